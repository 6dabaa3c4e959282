"""The O(d) implementations against float64 math and against each other: `_foreach` (flat buffers, eager;
with its kept workspace and without), `_pertensor` (what torch.compile traces; run eagerly here, and
compiled in test_compile.py) and the custom op `mechanic_fast::inner_products` (what torch.compile calls
for the sums of many small tensors on CPU; called eagerly here). Fresh random inputs per seed; a tiled
and a scattered Delta; a parameter that is a non-contiguous view."""

from __future__ import annotations

import pytest
import torch

from mechanic_fast import _foreach, _opaque, _pertensor

SHAPES = [(1,), (7,), (33, 5), (300,)]


class _CustomOp:
    """The sums through the custom op (its update is `_pertensor`'s: traced code calls it only for sums)."""

    @staticmethod
    def inner_products(d, d_ref, g, x, *, acc_dtype, x_sums=True, copy_x=False, workspace=None):
        sums = _opaque.inner_products(d, d_ref, g, x, acc_dtype=acc_dtype, x_sums=x_sums)
        return sums, [t.clone() for t in x] if copy_x and x is not None else None

    apply_update = staticmethod(_pertensor.apply_update)


def _impls():
    """name -> (module, workspace factory, PER_TENSOR_MIN_NUMEL): `_foreach` with few large tensors is
    emulated by a threshold of 1 element (gradients reduced in place, x written tensor by tensor)."""
    many_small = _foreach.PER_TENSOR_MIN_NUMEL
    return {
        "foreach": (_foreach, lambda: None, many_small),
        "foreach_workspace": (_foreach, _foreach.Workspace, many_small),
        "foreach_per_tensor": (_foreach, _foreach.Workspace, 1),
        "pertensor": (_pertensor, lambda: None, many_small),
        "custom_op": (_CustomOp, lambda: None, many_small),
    }


def _impl(name, monkeypatch):
    impl, make_workspace, threshold = _impls()[name]
    monkeypatch.setattr(_foreach, "PER_TENSOR_MIN_NUMEL", threshold)
    return impl, make_workspace


def _tiled(tensors):
    flat = torch.cat([t.reshape(-1) for t in tensors])
    views = flat.split([t.numel() for t in tensors])
    return _foreach.Tiled([v.view(t.shape) for v, t in zip(views, tensors)])


def _inputs(dtype, seed, non_contiguous=False):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda s: torch.randn(s, generator=gen, dtype=torch.float64)  # noqa: E731
    x = [rand(s).to(dtype) for s in SHAPES]
    if non_contiguous:  # a transposed parameter: its storage is not in the order of its elements
        x[2] = rand((5, 33)).to(dtype).t()
    g = [rand(s).to(dtype) for s in SHAPES]
    ref = [(t.double() + 1e-2 * rand(t.shape)).to(dtype) for t in x]
    delta = [1e-2 * rand(s).to(dtype) for s in SHAPES]
    return x, g, ref, delta


def _dot(a, b):
    return sum((u.double() * v.double()).sum() for u, v in zip(a, b))


def _run_inner_products(impl, workspace, d, d_ref, g, x, acc_dtype, x_sums):
    lists = lambda ts: None if ts is None else (ts if isinstance(ts, _foreach.Tiled) else list(ts))  # noqa: E731
    return impl.inner_products(
        lists(d),
        lists(d_ref),
        lists(g),
        lists(x),
        acc_dtype=acc_dtype,
        x_sums=x_sums,
        copy_x=True,
        workspace=workspace,
    )


@pytest.mark.parametrize("impl_name", sorted(_impls()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("store_delta", [True, False])
@pytest.mark.parametrize("x_sums", [True, False])
def test_inner_products_match_float64(monkeypatch, impl_name, dtype, store_delta, x_sums, seed):
    impl, make_workspace = _impl(impl_name, monkeypatch)
    x, g, ref, delta = _inputs(dtype, seed, non_contiguous=True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    d, d_ref = (_tiled(delta), None) if store_delta else (x, _tiled(ref))
    sums, copy = _run_inner_products(impl, make_workspace(), d, d_ref, g, x, acc, x_sums)
    direction = [a.double() - (0 if d_ref is None else b.double()) for a, b in zip(d, d_ref or d)]
    expected = torch.stack(
        [
            _dot(direction, g),
            _dot(direction, x) if x_sums else torch.tensor(0.0, dtype=torch.float64),
            _dot(g, g),
            _dot(x, x) if x_sums else torch.tensor(0.0, dtype=torch.float64),
        ]
    )
    assert sums.dtype == acc
    magnitude = _dot([t.abs() for t in x + g], [t.abs() for t in x + g]) + _dot(
        [t.abs() for t in direction], [t.abs() for t in direction]
    )
    tolerance = (1e-12 if dtype == torch.float64 else 1e-5) * magnitude
    assert ((sums.double() - expected).abs() <= tolerance).all(), (seed, sums, expected)
    copied = torch.split(copy.flat, copy.numels) if isinstance(copy, _foreach.FlatCopy) else copy
    assert all(torch.equal(c.reshape(t.shape), t) for c, t in zip(copied, x))  # an exact copy of x_t


@pytest.mark.parametrize("with_workspace", [True, False])
@pytest.mark.parametrize("chunk", [16, 1 << 18])
@pytest.mark.parametrize(
    "dtype, delta_dtype, acc",
    [
        (torch.bfloat16, torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.float32, torch.float32),  # ref_dtype="float32"
        (torch.float16, torch.float16, torch.float32),
        (torch.float32, torch.float32, torch.float64),  # a float32 group beside a float64 one
    ],
)
def test_sums_converted_in_chunks_match_float64(
    monkeypatch, with_workspace, chunk, dtype, delta_dtype, acc, seed
):
    """Parameters below the accumulation dtype are converted chunk by chunk (16 elements: 30 chunks, the
    last one partial); sums in `acc` as if converted whole. (An accelerator converts in one chunk of
    fresh memory: the cases of one chunk without a workspace.)"""
    monkeypatch.setattr(_foreach, "SUM_CHUNK", chunk)
    x, g, _, delta = _inputs(dtype, seed, non_contiguous=True)
    delta = _tiled([t.to(delta_dtype) for t in delta])
    workspace = _foreach.Workspace() if with_workspace else None
    for _ in range(2):  # the second call reuses the workspace's scratch
        sums, _ = _run_inner_products(_foreach, workspace, delta, None, g, x, acc, True)
    expected = torch.stack([_dot(delta, g), _dot(delta, x), _dot(g, g), _dot(x, x)])
    assert sums.dtype == acc
    magnitude = _dot([t.abs() for t in x + g + list(delta)], [t.abs() for t in x + g + list(delta)])
    assert ((sums.double() - expected).abs() <= 1e-5 * magnitude).all(), (seed, sums, expected)
    if with_workspace:
        assert workspace.buffers["acc_scratch"].shape == (3, min(chunk, sum(t.numel() for t in x)))


@pytest.mark.parametrize("impl_name", sorted(_impls()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("delta_layout", ["tiled", "scattered", "recomputed"])
def test_apply_update_matches_float64(monkeypatch, impl_name, dtype, delta_layout, seed):
    """x = x_ref + S * (Delta + x_base - x_t), Delta advanced in place when stored."""
    impl, make_workspace = _impl(impl_name, monkeypatch)
    x_t, g, ref, delta = _inputs(dtype, seed, non_contiguous=True)
    workspace = make_workspace()
    # the x_t copy as the implementation makes it (its workspace row, for the flat one)
    _, copy = _run_inner_products(impl, workspace, x_t, None, g, x_t, torch.float64, True)
    x_base = [t - 1e-3 * u for t, u in zip(x_t, g)]  # what a base step left in the parameters
    params = [t.clone() for t in x_t]
    params[2] = x_t[2].clone().t().contiguous().t()  # keep the transposed layout
    for p, b in zip(params, x_base):
        p.copy_(b)
    scale = torch.tensor(0.37, dtype=dtype)
    denom = torch.tensor(0.21, dtype=dtype)
    stored = {"tiled": _tiled(delta), "scattered": [t.clone() for t in delta], "recomputed": None}
    stored = stored[delta_layout]
    impl.apply_update(params, copy, _tiled(ref), stored, scale, denom, workspace)

    def f64(ts):
        return [t.double() for t in ts]

    if stored is None:
        expected_delta = [(a - r) / denom.double() for a, r in zip(f64(x_t), f64(ref))]
    else:
        expected_delta = f64(delta)
    expected_delta = [d + (b - a) for d, b, a in zip(expected_delta, f64(x_base), f64(x_t))]
    expected = [r + scale.double() * d for r, d in zip(f64(ref), expected_delta)]
    rtol = 1e-14 if dtype == torch.float64 else 1e-6
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.double(), e, rtol=rtol, atol=rtol * 1e-1)
    if stored is not None:
        for s, e in zip(stored, expected_delta):
            torch.testing.assert_close(s.double(), e, rtol=rtol, atol=rtol * 1e-3)


@pytest.mark.parametrize("threshold", [_foreach.PER_TENSOR_MIN_NUMEL, 1])
@pytest.mark.parametrize("store_delta", [True, False])
def test_flat_and_pertensor_updates_agree_bit_for_bit_in_float64(monkeypatch, threshold, store_delta, seed):
    """Both round each value in the references' order, so in float64 they agree to the last bits (a fused
    multiply-add may skip one rounding of the product: the bound allows a few ulps of the largest x)."""
    monkeypatch.setattr(_foreach, "PER_TENSOR_MIN_NUMEL", threshold)
    results = []
    for impl, workspace in ((_foreach, _foreach.Workspace()), (_pertensor, None)):
        x_t, g, ref, delta = _inputs(torch.float64, seed)
        _, copy = _run_inner_products(impl, workspace, x_t, None, g, x_t, torch.float64, True)
        params = [(t - 1e-3 * u) for t, u in zip(x_t, g)]
        stored = _tiled(delta) if store_delta else None
        impl.apply_update(
            params,
            copy,
            _tiled(ref),
            stored,
            torch.tensor(0.37, dtype=torch.float64),
            torch.tensor(0.21, dtype=torch.float64),
            workspace,
        )
        results.append(params)
    for a, b in zip(*results):
        assert ((a - b).abs() <= 4 * torch.finfo(torch.float64).eps * a.abs().max()).all()


def test_custom_op_registration_is_consistent(seed):
    """torch.library's own checks of the op: schema, fake (meta) implementation, no aliasing of inputs,
    dispatch under FakeTensor and under AOT tracing (what torch.compile relies on)."""
    x, g, _, delta = _inputs(torch.float32, seed)
    for args in (
        (delta, [], g, x, torch.float32, True),
        (x, [t + 1 for t in x], [], x, torch.float64, False),  # Delta recomputed, no gradient sums
    ):
        torch.library.opcheck(torch.ops.mechanic_fast.inner_products.default, args)
