"""Mechanic at its memory floor, counted in live tensor bytes: every tensor the garbage
collector can reach, one count per storage, beyond the parameters, their gradients and the base
optimizer's own state. Resident: what lives between steps; in a step: what lives when the update starts
(the x_t copy beside Mechanic's state)."""

from __future__ import annotations

import gc

import pytest
import torch

from mechanic_fast import _buffers, _step, functional, mechanize

SHAPES = [(256, 128)] * 6 + [(128,), (1,)]


def _live_storages():
    gc.collect()
    out = {}
    from torch._subclasses.fake_tensor import FakeTensor  # a compiled test's leftovers have no storage

    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not isinstance(obj, FakeTensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                out[storage.data_ptr()] = storage.nbytes()
        except Exception:  # a tensor subclass without storage, a half-built object
            continue
    return out


def _extra_bytes(opt, params):
    """Live storage bytes that are not parameters, gradients or the base optimizer's state."""
    owned = set()
    for p in params:
        owned.add(p.untyped_storage().data_ptr())
        if p.grad is not None:
            owned.add(p.grad.untyped_storage().data_ptr())
        for key, value in opt.state[p].items():
            if torch.is_tensor(value) and not key.startswith("mechanic_"):
                owned.add(value.untyped_storage().data_ptr())
    return sum(n for ptr, n in _live_storages().items() if ptr not in owned and ptr != 0)


def _setup(dtype, **options):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    opt = mechanize(torch.optim.AdamW, **options)(params, lr=1e-3, foreach=True)
    weights = sum(p.numel() * p.element_size() for p in params)
    return gen, params, opt, weights


def _steps(gen, params, opt, n):
    for _ in range(n):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


# weight copies resident beyond the base (float32 / float64 parameters), per option
RESIDENT = [
    ({"keep_workspace": False}, 1.0),  # Delta: the default on accelerators
    ({}, 2.0),  # on CPU by default: Delta and the kept x_t buffer
    ({"store_delta": False, "keep_workspace": False}, 1.0),  # x_ref
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options,copies", RESIDENT, ids=["accelerator-default", "cpu-default", "x_ref"])
def test_resident_memory_is_at_most_the_stated_weight_copies(dtype, options, copies):
    gen, params, opt, weights = _setup(dtype, **options)
    baseline = _extra_bytes(opt, params)  # before any state exists: the test's own tensors
    _steps(gen, params, opt, 3)
    resident = _extra_bytes(opt, params) - baseline
    # a few scalars (the tuner, its constants) beside the copies
    assert resident <= copies * weights + 4096, (resident / weights, options)
    assert resident >= copies * weights, (resident / weights, options)  # and the count is what we say


def test_low_precision_parameters_keep_x_ref_and_delta():
    """bfloat16: x_ref and Delta in the parameters' dtype (two copies), so that x = x_ref + S * Delta
    rounds once from them."""
    gen, params, opt, weights = _setup(torch.bfloat16, keep_workspace=False)
    baseline = _extra_bytes(opt, params)
    _steps(gen, params, opt, 3)
    resident = _extra_bytes(opt, params) - baseline
    assert 2 * weights <= resident <= 2 * weights + 4096, resident / weights


@pytest.mark.parametrize(
    "options", [{"keep_workspace": False}, {}], ids=["accelerator-default", "cpu-default"]
)
def test_memory_in_a_step_is_at_most_two_weight_copies(monkeypatch, options):
    """When the update starts, Mechanic holds Delta and the x_t copy: two weight copies, whether the
    buffer is kept or made for the step."""
    gen, params, opt, weights = _setup(torch.float32, **options)
    baseline = _extra_bytes(opt, params)
    seen = []
    real = functional.mechanic_update

    def counting(*args, **kwargs):
        seen.append(_extra_bytes(opt, params) - baseline)
        return real(*args, **kwargs)

    monkeypatch.setattr(_step, "mechanic_update", counting)
    _steps(gen, params, opt, 3)
    assert len(seen) == 3
    assert max(seen) <= 2 * weights + 4096, [s / weights for s in seen]


def _step_peak_bytes(step) -> int:
    """The highest total of bytes allocated during `step()` beyond what was allocated before it, from the
    profiler's record of every allocation and free in order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert events, "the profiler recorded no allocation"
    total = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        total += event.nbytes()
        peak = max(peak, total)
    return peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "options", [{"keep_workspace": False}, {}, {"store_delta": False, "keep_workspace": False}],
    ids=["accelerator-default", "cpu-default", "x_ref"],
)  # fmt: skip
def test_a_step_allocates_at_most_one_weight_copy_beyond_the_base(monkeypatch, dtype, options):
    """Over the whole step, every transient counted: the mechanized step's allocation peak is the base
    step's plus the x_t copy (plus, for x_ref alone, the recomputed Delta), plus the bounded scratch in
    which bfloat16 sums are formed in float32: never a float32 copy of the weights."""
    if dtype == torch.bfloat16 and options.get("store_delta") is False:
        pytest.skip("bfloat16 parameters always store Delta")
    chunk = 1024  # the scratch's row length, so that a whole-row conversion would show
    monkeypatch.setattr(_buffers, "SUM_CHUNK", chunk)
    monkeypatch.setattr(_buffers, "SUM_CHUNK_ACCELERATOR", chunk)
    peaks = []
    for wrap in (lambda cls: cls, lambda cls: mechanize(cls, **options)):
        gen, params, _, weights = _setup(dtype)
        opt = wrap(torch.optim.AdamW)(params, lr=1e-3, foreach=True)
        _steps(gen, params, opt, 2)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        peaks.append(_step_peak_bytes(opt.step))
    base, mechanized = peaks
    copies = 2 if options.get("store_delta") is False else 1
    # a chunk of g and x gathered (bf16), and g, x, Delta in float32; the update's chunk of u (float32)
    scratch = chunk * (2 * 2 + 3 * 4) + chunk * 4
    assert mechanized <= base + copies * weights + scratch + 65536, (base / weights, mechanized / weights)
