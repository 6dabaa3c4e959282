"""Mechanic's betas left at None: the mode's (the paper's six for the paper variant and mechanic_pytorch,
the four slow ones in the lr-invariant default), and a checkpoint's when one is loaded, so that a
checkpoint made with other betas (the six of earlier versions' default) resumes exactly."""

from __future__ import annotations

import pytest
import torch
from helpers import BETAS, make_problem

from mechanic_fast import mechanize

SLOW = (0.999, 0.9999, 0.99999, 0.999999)


def _tuner(opt):
    return opt.param_groups[0]["mechanic"]


def _steps(problem, x, opt, start, count):
    for t in range(start, start + count):
        problem.grad_step(x, t)
        opt.step()


@pytest.mark.parametrize(
    "options, betas",
    [({}, SLOW), ({"lr_invariant": False}, BETAS), ({"variant": "mechanic_pytorch"}, BETAS)],
    ids=["default", "paper", "mechanic_pytorch"],
)
def test_each_mode_has_its_betas(options, betas, seed):
    problem = make_problem()
    x = problem.params()
    opt = mechanize(torch.optim.AdamW, **options)(x, lr=1e-3)
    _steps(problem, x, opt, 0, 2)
    assert _tuner(opt)["betas"] == betas and _tuner(opt)["s"].shape == (len(betas),)


@pytest.mark.parametrize("mode", [{}, {"lr_invariant": False}], ids=["default", "paper"])
def test_a_checkpoint_with_other_betas_resumes_exactly(mode, seed):
    """Made with the six betas (in the lr-invariant mode: earlier versions' default), loaded into an
    optimizer whose betas are left at None: the six are kept, and the run is the uninterrupted one's,
    bit for bit."""
    problem = make_problem()
    x = problem.params()
    straight = mechanize(torch.optim.AdamW, betas=BETAS, **mode)(x, lr=1e-3, weight_decay=0.01)
    _steps(problem, x, straight, 0, 6)
    expected = [p.detach().clone() for p in x]

    y = problem.params()
    first = mechanize(torch.optim.AdamW, betas=BETAS, **mode)(y, lr=1e-3, weight_decay=0.01)
    _steps(problem, y, first, 0, 3)
    resumed = mechanize(torch.optim.AdamW, **mode)(y, lr=1e-3, weight_decay=0.01)
    resumed.load_state_dict(first.state_dict())
    _steps(problem, y, resumed, 3, 3)
    assert _tuner(resumed)["betas"] == BETAS
    assert resumed.state_dict()["param_groups"][0]["mechanic"]["betas"] == BETAS
    assert torch.equal(_tuner(resumed)["s"], _tuner(straight)["s"]), seed
    assert all(torch.equal(a, b) for a, b in zip(y, expected)), seed


def test_given_betas_must_match_and_bad_saved_betas_are_refused(seed):
    problem = make_problem()
    x = problem.params()
    saved = mechanize(torch.optim.AdamW)(x, lr=1e-3)
    _steps(problem, x, saved, 0, 2)
    sd = saved.state_dict()
    given = mechanize(torch.optim.AdamW, betas=BETAS)(x, lr=1e-3)
    with pytest.raises(ValueError, match=r"betas=\(0\.999, .*this optimizer has \(0\.9, 0\.99"):
        given.load_state_dict(sd)
    assert _tuner(given)["betas"] == BETAS  # made with the optimizer, and kept by the refusal
    left = mechanize(torch.optim.AdamW)(x, lr=1e-3)
    _steps(problem, x, left, 0, 1)
    before = {k: v.clone() for k, v in _tuner(left).items() if torch.is_tensor(v)}
    for bad, message in [(None, "sequence"), ((1.5,), r"\(0, 1\)"), ((), "empty"), ("0.9", "sequence")]:
        sd["param_groups"][0]["mechanic"]["betas"] = bad
        with pytest.raises(ValueError, match=f"checkpoint's Mechanic betas are not valid: .*{message}"):
            left.load_state_dict(sd)
        assert _tuner(left)["betas"] == SLOW
        assert all(torch.equal(v, _tuner(left)[k]) for k, v in before.items())
