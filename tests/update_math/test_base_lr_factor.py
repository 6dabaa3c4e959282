"""The base's step at its lr times a power of two (`_state.base_lr_factor`), in the lr-invariant default,
for bases whose update is proportional to their lr: which factor, what the base and the user see, that
it changes nothing but rounding, and that checkpoints without it resume as they were made."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import assert_same_snapshot, flatten, make_problem, max_rel, random_grad_steps, run

from mechanic_fast import _state, mechanize

USUAL = {torch.optim.AdamW: 1e-3, torch.optim.SGD: 0.1}


def _factor(opt):
    return opt.param_groups[0]["mechanic"].get("base_lr_factor")


@pytest.mark.parametrize("Base", [torch.optim.AdamW, torch.optim.SGD])
@pytest.mark.parametrize("lr", [1e-6, 1e-4, 3e-3, 0.05, 10.0])
def test_the_factor_brings_the_lr_near_64_usual_lrs_and_never_lowers_it(Base, lr):
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = mechanize(Base)(params, lr=lr)
    random_grad_steps(opt, params, 1)
    expected = max(1.0, 2.0 ** round(math.log2(64 * USUAL[Base] / lr)))
    assert _factor(opt) == expected
    assert opt.param_groups[0]["lr"] == lr


@pytest.mark.parametrize("lr", [1e-5, 1e-3, 0.1])
def test_float16_weights_step_the_base_at_most_at_its_usual_lr(lr):
    """float16's range (65504): the base's x_base stays within a step at the base's usual lr."""
    params = [torch.nn.Parameter(torch.randn(3, dtype=torch.float16)), torch.nn.Parameter(torch.randn(2))]
    opt = mechanize(torch.optim.AdamW)(params, lr=lr)
    random_grad_steps(opt, params, 1)
    assert _factor(opt) == max(1.0, 2.0 ** round(math.log2(1e-3 / lr)))


@pytest.mark.parametrize(
    "Base, options",
    [
        (torch.optim.Adagrad, {}),  # lr_decay divides by the lr
        (torch.optim.Rprop, {}),
        (torch.optim.ASGD, {}),
        (torch.optim.AdamW, {"lr_invariant": False}),
        (torch.optim.AdamW, {"variant": "mechanic_pytorch"}),
    ],
)
def test_other_bases_and_modes_step_at_the_given_lr(Base, options):
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = mechanize(Base, **options)(params, lr=1e-4)
    random_grad_steps(opt, params, 2)
    assert _factor(opt) in (None, 1.0)


class _RecordingAdamW(torch.optim.AdamW):
    """AdamW that records the lrs its step sees, and can fail."""

    seen: list = []
    fail = False

    def step(self, closure=None):
        _RecordingAdamW.seen.append([group["lr"] for group in self.param_groups])
        if _RecordingAdamW.fail:
            raise RuntimeError("the base failed")
        return super().step(closure)


def test_the_base_sees_its_lrs_times_the_factor(monkeypatch):
    monkeypatch.setattr(_RecordingAdamW, "seen", [])
    lr_tensor = torch.tensor(2e-4)
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(2))
    opt = mechanize(_RecordingAdamW)(
        [{"params": [a]}, {"params": [b], "lr": lr_tensor}], lr=1e-4, weight_decay=0.0
    )
    random_grad_steps(opt, [a, b], 3)
    factor = _factor(opt)
    assert factor == 2.0 ** round(math.log2(64 * 1e-3 / 1e-4))
    for lrs in _RecordingAdamW.seen:
        assert lrs[0] == 1e-4 * factor
        assert torch.equal(lrs[1], lr_tensor * factor)
    assert opt.param_groups[0]["lr"] == 1e-4
    assert opt.param_groups[1]["lr"] is lr_tensor and lr_tensor.item() == pytest.approx(2e-4)


def test_step_hooks_see_the_lrs_the_user_set():
    lr_tensor = torch.tensor(2e-4)
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(2))
    opt = mechanize(torch.optim.AdamW)([{"params": [a]}, {"params": [b], "lr": lr_tensor}], lr=1e-4)
    hooked = []
    opt.register_step_pre_hook(lambda o, *_: hooked.append([g["lr"] for g in o.param_groups]))
    opt.register_step_post_hook(lambda o, *_: hooked.append([g["lr"] for g in o.param_groups]))
    random_grad_steps(opt, [a, b], 3)
    assert _factor(opt) > 1 and len(hooked) == 6
    assert all(lrs[0] == 1e-4 and lrs[1] is lr_tensor for lrs in hooked), hooked


def test_the_lrs_are_put_back_when_the_base_step_raises(monkeypatch):
    monkeypatch.setattr(_RecordingAdamW, "seen", [])
    params = [torch.nn.Parameter(torch.randn(4))]
    opt = mechanize(_RecordingAdamW)(params, lr=1e-4)
    random_grad_steps(opt, params, 2)
    monkeypatch.setattr(_RecordingAdamW, "fail", True)
    with pytest.raises(RuntimeError, match="the base failed"):
        random_grad_steps(opt, params, 1)
    assert opt.param_groups[0]["lr"] == 1e-4
    assert _RecordingAdamW.seen[-1][0] == 1e-4 * _factor(opt)


@pytest.mark.parametrize(
    "Base, kwargs", [(torch.optim.AdamW, {"weight_decay": 0.01}), (torch.optim.SGD, {"momentum": 0.9})]
)
def test_in_float64_the_factor_changes_nothing_but_rounding(Base, kwargs, monkeypatch, seed):
    """The same run with the base at its given lr (factor 1): the factor is a power of two and cancels."""
    problem = make_problem()
    scaled, opt = run(lambda ps: mechanize(Base)(ps, lr=1e-5, **kwargs), problem, 40)
    assert _factor(opt) > 1000
    monkeypatch.setattr(_state, "base_lr_factor", lambda *args: 1.0)
    plain, _ = run(lambda ps: mechanize(Base)(ps, lr=1e-5, **kwargs), problem, 40)
    for a, b in zip(scaled, plain):
        assert max_rel(a.detach(), b.detach()) < 1e-9, seed


def test_a_checkpoint_made_without_the_factor_resumes_with_factor_1_exactly(monkeypatch):
    """Checkpoints of earlier versions: their Delta is the sum of the base's updates at its given lrs."""
    problem = make_problem(torch.float32)
    monkeypatch.setattr(_state, "base_lr_factor", lambda *args: 1.0)
    x, opt = run(lambda ps: mechanize(torch.optim.AdamW)(ps, lr=1e-5), problem, 6)
    saved = copy.deepcopy(opt.state_dict())
    del saved["param_groups"][0]["mechanic"]["base_lr_factor"]
    resumed_x = [torch.nn.Parameter(p.detach().clone()) for p in x]
    random_grad_steps(opt, x, 5, seed=3)  # the earlier version's run, on
    monkeypatch.undo()
    resumed = mechanize(torch.optim.AdamW)(resumed_x, lr=1e-5)
    resumed.load_state_dict(saved)
    random_grad_steps(resumed, resumed_x, 5, seed=3)
    assert "base_lr_factor" not in resumed.param_groups[0]["mechanic"]
    for a, b in zip(resumed_x, x):
        assert torch.equal(a, b)
    mine, theirs = flatten(resumed.state_dict()), flatten(opt.state_dict())
    theirs = {k: v for k, v in theirs.items() if "base_lr_factor" not in k}
    assert_same_snapshot(mine, theirs)


@pytest.mark.slow
def test_a_compiled_step_leaves_the_groups_as_the_user_set_them():
    """torch.compile traces every optimizer group as capturable=True and writes back a group the traced
    code writes to: the groups keep their own keys and values (SGD has no capturable)."""
    problem = make_problem(torch.float32)
    eager, eager_opt = run(lambda ps: mechanize(torch.optim.SGD)(ps, lr=1e-3, momentum=0.9), problem, 8)
    params = problem.params()
    opt = mechanize(torch.optim.SGD)(params, lr=1e-3, momentum=0.9)
    before = dict(opt.param_groups[0])
    step = torch.compile(opt.step)
    for t in range(8):
        problem.grad_step(params, t)
        step()
    group = opt.param_groups[0]
    assert _factor(opt) > 1 and set(group) == set(before)
    assert all(group[k] == v for k, v in before.items() if k not in ("params", "mechanic"))
    torch.testing.assert_close(opt.mechanic_scale, eager_opt.mechanic_scale, rtol=1e-4, atol=0)
    for a, b in zip(params, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
