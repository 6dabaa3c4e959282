"""`python -m mechanic_fast` / `mechanic-fast`: a demonstration on real data, and the benchmark sweep."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import mechanize

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
# Plain AdamW's best lr at the default 1500 steps, from the grid {3e-4, 1e-3, 3e-3, 1e-2, 3e-2}: final
# validation losses 1.931, 1.714, 1.806, 1.800, 2.285 (measured on the reference machine).
BASELINE_LR = 1e-3


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
    train: torch.Tensor, val: torch.Tensor, lr: float, mechanized: bool, args: argparse.Namespace, bar: Any
) -> Dict[str, Any]:
    torch.manual_seed(args.seed)
    model = CharModel(args.context)
    opt_class = mechanize(torch.optim.AdamW) if mechanized else torch.optim.AdamW
    opt = opt_class(model.parameters(), lr=lr, weight_decay=0.0)
    losses, scales = [], []
    for x, y in _batches(train, args.context, args.batch_size, args.steps, args.seed):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        scales.append(opt.mechanic_scale.item() if mechanized else 1.0)
        bar.update(1)
    final = _evaluate(model, val, args.context)
    scale = scales[-1]
    return {
        "optimizer": "mechanized AdamW" if mechanized else "AdamW (tuned)",
        "base_lr": lr,
        "val_loss": final if math.isfinite(final) else float("nan"),
        "scale": scale,
        "effective_lr": scale * lr,
        "train_loss": losses,
        "scale_curve": scales,
    }


def _progress_bar(total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
    except ImportError:  # a plain counter on stderr
        return _PlainBar(total, desc)


class _PlainBar:
    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n = total, desc, 0

    def update(self, k: int) -> None:
        self.n += k
        if self.n % max(1, self.total // 20) == 0 or self.n == self.total:
            print(f"\r{self.desc}: {self.n}/{self.total}", end="", file=sys.stderr, flush=True)

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        print(file=sys.stderr)


def demo(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads) if args.threads else None
    data = load_corpus()
    split = int(0.9 * len(data))
    train, val = data[:split], data[split:]
    lrs = args.lrs
    start = time.perf_counter()
    print(
        f"Next-byte prediction on {len(data):,} bytes of Python's own standard library "
        f"({', '.join(CORPUS_MODULES)}); {args.steps} steps of batch {args.batch_size} per run.\n"
    )
    bar = _progress_bar((len(lrs) + 1) * args.steps, "training")
    runs = []
    for lr, mechanized in [(args.baseline_lr, False)] + [(lr, True) for lr in lrs]:
        bar.set_description(f"{'mechanized' if mechanized else 'tuned AdamW'} lr={lr:g}")
        runs.append(train_run(train, val, lr, mechanized, args, bar))
    bar.close()
    print(results_table(runs))
    print(f"\n({time.perf_counter() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "batch_size": args.batch_size, "runs": runs}, f)
    if args.plot:
        plot_runs(runs, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def results_table(runs: Sequence[Dict[str, Any]]) -> str:
    lines = [
        "| optimizer | base lr | final val loss | learned scale | effective lr |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in runs:
        scale = f"{r['scale']:.3g}" if r["optimizer"].startswith("mechanized") else "-"
        lr, loss, effective = r["base_lr"], r["val_loss"], r["effective_lr"]
        lines.append(f"| {r['optimizer']} | {lr:g} | {loss:.3f} | {scale} | {effective:.3g} |")
    return "\n".join(lines)


def plot_runs(runs: Sequence[Dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_scale) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.cm.viridis([i / max(1, len(runs) - 2) for i in range(len(runs) - 1)])
    window = 20
    for r, color in zip(runs[1:], colors):
        label = f"mechanized, lr={r['base_lr']:g}"
        ax_loss.plot(_smooth(r["train_loss"], window), color=color, label=label)
        ax_scale.plot(r["scale_curve"], color=color, label=label)
    ax_loss.plot(
        _smooth(runs[0]["train_loss"], window), "k--", label=f"AdamW tuned, lr={runs[0]['base_lr']:g}"
    )
    ax_loss.set(xlabel="step", ylabel=f"train loss (running mean of {window})", title="Loss")
    ax_scale.set(
        xlabel="step",
        ylabel="learned scale S",
        yscale="log",
        title="Mechanic's scale (effective lr = S * lr)",
    )
    ax_loss.legend(fontsize=7)
    ax_scale.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(values: Sequence[float], window: int) -> List[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


# --------------------------------------------------------------------------------------------- bench
def bench(args: argparse.Namespace) -> int:
    from . import benchmark

    bar = None

    def progress(done: int, total: int, what: str) -> None:
        nonlocal bar
        if bar is None:
            bar = _progress_bar(total, "benchmark")
        bar.set_description(what)
        if done:
            bar.update(1)

    result = benchmark.run_sweep(args.device, args.quick, args.json, args.md, args.plot, progress)
    if bar is not None:
        bar.close()
    print(benchmark.markdown_table(result["rows"]))
    return 0


# ------------------------------------------------------------------------------------------- parsing
def _lr_list(text: str) -> List[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lrs must be comma-separated numbers, got {text!r}") from None
    if not values or not all(v > 0 and math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"--lrs must be positive finite numbers, got {text!r}")
    return values


def _positive(kind: type, what: str):
    """An argparse type: a positive finite number of `kind` (int or float)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {what}, got {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected a positive {what}, got {text!r}")
        return value

    return parse


_positive_int = _positive(int, "integer")
_positive_float = _positive(float, "number")


def _output(suffix: Optional[str]):
    def check(text: str) -> str:
        parent = os.path.dirname(os.path.abspath(text))
        if not os.path.isdir(parent):
            raise argparse.ArgumentTypeError(f"directory {parent!r} does not exist")
        if suffix and not text.lower().endswith(suffix):
            raise argparse.ArgumentTypeError(f"{text!r} must end in {suffix}")
        return text

    return check


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mechanic-fast", description="Mechanic learning-rate tuner: demonstration and benchmarks."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser(
        "demo",
        help="train on real data: tuned AdamW vs mechanized AdamW over many base learning rates",
        description="Train a next-byte model on the source code of Python's standard library, once with a "
        "tuned AdamW and then with mechanized AdamW at base learning rates spread over many orders of "
        "magnitude, and print final validation losses and Mechanic's learned scales.",
    )
    d.add_argument(
        "--lrs",
        type=_lr_list,
        default=_lr_list(DEFAULT_LRS),
        help=f"comma-separated base learning rates for mechanized AdamW (default {DEFAULT_LRS})",
    )
    d.add_argument(
        "--baseline-lr",
        type=_positive_float,
        default=BASELINE_LR,
        help=f"learning rate of the tuned AdamW baseline (default {BASELINE_LR:g})",
    )
    d.add_argument("--steps", type=_positive_int, default=1500, help="training steps per run (default 1500)")
    d.add_argument("--batch-size", type=_positive_int, default=64, help="sequences per step (default 64)")
    d.add_argument(
        "--context", type=_positive_int, default=16, help="bytes of context per prediction (default 16)"
    )
    d.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the model init and data order, shared by all runs (default 0)",
    )
    d.add_argument(
        "--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    d.add_argument(
        "--quick", action="store_true", help="a few seconds' run (60 steps, 3 learning rates), for tests"
    )
    d.add_argument(
        "--plot", type=_output(".png"), help="write loss curves and the learned scale to this PNG file"
    )
    d.add_argument(
        "--json", type=_output(None), help="write the results (per-step losses and scales) to this JSON file"
    )
    d.set_defaults(func=demo)

    b = sub.add_parser(
        "bench",
        help="benchmark a mechanized step against the bare step, mechanic-pytorch and the memory floor",
        description="Benchmark sweep: AdamW(foreach) bare, mechanic-pytorch, mechanic-fast foreach, compiled "
        "and Triton (CUDA), over shape sets and dtypes, on every device present.",
    )
    b.add_argument(
        "--device",
        action="append",
        choices=["cpu", "cuda", "mps"],
        help="device to benchmark (repeatable; default: every device present)",
    )
    b.add_argument("--quick", action="store_true", help="small shapes and few repeats, no compile (seconds)")
    b.add_argument("--json", type=_output(".json"), help="write the rows and machine info to this JSON file")
    b.add_argument("--md", type=_output(".md"), help="write the markdown table to this file")
    b.add_argument("--plot", type=_output(".png"), help="write a bar plot of step times to this PNG file")
    b.set_defaults(func=bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo" and args.quick:
        args.steps = min(args.steps, 60)
        args.lrs = (
            [args.lrs[0], args.lrs[len(args.lrs) // 2], args.lrs[-1]] if len(args.lrs) > 3 else args.lrs
        )
    if args.command == "bench":
        missing = [d for d in args.device or [] if d not in _present_devices()]
        if missing:
            parser.error(f"--device {missing[0]}: no such device on this machine")
    return args.func(args)


def _present_devices() -> List[str]:
    from .benchmark import devices_present

    return devices_present()


if __name__ == "__main__":
    raise SystemExit(main())
