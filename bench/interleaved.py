"""Bare AdamW, mechanized AdamW and mechanic-pytorch stepping in turn in one process: medians per step.

    python bench/interleaved.py --shapes 200x64x64 --steps 40
    python bench/interleaved.py --shapes 200x64x64 --own-compile   # also mechanize(..., compile=True)

Fewer implementations in between than the sweep (which also interleaves the compiled ones), so caches are
warmer: the closest to a training loop that runs one optimizer. Gradients are set outside the timed region.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mechanic_fast import mechanize
from mechanic_fast.tools import sweep as benchmark


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="200x64x64", choices=sorted(benchmark.shape_sets(False)))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--own-compile",
        action="store_true",
        help="also step mechanize(..., compile=True) (the whole step compiled by Mechanic)",
    )
    args = parser.parse_args()
    import mechanic_pytorch

    shapes, dtype = benchmark.shape_sets(False)[args.shapes], getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    kw = dict(lr=1e-3, weight_decay=0.01, foreach=True)
    makers = {
        "bare": torch.optim.AdamW,
        "mechanic_fast": mechanize(torch.optim.AdamW),
        "mechanic_pytorch": mechanic_pytorch.mechanize(torch.optim.AdamW),
    }
    if args.own_compile:  # its first steps compile (tens of seconds), outside the timed steps
        makers["mechanic_fast_compile"] = mechanize(torch.optim.AdamW, compile=True)
    params, opts = {}, {}
    for name, make in makers.items():
        params[name] = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
        opts[name] = make(params[name], **kw)
    times = {name: [] for name in opts}
    for i in range(args.steps + 5):
        for name, opt in opts.items():
            for p, g in zip(params[name], grads):
                p.grad = g
            start = time.perf_counter()
            opt.step()
            if i >= 5:  # the first steps create state
                times[name].append(time.perf_counter() - start)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    for name, value in ms.items():
        print(f"{name:>16}: {value:7.2f} ms")
    print(
        f"overhead {ms['mechanic_fast'] - ms['bare']:.2f} ms; "
        f"speed-up vs mechanic-pytorch {ms['mechanic_pytorch'] / ms['mechanic_fast']:.2f}x"
    )
    if args.own_compile:
        print(f"compile=True overhead {ms['mechanic_fast_compile'] - ms['bare']:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
