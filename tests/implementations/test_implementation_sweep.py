"""The implementation sweep, declared once: every implementation `functional.select_impl` can pick x
dtype x layout (`LayoutKind`, with Delta tiled or scattered) x device, through the functional core
(`mechanic_sums`, `mechanic_update`), against float64 math and against each other, on shapes that
include a 0-d-like tensor, odd sizes and a non-contiguous view. Fresh random inputs per seed. CUDA rows
skip without a GPU; the per-tensor implementations run eagerly here (compile/test_compiled_step.py
compiles them); Triton runs under its interpreter on CPU (compiled on CUDA)."""

from __future__ import annotations

import pytest
import torch

from mechanic_fast import _buffers, _foreach, functional
from mechanic_fast._buffers import FlatCopy, Tiled, Workspace
from mechanic_fast._plan import GroupPlan, LayoutKind, Scales
from mechanic_fast.functional import mechanic_sums, mechanic_update

SHAPES = [(1,), (7,), (33, 5), (300,)]
IMPLS = ["foreach", "foreach_per_tensor", "per_tensor", "per_tensor_opaque_sums", "triton"]
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU here")),
]
# each layout of the state: (its kind, Delta tiling one buffer or scattered over tensors)
LAYOUTS = {
    "x_ref+delta": (LayoutKind.X_REF_DELTA, True),
    "delta": (LayoutKind.DELTA, True),
    "x_ref+delta/scattered": (LayoutKind.X_REF_DELTA, False),
    "x_ref": (LayoutKind.X_REF, True),
}


def _impl(name, device="cpu"):
    """The implementation `name`, or a skip where it cannot run on `device`."""
    if name == "triton":
        if not functional.triton_runnable(torch.device(device)):
            pytest.skip("Triton runs on CUDA, or on CPU under its interpreter (TRITON_INTERPRET=1)")
        return functional._triton_impl()
    return {
        i.name: i
        for i in (
            functional.FOREACH,
            functional.FOREACH_PER_TENSOR,
            functional.PER_TENSOR,
            functional.PER_TENSOR_OPAQUE_SUMS,
        )
    }[name]


def _workspace(name):
    return Workspace() if name.startswith("foreach") or name == "triton" else None


def _tiled(tensors):
    flat = torch.cat([t.reshape(-1) for t in tensors])
    views = flat.split([t.numel() for t in tensors])
    return Tiled([v.view(t.shape) for v, t in zip(views, tensors)])


def _inputs(dtype, seed, non_contiguous=False, device="cpu"):
    """x, g, x_ref near x, and a small Delta: random in float64 on the CPU (the same values on every
    device), then cast and moved."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda s: torch.randn(s, generator=gen, dtype=torch.float64)  # noqa: E731
    x = [rand(s).to(dtype) for s in SHAPES]
    if non_contiguous:  # a transposed parameter: its storage is not in the order of its elements
        x[2] = rand((5, 33)).to(dtype).t()
    g = [rand(s).to(dtype) for s in SHAPES]
    ref = [(t.double() + 1e-2 * rand(t.shape)).to(dtype) for t in x]
    delta = [1e-2 * rand(s).to(dtype) for s in SHAPES]
    return tuple([t.to(device) for t in ts] for ts in (x, g, ref, delta))


def _cpu(tensors):
    return None if tensors is None else [t.cpu() for t in tensors]


def _dot(a, b):
    return sum((u.double().cpu() * v.double().cpu()).sum() for u, v in zip(a, b))


def _non_contiguous_ok(name):
    return name != "triton"  # select_impl never hands Triton a non-contiguous tensor


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("store_delta", [True, False])
@pytest.mark.parametrize("x_sums", [True, False])
@pytest.mark.parametrize("maximize", [False, True])
def test_sums_match_float64(device, name, dtype, store_delta, x_sums, maximize, seed):
    impl = _impl(name, device)
    x, g, ref, delta = _inputs(dtype, seed, _non_contiguous_ok(name), device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    stored = _tiled(delta) if store_delta else None
    plan = GroupPlan(x, _tiled(ref), stored, impl, acc, maximize=maximize, workspace=_workspace(name))
    assert plan.kind == (LayoutKind.X_REF_DELTA if store_delta else LayoutKind.X_REF)
    sums, copy = mechanic_sums(plan, g, x_sums=x_sums)
    direction = delta if store_delta else [a.double() - b.double() for a, b in zip(x, ref)]
    zero = torch.tensor(0.0, dtype=torch.float64)
    expected = torch.stack(
        [
            -_dot(direction, g) if maximize else _dot(direction, g),
            _dot(direction, x) if x_sums else zero,
            _dot(g, g),
            _dot(x, x) if x_sums else zero,
        ]
    )
    assert sums.dtype == acc and sums.device.type == device
    everything = x + g + [t.double().abs() for t in direction]
    magnitude = _dot([t.abs() for t in everything], [t.abs() for t in everything])
    tolerance = (1e-12 if dtype == torch.float64 else 1e-5) * magnitude
    assert ((sums.double().cpu() - expected).abs() <= tolerance).all(), (seed, sums, expected)
    copied = torch.split(copy.flat, copy.numels) if isinstance(copy, FlatCopy) else copy.tensors
    assert all(torch.equal(c.reshape(t.shape), t) for c, t in zip(copied, x))  # an exact copy of x_t


def _step(name, dtype, seed, layout, non_contiguous, device="cpu"):
    """x_t -> copy (mechanic_sums) -> a base step -> mechanic_update, as a Mechanic step runs them; all
    returned on the CPU."""
    impl = _impl(name, device)
    x_t, g, ref, delta = _inputs(dtype, seed, non_contiguous, device)
    params = [t.clone() for t in x_t]
    if non_contiguous:
        params[2] = x_t[2].clone().t().contiguous().t()  # keep the transposed layout
    kind, tiled = LAYOUTS[layout]
    stored = None if kind == LayoutKind.X_REF else (_tiled(delta) if tiled else [t.clone() for t in delta])
    ref = None if kind == LayoutKind.DELTA else _tiled(ref)
    plan = GroupPlan(params, ref, stored, impl, torch.float64, workspace=_workspace(name))
    assert plan.kind == kind
    _, copy = mechanic_sums(plan, g)
    for p, u in zip(params, g):  # what a base step leaves in the parameters
        p.sub_(1e-3 * u)
    scales = Scales(*(torch.tensor(v, dtype=dtype, device=device) for v in (SCALE, SCALE_OLD, DENOM)))
    mechanic_update(plan, copy, scales)
    return _cpu(x_t), _cpu(g), _cpu(ref), _cpu(delta), _cpu(params), _cpu(stored)


SCALE, SCALE_OLD, DENOM = 0.37, 0.29, 0.21


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_update_matches_float64(device, name, dtype, layout, seed):
    """x = x_ref + S * (Delta + x_base - x_t), or without x_ref x_t + S * Delta_new - S_old * Delta,
    Delta advanced in place when stored."""
    if name == "triton" and layout.endswith("scattered"):
        pytest.skip("Triton reads Delta where it is; a scattered one is contiguous per tensor (covered)")
    x_t, g, ref, delta, params, stored = _step(name, dtype, seed, layout, _non_contiguous_ok(name), device)

    def f64(ts):
        return [t.double() for t in ts]

    denom, scale = DENOM, SCALE
    if stored is None:
        expected_delta = [
            (a - r) / torch.tensor(denom, dtype=dtype).double() for a, r in zip(f64(x_t), f64(ref))
        ]
    else:
        expected_delta = f64(delta)
    x_base = [(t - 1e-3 * u) for t, u in zip(x_t, g)]
    expected_delta = [d + (b.double() - a) for d, b, a in zip(expected_delta, x_base, f64(x_t))]
    as_dtype = lambda v: torch.tensor(v, dtype=dtype).double()  # noqa: E731
    if ref is None:
        expected = [
            t + as_dtype(scale) * d - as_dtype(SCALE_OLD) * old
            for t, d, old in zip(f64(x_t), expected_delta, f64(delta))
        ]
    else:
        expected = [r + as_dtype(scale) * d for r, d in zip(f64(ref), expected_delta)]
    rtol = 1e-14 if dtype == torch.float64 else 1e-6
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.double(), e, rtol=rtol, atol=rtol * 1e-1)
    if stored is not None:
        for s, e in zip(stored, expected_delta):
            torch.testing.assert_close(s.double(), e, rtol=rtol, atol=rtol * 1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [16, 1 << 18])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["x_ref+delta", "delta", "x_ref"])
def test_every_implementation_rounds_the_update_alike(monkeypatch, device, dtype, layout, chunk, seed):
    """One rounding order: eagerly, every implementation writes the same bits into x and Delta. (Triton
    forms bfloat16 values in float32 and rounds once at the end: within one bfloat16 step of the others.)
    Chunks of 16 elements: the flat update without x_ref gathers groups of small tensors and reads the
    long ones where they are, a chunk at a time."""
    monkeypatch.setattr(_buffers, "SUM_CHUNK", chunk)
    monkeypatch.setattr(_buffers, "SUM_CHUNK_ACCELERATOR", chunk)
    if dtype == torch.bfloat16 and layout == "x_ref":
        pytest.skip("Delta is always stored for bfloat16 parameters")
    runnable = [n for n in IMPLS if n != "triton" or functional.triton_runnable(torch.device(device))]
    results = {name: _step(name, dtype, seed, layout, False, device)[4:] for name in runnable}
    first_x, first_delta = results["foreach"]
    for name, (x, delta) in results.items():
        pairs = list(zip(x, first_x)) + (list(zip(delta, first_delta)) if delta is not None else [])
        if name == "triton" and dtype == torch.bfloat16:
            # within a bfloat16 step of the values formed (two without x_ref: x goes through four
            # roundings, which some interpreter versions truncate); a result near 0 that cancels
            # operands of order 1 within a step of those
            rtol = 2**-6 if layout == "delta" else 2**-7
            for a, b in pairs:
                torch.testing.assert_close(a, b, rtol=rtol, atol=rtol)
        elif name == "triton" and device == "cpu" and not _interpreted_fma_is_fused():
            # some Triton interpreters round tl.fma's product before the sum (GPUs fuse it): within one
            # rounding of the others there, of the operands (randn, a few units) where a result near 0
            # cancels them
            eps = torch.finfo(dtype).eps
            for a, b in pairs:
                torch.testing.assert_close(a, b, rtol=4 * eps, atol=8 * eps)
        else:
            assert all(torch.equal(a, b) for a, b in pairs), name


def _interpreted_fma_is_fused() -> bool:
    """Whether tl.fma rounds once where Triton runs here: (1 + 2^-23)(1 - 2^-23) - 1 is -2^-46 fused, 0
    with the product rounded first."""
    a = torch.tensor([1 + 2**-23, 1 - 2**-23, -1.0])
    out = torch.zeros(1)
    _fma_kernel[(1,)](a, out)
    return out.item() != 0


if functional.triton_runnable(torch.device("cpu")):
    import triton
    import triton.language as tl

    @triton.jit
    def _fma_kernel(a_ptr, out_ptr):
        tl.store(out_ptr, tl.fma(tl.load(a_ptr), tl.load(a_ptr + 1), tl.load(a_ptr + 2)))


@pytest.mark.parametrize("copy_x", [True, False])
@pytest.mark.parametrize("per_tensor", [False, True])
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
    monkeypatch, copy_x, per_tensor, with_workspace, chunk, dtype, delta_dtype, acc, seed
):
    """Parameters below the accumulation dtype are converted chunk by chunk (16 elements: 30 chunks, the
    last one partial; per tensor, chunks end at each tensor's end); sums in `acc` as if converted whole.
    (An accelerator converts in larger chunks of fresh memory: the cases without a workspace.) The x_t
    copy, where asked for, is exact."""
    monkeypatch.setattr(_buffers, "SUM_CHUNK", chunk)
    x, g, _, delta = _inputs(dtype, seed, non_contiguous=True)
    delta = _tiled([t.to(delta_dtype) for t in delta])
    workspace = Workspace() if with_workspace else None
    for _ in range(2):  # the second call reuses the workspace's scratch
        sums, copy = _foreach.inner_products(
            delta, None, g, x, acc_dtype=acc, copy_x=copy_x, workspace=workspace, per_tensor=per_tensor
        )
    expected = torch.stack([_dot(delta, g), _dot(delta, x), _dot(g, g), _dot(x, x)])
    assert sums.dtype == acc
    magnitude = _dot([t.abs() for t in x + g + list(delta)], [t.abs() for t in x + g + list(delta)])
    assert ((sums.double() - expected).abs() <= 1e-5 * magnitude).all(), (seed, sums, expected)
    if copy_x:
        assert all(torch.equal(c.view(t.shape), t) for c, t in zip(torch.split(copy.flat, copy.numels), x))
    else:
        assert copy is None
    if with_workspace:
        # g, x and Delta side by side, converted a chunk at a time: never a converted copy of the weights
        rows, width = workspace.buffers["acc_scratch"].shape
        assert rows == 3 and width <= chunk


def test_select_impl_is_the_one_decision(monkeypatch):
    """Eager CPU: flat for many small tensors, per-tensor flat for few large ones; explicit Triton where
    it runs, the flat one for a non-contiguous tensor; traced: the per-tensor code (see test_compile)."""
    small = [torch.zeros(8) for _ in range(4)]
    large = [torch.zeros(functional.PER_TENSOR_MIN_NUMEL)]
    assert functional.select_impl("auto", small) is functional.FOREACH
    assert functional.select_impl("foreach", large) is functional.FOREACH_PER_TENSOR
    assert functional.select_impl("auto", large, numel=8) is functional.FOREACH  # the count given wins
    monkeypatch.setattr(functional, "triton_importable", lambda: False)
    with pytest.raises(RuntimeError, match="cannot be imported"):
        functional.select_impl("triton", small)
    monkeypatch.undo()
    if functional.triton_runnable(torch.device("cpu")):
        assert functional.select_impl("triton", small).name == "triton"
        transposed = [torch.zeros(3, 4).t()]
        assert functional.select_impl("triton", small, (transposed,)) is functional.FOREACH
    else:
        with pytest.raises(RuntimeError, match="cannot run on cpu"):
            functional.select_impl("triton", small)


def test_custom_op_registration_is_consistent(seed):
    """torch.library's own checks of the op: schema, fake (meta) implementation, no aliasing of inputs,
    dispatch under FakeTensor and under AOT tracing (what torch.compile relies on)."""
    x, g, _, delta = _inputs(torch.float32, seed)
    for args in (
        (delta, [], g, x, torch.float32, True),
        (x, [t + 1 for t in x], [], x, torch.float64, False),  # Delta recomputed, no gradient sums
    ):
        torch.library.opcheck(torch.ops.mechanic_fast.inner_products.default, args)
