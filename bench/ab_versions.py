"""A/B of two versions of mechanic-fast in one process: an older git revision against the working tree,
each mechanized AdamW stepping in turn with bare AdamW, on the same gradients. Medians per step (ms), and
for compiled steps the time of the first (compiling) steps and the number of graphs.

    python bench/ab_versions.py --old 3e31ee5 --shapes 200x64x64 4x1024x1024 transformer
    python bench/ab_versions.py --old 3e31ee5 --shapes 200x64x64 --dtype bfloat16
    python bench/ab_versions.py --old 3e31ee5 --shapes 200x64x64 4x1024x1024 --mode compiled
    python bench/ab_versions.py --old 3e31ee5 --shapes 200x64x64 --mode own    # mechanize(compile=True)

The old revision is exported with `git archive` and imported as `mechanic_old` (its custom-op namespace
renamed), so that both live in one process and share its caches and its load.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Any, Dict, List

import torch
from torch._dynamo.testing import CompileCounterWithBackend

from mechanic_fast import mechanize
from mechanic_fast.tools import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_old(rev: str) -> Any:
    """mechanic-fast at `rev`, as the package `mechanic_old`."""
    target = tempfile.mkdtemp(prefix="mechanic_old_")
    blob = subprocess.run(
        ["git", "archive", rev, "mechanic_fast", "kernels"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    tarfile.open(fileobj=io.BytesIO(blob)).extractall(target)
    package = os.path.join(target, "mechanic_old")
    os.rename(os.path.join(target, "mechanic_fast"), package)
    os.rename(os.path.join(target, "kernels"), os.path.join(package, "kernels"))
    for name in os.listdir(package):  # the custom op's namespace and the logger
        path = os.path.join(package, name)
        if name.endswith(".py"):
            with open(path) as f:
                text = f.read()
            text = text.replace('"mechanic_fast"', '"mechanic_old"').replace(
                "mechanic_fast::", "mechanic_old::"
            )
            text = text.replace("torch.ops.mechanic_fast", "torch.ops.mechanic_old")
            with open(path, "w") as f:
                f.write(text)
    sys.path.insert(0, target)
    return importlib.import_module("mechanic_old")


def run_case(
    shapes: List[torch.Size], dtype: torch.dtype, mode: str, makers: Dict[str, Any], steps: int
) -> None:
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    kw = dict(lr=1e-3, weight_decay=0.01, foreach=True)
    params, steppers, counters, first = {}, {}, {}, {}
    for name, make in makers.items():
        params[name] = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
        opt = make(params[name], **kw)
        if mode == "compiled":
            counters[name] = CompileCounterWithBackend("inductor")
            steppers[name] = torch.compile(opt.step, backend=counters[name])
        else:
            steppers[name] = opt.step
    warmup = 3 if mode != "eager" else 5
    times: Dict[str, List[float]] = {name: [] for name in makers}
    for i in range(steps + warmup):
        for name, step in steppers.items():
            for p, g in zip(params[name], grads):
                p.grad = g
            start = time.perf_counter()
            step()
            elapsed = time.perf_counter() - start
            if i < warmup:
                first[name] = first.get(name, 0.0) + elapsed
            else:
                times[name].append(elapsed)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    for name in makers:
        extra = ""
        if mode != "eager":
            extra = f"  first {warmup} steps {first[name]:6.1f} s"
            if name in counters:
                extra += f", {counters[name].frame_count} graphs"
        overhead = f"  overhead {ms[name] - ms['bare']:6.2f} ms" if name != "bare" else ""
        print(f"  {name:>5}: {ms[name]:8.2f} ms{overhead}{extra}")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="git revision of the old version")
    parser.add_argument("--shapes", nargs="+", default=["200x64x64"], choices=sorted(sweep.shape_sets(False)))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--mode", default="eager", choices=["eager", "compiled", "own"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    old = import_old(args.old)
    own = args.mode == "own"
    makers = {
        "bare": torch.optim.AdamW,
        "old": old.mechanize(torch.optim.AdamW, compile=own),
        "new": mechanize(torch.optim.AdamW, compile=own),
    }
    if args.mode == "compiled":  # old and new each against the same compiled bare step
        makers = {"bare": torch.optim.AdamW, "old": old.mechanize(torch.optim.AdamW), "new": makers["new"]}
    print(f"old = {args.old}, new = working tree; {args.dtype}, {args.mode}, median of {args.steps} steps")
    for name in args.shapes:
        print(name)
        torch._dynamo.reset()
        run_case(sweep.shape_sets(False)[name], getattr(torch, args.dtype), args.mode, makers, args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
