"""The tuner's state step by step on one task of bench/fast_right.py: training loss, effective lr, the
inner product h and each tuner's s_j, r_j and sqrt(v_j), every `--every` steps and at every loss spike.

    python bench/tuner_trace.py --task digits --base adamw --steps 3000 [--seed 0] [--every 100]
                                [--betas 0.9,0.99,0.999,0.9999,0.99999,0.999999]

The default (mechanize(Base)) at base lr 1e-2, as fast_right measures it, or with the Mechanic betas
given; a spike is a step whose batch loss is above 1e-3 and ten times the one before. The last line
counts the spikes.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fast_right  # noqa: E402

from mechanic_fast import mechanize, tuner  # noqa: E402

LR = fast_right.DEFAULT_LR


def _fmt(values: List[float]) -> str:
    return "[" + " ".join(f"{v:.1e}" for v in values) + "]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="digits")
    parser.add_argument("--base", default="adamw", choices=sorted(fast_right.BASES))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--betas", help="Mechanic's betas, comma-separated (default: the default's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    make_model, loss_fn, _, _ = fast_right._task(args.task, args.seed)
    torch.manual_seed(args.seed)
    model = make_model()
    Base, options = fast_right.BASES[args.base]
    betas = None if args.betas is None else [float(b) for b in args.betas.split(",")]
    opt = mechanize(Base, betas=betas)(model.parameters(), lr=LR, **options)
    seen: List[float] = []
    inner_product = tuner.inner_product

    def traced(*a: Any, **k: Any) -> torch.Tensor:
        h = inner_product(*a, **k)
        seen.append(h.item())
        return h

    tuner.inner_product = traced
    previous, spikes = None, 0
    print("step | batch loss | effective lr | h | s_j | r_j | sqrt(v_j)")
    for t in range(args.steps):
        opt.zero_grad()
        loss = loss_fn(model, t)
        loss.backward()
        opt.step()
        value = loss.item()
        spike = previous is not None and value > 1e-3 and value > 10 * previous
        spikes += spike
        if t % args.every == 0 or spike:
            entry = opt.param_groups[0]["mechanic"]
            print(
                f"{t} | {value:.2e} | {opt.mechanic_scale.item() * LR:.3e} | {seen[-1]:+.2e} | "
                f"{_fmt(entry['s'].tolist())} | {_fmt(entry['r'].tolist())} | "
                f"{_fmt(entry['v'].sqrt().tolist())}" + (" | spike" if spike else "")
            )
        previous = value
    print(f"{spikes} spikes in {args.steps} steps")


if __name__ == "__main__":
    main()
