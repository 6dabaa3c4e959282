"""log_func / log_every as in mechanic-pytorch, and the variants' s_init defaults."""

from __future__ import annotations

import logging

import pytest
import torch

from mechanic_fast import MechanicConfig, mechanize


def _train(opt, params, steps):
    for _ in range(steps):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()


def test_log_func_every_log_every_steps():
    params = [torch.nn.Parameter(torch.zeros(3))]
    seen = []
    opt = mechanize(torch.optim.SGD, log_func=seen.append, log_every=3)(params, lr=0.1)
    _train(opt, params, 10)
    assert [d["iter_count"] for d in seen] == [3, 6, 9]
    assert all(isinstance(d["iter_count"], int) and isinstance(d["s"], float) for d in seen)
    assert seen[-1]["s"] > seen[0]["s"] > 0


def test_default_log_func_uses_logging(caplog):
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = mechanize(torch.optim.SGD, log_every=2)(params, lr=0.1)
    with caplog.at_level(logging.INFO, logger="mechanic_fast"):
        _train(opt, params, 4)
    messages = [r.getMessage() for r in caplog.records if r.name == "mechanic_fast"]
    assert len(messages) == 2 and "iter=4" in messages[-1] and "s_sum" in messages[-1]


def test_no_logging_by_default(caplog):
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = mechanize(torch.optim.SGD)(params, lr=0.1)
    with caplog.at_level(logging.DEBUG, logger="mechanic_fast"):
        _train(opt, params, 3)
    assert not [r for r in caplog.records if r.name == "mechanic_fast"]


def test_iteration_count_survives_a_checkpoint():
    params = [torch.nn.Parameter(torch.zeros(3))]
    seen = []
    opt = mechanize(torch.optim.SGD, log_func=seen.append, log_every=2)(params, lr=0.1)
    _train(opt, params, 3)
    fresh = mechanize(torch.optim.SGD, log_func=seen.append, log_every=2)(params, lr=0.1)
    fresh.load_state_dict(opt.state_dict())
    _train(fresh, params, 1)
    assert [d["iter_count"] for d in seen] == [2, 4]


def test_s_init_defaults_per_variant():
    assert MechanicConfig().resolved(False).s_init == 1e-6
    assert MechanicConfig(variant="mechanic_pytorch").resolved(False).s_init == 1e-8
    assert MechanicConfig(s_init=3e-7, variant="mechanic_pytorch").resolved(False).s_init == 3e-7
    params = [torch.nn.Parameter(torch.zeros(3))]
    paper = mechanize(torch.optim.SGD, lr_invariant=False)(params, lr=0.1)
    assert paper.mechanic_scale.item() == pytest.approx(6e-6)
    # the lr-invariant default: 4 tuners at 1e-2 of SGD's usual lr (1e-3), in units of the reference lr 0.1
    assert mechanize(torch.optim.SGD)(params, lr=0.1).mechanic_scale.item() == pytest.approx(4e-2)
    assert mechanize(torch.optim.SGD, variant="mechanic_pytorch")(params, lr=0.1).mechanic_scale.item() == 0.0


def test_log_numbering_continues_from_a_checkpoint_saved_without_logging():
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = mechanize(torch.optim.SGD)(params, lr=0.1)
    _train(opt, params, 5)
    seen = []
    fresh = mechanize(torch.optim.SGD, log_func=seen.append, log_every=1)(params, lr=0.1)
    fresh.load_state_dict(opt.state_dict())
    _train(fresh, params, 1)
    assert [d["iter_count"] for d in seen] == [6]


@pytest.mark.parametrize(
    "options,before,after",
    [
        ({}, 4e-2, 1e-2),  # the default (4 tuners) at Adam's usual lr: a first effective lr of 1e-5
        ({"lr_invariant": False}, 6e-6, 1e-6),
        ({"variant": "mechanic_pytorch"}, 0.0, sum(1 - 10.0**-i for i in range(1, 7)) * 1e-6 / 6),
    ],
    ids=["default", "paper", "mechanic_pytorch"],
)
def test_scale_before_and_after_the_first_step_is_what_the_docs_say(options, before, after):
    w = torch.nn.Parameter(torch.randn(5))
    opt = mechanize(torch.optim.Adam, **options)([w], lr=1e-3)
    assert opt.mechanic_scale.item() == pytest.approx(before, rel=1e-6)
    w.grad = torch.randn(5)
    opt.step()
    assert opt.mechanic_scale.item() == pytest.approx(after, rel=1e-5)
