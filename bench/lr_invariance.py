"""How much the base lr matters: plain, paper-Mechanic and lr-invariant Mechanic over base lrs 1e-6..10.

usage: python bench/lr_invariance.py [--steps N] [--seeds K] [--lrs 1e-6,...] [--json out.json] [--quick]
       python bench/lr_invariance.py --calibrate [--steps N] [--seeds K]

Three small tasks on data that ships with Python or is made here, each trained from the same init on the
same batches for every (base, lr, method):
- lm: next-byte prediction on Python's own standard library (the demo's model and corpus);
- classify: which of 8 standard-library modules a 32-byte window comes from (cross-entropy);
- regress: a 2-layer tanh MLP fitting y = sin(3 x.w) + noise on made-up inputs (mean squared error).
Bases AdamW (weight decay 0.01) and SGD with momentum 0.9. Reported per task and base: the final
validation loss at every base lr for plain, mechanized (paper) and mechanized (lr_invariant=True), the
best plain run of the grid (the "tuned" plain optimizer), each method's spread over the lrs, and its
worst and mean gap to the best plain run. Diverged runs count as the task's loss at init.
--calibrate: the lr-invariant mode's (s_init, s_decay) over a grid, at one base lr (the mode does not
depend on it), against the paper variant's defaults at the best and worst base lr of the same grid.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch

from mechanic_fast import mechanize
from mechanic_fast.tools.demo import CharModel, load_corpus

METHODS = ("plain", "paper", "invariant")
BASES = {"adamw": (torch.optim.AdamW, dict(weight_decay=0.01)), "sgd": (torch.optim.SGD, dict(momentum=0.9))}


def _lm_task(seed: int) -> Tuple[Callable[[], torch.nn.Module], Callable, Callable]:
    data = load_corpus()
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    context = 16

    def batch(t: int):
        gen = torch.Generator().manual_seed(1000 * seed + t)
        idx = torch.randint(0, len(train) - context - 1, (64,), generator=gen)
        window = torch.stack([train[i : i + context + 1] for i in idx.tolist()])
        return window[:, :-1], window[:, -1]

    windows = val.unfold(0, context + 1, 97)
    val_x, val_y = windows[:, :-1], windows[:, -1]

    def evaluate(model):
        return torch.nn.functional.cross_entropy(model(val_x), val_y).item()

    return (lambda: CharModel(context, width=128)), (lambda m, t: _ce(m, *batch(t))), evaluate


def _ce(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def _classify_task(seed: int):
    import os
    import sysconfig

    from mechanic_fast.tools.demo import CORPUS_MODULES

    root = sysconfig.get_paths()["stdlib"]
    texts = [open(os.path.join(root, name), "rb").read() for name in CORPUS_MODULES]
    width = 32
    windows, labels = [], []
    for label, text in enumerate(texts):
        t = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
        w = t.unfold(0, width, width)
        windows.append(w)
        labels.append(torch.full((len(w),), label))
    x, y = torch.cat(windows), torch.cat(labels)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n_val = len(x) // 10
    val_x, val_y, train_x, train_y = x[:n_val], y[:n_val], x[n_val:], y[n_val:]

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(256, 16)
            self.mlp = torch.nn.Sequential(
                torch.nn.Linear(width * 16, 128), torch.nn.ReLU(), torch.nn.Linear(128, len(texts))
            )

        def forward(self, x):
            return self.mlp(self.embed(x).flatten(1))

    def loss(model, t):
        gen = torch.Generator().manual_seed(1000 * seed + t)
        idx = torch.randint(0, len(train_x), (64,), generator=gen)
        return _ce(model, train_x[idx], train_y[idx])

    return Classifier, loss, lambda m: _ce(m, val_x, val_y).item()


def _regress_task(seed: int):
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(10, generator=gen) / math.sqrt(10)

    def make(n, g):
        x = torch.randn(n, 10, generator=g)
        return x, torch.sin(3 * x @ w).unsqueeze(1) + 0.05 * torch.randn(n, 1, generator=g)

    val_x, val_y = make(2048, torch.Generator().manual_seed(8))

    def model():
        return torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))

    def loss(m, t):
        x, y = make(64, torch.Generator().manual_seed(1000 * seed + t))
        return torch.nn.functional.mse_loss(m(x), y)

    return model, loss, lambda m: torch.nn.functional.mse_loss(m(val_x), val_y).item()


TASKS = {"lm": _lm_task, "classify": _classify_task, "regress": _regress_task}


def run(
    task: str, base: str, method: str, lr: float, seed: int, steps: int, tasks=TASKS, **mechanic
) -> float:
    """Final validation loss of one run (`tasks`: name -> task maker); a diverged run counts as its loss
    at init."""
    make_model, loss_fn, evaluate = tasks[task](seed)
    torch.manual_seed(seed)
    model = make_model()
    Base, options = BASES[base]
    cls = Base if method == "plain" else mechanize(Base, lr_invariant=method == "invariant", **mechanic)
    opt = cls(model.parameters(), lr=lr, **options)
    with torch.no_grad():
        start = evaluate(model)
    for t in range(steps):
        opt.zero_grad()
        loss = loss_fn(model, t)
        if not torch.isfinite(loss):
            return start  # diverged: counted as no progress at all
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = evaluate(model)
    return final if math.isfinite(final) and final < 10 * start else start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--lrs", default="1e-6,1e-5,1e-4,1e-3,1e-2,1e-1,1,10")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--json")
    parser.add_argument("--quick", action="store_true", help="2 lrs, 1 seed, 20 steps, the regression only")
    parser.add_argument("--calibrate", action="store_true", help="the invariant mode's constants over a grid")
    args = parser.parse_args(argv)
    if args.calibrate:
        return calibrate(args.tasks.split(","), args.steps, args.seeds)
    lrs = [float(v) for v in args.lrs.split(",")]
    tasks = args.tasks.split(",")
    if args.quick:
        lrs, args.seeds, args.steps, tasks = [1e-3, 1e-1], 1, 20, ["regress"]
    torch.set_num_threads(1)
    results: Dict[str, Dict] = {}
    start = time.perf_counter()
    for task in tasks:
        for base in BASES:
            table = {
                m: {lr: [run(task, base, m, lr, s, args.steps) for s in range(args.seeds)] for lr in lrs}
                for m in METHODS
            }
            results[f"{task}/{base}"] = {m: {str(lr): v for lr, v in t.items()} for m, t in table.items()}
            print(report(task, base, lrs, table))
            sys.stdout.flush()
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "seeds": args.seeds, "results": results}, f, indent=1)
    return 0


def calibrate(tasks: List[str], steps: int, seeds: int) -> int:
    torch.set_num_threads(1)
    grid = [(s_init, s_decay) for s_init in (1e-9, 1e-7, 1e-5) for s_decay in (10.0, 1.0, 0.0)]
    print("| task, base | " + " | ".join(f"s_init {a:g}, s_decay {b:g}" for a, b in grid) + " |")
    print("|---|" + "---:|" * len(grid))
    for task in tasks:
        for base in BASES:
            cells = []
            for s_init, s_decay in grid:
                losses = [
                    run(task, base, "invariant", 1e-3, s, steps, s_init=s_init, s_decay=s_decay)
                    for s in range(seeds)
                ]
                cells.append(f"{statistics.mean(losses):.4g}")
            print(f"| {task}, {base} | " + " | ".join(cells) + " |")
            sys.stdout.flush()
    return 0


def report(task: str, base: str, lrs: List[float], table: Dict[str, Dict[float, List[float]]]) -> str:
    mean = {m: {lr: statistics.mean(v) for lr, v in t.items()} for m, t in table.items()}
    best = min(mean["plain"].values())
    lines = [f"\n{task}, {base} (final validation loss, mean of seeds; best plain run {best:.4g})", ""]
    lines.append("| base lr | " + " | ".join(METHODS) + " |")
    lines.append("|---:|" + "---:|" * len(METHODS))
    for lr in lrs:
        lines.append(f"| {lr:g} | " + " | ".join(f"{mean[m][lr]:.4g}" for m in METHODS) + " |")
    for m in METHODS:
        values = list(mean[m].values())
        gaps = [v - best for v in values]
        lines.append(
            f"{m}: spread {max(values) - min(values):.4g}, worst gap to best plain {max(gaps):+.4g}, "
            f"mean gap {statistics.mean(gaps):+.4g}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
