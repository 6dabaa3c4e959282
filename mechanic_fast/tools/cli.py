"""`python -m mechanic_fast` / `mechanic-fast`: the command line of the demo and the benchmark sweep."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, Optional, Sequence

import torch

from .demo import BASES, DEFAULT_LRS, QUICK_LRS, QUICK_STEPS, Progress, demo


# --------------------------------------------------------------------------------------------- bench
def bench(args: argparse.Namespace) -> int:
    from . import sweep

    if args.threads:
        torch.set_num_threads(args.threads)
    warning = sweep.load_warning()
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

    result = sweep.run_sweep(args.device, args.quick, args.json, args.md, args.plot, report, warning=warning)
    if progress is not None:
        progress.close()
    print(sweep.markdown_table(result["rows"]))
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
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"mechanic-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_bench(sub)
    return parser


def _add_demo(sub: argparse._SubParsersAction) -> None:
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


def _add_bench(sub: argparse._SubParsersAction) -> None:
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
    from .sweep import devices_present

    return devices_present()


if __name__ == "__main__":
    raise SystemExit(main())
