"""The demo behind `python -m mechanic_fast demo`: a small character-level language model trained on
the standard library's own source code, plain and mechanized, over a grid of learning rates."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import time
from typing import Any, Dict, List, NamedTuple, Sequence

import torch

from .. import mechanize
from .report import METHOD_LABELS, plot_runs

# Real text that ships with every Python: the standard library's own source code.
CORPUS_MODULES = (
    "argparse.py",
    "textwrap.py",
    "string.py",
    "json/decoder.py",
    "json/encoder.py",
    "csv.py",
    "fractions.py",
    "shlex.py",
)
DEFAULT_LRS = "1e-6,1e-5,1e-4,1e-3,1e-2,1e-1,1"
QUICK_LRS = "1e-5,1e-3,1e-1"
QUICK_STEPS = 500  # fewer would leave every run in its first, noisy phase


class Base(NamedTuple):
    label: str
    cls: type
    options: Dict[str, Any]
    tuned_lr: float  # the best lr of a grid (see docs/demo.md)


# The best lr at the default 1500 steps, from a grid. AdamW from
# {3e-4, 1e-3, 3e-3, 1e-2, 3e-2}: final validation losses 1.931, 1.714, 1.806, 1.800, 2.285. SGD with
# momentum 0.9 from {0.01, 0.03, 0.1, 0.3, 1}: 1.866, 1.763, 1.956, 2.248, diverged.
BASES = {
    "adamw": Base("AdamW", torch.optim.AdamW, dict(weight_decay=0.0), 1e-3),
    "sgd": Base("SGD", torch.optim.SGD, dict(momentum=0.9), 0.03),
}


# ---------------------------------------------------------------------------------------------- demo
def load_corpus() -> torch.Tensor:
    """The bytes of a fixed set of standard-library modules, as a uint8 tensor."""
    root = sysconfig.get_paths()["stdlib"]
    data = b"".join(open(os.path.join(root, name), "rb").read() for name in CORPUS_MODULES)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


class CharModel(torch.nn.Module):
    """Next-byte prediction from the previous `context` bytes: embeddings and a 2-layer MLP."""

    def __init__(self, context: int, width: int = 256, embed: int = 32) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(256, embed)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(context * embed, width), torch.nn.GELU(), torch.nn.Linear(width, 256)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(x).flatten(1))


def _batches(data: torch.Tensor, context: int, batch: int, steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(data) - context - 1, (batch,), generator=gen)
        window = torch.stack([data[i : i + context + 1] for i in idx.tolist()])
        yield window[:, :-1], window[:, -1]


def _evaluate(model: torch.nn.Module, data: torch.Tensor, context: int) -> float:
    with torch.no_grad():
        windows = data.unfold(0, context + 1, 97)  # a fixed, strided sample of the validation text
        logits = model(windows[:, :-1])
        return torch.nn.functional.cross_entropy(logits, windows[:, -1]).item()


def train_run(
    train: torch.Tensor,
    val: torch.Tensor,
    base: Base,
    lr: float,
    method: str,
    args: argparse.Namespace,
    progress: Progress,
) -> Dict[str, Any]:
    """One training run; every run starts from the same init and sees the same batches."""
    torch.manual_seed(args.seed)
    model = CharModel(args.context)
    mechanized = method != "plain"
    # mechanize(Base) as users get it; "paper": the paper variant, lr_invariant=False
    opt_class = mechanize(base.cls, **({"lr_invariant": False} if method == "paper" else {}))
    opt_class = opt_class if mechanized else base.cls
    opt = opt_class(model.parameters(), lr=lr, **base.options)
    losses, scales = [], []
    for x, y in _batches(train, args.context, args.batch_size, args.steps, args.seed):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if mechanized:
            scales.append(opt.mechanic_scale.item())
        progress.update(1)
    final = _evaluate(model, val, args.context)
    scale = scales[-1] if mechanized else None
    return {
        "optimizer": f"{METHOD_LABELS[method]}{base.label}",
        "method": method,
        "base": base.label,
        "mechanized": mechanized,
        "base_lr": lr,
        "val_loss": final if math.isfinite(final) else float("nan"),
        "scale": scale,
        "effective_lr": scale * lr if mechanized else lr,
        "train_loss": losses,
        "scale_curve": scales if mechanized else None,
    }


class Progress:
    """A progress bar on a terminal; elsewhere (a CI log) one line per finished run, never per step."""

    def __init__(self, total_steps: int, runs: int) -> None:
        self.runs, self.done, self.started = runs, 0, time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total_steps, file=sys.stderr, leave=False, dynamic_ncols=True)
            except ImportError:
                pass

    def start(self, what: str) -> None:
        self.what, self.started = what, time.perf_counter()
        if self.bar is not None:
            self.bar.set_description(what)

    def update(self, steps: int) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def finish(self, result: str) -> None:
        self.done += 1
        line = f"[{self.done}/{self.runs}] {self.what}: {result} ({time.perf_counter() - self.started:.1f} s)"
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def demo(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_corpus()
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    bases = [BASES[name] for name in args.bases]
    # the tuned reference is its own run unless the lr grid already has that lr
    jobs = [(b, args.baseline_lr or b.tuned_lr, "plain", "tuned") for b in bases]
    jobs = [j for j in jobs if j[1] not in args.lrs]
    jobs += [(b, lr, m, "") for b in bases for lr in args.lrs for m in METHOD_LABELS]
    start = time.perf_counter()
    print(
        f"Next-byte prediction on {len(data):,} bytes of Python's own standard library "
        f"({', '.join(CORPUS_MODULES)}); {args.steps} steps of batch {args.batch_size} per run, every run "
        "from the same initialisation on the same batches.\n"
    )
    progress = Progress(len(jobs) * args.steps, len(jobs))
    tuned, runs = {}, []
    for base, lr, method, kind in jobs:
        name = f"{METHOD_LABELS[method]}{base.label}"
        progress.start(f"{name} lr={lr:g}" + (" (tuned)" if kind else ""))
        run = train_run(train, val, base, lr, method, args, progress)
        progress.finish(f"val loss {run['val_loss']:.3f}")
        if kind:
            run["optimizer"] += " (tuned)"
            tuned[base.label] = run
        else:
            runs.append(run)
    progress.close()
    tuned = _best_plain(runs, tuned, bases)
    for base in bases:
        print(results_table([r for r in runs if r["base"] == base.label], tuned[base.label]))
        print()
        print(conclusion([r for r in runs if r["base"] == base.label], tuned[base.label]))
        print()
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "steps": args.steps,
                    "batch_size": args.batch_size,
                    "tuned": list(tuned.values()),
                    "runs": runs,
                },
                f,
            )
    if args.plot:
        plot_runs(runs, list(tuned.values()), args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _best_plain(runs: List[Dict[str, Any]], extra: Dict[str, Any], bases: List[Base]) -> Dict[str, Any]:
    """The reference per base: the best plain run made here, at these settings (the lr tuned at the
    default settings need not be the best at others: fewer steps, another batch size)."""
    tuned = {}
    for base in bases:
        plain = [r for r in runs if r["base"] == base.label and r["method"] == "plain"]
        plain += [extra[base.label]] if base.label in extra else []
        best = min(plain, key=lambda r: r["val_loss"] if math.isfinite(r["val_loss"]) else math.inf)
        tuned[base.label] = {
            **best,
            "optimizer": f"{base.label} (best plain)",
            "chosen_from": sorted({r["base_lr"] for r in plain}),
        }
    return tuned


def _loss(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "diverged"


def results_table(runs: Sequence[Dict[str, Any]], tuned: Dict[str, Any]) -> str:
    """One row per base lr: the plain optimizer, mechanize(Base), and lr_invariant=False (the paper)."""
    label = tuned["base"]
    lines = [
        f"Final validation loss (lower is better), {label} with and without Mechanic:",
        "",
        f"| base lr | {label} | mechanized {label} | lr_invariant=False {label} | effective lr S*lr, "
        "mechanized | effective lr, lr_invariant=False |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for lr in sorted({r["base_lr"] for r in runs}):
        plain, mech, paper = (
            next(r for r in runs if r["base_lr"] == lr and r["method"] == m) for m in METHOD_LABELS
        )
        lines.append(
            f"| {lr:g} | {_loss(plain['val_loss'])} | {_loss(mech['val_loss'])} | {_loss(paper['val_loss'])} "
            f"| {mech['effective_lr']:.3g} | {paper['effective_lr']:.3g} |"
        )
    lines.append(f"| best plain: {tuned['base_lr']:g} | {_loss(tuned['val_loss'])} | | | | |")
    return "\n".join(lines)


def _spread(runs: Sequence[Dict[str, Any]]) -> str:
    finite = [r["val_loss"] for r in runs if math.isfinite(r["val_loss"])]
    diverged = len(runs) - len(finite)
    if not finite:
        return "every run diverged"
    text = f"{min(finite):.3f} to {max(finite):.3f} (spread {max(finite) - min(finite):.3f})"
    return text + (f", {diverged} diverged" if diverged else "")


def conclusion(runs: Sequence[Dict[str, Any]], tuned: Dict[str, Any]) -> str:
    """The measured answer to "how much does the base lr matter, with and without Mechanic?"."""
    label = tuned["base"]
    lrs = sorted({r["base_lr"] for r in runs})
    plain = [r for r in runs if r["method"] == "plain"]
    mech = [r for r in runs if r["method"] == "mechanized"]
    paper = [r for r in runs if r["method"] == "paper"]
    best = min((r for r in mech if math.isfinite(r["val_loss"])), key=lambda r: r["val_loss"], default=None)
    chosen = ", ".join(f"{lr:g}" for lr in tuned["chosen_from"])
    gap = f"; the best mechanized run ({best['val_loss']:.3f} at lr {best['base_lr']:g}) is " + (
        f"{best['val_loss'] - tuned['val_loss']:+.3f} from the best plain {label} run "
        f"({tuned['val_loss']:.3f} at lr {tuned['base_lr']:g}, the best of lrs {chosen})"
        if best
        else ""
    )
    return (
        f"Conclusion: over base lrs {lrs[0]:g} to {lrs[-1]:g}, {label}'s final loss ranges "
        f"{_spread(plain)}; mechanized {label}'s ranges {_spread(mech)}; with lr_invariant=False "
        f"(the paper variant) {_spread(paper)}" + (gap if best else "") + "."
    )
