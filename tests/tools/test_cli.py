"""`python -m mechanic_fast demo|bench`: what they print and write, --help, and bad arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import HANG_LIMIT_S

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(*args, cwd, timeout=HANG_LIMIT_S):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "mechanic_fast", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_demo_quick_compares_plain_and_mechanized_per_lr(tmp_path):
    work = tmp_path / "cwd"
    work.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli(
        "demo", "--quick", "--plot", str(out / "demo.png"), "--json", str(out / "demo.json"), cwd=work
    )
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "demo.json").read_text())
    assert data["steps"] == 500  # quick: fewer lrs, not steps cut to noise
    for label in ("AdamW", "SGD"):
        header = (
            f"| base lr | {label} | mechanized {label} | lr_invariant=False {label} "
            "| effective lr S*lr, mechanized | effective lr, lr_invariant=False |"
        )
        lines = result.stdout.splitlines()
        start = lines.index(header)
        rows = [line for line in lines[start + 2 :] if line.startswith("| ")][:4]
        best = next(t for t in data["tuned"] if t["base"] == label)  # the best plain run made here
        plain = [r["val_loss"] for r in data["runs"] if r["base"] == label and r["method"] == "plain"]
        assert best["val_loss"] <= min(plain) and best["chosen_from"] == sorted(
            {1e-5, 1e-3, 0.1, _tuned(label)}
        )
        assert [r.split("|")[1].strip() for r in rows] == [
            "1e-05",
            "0.001",
            "0.1",
            f"best plain: {best['base_lr']:g}",
        ]
        for row in rows[:3]:  # a plain, a mechanized and a paper-variant loss on every row
            cells = [c.strip() for c in row.split("|")[1:-1]]
            assert len(cells) == 6 and all(cells), row
        conclusion = next(
            line for line in lines if line.startswith("Conclusion: over base lrs") and f" {label}'s" in line
        )
        assert "spread" in conclusion and f"mechanized {label}'s ranges" in conclusion
        assert "with lr_invariant=False (the paper variant)" in conclusion
        assert f"from the best plain {label} run" in conclusion and "the best of lrs" in conclusion
        runs = [r for r in data["runs"] if r["base"] == label]
        assert sorted((r["base_lr"], r["method"]) for r in runs) == sorted(
            (lr, m) for lr in (1e-5, 1e-3, 0.1) for m in ("plain", "mechanized", "paper")
        )
        mech = [r["effective_lr"] for r in runs if r["method"] == "mechanized"]
        assert max(mech) <= 1.05 * min(mech)  # the default (lr-invariant): one effective lr at every base lr
        for r in runs:
            assert len(r["train_loss"]) == 500
            if r["mechanized"]:
                assert r["effective_lr"] == pytest.approx(r["scale"] * r["base_lr"])
                assert len(r["scale_curve"]) == 500
    assert {t["base"] for t in data["tuned"]} == {"AdamW", "SGD"}
    assert (out / "demo.png").read_bytes()[:8] == PNG_MAGIC
    assert sorted(os.listdir(out)) == ["demo.json", "demo.png"] and os.listdir(work) == []
    # not a terminal: one line per run on stderr, no progress bar redrawn per step
    progress = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert len(progress) == len(data["runs"]) + 1  # + SGD's tuned lr 0.03, not in the quick grid
    assert "\r" not in result.stderr


def _tuned(label):
    from mechanic_fast.tools.demo import BASES

    return next(b.tuned_lr for b in BASES.values() if b.label == label)


def _fake_run(base, lr, mechanized, loss):
    curve = [1e-6 * 2**i for i in range(5)]
    method = mechanized if isinstance(mechanized, str) else ("mechanized" if mechanized else "plain")
    return {"base": base, "base_lr": lr, "method": method, "val_loss": loss, "scale_curve": curve}


def test_plot_series_tell_bases_apart_and_mark_diverged_runs():
    from mechanic_fast.tools.report import plot_series

    nan = float("nan")
    runs = [
        _fake_run(base, lr, m, nan if (base, lr, m) == ("SGD", 1.0, "plain") else 2.0 + lr)
        for base in ("AdamW", "SGD")
        for lr in (1e-3, 1.0)
        for m in ("plain", "mechanized", "paper")
    ]
    refs = [{**_fake_run("AdamW", 1e-3, False, 2.001)}, {**_fake_run("SGD", 1e-3, False, 2.001)}]
    series = plot_series(runs, refs)
    loss = [s for s in series if s["panel"] == "loss"]
    hlines = [s for s in loss if s["style"] == "hline"]
    # one best-plain reference per base, each in its base's colour and named after it
    assert [h["label"] for h in hlines] == ["best plain AdamW (lr 0.001)", "best plain SGD (lr 0.001)"]
    assert len({h["color"] for h in hlines}) == 2
    for h in hlines:
        base = h["label"].split()[2]
        assert all(s["color"] == h["color"] for s in loss if base in s["label"])
    # the diverged plain SGD run at lr 1 is marked, not drawn as a point
    sgd = next(s for s in loss if s["label"] == "plain SGD")
    assert sgd["diverged"] == [1.0] and sgd["x"] == [1e-3]
    labels = [s["label"] for s in loss if s["style"] != "hline"]
    assert labels == [
        f"{m}{b}"
        for b in ("AdamW", "SGD")
        for m in ("plain ", "mechanized ", "lr_invariant=False mechanized ")
    ]
    assert len({s["style"] for s in loss if s["style"] != "hline"}) == 3  # three methods, three line styles
    assert all(not s.get("diverged") for s in loss if s is not sgd)
    # one effective-lr panel per base; what is drawn is S * lr, as its axis says
    panels = {s["panel"] for s in series} - {"loss"}
    assert panels == {"effective lr: mechanized AdamW", "effective lr: mechanized SGD"}
    curve = next(s for s in series if s["panel"] == "effective lr: mechanized SGD" and s["label"] == "1")
    assert curve["y"] == [v * 1.0 for v in runs[0]["scale_curve"]]


@pytest.mark.parametrize("command", ["demo", "bench"])
@pytest.mark.parametrize(
    "option,make,message",
    [
        ("--json", lambda d: d / "adir", "is a directory"),
        ("--plot", lambda d: d / "adir.png", "is a directory"),
        ("--json", lambda d: d / "out.txt", "must end in .json"),
        ("--plot", lambda d: d / "no" / "such" / "x.png", "does not exist"),
    ],
)
def test_bad_output_paths_fail_before_any_work(command, option, make, message, tmp_path):
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir.png").mkdir()
    before = sorted(os.listdir(tmp_path))
    result = run_cli(command, option, str(make(tmp_path)), cwd=tmp_path, timeout=HANG_LIMIT_S)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "[1/" not in result.stderr and "Next-byte" not in result.stdout  # nothing trained or measured
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_plot_without_matplotlib_fails_before_any_work(command, tmp_path):
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "matplotlib.py").write_text("raise ImportError('matplotlib is blocked for this test')\n")
    env = dict(os.environ, PYTHONPATH=str(blocker), PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, "-m", "mechanic_fast", command, "--plot", "x.png"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=HANG_LIMIT_S,
        env=env,
    )
    assert result.returncode == 2 and "needs matplotlib" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["site"]


@pytest.mark.parametrize(
    "command,options",
    [
        (
            "demo",
            [
                "--lrs",
                "--bases",
                "--baseline-lr",
                "--steps",
                "--batch-size",
                "--context",
                "--seed",
                "--threads",
                "--quick",
                "--plot",
                "--json",
            ],
        ),
        ("bench", ["--device", "--quick", "--threads", "--json", "--md", "--plot"]),
    ],
)
def test_help_explains_every_option(command, options, tmp_path):
    result = run_cli(command, "--help", cwd=tmp_path)
    assert result.returncode == 0
    for option in options:
        assert option in result.stdout, option


@pytest.mark.parametrize(
    "args,message",
    [
        (["demo", "--lrs", "0.1,-1"], "positive"),
        (["demo", "--lrs", "abc"], "numbers"),
        (["demo", "--steps", "0"], "positive integer"),
        (["demo", "--plot", "out.jpg"], ".png"),
        (["demo", "--bases", "adamw,lion"], "--bases"),
        (["demo", "--plot", "/no/such/dir/x.png"], "does not exist"),
        (["bench", "--device", "tpu"], "invalid choice"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_arguments_exit_nonzero_with_a_message(args, message, tmp_path):
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert os.listdir(tmp_path) == []


def test_bench_quick_writes_json_markdown_and_png(tmp_path):
    result = run_cli(
        "bench",
        "--quick",
        "--device",
        "cpu",
        "--json",
        "b.json",
        "--md",
        "b.md",
        "--plot",
        "b.png",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "b.json").read_text())
    assert {"machine", "rows"} <= set(data) and data["machine"]["torch"]
    impls = {r["impl"] for r in data["rows"]}
    assert {"base", "mechanic_pytorch", "foreach"} <= impls
    for row in data["rows"]:
        assert {"device", "dtype", "shape_set", "impl", "floor_ms"} <= set(row)
        if row["impl"] in ("foreach", "mechanic_pytorch"):
            assert row["step_ms"] > 0 and "overhead_over_floor" in row and "speedup_vs_reference" in row
        if row["impl"].startswith("base"):  # a speed-up of the bare step over mechanic-pytorch means nothing
            assert "speedup_vs_reference" not in row
    table = (tmp_path / "b.md").read_text().split("\n\n**Warning:**")[0]  # a busy machine adds one
    assert table.startswith("| device | dtype |") and table.count("| cpu |") == len(data["rows"])
    lines = table.strip().splitlines()
    columns = lines[0].count("|")
    assert all(line.count("|") == columns for line in lines), "every row has the header's cells"
    triton = next(line for line in lines if "| triton |" in line)
    assert "needs CUDA" in triton  # said as what it is, in the note column
    assert table in result.stdout
    assert (tmp_path / "b.png").read_bytes()[:8] == PNG_MAGIC
    assert sorted(os.listdir(tmp_path)) == ["b.json", "b.md", "b.png"]


def test_bench_says_not_installed_as_such(monkeypatch):
    import torch

    from mechanic_fast.tools import sweep as benchmark

    monkeypatch.setitem(sys.modules, "mechanic_pytorch", None)  # import fails as if not installed
    rows = benchmark.measure("cpu", torch.float32, "tiny", [torch.Size((4, 4))], ["mechanic_pytorch"], True)
    assert rows[0]["note"].startswith("not installed")


def test_bench_warns_when_the_machine_is_busy(monkeypatch):
    from mechanic_fast.tools import sweep as benchmark

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.9, 1.0, 0.5))
    assert "not trustworthy" in benchmark.load_warning()
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.1, 0.1))
    assert benchmark.load_warning() is None


def test_bench_markdown_file_carries_the_load_warning():
    from mechanic_fast.tools import sweep as benchmark

    rows = [{"device": "cpu", "dtype": "float32", "shape_set": "s", "impl": "base", "floor_ms": 1.0}]
    busy = benchmark.markdown_report(rows, "load average 1.9 on 2 cores: timings are not trustworthy")
    assert busy.startswith(benchmark.markdown_table(rows))
    assert busy.rstrip().endswith("**Warning:** load average 1.9 on 2 cores: timings are not trustworthy")
    assert "Warning" not in benchmark.markdown_report(rows, None)
