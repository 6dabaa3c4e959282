"""Models and options torch's optimizers accept: maximize, 0-d and empty parameters, mixed dtypes with
ref_dtype='float32', the float32 rounding stall, overflow, layers frozen mid-run, numpy numbers as
options. Each test guards against a bug a plain implementation has."""

from __future__ import annotations

import numpy as np
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
    assert opt_min.mechanic_scale > 1e-4  # the scale grew (it collapses if h ignores maximize)
    assert torch.equal(opt_min.mechanic_scale, opt_max.mechanic_scale)
    assert torch.equal(w_min, w_max)


def test_zero_dim_and_empty_parameters_train_beside_others():
    # float64: in float32 the first steps (S = 1e-6) round away, the stall a recomputed Delta has
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
    assert alone.item() != 2.0 and "mechanic_delta" in opt.state[logit_scale]
    assert opt.state[logit_scale]["mechanic_delta"].shape == ()
    assert "mechanic_delta" not in opt.state.get(empty.weight, {})
    opt.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("store_delta", [None, True])
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
        assert opt.state[p]["mechanic_delta"].dtype == (torch.float64 if p is extra else torch.float32)
        # x_ref is kept for the bfloat16 parameters alone (float32, as Delta)
        low = p.dtype == torch.bfloat16
        assert ("mechanic_x_ref" in opt.state[p]) == low
        assert not low or opt.state[p]["mechanic_x_ref"].dtype == torch.float32
        assert torch.isfinite(p).all()


# ------------------------------------------------------------------------------ rounding stall (item 2)
def _least_squares(Opt, steps, seed=0, **kwargs):
    """Unit-scale float32 weights: S * u starts far below half an ulp of every weight."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(10, 5, generator=gen))
    a, b = torch.randn(20, 10, generator=gen), torch.randn(20, 5, generator=gen)
    start = w.detach().clone()
    opt = Opt([w], **kwargs)
    scales, losses = [], []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((a @ w - b) ** 2).mean()
        loss.backward()
        opt.step()
        scales.append(opt.mechanic_scale.item())
        losses.append(loss.item())
    return w.detach(), start, scales, losses, opt


@pytest.mark.parametrize("Base", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("lr", [1e-3, 1e-6])
def test_default_float32_run_leaves_the_initial_scale(Base, lr):
    w, start, scales, losses, opt = _least_squares(mechanize(Base), 200, lr=lr)
    assert all("mechanic_delta" in s for s in opt.state.values())  # the default keeps Delta in float32
    # S left s_init = 1e-6 (with Delta recomputed it stays exactly 1e-6 forever)
    assert scales[-1] > 1e3 * 1e-6, scales[-1]
    assert not torch.equal(w, start)
    assert losses[-1] < 0.5 * losses[0]


def test_recomputed_delta_still_stalls_where_asked_for():
    """store_delta=False is the stall the default avoids (what the default's extra copy buys): the paper
    variant's first S, 1e-6, moves float32 weights of order 1 by less than half an ulp."""
    cls = mechanize(torch.optim.Adam, store_delta=False, lr_invariant=False)
    w, start, scales, _, _ = _least_squares(cls, 50, lr=1e-3)
    assert torch.equal(w, start) and max(scales) == pytest.approx(1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_parameters_keep_delta_alone(dtype):
    """One copy of the weights in Mechanic's state: Delta, no x_ref (float32 and float64 alike)."""
    w = torch.nn.Parameter(torch.randn(4, dtype=dtype))
    opt = mechanize(torch.optim.Adam)([w], lr=1e-3)
    w.grad = torch.randn(4, dtype=dtype)
    opt.step()
    assert set(opt.state[w]) == {"step", "exp_avg", "exp_avg_sq", "mechanic_delta"}
    assert opt.param_groups[0]["mechanic"]["store_delta"] is True


def _digits_like(gen):
    """A digits-style problem: 8x8 'images' of 10 noisy class prototypes."""
    prototypes = torch.rand(10, 64, generator=gen)
    labels = torch.randint(0, 10, (512,), generator=gen)
    images = (prototypes[labels] + 0.3 * torch.randn(512, 64, generator=gen)).clamp(0, 1)
    return images, labels


def test_digits_mlp_trains_at_base_lr_1e_6():
    gen = torch.Generator().manual_seed(0)
    images, labels = _digits_like(gen)

    def train(Opt):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        start = [p.detach().clone() for p in model.parameters()]
        opt = Opt(model.parameters(), lr=1e-6)
        losses = []
        for _ in range(300):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, all(not torch.equal(p, p0) for p, p0 in zip(model.parameters(), start))

    bare, _ = train(torch.optim.AdamW)
    losses, all_moved = train(mechanize(torch.optim.AdamW))
    assert bare[-1] > 0.99 * bare[0]  # the untuned lr barely moves the loss
    # with Delta recomputed from float32 weights, not one element moves in 20,000 steps
    assert all_moved
    assert losses[-1] < 0.7 * losses[0], (losses[0], losses[-1])


# ------------------------------------------------------------------------------------- overflow (item 6)
@pytest.mark.parametrize("Base", [torch.optim.SGD, torch.optim.Adam])
@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_huge_finite_gradients_stay_finite_like_the_base(Base, skip_nonfinite):
    """||g||^2 of 1e20 gradients overflows float32; the bare optimizer stays finite, so must we (the base
    steps at its lr times base_lr_factor, 8192 for SGD here: it stays finite there too)."""

    def run(Opt):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(8, 4))
        opt = Opt([w], lr=1e-3)
        for step in range(6):
            scale = 1e20 if step in (2, 3) else 1.0
            w.grad = scale * torch.randn(8, 4)
            opt.step()
        return w.detach(), opt

    bare, _ = run(Base)
    w, opt = run(mechanize(Base, skip_nonfinite=skip_nonfinite))
    assert torch.isfinite(bare).all()
    assert torch.isfinite(w).all()
    assert torch.isfinite(opt.mechanic_scale)
    assert opt.mechanic_skipped_steps == 0  # finite gradients are not skipped


def test_nonfinite_gradients_are_still_skipped():
    w = torch.nn.Parameter(torch.randn(4))
    opt = mechanize(torch.optim.SGD, skip_nonfinite=True)([w], lr=0.1)
    w.grad = torch.tensor([1.0, float("inf"), 0.0, 1.0])
    before = w.detach().clone()
    opt.step()
    assert opt.mechanic_skipped_steps == 1 and torch.equal(w, before)


# ---------------------------------------------------------------------------- frozen mid-run (item 10)
def test_layer_frozen_mid_run_stays_where_the_base_leaves_it():
    """requires_grad_(False) with zero_grad(set_to_none=False): its zero gradient stays, and with plain
    SGD (which does not move it) it must not move as S changes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1))
    opt = mechanize(torch.optim.SGD)(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    for step in range(40):
        if step == 10:
            model[0].requires_grad_(False)
            frozen = [p.detach().clone() for p in model[0].parameters()]
            scale_at_freeze = opt.mechanic_scale.clone()
        opt.zero_grad(set_to_none=False)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    assert not torch.equal(opt.mechanic_scale, scale_at_freeze)  # S kept changing
    for p, p0 in zip(model[0].parameters(), frozen):
        assert torch.equal(p.detach(), p0)


@pytest.mark.parametrize("value", [np.float32(0.01), np.float64(0.01), np.int64(0), 0.01, 0])
def test_numpy_and_python_real_numbers_are_accepted(value):
    cls = mechanize(torch.optim.SGD, s_decay=value, s_init=np.float32(1e-6), eps=np.float64(1e-8))
    assert cls._mechanic_spec.config.s_decay == float(value)
    assert type(cls._mechanic_spec.config.s_decay) is float
    assert mechanize(torch.optim.SGD, log_every=np.int64(3))._mechanic_spec.config.log_every == 3
    assert mechanize(torch.optim.SGD, betas=np.array([0.9, 0.99, 0.999]))._mechanic_spec.config.betas == (
        0.9,
        0.99,
        0.999,
    )
