"""Compile time of `torch.compile(opt.step)`, bare AdamW(foreach) against mechanized, by tensor count.

    python bench/compile_times.py --tensors 50 200 500 --out out/compile_times.md
    python bench/compile_times.py --tensors 200 --fusion-pairs 8   # also with inductor's fusion knob
    python bench/compile_times.py --tensors 200 --mechanized own   # mechanize(..., compile=True)

Each (optimizer, count) runs in a fresh process with fresh inductor caches (FX graph and autograd caches
off, an empty cache directory), so that nothing compiled earlier is reused. Reported: the wall time of
the first 5 compiled steps (state creation and every compile they trigger), and the median step after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import contextlib, json, statistics, sys, time, torch
from mechanic_fast import mechanize
kind, n, side, pairs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
inductor_options = (
    torch._inductor.config.patch(max_fusion_buffer_group_pairwise_attempts=pairs) if pairs
    else contextlib.nullcontext()
)
gen = torch.Generator().manual_seed(0)
params = [torch.nn.Parameter(torch.randn(side, side, generator=gen)) for _ in range(n)]
grads = [torch.randn(side, side, generator=gen) for _ in range(n)]
kw = dict(lr=1e-3, weight_decay=0.01, foreach=True)
if kind == "bare":
    step = torch.compile(torch.optim.AdamW(params, **kw).step)
elif kind == "step":
    step = torch.compile(mechanize(torch.optim.AdamW, backend="foreach")(params, **kw).step)
else:  # Mechanic compiles its own work; the base step runs eagerly
    step = mechanize(torch.optim.AdamW, backend="foreach", compile=True)(params, **kw).step
def set_grads():
    for p, g in zip(params, grads):
        p.grad = g
with inductor_options:  # scoped, as the compile happens inside the first steps
    start = time.perf_counter()
    for _ in range(5):
        set_grads()
        step()
    first5 = time.perf_counter() - start
    times = []
    for _ in range(15):
        set_grads()
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
print(json.dumps(dict(kind=kind, tensors=n, first5_s=first5, step_ms=statistics.median(times))))
"""


def measure(kind: str, tensors: int, side: int, pairs: int = 0) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = dict(
            os.environ,
            TORCHINDUCTOR_FX_GRAPH_CACHE="0",
            TORCHINDUCTOR_AUTOGRAD_CACHE="0",
            TORCHINDUCTOR_CACHE_DIR=cache,
        )
        out = subprocess.run(
            [sys.executable, "-c", CHILD, kind, str(tensors), str(side), str(pairs)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, nargs="+", default=[50, 200, 500])
    parser.add_argument("--side", type=int, default=64, help="each tensor is side x side")
    parser.add_argument(
        "--fusion-pairs",
        type=int,
        default=0,
        help="also measure both with torch._inductor.config.max_fusion_buffer_group_pairwise_attempts "
        "set to this (inductor's default is 64)",
    )
    parser.add_argument(
        "--mechanized",
        choices=["step", "own"],
        default="step",
        help="what the mechanized columns compile: torch.compile(opt.step) (step), or mechanize(..., "
        "compile=True), which compiles the same whole step (own)",
    )
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args()
    header = (
        f"| tensors ({args.side}x{args.side}) | bare AdamW: first 5 steps s | mechanized: first 5 steps s "
        "| ratio | bare step ms | mechanized step ms |"
    )
    rule = "|---:|---:|---:|---:|---:|---:|"
    if args.fusion_pairs:
        k = args.fusion_pairs
        header += f" bare, pairs={k}: s | mechanized, pairs={k}: s | ratio | mechanized step ms, pairs={k} |"
        rule += "---:|---:|---:|---:|"
    lines = [header, rule]
    started = time.perf_counter()
    for n in args.tensors:
        bare, mech = measure("bare", n, args.side), measure(args.mechanized, n, args.side)
        ratio = mech["first5_s"] / bare["first5_s"]
        row = (
            f"| {n} | {bare['first5_s']:.1f} | {mech['first5_s']:.1f} | {ratio:.2f} "
            f"| {bare['step_ms']:.2f} | {mech['step_ms']:.2f} |"
        )
        if args.fusion_pairs:
            bare_k = measure("bare", n, args.side, args.fusion_pairs)
            mech_k = measure(args.mechanized, n, args.side, args.fusion_pairs)
            row += (
                f" {bare_k['first5_s']:.1f} | {mech_k['first5_s']:.1f} "
                f"| {mech_k['first5_s'] / bare_k['first5_s']:.2f} | {mech_k['step_ms']:.2f} |"
            )
        lines.append(row)
        print(row, flush=True)
    table = "\n".join(lines)
    print(f"\n{table}\n\n({time.perf_counter() - started:.0f} s in all)")
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
