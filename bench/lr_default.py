"""Which Mechanic should be the default: the paper variant or the lr-invariant mode, and with which
constants for Adam-like and SGD-like bases (issue 30).

usage: python bench/lr_default.py [--steps 1500] [--seeds 2] [--tasks lm,transformer,classify,regress]
                                  [--bases adamw,sgd] [--json out.json]

Four tasks (bench/lr_invariance.py's three and a small transformer LM on the same corpus), each trained
from the same init on the same batches, AdamW (weight decay 0.01) and SGD (momentum 0.9). Per task and
base: the tuned plain optimizer (the best final validation loss over a grid of lrs), and every cell's
final validation loss divided by it, for the paper variant and the lr-invariant mode over base lrs
1e-6..10, and the lr-invariant mode per s_decay (in units of the reference lr) at one base lr (it does
not depend on the lr, checked at a second). The worst cell is what a user who picked a bad lr gets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Dict, List

import lr_invariance
import torch
from lr_invariance import TASKS, load_corpus

LRS = [1e-6, 1e-4, 1e-2, 1, 10]
PLAIN_LRS = {"adamw": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], "sgd": [1e-2, 3e-2, 1e-1, 3e-1, 1]}


def _transformer_task(seed: int):
    data = load_corpus()
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    context, width = 32, 64

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(256, width)
            self.pos = torch.nn.Parameter(0.02 * torch.randn(context, width))
            layer = torch.nn.TransformerEncoderLayer(
                width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True
            )
            self.blocks = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = torch.nn.Linear(width, 256)
            self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(context))

        def forward(self, x):
            return self.head(self.blocks(self.embed(x) + self.pos, mask=self.mask, is_causal=True))

    def batch(t):
        gen = torch.Generator().manual_seed(1000 * seed + t)
        idx = torch.randint(0, len(train) - context - 1, (32,), generator=gen)
        return torch.stack([train[i : i + context + 1] for i in idx.tolist()])

    windows = val.unfold(0, context + 1, 997)[:256]

    def ce(model, w):
        logits = model(w[:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 256), w[:, 1:].reshape(-1))

    return Tiny, (lambda m, t: ce(m, batch(t))), (lambda m: ce(m, windows).item())


ALL_TASKS = {**TASKS, "transformer": _transformer_task}


def run(task: str, base: str, method: str, lr: float, seed: int, steps: int, **mechanic: Any) -> float:
    """`lr_invariance.run` over these tasks."""
    return lr_invariance.run(task, base, method, lr, seed, steps, tasks=ALL_TASKS, **mechanic)


S_DECAYS = (10.0, 1.0, 0.1, 0.0)  # the lr-invariant mode's s_decay, in units of the reference lr


def table(task: str, base: str, steps: int, seeds: int) -> Dict[str, Any]:
    """Ratios of final validation loss to the tuned plain run's: the paper variant per base lr, the
    invariant mode per s_decay at base lr 1e-2 (it does not depend on the lr; checked at lr 1 too)."""

    def mean(method: str, lr: float, **mechanic: Any) -> float:
        return statistics.mean(run(task, base, method, lr, s, steps, **mechanic) for s in range(seeds))

    plain = {lr: mean("plain", lr) for lr in PLAIN_LRS[base]}
    tuned = min(plain.values())
    return {
        "plain": plain,
        "tuned": tuned,
        "paper": {lr: mean("paper", lr) / tuned for lr in LRS},
        "invariant": {d: mean("invariant", 1e-2, s_decay=d) / tuned for d in S_DECAYS},
        "invariant_default_lr_1": mean("invariant", 1.0) / tuned,
    }


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--tasks", default="lm,transformer,classify,regress")
    parser.add_argument("--bases", default="adamw,sgd")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    results: Dict[str, Any] = {}
    for task in args.tasks.split(","):
        for base in args.bases.split(","):
            results[f"{task}/{base}"] = t = table(task, base, args.steps, args.seeds)
            print(
                f"{task}/{base}: tuned {t['tuned']:.4g} (plain {t['plain']}); paper per lr "
                + ", ".join(f"{lr:g}: {v:.3f}" for lr, v in t["paper"].items())
                + "; invariant per s_decay "
                + ", ".join(f"{d:g}: {v:.3f}" for d, v in t["invariant"].items())
                + f"; invariant (default s_decay) at lr 1: {t['invariant_default_lr_1']:.3f}"
            )
            sys.stdout.flush()
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
