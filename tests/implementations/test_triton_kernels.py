"""The Triton backend, run by Triton's interpreter on CPU (TRITON_INTERPRET=1), against float64 sums and
against the foreach backend over whole trajectories."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
from mechanic_fast import _foreach, _triton, functional, mechanize  # noqa: E402

# Without a GPU, conftest.py turns on Triton's interpreter (before triton.jit decorates the kernels).

SHAPES = [(1,), (7,), (1000,), (4099,), (37, 53)]
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton needs CUDA or its interpreter",
)


def _lists(dtype, gen):
    return [[torch.randn(s, generator=gen).to(dtype) for s in SHAPES] for _ in range(3)]


def _float64_sums(d, d_ref, g, x):
    dd = [a.double() - (b.double() if d_ref is not None else 0) for a, b in zip(d, d_ref or d)]
    dot = lambda u, v: sum((a * b.double()).sum() for a, b in zip(u, v))  # noqa: E731
    return torch.stack(
        [
            dot(dd, g) if g is not None else torch.tensor(0.0, dtype=torch.float64),
            dot(dd, x) if x is not None else torch.tensor(0.0, dtype=torch.float64),
            dot([t.double() for t in g], g) if g is not None else torch.tensor(0.0, dtype=torch.float64),
            dot([t.double() for t in x], x) if x is not None else torch.tensor(0.0, dtype=torch.float64),
        ]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "with_ref,with_g,x_sums", [(True, True, True), (True, False, True), (False, True, False)]
)
def test_inner_products_match_float64(dtype, with_ref, with_g, x_sums, seed):
    gen = torch.Generator().manual_seed(seed)
    x, ref, g = _lists(dtype, gen)
    d_ref = ref if with_ref else None
    grads = g if with_g else None
    sums, copy = _triton.inner_products(
        x, d_ref, grads, x, acc_dtype=torch.float32, x_sums=x_sums, copy_x=True
    )
    expected = _float64_sums(x, d_ref, grads, x if x_sums else None)
    assert sums.dtype == torch.float32
    # float32 accumulation of exact products: relative to the sum of magnitudes
    magnitude = _float64_sums([t.abs() for t in x], None, [t.abs() for t in g], [t.abs() for t in x]).abs()
    assert ((sums.double() - expected).abs() <= 1e-5 * magnitude.max() + 1e-6).all(), (seed, sums, expected)
    views = torch.split(copy.flat, copy.numels)
    assert all(torch.equal(v.view_as(t), t) for v, t in zip(views, x))


def test_float64_inputs_accumulate_in_float64(seed):
    gen = torch.Generator().manual_seed(seed)
    x, ref, g = _lists(torch.float64, gen)
    sums, _ = _triton.inner_products(x, ref, g, x, acc_dtype=torch.float64)
    torch.testing.assert_close(sums, _float64_sums(x, ref, g, x), rtol=1e-12, atol=1e-12)


def test_deterministic_bits(seed):
    gen = torch.Generator().manual_seed(seed)
    x, ref, g = _lists(torch.float32, gen)
    first, _ = _triton.inner_products(x, ref, g, x, acc_dtype=torch.float32)
    for _ in range(3):
        again, _ = _triton.inner_products(x, ref, g, x, acc_dtype=torch.float32)
        assert torch.equal(first, again)


@pytest.mark.parametrize("dtype,ref_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("stored", [False, True])
def test_apply_update_matches_float64_and_foreach(dtype, ref_dtype, stored, seed):
    gen = torch.Generator().manual_seed(seed)
    x, x_t, ref = _lists(dtype, gen)
    ref = [t.to(ref_dtype) for t in ref]
    delta = [torch.randn(s, generator=gen).to(ref_dtype) for s in SHAPES] if stored else None
    scale, scale_old, denom = torch.tensor(0.37), torch.tensor(0.29), torch.tensor(0.21)
    ours = [t.clone() for t in x]
    ours_delta = [t.clone() for t in delta] if stored else None
    _, copy = _triton.inner_products(x_t, None, None, x_t, acc_dtype=torch.float32, x_sums=False, copy_x=True)
    _triton.apply_update(ours, copy, ref, ours_delta, scale, scale_old, denom)
    # float64 math of the spec, rounded once to the parameters' dtype
    for i, (a, xb, xt, r) in enumerate(zip(ours, x, x_t, ref)):
        u = xb.double() - xt.double()
        step_delta = delta[i].double() + u if stored else (xt.double() - r.double()) / 0.21 + u
        exact = r.double() + 0.37 * step_delta
        # one bfloat16 ulp: Triton 3.9's interpreter truncates float32 -> bfloat16 even when asked to
        # round to nearest (as the kernel does, and as GPUs do), so allow a whole ulp, not half
        ulp = 1e-6 if dtype == torch.float32 else 2.0**-7
        assert ((a.double() - exact).abs() <= ulp * exact.abs() + 1e-6).all(), seed
        if stored:
            torch.testing.assert_close(ours_delta[i].double(), step_delta, rtol=1e-6, atol=1e-6)
    if dtype == torch.float32:  # and the foreach implementation, which rounds at every op
        theirs = [t.clone() for t in x]
        _foreach.apply_update(theirs, [t.clone() for t in x_t], ref, delta, scale, scale_old, denom)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["paper", "mechanic_pytorch"])
def test_trajectory_matches_foreach(dtype, variant):
    def run(backend):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
        targets = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
        opt = mechanize(
            torch.optim.AdamW,
            backend=backend,
            variant=variant,
            store_delta=dtype != torch.float32,
            lr_invariant=False if variant == "paper" else None,
        )(params, lr=1e-2)
        for _ in range(20):
            for p, t in zip(params, targets):
                p.grad = p.detach() - t
            opt.step()
        return params, opt

    (ours, ours_opt), (ref, ref_opt) = run("triton"), run("foreach")
    assert ref_opt.mechanic_scale > 1e-4
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=0.05, atol=0.02)
    torch.testing.assert_close(ours_opt.mechanic_scale, ref_opt.mechanic_scale, rtol=tol["rtol"], atol=0)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **tol)


def test_non_contiguous_tensors_take_the_foreach_path(seed):
    gen = torch.Generator().manual_seed(seed)
    x = [torch.randn(8, 6, generator=gen).t(), torch.randn(5, generator=gen)]
    params = [torch.nn.Parameter(t) for t in x]
    assert not _triton.contiguous(x)
    assert functional.select_impl("triton", x) is functional.FOREACH
    opt = mechanize(torch.optim.SGD, backend="triton")(params, lr=0.1)
    ref = mechanize(torch.optim.SGD, backend="foreach")([torch.nn.Parameter(t.clone()) for t in x], lr=0.1)
    for _ in range(3):
        for a, b in zip(params, ref.param_groups[0]["params"]):
            a.grad = torch.ones_like(a)
            b.grad = torch.ones_like(b)
        opt.step()
        ref.step()
    for a, b in zip(params, ref.param_groups[0]["params"]):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_picks_triton_on_cuda_and_matches_foreach():
    assert functional.select_impl("auto", [torch.ones(3, device="cuda")]).name == "triton"
    gen = torch.Generator().manual_seed(0)
    x, ref, g = [[t.cuda() for t in lst] for lst in _lists(torch.float32, gen)]
    a, _ = _triton.inner_products(x, ref, g, x, acc_dtype=torch.float32)
    b, _ = _foreach.inner_products(x, ref, g, x, acc_dtype=torch.float32)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
