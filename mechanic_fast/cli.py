"""`python -m mechanic_fast` / `mechanic-fast`: a demonstration on real data, and the benchmark sweep."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import time
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

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
QUICK_LRS = "1e-5,1e-3,1e-1"
QUICK_STEPS = 500  # fewer would leave every run in its first, noisy phase


# what each run trains, and how its name starts: plain, Mechanic (paper variant), Mechanic lr_invariant
METHOD_LABELS = {"plain": "", "mechanized": "mechanized ", "invariant": "lr-invariant mechanized "}


class Base(NamedTuple):
    label: str
    cls: type
    options: Dict[str, Any]
    tuned_lr: float  # the best lr of a grid (see docs/demo.md)


# The best lr at the default 1500 steps, from a grid, measured on a 2-core CPU. AdamW from
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
    opt_class = mechanize(base.cls, lr_invariant=method == "invariant") if mechanized else base.cls
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
    # The reference is the best plain run made here, at these settings: the lr tuned at the default
    # settings need not be the best at others (fewer steps, another batch size).
    extra, tuned = tuned, {}
    for base in bases:
        plain = [r for r in runs if r["base"] == base.label and r["method"] == "plain"]
        plain += [extra[base.label]] if base.label in extra else []
        best = min(plain, key=lambda r: r["val_loss"] if math.isfinite(r["val_loss"]) else math.inf)
        tuned[base.label] = {
            **best,
            "optimizer": f"{base.label} (best plain)",
            "chosen_from": sorted({r["base_lr"] for r in plain}),
        }
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


def _loss(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "diverged"


def results_table(runs: Sequence[Dict[str, Any]], tuned: Dict[str, Any]) -> str:
    """One row per base lr: the plain, the mechanized and the lr-invariant mechanized optimizer."""
    label = tuned["base"]
    lines = [
        f"Final validation loss (lower is better), {label} with and without Mechanic:",
        "",
        f"| base lr | {label} | mechanized {label} | lr-invariant {label} | effective lr S*lr, mechanized "
        "| effective lr, lr-invariant |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for lr in sorted({r["base_lr"] for r in runs}):
        plain, mech, inv = (
            next(r for r in runs if r["base_lr"] == lr and r["method"] == m) for m in METHOD_LABELS
        )
        lines.append(
            f"| {lr:g} | {_loss(plain['val_loss'])} | {_loss(mech['val_loss'])} | {_loss(inv['val_loss'])} "
            f"| {mech['effective_lr']:.3g} | {inv['effective_lr']:.3g} |"
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
    inv = [r for r in runs if r["method"] == "invariant"]
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
        f"{_spread(plain)}; mechanized {label}'s ranges {_spread(mech)}; lr-invariant mechanized "
        f"{label}'s ranges {_spread(inv)}" + (gap if best else "") + "."
    )


BASE_COLORS = {"AdamW": ("C0", "Blues"), "SGD": ("C1", "Oranges")}


def plot_series(runs: Sequence[Dict[str, Any]], references: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """What the demo plot draws, as data: one entry per line, with its panel, label and style.

    Left panel: final loss against base lr, one colour per base (plain dashed, mechanized solid,
    lr-invariant dash-dotted with triangles), the
    base's best plain run as a dotted line in its colour, and diverged runs as an x at the top. One
    panel per base on the right: the effective lr S * lr over the steps, one shade per base lr."""
    series = []
    for ref in references:
        label = ref["base"]
        color, shades = BASE_COLORS.get(label, ("C2", "Greens"))
        for method, style in (("plain", "o--"), ("mechanized", "s-"), ("invariant", "^-.")):
            mine = sorted(
                (r for r in runs if r["base"] == label and r["method"] == method),
                key=lambda r: r["base_lr"],
            )
            finite = [r for r in mine if math.isfinite(r["val_loss"])]
            series.append(
                {
                    "panel": "loss",
                    "label": f"{METHOD_LABELS[method] or 'plain '}{label}",
                    "color": color,
                    "style": style,
                    "x": [r["base_lr"] for r in finite],
                    "y": [r["val_loss"] for r in finite],
                    "diverged": [r["base_lr"] for r in mine if not math.isfinite(r["val_loss"])],
                }
            )
        series.append(
            {
                "panel": "loss",
                "label": f"best plain {label} (lr {ref['base_lr']:g})",
                "color": color,
                "style": "hline",
                "y": [ref["val_loss"]],
            }
        )
        mech = sorted(
            (r for r in runs if r["base"] == label and r["method"] == "mechanized"),
            key=lambda r: r["base_lr"],
        )
        for i, r in enumerate(mech):
            series.append(
                {
                    "panel": f"effective lr: mechanized {label}",
                    "label": f"{r['base_lr']:g}",
                    "shades": (shades, 0.35 + 0.65 * i / max(1, len(mech) - 1)),
                    "style": "-",
                    "x": list(range(1, len(r["scale_curve"]) + 1)),
                    "y": [s * r["base_lr"] for s in r["scale_curve"]],
                }
            )
    return series


def plot_runs(runs: Sequence[Dict[str, Any]], tuned: Sequence[Dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = plot_series(runs, tuned)
    panels = list(dict.fromkeys(s["panel"] for s in series))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.8), squeeze=False)
    ax_of = dict(zip(panels, axes[0]))
    finite = [y for s in series if s["panel"] == "loss" for y in s["y"] if math.isfinite(y)]
    top = max(finite) * 1.05 if finite else 1.0
    for s in series:
        ax = ax_of[s["panel"]]
        if s["style"] == "hline":
            ax.axhline(s["y"][0], linestyle=":", linewidth=2, color=s["color"], label=s["label"])
            continue
        color = plt.get_cmap(s["shades"][0])(s["shades"][1]) if "shades" in s else s["color"]
        ax.plot(s["x"], s["y"], s["style"], color=color, label=s["label"])
        if s.get("diverged"):
            ax.plot(s["diverged"], [top] * len(s["diverged"]), "x", color=color, markersize=10, mew=2)
            for lr in s["diverged"]:
                ax.annotate("diverged", (lr, top), textcoords="offset points", xytext=(0, -14), ha="center")
    ax_of["loss"].set(
        xscale="log",
        xlabel="base learning rate",
        ylabel="final validation loss",
        title="Final loss vs base lr",
    )
    ax_of["loss"].legend(fontsize=7, loc="upper center")
    for panel in panels[1:]:
        ax_of[panel].set(
            xlabel="step", ylabel="effective lr = S × base lr", yscale="log", title=panel.split(": ")[1]
        )
        ax_of[panel].legend(fontsize=7, loc="lower right", title="base lr given", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- bench
def bench(args: argparse.Namespace) -> int:
    from . import benchmark

    if args.threads:
        torch.set_num_threads(args.threads)
    warning = benchmark.load_warning()
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    progress: Optional[Progress] = None

    def report(done: int, total: int, what: str) -> None:
        nonlocal progress
        if progress is None:
            progress = Progress(total, total)
        if done:
            progress.update(1)
            progress.finish("measured")
        if done < total:
            progress.start(what)

    result = benchmark.run_sweep(
        args.device, args.quick, args.json, args.md, args.plot, report, warning=warning
    )
    if progress is not None:
        progress.close()
    print(benchmark.markdown_table(result["rows"]))
    if warning:
        print(f"\nwarning: {warning}")
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


OUTPUTS = {"json": ".json", "md": ".md", "plot": ".png"}


def check_outputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before any work, an output that could not be written at the end (exit 2, one line, with
    the usage of the subcommand that was given)."""
    parser = args.subparser
    for name, suffix in OUTPUTS.items():
        path = getattr(args, name, None)
        if path is None:
            continue
        flag = f"--{name}"
        if os.path.isdir(path):
            parser.error(f"{flag} {path!r} is a directory; give a file name ending in {suffix}")
        if not path.lower().endswith(suffix):
            formats = {".png": "a PNG image", ".json": "JSON", ".md": "a markdown table"}[suffix]
            parser.error(
                f"{flag} {path!r} must end in {suffix}: it writes {formats}, the only format it writes"
            )
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            parser.error(f"{flag} {path!r}: directory {parent!r} does not exist")
        if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
            parser.error(f"{flag} {path!r} is not writable")
    if getattr(args, "plot", None):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib, which is not installed (pip install matplotlib)")


def _bases(text: str) -> List[str]:
    names = [v.strip().lower() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in BASES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"--bases takes a comma-separated subset of {sorted(BASES)}, got {text!r}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mechanic-fast", description="Mechanic learning-rate tuner: demonstration and benchmarks."
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"mechanic-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser(
        "demo",
        help="train on real data: how much the base lr matters with and without Mechanic",
        description="Train a next-byte model on the source code of Python's standard library with plain "
        "and mechanized AdamW and SGD with momentum (--bases chooses) at base learning rates "
        "spread over six orders of magnitude, plus the plain optimizer at its tuned lr; print the final "
        "validation losses side by side, the spread of each over the lr range, and the gap to the best plain "
        "run made (the grid, plus one run at a pre-tuned lr).",
    )
    d.add_argument(
        "--lrs",
        type=_lr_list,
        default=None,
        help=f"comma-separated base learning rates (default {DEFAULT_LRS}; --quick: {QUICK_LRS})",
    )
    d.add_argument(
        "--bases",
        type=_bases,
        default=["adamw", "sgd"],
        help="comma-separated base optimizers: adamw, sgd (with momentum 0.9) (default adamw,sgd)",
    )
    d.add_argument(
        "--baseline-lr",
        type=_positive_float,
        default=None,
        help="one more plain run at this lr, a candidate for the best plain run the others are compared "
        "with (default: the best of a grid at the default settings: "
        + ", ".join(f"{b.label} {b.tuned_lr:g}" for b in BASES.values())
        + ")",
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
        "--quick",
        action="store_true",
        help=f"3 learning rates ({QUICK_LRS}) and at most {QUICK_STEPS} steps",
    )
    d.add_argument("--plot", help="write final loss vs base lr and the learned scales to this .png file")
    d.add_argument("--json", help="write the results (per-step losses and scales) to this .json file")
    d.set_defaults(func=demo, subparser=d)

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
    b.add_argument(
        "--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    b.add_argument("--json", help="write the rows and machine info to this .json file")
    b.add_argument("--md", help="write the markdown table to this .md file")
    b.add_argument("--plot", help="write a bar plot of step times to this .png file")
    b.set_defaults(func=bench, subparser=b)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_outputs(parser, args)  # before any work: a bad path must not cost a whole run
    if args.command == "demo":
        if args.quick:
            args.steps = min(args.steps, QUICK_STEPS)
        if args.lrs is None:
            args.lrs = _lr_list(QUICK_LRS if args.quick else DEFAULT_LRS)
    if args.command == "bench":
        missing = [d for d in args.device or [] if d not in _present_devices()]
        if missing:
            args.subparser.error(f"--device {missing[0]}: no such device on this machine")
    return args.func(args)


def _present_devices() -> List[str]:
    from .benchmark import devices_present

    return devices_present()


if __name__ == "__main__":
    raise SystemExit(main())
