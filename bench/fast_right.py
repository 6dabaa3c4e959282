"""Fast and right: the lr-invariant default against mechanic-pytorch at its best lr (training loss in the
first steps) and against the tuned base (held-out loss at the end), with the previous default beside it.

usage: python bench/fast_right.py [--old REV] [--candidate NAME:KEY=VALUE,...] [--tasks digits,regress,
                                  classify,lm,transformer] [--bases adamw,sgdm,sgd] [--horizons 300,1500]
                                  [--seeds 3] [--jobs 2] [--json out.json]
       python bench/fast_right.py --tables a.json b.json ...   (one table from the runs of earlier --json)

Every run trains one task from the same init on the same batches and records, at each horizon, the
training loss (the loss on the whole training set where the task has one, else the mean of the last 50
batch losses) and the held-out loss. Per task, base and horizon (means over seeds):
- default: mechanize(Base) at base lr 1e-2 (the mode is lr-invariant: any base lr gives the same run);
- old: the default of the revision --old (exported with git archive), if given;
- each --candidate: mechanize(Base, KEY=VALUE, ...) at base lr 1e-2 (for calibrating the defaults);
- mechanic-pytorch: its best and worst over base lrs 1e-4..100, run to the first horizon only (its
  role here is the "fast" reference);
- tuned: the base at the best lr of a grid (AdamW 1e-4..3e-2, SGD 1e-2..1).
"fast" is default / mechanic-pytorch's best on training loss; "right" is default / tuned on held-out loss.
A run whose loss turns non-finite counts as diverged (inf). A second table gives the worst cell per task
and horizon over the bases, with mechanic-pytorch at its worst lr and the base at the worst lr of its grid.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import os
import re
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lr_default  # noqa: E402
import lr_invariance  # noqa: E402

# lr_invariance's bases (its "sgd" has momentum 0.9) and plain SGD
BASES = {
    "adamw": lr_invariance.BASES["adamw"],
    "sgdm": lr_invariance.BASES["sgd"],
    "sgd": (torch.optim.SGD, {}),
}
MP_LRS = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]
TUNED_LRS = {"adamw": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2], "sgdm": [1e-2, 3e-2, 1e-1, 3e-1, 1.0]}
TUNED_LRS["sgd"] = TUNED_LRS["sgdm"]
DEFAULT_LR = 1e-2


def _digits_task(seed: int):
    """A small MLP on scikit-learn's digits, batch 128 (the classifier of issue 34)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    val_x, val_y, train_x, train_y = x[:297], y[:297], x[297:], y[297:]

    def model():
        return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

    def loss(m, t):
        idx = torch.randint(0, len(train_x), (128,), generator=torch.Generator().manual_seed(1000 * seed + t))
        return torch.nn.functional.cross_entropy(m(train_x[idx]), train_y[idx])

    def evaluate(m):
        return torch.nn.functional.cross_entropy(m(val_x), val_y).item()

    def train_loss(m):
        return torch.nn.functional.cross_entropy(m(train_x), train_y).item()

    return model, loss, evaluate, train_loss


def _task(name: str, seed: int) -> Tuple[Callable, Callable, Callable, Optional[Callable]]:
    if name == "digits":
        return _digits_task(seed)
    return (*lr_default.ALL_TASKS[name](seed), None)


_OLD: Dict[str, Any] = {}


def _optimizer(method: str, base: str, lr: float, params, old: Optional[str]) -> torch.optim.Optimizer:
    """`method`: tuned, mechanic_pytorch, old, default, or a candidate "name:key=value,..."."""
    Base, options = BASES[base]
    if method == "tuned":
        return Base(params, lr=lr, **options)
    if method == "mechanic_pytorch":
        import mechanic_pytorch

        return mechanic_pytorch.mechanize(Base)(params, lr=lr, **options)
    if method == "old":
        if old not in _OLD:
            import ab_versions

            _OLD[old] = ab_versions.import_old(old)
        return _OLD[old].mechanize(Base)(params, lr=lr, **options)
    from mechanic_fast import mechanize

    return mechanize(Base, **_candidate_options(method))(params, lr=lr, **options)


def _candidate_options(method: str) -> Dict[str, Any]:
    if ":" not in method:
        return {}
    # KEY=VALUE pairs split at commas outside brackets: a value may be a JSON list ("betas=[0.99,0.999]")
    items = re.split(r",(?![^\[]*\])", method.split(":", 1)[1])
    pairs = [item.split("=", 1) for item in items if item]
    return {key: json.loads(value) for key, value in pairs}


Job = Tuple[str, str, str, float, int, Tuple[int, ...], Optional[str]]


def run(job: Job) -> Dict[int, Tuple[float, float]]:
    """One run: horizon -> (training loss, held-out loss)."""
    task, base, method, lr, seed, horizons, old = job
    torch.set_num_threads(1)
    make_model, loss_fn, evaluate, train_loss = _task(task, seed)
    torch.manual_seed(seed)
    model = make_model()
    opt = _optimizer(method, base, lr, model.parameters(), old)
    recent: List[float] = []
    out: Dict[int, Tuple[float, float]] = {}
    if method == "mechanic_pytorch":
        horizons = horizons[:1]
    for t in range(max(horizons)):
        opt.zero_grad()
        loss = loss_fn(model, t)
        value = loss.item()
        if not math.isfinite(value):
            break
        recent = (recent + [value])[-50:]
        loss.backward()
        opt.step()
        if t + 1 in horizons:
            with torch.no_grad():
                held_out = evaluate(model)
                train = train_loss(model) if train_loss is not None else statistics.mean(recent)
            if not (math.isfinite(held_out) and math.isfinite(train)):
                break
            out[t + 1] = (train, held_out)
    return {h: out.get(h, (math.inf, math.inf)) for h in horizons}


def _jobs(args: argparse.Namespace) -> List[Tuple]:
    horizons = tuple(int(h) for h in args.horizons.split(","))
    jobs = []
    for task in args.tasks.split(","):
        for base in args.bases.split(","):
            methods = [("default", [DEFAULT_LR]), ("mechanic_pytorch", MP_LRS), ("tuned", TUNED_LRS[base])]
            if args.old:
                methods.append(("old", [DEFAULT_LR]))
            methods += [(candidate, [DEFAULT_LR]) for candidate in args.candidate]
            for method, lrs in methods:
                for lr in lrs:
                    for seed in range(args.seeds):
                        jobs.append((task, base, method, lr, seed, horizons, args.old))
    # the longest first, so that two workers finish together
    cost = {"lm": 10, "transformer": 20, "classify": 5}
    return sorted(jobs, key=lambda j: -cost.get(j[0], 1))


def summarise(results: Dict[Tuple, Dict[int, Tuple[float, float]]]) -> List[Dict[str, Any]]:
    """Per task, base and horizon: seed means; mechanic-pytorch's best and worst lr on training loss, the
    tuned base's best on each loss; and per Mechanic default ("default", "old", candidates) its losses
    and the two ratios, "fast" (training loss / mechanic-pytorch's best) and "right" (held-out / tuned)."""
    by_config: Dict[Tuple, List[Dict[int, Tuple[float, float]]]] = {}
    for (task, base, method, lr, _seed), res in results.items():
        by_config.setdefault((task, base, method, lr), []).append(res)
    means = {
        key: {h: tuple(statistics.mean(r[h][i] for r in runs) for i in (0, 1)) for h in runs[0]}
        for key, runs in by_config.items()
    }
    rows = []
    for task, base in sorted({(k[0], k[1]) for k in means}):
        horizons = sorted({h for k, v in means.items() if k[:2] == (task, base) for h in v})
        mechanics = sorted({k[2] for k in means if k[2] not in ("tuned", "mechanic_pytorch")}, key=_order)
        for h in horizons:
            cells = functools.partial(_cells, means, task, base, h)
            row: Dict[str, Any] = {"task": task, "base": base, "steps": h, "mechanics": {}}
            mp = cells("mechanic_pytorch", 0)
            row["mp_best_train"], row["mp_worst_train"] = (min(mp), max(mp)) if mp else (math.nan, math.nan)
            row["mp_worst_held_out"] = max(cells("mechanic_pytorch", 1), default=math.nan)
            row["tuned_train"], row["tuned_held_out"] = min(cells("tuned", 0)), min(cells("tuned", 1))
            row["grid_worst_held_out"] = max(cells("tuned", 1))
            for method in mechanics:
                train, held_out = cells(method, 0)[0], cells(method, 1)[0]
                row["mechanics"][method] = {
                    "train": train,
                    "held_out": held_out,
                    "fast": train / row["mp_best_train"],
                    "right": held_out / row["tuned_held_out"],
                }
            rows.append(row)
    return rows


def _cells(
    means: Dict[Tuple, Dict[int, Tuple[float, float]]], task: str, base: str, h: int, method: str, metric: int
) -> List[float]:
    """One loss (0: training, 1: held-out) at horizon h of every lr of a method."""
    return [v[h][metric] for k, v in means.items() if k[:3] == (task, base, method) and h in v]


def _order(method: str) -> Tuple[int, str]:
    return ({"default": 0, "old": 1}.get(method, 2), method)


def markdown(rows: List[Dict[str, Any]]) -> str:
    """One table: per Mechanic default its training / held-out loss and its fast / right ratios."""
    mechanics = sorted({m for r in rows for m in r["mechanics"]}, key=_order)
    head = "| task, base | steps | mechanic-pytorch best / worst train | tuned train / held-out |"
    names = [m.split(":")[0] for m in mechanics]
    head += "".join(f" {m} train / held-out | {m} fast / right |" for m in names)
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    first = min(r["steps"] for r in rows)  # mechanic-pytorch runs to the first horizon only
    for r in rows:
        mp = f"{r['mp_best_train']:.3g} / {r['mp_worst_train']:.3g}" if r["steps"] == first else "–"
        tuned = f"{r['tuned_train']:.3g} / {r['tuned_held_out']:.3g}"
        line = f"| {r['task']}, {r['base']} | {r['steps']} | {mp} | {tuned} |"
        for m in mechanics:
            c = r["mechanics"].get(m)
            fast = f"{c['fast']:.2f}" if r["steps"] == first else "–"
            line += f" {c['train']:.3g} / {c['held_out']:.3g} | {fast} / {c['right']:.2f} |" if c else " | |"
        lines.append(line)
    return "\n".join(lines)


def worst(rows: List[Dict[str, Any]]) -> str:
    """The worst cell per task and horizon, over the bases: fast / right of each Mechanic default; of
    mechanic-pytorch at its worst lr (first horizon only); right of the base at the worst lr of its grid."""
    mechanics = sorted({m for r in rows for m in r["mechanics"]}, key=_order)
    head = "| task | steps |" + "".join(f" {m.split(':')[0]} fast / right |" for m in mechanics)
    head += " mechanic-pytorch, worst lr: fast / right | base, worst lr of its grid: right |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    first = min(r["steps"] for r in rows)
    for task, steps in sorted({(r["task"], r["steps"]) for r in rows}):
        group = [r for r in rows if (r["task"], r["steps"]) == (task, steps)]
        line = f"| {task} | {steps} |"
        for m in mechanics:
            cells = [r["mechanics"][m] for r in group if m in r["mechanics"]]
            fast = f"{max(c['fast'] for c in cells):.2f}" if steps == first else "–"
            line += f" {fast} / {max(c['right'] for c in cells):.2f} |"
        if steps == first:
            mp_fast = max(r["mp_worst_train"] / r["mp_best_train"] for r in group)
            mp_right = max(r["mp_worst_held_out"] / r["tuned_held_out"] for r in group)
            line += f" {mp_fast:.3g} / {mp_right:.3g} |"
        else:
            line += " – |"
        line += f" {max(r['grid_worst_held_out'] / r['tuned_held_out'] for r in group):.3g} |"
        lines.append(line)
    return "\n".join(lines)


def load_runs(paths: List[str]) -> Dict[Tuple, Dict[int, Tuple[float, float]]]:
    """The runs of --json files, as `summarise` takes them."""
    runs = {}
    for path in paths:
        with open(path) as f:
            for r in json.load(f)["runs"]:
                key = (r["task"], r["base"], r["method"], r["lr"], r["seed"])
                runs[key] = {int(h): tuple(v) for h, v in r["res"].items()}
    return runs


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", help="a git revision whose default is measured beside this one")
    parser.add_argument("--candidate", action="append", default=[], help="NAME:KEY=VALUE,... (repeatable)")
    parser.add_argument("--tasks", default="digits,regress,classify,lm,transformer")
    parser.add_argument("--bases", default="adamw,sgdm,sgd")
    parser.add_argument("--horizons", default="300,1500")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json")
    parser.add_argument("--tables", nargs="+", help="print the table of the runs saved by --json")
    args = parser.parse_args(argv)
    if args.tables:
        rows = summarise(load_runs(args.tables))
        print(markdown(rows) + "\n\n" + worst(rows))
        return 0
    start = time.perf_counter()
    jobs = _jobs(args)
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        outputs = pool.map(run, jobs, chunksize=1)
    results = {job[:5]: out for job, out in zip(jobs, outputs)}
    rows = summarise(results)
    print(markdown(rows) + "\n\n" + worst(rows))
    print(f"({len(jobs)} runs, {time.perf_counter() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            raw = [dict(zip(("task", "base", "method", "lr", "seed"), k), res=v) for k, v in results.items()]
            json.dump({"args": vars(args), "rows": rows, "runs": raw}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
