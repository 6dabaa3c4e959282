"""Rounding of the mechanized step against float64, in ulps of the weights, at base lrs 1e-4..1e4.

The setting of tests/update_math/test_float32_rounding_gaps_and_lr_units.py: 1000 weights of size
~0.05, a fixed sequence of gradients (no feedback from x, so every run follows the same path and differs
by rounding alone), SGD with momentum and AdamW as bases. Prints the median and largest error after
`--steps` steps for float32, bfloat16 with x_ref
and Delta in float32 (`ref_dtype="float32"`) and bfloat16 with them in bfloat16 (the default), each
against the same run in float64.

    python bench/ulps.py [--steps 20]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from mechanic_fast import mechanize

LRS = [1e-4, 1e-2, 1.0, 1e2, 1e4]
BASES = {
    "SGD(momentum=0.9)": (torch.optim.SGD, dict(momentum=0.9)),
    "AdamW(weight_decay=0.01)": (torch.optim.AdamW, dict(weight_decay=0.01)),
}
LAYOUTS = {
    "float32": (torch.float32, {}),
    "bfloat16, ref_dtype=float32": (torch.bfloat16, {"ref_dtype": "float32"}),
    "bfloat16": (torch.bfloat16, {}),
}


def run(dtype, Base, kwargs, lr, steps, seed=0, n=1000, **options):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, generator=gen, dtype=torch.float64) * 0.05
    drift = torch.randn(n, generator=gen, dtype=torch.float64)
    grads = [drift + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(steps)]
    p = torch.nn.Parameter(x0.to(dtype, copy=True))
    opt = mechanize(Base, **options)([p], lr=lr, **kwargs)
    for g in grads:
        p.grad = g.to(dtype)
        opt.step()
    return p.detach()


def ulps(x, exact, dtype):
    rounded = exact.to(dtype)
    ulp = (rounded.abs().nextafter(torch.tensor(float("inf"), dtype=dtype)) - rounded.abs()).double()
    return ((x.double() - exact).abs() / ulp).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[20])
    args = parser.parse_args()
    print("| base | steps | layout | " + " | ".join(f"lr {lr:g}" for lr in LRS) + " |")
    print("|---|---|---|" + "---|" * len(LRS))
    for base, (Base, kwargs) in BASES.items():
        for steps in args.steps:
            for layout, (dtype, options) in LAYOUTS.items():
                cells = []
                for lr in LRS:
                    exact = run(torch.float64, Base, kwargs, lr, steps)
                    errors = ulps(run(dtype, Base, kwargs, lr, steps, **options), exact, dtype)
                    cells.append(f"{statistics.median(errors):.2f} / {max(errors):.0f}")
                print(f"| {base} | {steps} | {layout} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
