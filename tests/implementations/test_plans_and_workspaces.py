"""The step's kept structures (issue 10): the per-group workspace is reused from step to step, and the
cached layout gives exactly what re-making it every step gives, also when the set of parameters with a
gradient changes and when a group is added mid-run."""

from __future__ import annotations

import pytest
import torch

from mechanic_fast import mechanize


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
