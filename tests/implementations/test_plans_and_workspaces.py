"""The step's kept structures: each group's plan and workspace are reused from step to step, kept plans
give exactly what re-making them every step gives (also when the set of parameters with a gradient
changes, a group is added mid-run, a 0-d parameter's data is replaced or a dtype is added), and a plan
is decided once, not per step."""

from __future__ import annotations

import pytest
import torch

from mechanic_fast import mechanize
from mechanic_fast._plan import LayoutKind


def _run(fresh_layout_every_step: bool, store_delta):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(8, 4), (4,), (), (5, 3)]]
    late = torch.nn.Parameter(torch.randn(6, generator=gen))
    opt = mechanize(torch.optim.AdamW, store_delta=store_delta)(params[:3], lr=1e-2)
    opt.add_param_group({"params": [params[3]], "maximize": True})
    for step in range(12):
        if step == 6:
            opt.add_param_group({"params": [late], "lr": 3e-2})
        for i, p in enumerate([*params, late]):
            # parameter 1 has no gradient on every third step: the layout must follow
            p.grad = None if (i == 1 and step % 3 == 0) else torch.randn(p.shape, generator=gen)
        if fresh_layout_every_step:
            opt._mechanic_planner.cached = None
        opt.step()
    return [p.detach().clone() for p in [*params, late]], opt


@pytest.mark.parametrize("store_delta", [None, False])
def test_cached_layout_equals_a_fresh_one_every_step(store_delta):
    cached, opt = _run(False, store_delta)
    fresh, fresh_opt = _run(True, store_delta)
    assert all(torch.equal(a, b) for a, b in zip(cached, fresh))
    assert torch.equal(opt.mechanic_scale, fresh_opt.mechanic_scale)


def test_workspace_is_reused_across_steps():
    params = [torch.nn.Parameter(torch.randn(16, 16)) for _ in range(5)]
    opt = mechanize(torch.optim.SGD)(params, lr=0.1, momentum=0.9)
    addresses = []
    for _ in range(5):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        (group,) = opt._mechanic_planner.cached[1]
        addresses.append({k: b.data_ptr() for k, b in group.workspace.buffers.items()})
    assert addresses[0] and all(a == addresses[0] for a in addresses)
    # one weight-sized buffer: the gradients gathered for their sums, then x_t
    assert group.workspace.nbytes() == sum(p.numel() * 4 for p in params)


@pytest.mark.parametrize("keep", [False, None])
def test_no_workspace_is_kept_unless_asked_for_or_on_cpu(keep):
    """keep_workspace=False (the default on accelerators) keeps nothing between steps, and gives the
    result of a kept one."""
    results = []
    for option in (keep, True):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(16, 16, generator=gen)) for _ in range(5)]
        opt = mechanize(torch.optim.SGD, keep_workspace=option)(params, lr=0.1, momentum=0.9)
        for _ in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        (group,) = opt._mechanic_planner.cached[1]
        assert (group.workspace is None) == (option is False)
        results.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("store_delta", [None, False])
def test_few_large_tensors_keep_only_the_x_t_copy(monkeypatch, store_delta):
    """Gradients reduced in place (few large tensors): the workspace holds x_t alone; the result equals
    the gathered layout's."""
    from mechanic_fast import functional

    results = []
    for threshold in (functional.PER_TENSOR_MIN_NUMEL, 1):
        monkeypatch.setattr(functional, "PER_TENSOR_MIN_NUMEL", threshold)
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(16, 16), (9,), (3, 5)]]
        opt = mechanize(torch.optim.AdamW, store_delta=store_delta)(params, lr=1e-2)
        for _ in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        results.append([p.detach().clone() for p in params])
    numel = sum(p.numel() for p in params)
    (group,) = opt._mechanic_planner.cached[1]
    assert group.workspace.nbytes() == numel * 4
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_0d_parameter_whose_data_is_replaced_between_steps_stays_tuned():
    """CLIP clamps its logit scale with `s.data = torch.clamp(s.data, 0, 4.6)`: the step must move the
    new storage by S times the base step, not leave the full base step in it."""
    scale = torch.nn.Parameter(torch.tensor(2.0))
    w = torch.nn.Parameter(torch.randn(4))
    opt = mechanize(torch.optim.AdamW)([scale, w], lr=0.1)
    for _ in range(4):
        opt.zero_grad()
        (scale * w.sum()).backward()
        before = scale.detach().clone()
        opt.step()
        moved = (scale.detach() - before).abs().item()
        # S is ~1e-6 here: the base step is 0.1, Mechanic's a millionth of it
        assert moved < 1e-4, moved
        scale.data = torch.clamp(scale.data, 0, 4.6)


@pytest.mark.parametrize("late_dtype", [torch.float32, torch.bfloat16])
def test_parameters_added_in_another_dtype_than_the_first_are_tuned(late_dtype):
    """An optimizer first built over float64 parameters: float32 or bfloat16 ones added later, the only
    ones training, move with the scale (before, the float64 layout without Delta was applied to them:
    x - x_ref rounded to 0 while S was small, and S stayed at 1e-6)."""
    first = torch.nn.Parameter(torch.randn(8, dtype=torch.float64))
    # float32 at 10 (ulp 1e-6: x_ref + 1e-6 * Delta rounds to x_ref); bfloat16 near 0, where the base's
    # own steps are not lost to its resolution
    late = torch.nn.Parameter(((10 if late_dtype == torch.float32 else 0) + torch.randn(64)).to(late_dtype))
    opt = mechanize(torch.optim.AdamW)([first], lr=1e-2)
    opt.add_param_group({"params": [late]})
    start = late.detach().clone()
    for _ in range(200):
        late.grad = (late.detach().float() - 3).to(late.dtype)  # a pull towards 3; none for `first`
        opt.step()
    assert opt.mechanic_scale > 1e-2
    assert (late.detach().float() - start.float()).abs().mean() > 0.1


def test_a_plan_is_decided_once_not_per_step(monkeypatch):
    """The implementation of each group is picked when its plan is made (`select_impl`), and a step with
    the same parameters as the last reuses the plans; a parameter that joins makes them anew."""
    from mechanic_fast import _layout

    picks = []
    original = _layout.select_impl
    monkeypatch.setattr(_layout, "select_impl", lambda *a, **k: picks.append(1) or original(*a, **k))
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5, dtype=torch.float64))]
    late = torch.nn.Parameter(torch.randn(2))
    opt = mechanize(torch.optim.AdamW)(params, lr=1e-2)
    for step in range(6):
        if step == 3:
            opt.add_param_group({"params": [late]})
        for p in [*params, late]:
            p.grad = torch.randn_like(p)
        opt.step()
        plans = opt._mechanic_planner.cached[1]
        assert {(plan.kind, plan.acc_dtype) for plan in plans} == {(LayoutKind.DELTA, torch.float64)}
    assert len(picks) == 4  # two groups (float32, float64) at the first step, two again when `late` joins
