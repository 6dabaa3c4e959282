"""What the demo and the benchmark sweep write: markdown tables, machine facts and plots."""

from __future__ import annotations

import math
import os
import platform
from typing import Any, Dict, List, Optional, Sequence

import torch

BASE_COLORS = {"AdamW": ("C0", "Blues"), "SGD": ("C1", "Oranges")}

# what each run trains, and how its name starts: plain, mechanize(Base) (the default), the paper variant
METHOD_LABELS = {"plain": "", "mechanized": "mechanized ", "paper": "lr_invariant=False mechanized "}
# the sweep's implementations, in the order of its tables
# "foreach_fresh": keep_workspace=False (the accelerator default: no buffer kept between steps)
IMPLS = ("base", "mechanic_pytorch", "foreach", "foreach_fresh", "base_compiled", "compiled", "triton")


def plot_series(runs: Sequence[Dict[str, Any]], references: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """What the demo plot draws, as data: one entry per line, with its panel, label and style.

    Left panel: final loss against base lr, one colour per base (plain dashed, mechanized solid,
    lr_invariant=False dash-dotted with triangles), the
    base's best plain run as a dotted line in its colour, and diverged runs as an x at the top. One
    panel per base on the right: the effective lr S * lr over the steps, one shade per base lr."""
    series = []
    for ref in references:
        label = ref["base"]
        color, shades = BASE_COLORS.get(label, ("C2", "Greens"))
        for method, style in (("plain", "o--"), ("mechanized", "s-"), ("paper", "^-.")):
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


def machine_info() -> Dict[str, Any]:
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown_table(rows: Sequence[Dict[str, Any]]) -> str:
    head = (
        "| device | dtype | shapes | impl | step ms | overhead ms | floor ms | overhead / floor "
        "| speedup vs mechanic-pytorch | peak extra MiB | resident MiB | note |\n"
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|\n"
    )
    lines = []
    for r in rows:
        peak, resident = r.get("peak_extra_bytes"), r.get("resident_bytes")
        lines.append(
            f"| {r['device']} | {r['dtype']} | {r['shape_set']} | {r['impl']} "
            f"| {_fmt(r.get('step_ms'), '.2f')} "
            f"| {_fmt(r.get('overhead_ms'), '.2f')} | {_fmt(r.get('floor_ms'), '.2f')} "
            f"| {_fmt(r.get('overhead_over_floor'), '.1f')} | {_fmt(r.get('speedup_vs_reference'), '.2f')} "
            f"| {_fmt(peak / 2**20 if peak is not None else None, '.1f')} "
            f"| {_fmt(resident / 2**20 if resident is not None else None, '.1f')} "
            f"| {r.get('note', '').replace('|', '/')} |"
        )
    return head + "\n".join(lines) + "\n"


def markdown_report(rows: Sequence[Dict[str, Any]], warning: Optional[str] = None) -> str:
    """The `--md` file: the table, and the load warning under it when the machine was busy."""
    return markdown_table(rows) + (f"\n\n**Warning:** {warning}\n" if warning else "\n")


def plot(rows: Sequence[Dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["device"], r["dtype"], r["shape_set"]) for r in rows})
    impls = [i for i in IMPLS if any(r["impl"] == i and "step_ms" in r for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4.5))
    width = 0.8 / max(len(impls), 1)
    for k, impl in enumerate(impls):
        values = [
            next(
                (
                    r.get("step_ms", 0.0)
                    for r in rows
                    if (r["device"], r["dtype"], r["shape_set"]) == g and r["impl"] == impl
                ),
                0.0,
            )
            for g in groups
        ]
        ax.bar([i + k * width for i in range(len(groups))], values, width, label=impl)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels(["\n".join(g) for g in groups], fontsize=8)
    ax.set_ylabel("median step time (ms)")
    ax.set_title("AdamW(foreach) step: bare and mechanized")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
