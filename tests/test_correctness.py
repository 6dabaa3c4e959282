"""Models and options torch's optimizers accept (issue 9): maximize, 0-d and empty parameters, mixed
dtypes with ref_dtype='float32', eps=0, differentiable=True. Each test failed on round 1's main."""

from __future__ import annotations

import pytest
import torch

from mechanic_fast import mechanize


def _quadratic_run(Opt, maximize, steps=40, **kwargs):
    gen = torch.Generator().manual_seed(3)
    w = torch.nn.Parameter(torch.randn(10, 5, generator=gen))
    target = torch.randn(10, 5, generator=gen)
    opt = Opt([w], maximize=maximize, **kwargs)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((w - target) ** 2).sum()
        (-loss if maximize else loss).backward()
        opt.step()
    return w.detach(), opt


@pytest.mark.parametrize("Base", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop])
def test_maximize_of_minus_f_equals_minimizing_f(Base):
    Opt = mechanize(Base)
    w_min, opt_min = _quadratic_run(Opt, False, lr=1e-2)
    w_max, opt_max = _quadratic_run(Opt, True, lr=1e-2)
    assert opt_min.mechanic_scale > 1e-4  # the scale grew (round 1: it collapsed under maximize)
    assert torch.equal(opt_min.mechanic_scale, opt_max.mechanic_scale)
    assert torch.equal(w_min, w_max)


def test_zero_dim_and_empty_parameters_train_beside_others():
    # float64: in float32 the first steps (S = 1e-6) round away, the stall of issue 9 item 2
    logit_scale = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    empty = torch.nn.Linear(4, 0).double()
    w = torch.nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    opt = mechanize(torch.optim.AdamW)([logit_scale, w, *empty.parameters()], lr=1e-2)
    alone = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    opt_alone = mechanize(torch.optim.AdamW)([alone], lr=1e-2)
    x = torch.randn(16, 4, dtype=torch.float64)
    for _ in range(30):
        opt.zero_grad()
        loss = (logit_scale * (x @ w.t())).square().mean() + empty(x).sum() + (logit_scale - 1) ** 2
        loss.backward()
        opt.step()
        opt_alone.zero_grad()
        ((alone - 1) ** 2).backward()
        opt_alone.step()
    assert torch.isfinite(logit_scale) and logit_scale.item() != 2.0
    assert alone.item() != 2.0 and "mechanic_x_ref" in opt.state[logit_scale]
    assert opt.state[logit_scale]["mechanic_x_ref"].shape == ()
    assert "mechanic_x_ref" not in opt.state.get(empty.weight, {})
    opt.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("store_delta", [False, True])
def test_mixed_dtypes_with_float32_references(store_delta):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 1))
    model[0].bfloat16()
    opt = mechanize(torch.optim.AdamW, ref_dtype="float32", store_delta=store_delta)(
        model.parameters(), lr=1e-2
    )
    extra = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    opt.add_param_group({"params": [extra]})
    for _ in range(5):
        opt.zero_grad()
        x = torch.randn(4, 8)
        (model[1](model[0](x.bfloat16()).float()).square().mean() + extra.square().sum()).backward()
        opt.step()
    for p in [*model.parameters(), extra]:
        assert opt.state[p]["mechanic_x_ref"].dtype == (torch.float64 if p is extra else torch.float32)
        assert torch.isfinite(p).all()


def test_eps_zero_is_refused():
    with pytest.raises(ValueError, match="eps"):
        mechanize(torch.optim.SGD, eps=0.0)


def test_differentiable_is_refused_at_construction():
    w = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="differentiable"):
        mechanize(torch.optim.SGD)([w], lr=0.1, differentiable=True)
