"""`python -m mechanic_fast demo|bench`: what they print and write, --help, and bad arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(*args, cwd, timeout=300):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "mechanic_fast", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_demo_quick_prints_table_and_writes_plot_and_json(tmp_path):
    work = tmp_path / "cwd"
    work.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli(
        "demo", "--quick", "--plot", str(out / "demo.png"), "--json", str(out / "demo.json"), cwd=work
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| optimizer | base lr | final val loss | learned scale | effective lr |")
    assert rows[1].startswith("| AdamW (tuned) |")
    assert len([r for r in rows if r.startswith("| mechanized AdamW |")]) == 3
    assert (out / "demo.png").read_bytes()[:8] == PNG_MAGIC
    data = json.loads((out / "demo.json").read_text())
    assert len(data["runs"]) == 4
    for run in data["runs"]:
        assert {
            "optimizer",
            "base_lr",
            "val_loss",
            "scale",
            "effective_lr",
            "train_loss",
            "scale_curve",
        } <= set(run)
        assert len(run["train_loss"]) == data["steps"] == 60
    mechanized = [r for r in data["runs"] if r["optimizer"].startswith("mechanized")]
    assert all(r["effective_lr"] == pytest.approx(r["scale"] * r["base_lr"]) for r in mechanized)
    assert len({r["scale"] for r in mechanized}) == 3  # each run learned its own scale
    assert sorted(os.listdir(out)) == ["demo.json", "demo.png"] and os.listdir(work) == []
    assert "training" in result.stderr or "mechanized" in result.stderr  # the progress bar


@pytest.mark.parametrize(
    "command,options",
    [
        (
            "demo",
            [
                "--lrs",
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
        ("bench", ["--device", "--quick", "--json", "--md", "--plot"]),
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
    table = (tmp_path / "b.md").read_text()
    assert table.startswith("| device | dtype |") and table.count("| cpu |") == len(data["rows"])
    assert table in result.stdout
    assert (tmp_path / "b.png").read_bytes()[:8] == PNG_MAGIC
    assert sorted(os.listdir(tmp_path)) == ["b.json", "b.md", "b.png"]
