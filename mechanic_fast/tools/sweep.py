"""Benchmark sweep: a mechanized step against the bare base step, mechanic-pytorch and the memory floor.

Every row of one shape set / dtype / device is measured in the same run, side by side, as the median of
repeated steps after warm-up (gradients are set outside the timed region). The memory floor is the time
of 4 flat copies of all parameters (8 passes over d elements: the least Mechanic must read and write per
step with store_delta=False); Mechanic's overhead (mechanized minus bare step) is reported as a multiple
of it. Outputs: JSON rows, a markdown table and a PNG plot, written only to the paths given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .. import _torch, mechanize
from .._torch import TorchDispatchMode
from .report import IMPLS, machine_info, markdown_report, markdown_table, plot

Progress = Callable[[int, int, str], None]
# Compiled rows above this many tensors are skipped with a note: compile time grows with the tensor
# count, and beyond this the sweep would be dominated by it.
MAX_COMPILED_TENSORS = 200


# --------------------------------------------------------------------------------------------- shapes
def _model_shapes() -> List[torch.Size]:
    """The parameter list of a real model: a 4-layer transformer encoder (d_model 256) with embeddings."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=256, nhead=4, dim_feedforward=1024, batch_first=True)
    model = torch.nn.ModuleDict(
        {"embed": torch.nn.Embedding(1000, 256), "encoder": torch.nn.TransformerEncoder(layer, num_layers=4)}
    )
    return [p.shape for p in model.parameters()]


def shape_sets(quick: bool) -> Dict[str, List[torch.Size]]:
    if quick:
        return {"20x64x64": [torch.Size((64, 64))] * 20, "2x256x256": [torch.Size((256, 256))] * 2}
    return {
        "200x64x64": [torch.Size((64, 64))] * 200,
        "4x1024x1024": [torch.Size((1024, 1024))] * 4,
        "transformer": _model_shapes(),
    }


def devices_present() -> List[str]:
    found = ["cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


# ------------------------------------------------------------------------------------------- timing
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def _median_ms(
    fn: Callable[[], Any], before: Callable[[], Any], device: str, warmup: int, repeats: int
) -> float:
    for _ in range(warmup):
        before()
        fn()
    times = []
    for _ in range(repeats):
        before()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


class _PeakAllocations(TorchDispatchMode):
    """Peak bytes of tensors allocated (and still alive) during a region, seen through the dispatcher.

    Counts every op output that does not alias an input; frees are tracked with weakref finalizers.
    A device-independent stand-in for torch.cuda.max_memory_allocated on CPU.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = _tensors(args) + _tensors(list((kwargs or {}).values()))  # out= buffers are not new
        inputs = {a.untyped_storage().data_ptr() for a in given if a.device.type != "meta"}
        for t in _tensors(out):
            storage = t.untyped_storage()
            if storage.data_ptr() in inputs or storage.nbytes() == 0:
                continue
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, storage.nbytes())
        return out


def _tensors(obj: Any) -> List[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


class Unavailable(Exception):
    """An implementation that cannot run here, and why (shown in the row's note)."""


def load_warning() -> Optional[str]:
    """Why timings taken now would not be trustworthy (other work keeps the cores busy), or None."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this platform
        return None
    cores = os.cpu_count() or 1
    if load < 0.5 * cores:
        return None
    return (
        f"load average {load:.1f} on {cores} cores: other work is running, so these timings are not "
        "trustworthy (compare rows of one run only, or re-run on an idle machine)"
    )


def _make_optimizer(impl: str, params: List[torch.nn.Parameter]) -> Callable[[], Any]:
    """The step function of one implementation; raises `Unavailable` where it cannot run here."""
    kwargs = dict(lr=1e-3, weight_decay=0.01, foreach=True)
    if impl == "base":
        return torch.optim.AdamW(params, **kwargs).step
    if impl == "base_compiled":
        return torch.compile(torch.optim.AdamW(params, **kwargs).step)
    if impl == "mechanic_pytorch":
        try:
            import mechanic_pytorch
        except ImportError:
            raise Unavailable("not installed (pip install mechanic-pytorch==0.0.1)") from None
        return mechanic_pytorch.mechanize(torch.optim.AdamW)(params, **kwargs).step
    if impl in ("foreach", "foreach_fresh"):
        keep = None if impl == "foreach" else False
        return mechanize(torch.optim.AdamW, backend="foreach", keep_workspace=keep)(params, **kwargs).step
    if impl == "compiled":
        return torch.compile(mechanize(torch.optim.AdamW, backend="foreach")(params, **kwargs).step)
    if impl == "triton":
        if params[0].device.type != "cuda":
            raise Unavailable("needs CUDA (Triton compiles for GPUs)")
        return mechanize(torch.optim.AdamW, backend="triton")(params, **kwargs).step
    raise ValueError(impl)


def _floor_ms(
    shapes: Sequence[torch.Size], dtype: torch.dtype, device: str, warmup: int, repeats: int
) -> float:
    total = sum(s.numel() for s in shapes)
    src = torch.randn(total, device=device).to(dtype)
    dst = torch.empty_like(src)

    def four_copies() -> None:
        for _ in range(4):
            dst.copy_(src)

    return _median_ms(four_copies, lambda: None, device, warmup, repeats)


def measure(
    device: str,
    dtype: torch.dtype,
    shape_set: str,
    shapes: Sequence[torch.Size],
    impls: Sequence[str],
    quick: bool,
) -> List[Dict[str, Any]]:
    """All implementations for one (device, dtype, shape set), side by side: the timed steps of the
    implementations are interleaved round by round, so that drift of the machine hits all alike."""
    warmup, repeats = (2, 5) if quick else (5, 25)
    # Every compiled step traces the same code objects (AdamW.step, Mechanic.step): without a reset, the
    # rows measured after dynamo's recompile limit (8 per code object) would silently run eagerly.
    torch.compiler.reset()
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    rows: List[Dict[str, Any]] = []
    steps: Dict[str, Callable[[], Any]] = {}
    setters: Dict[str, Callable[[], Any]] = {}
    for impl in impls:
        row: Dict[str, Any] = dict(device=device, dtype=str(dtype).replace("torch.", ""), shape_set=shape_set)
        row.update(impl=impl, tensors=len(shapes), elements=sum(s.numel() for s in shapes))
        rows.append(row)
        if impl.endswith("compiled") and len(shapes) > MAX_COMPILED_TENSORS:
            row["note"] = f"skipped: compiling over {len(shapes)} tensors takes minutes"
            continue
        params = [
            torch.nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype)) for s in shapes
        ]
        try:
            step = _make_optimizer(impl, params)
        except Unavailable as exc:
            row["note"] = str(exc)
            continue
        except Exception as exc:  # e.g. an implementation that refuses this dtype
            row["note"] = f"unavailable: {type(exc).__name__}: {exc}"
            continue

        def set_grads(params=params) -> None:
            for p, g in zip(params, grads):
                p.grad = g

        try:
            start = time.perf_counter()
            for _ in range(warmup):  # the first step creates state (and compiles, for "compiled")
                set_grads()
                step()
            _sync(device)
            row["warmup_s"] = time.perf_counter() - start
            row["peak_extra_bytes"] = _peak_bytes(step, set_grads, device)
            row["resident_bytes"] = _resident_bytes(step)
        except Exception as exc:
            row["note"] = f"failed: {type(exc).__name__}: {exc}"
            continue
        steps[impl], setters[impl] = step, set_grads

    floor = _floor_ms(shapes, dtype, device, warmup, repeats)
    times: Dict[str, List[float]] = {impl: [] for impl in steps}
    for _ in range(repeats):
        for impl, step in steps.items():
            times[impl].append(_median_ms(step, setters[impl], device, 0, 1))
    _fill_rows(rows, {impl: statistics.median(t) for impl, t in times.items()}, floor)
    return rows


def _fill_rows(rows: List[Dict[str, Any]], medians: Dict[str, float], floor: float) -> None:
    """Step times, overheads over the bare step and speed-ups over mechanic-pytorch, into `rows`."""
    reference = medians.get("mechanic_pytorch")
    for row in rows:
        row["floor_ms"] = floor
        if row["impl"] not in medians:
            continue
        row["step_ms"] = medians[row["impl"]]
        # Mechanic's own overhead: against the bare step run the same way (compiled against compiled)
        base = medians.get("base_compiled" if row["impl"].endswith("compiled") else "base")
        if base is not None:
            row["overhead_ms"] = row["step_ms"] - base
            row["overhead_over_floor"] = row["overhead_ms"] / floor
        # a speed-up over mechanic-pytorch says something of a mechanized step only, not of the bare ones
        if reference is not None and not row["impl"].startswith("base"):
            row["speedup_vs_reference"] = reference / row["step_ms"]


def _peak_bytes(step: Callable[[], Any], set_grads: Callable[[], Any], device: str) -> Optional[int]:
    set_grads()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    if _torch.is_compiled(step):
        return None  # compiled code allocates below the dispatcher
    with _PeakAllocations() as mode:
        step()
    return mode.peak + _kept_bytes(step)


def _kept_bytes(step: Callable[[], Any]) -> int:
    """Bytes a mechanized optimizer keeps between steps for them (its workspace), counted in the step's
    peak: they are allocated for the step, only not freed after it."""
    opt = getattr(step, "__self__", None)
    cached = getattr(getattr(opt, "_mechanic_planner", None), "cached", None)
    return sum(grp.workspace.nbytes() for grp in cached[1] if grp.workspace is not None) if cached else 0


def _resident_bytes(step: Callable[[], Any]) -> Optional[int]:
    """Bytes a mechanized optimizer keeps between steps beyond its base: Mechanic's per-parameter state
    (one count per storage) and its kept workspace; None for what is not a mechanized step."""
    opt = getattr(step, "__self__", None)
    if getattr(opt, "_mechanic_planner", None) is None:
        return None
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for s in opt.state.values()
        if isinstance(s, dict)
        for k, t in s.items()
        if k.startswith("mechanic_") and torch.is_tensor(t)
    }
    return sum(storages.values()) + _kept_bytes(step)


# ---------------------------------------------------------------------------------------------- sweep
def run_sweep(
    devices: Optional[List[str]] = None,
    quick: bool = False,
    out_json: Optional[str] = None,
    out_md: Optional[str] = None,
    out_png: Optional[str] = None,
    progress: Optional[Progress] = None,
    impls: Sequence[str] = IMPLS,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
    warning: Optional[str] = None,
) -> Dict[str, Any]:
    """Run the sweep and write the outputs that were asked for, each with `warning` (the machine was
    busy: the timings are not trustworthy) if there is one. Returns {"machine": ..., "rows": [...]}."""
    devices = devices or devices_present()
    sets = shape_sets(quick)
    if quick:
        impls = [i for i in impls if not i.endswith("compiled")]  # compiling takes longer than the run
    jobs = [(dev, dt, name) for dev in devices for dt in dtypes for name in sets]
    rows: List[Dict[str, Any]] = []
    for i, (dev, dt, name) in enumerate(jobs):
        if progress:
            progress(i, len(jobs), f"{dev} {str(dt).replace('torch.', '')} {name}")
        rows += measure(dev, dt, name, sets[name], impls, quick)
    if progress:
        progress(len(jobs), len(jobs), "done")
    result = {"machine": machine_info(), "quick": quick, "rows": rows, "warning": warning}
    if out_json:
        with open(out_json, "w") as f:
            json.dump(result, f, indent=2)
    if out_md:
        with open(out_md, "w") as f:
            f.write(markdown_report(rows, warning))
    if out_png:
        plot(rows, out_png)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", action="append", help="device to run on (repeatable; default: all present)"
    )
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats, no compile")
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--md", help="write a markdown table here")
    parser.add_argument("--plot", help="write a PNG plot here")
    args = parser.parse_args(argv)
    result = run_sweep(args.device, args.quick, args.json, args.md, args.plot)
    print(markdown_table(result["rows"]))
    return 0
