"""The pytest-benchmark suite in bench/ stays runnable (timing is for `pytest bench/ --benchmark-only`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import HANG_LIMIT_S

ROOT = Path(__file__).resolve().parents[2]


def test_bench_suite_runs_once_per_case(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(ROOT / "bench"),
            "-q",
            "--benchmark-disable",
            "-p",
            "no:cacheprovider",
            "-k",
            "200x64x64 and (foreach or base) and not compiled",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=HANG_LIMIT_S,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_gpu_check_says_it_needs_a_gpu_here(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run bench/gpu_check.py itself")
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out-dir", str(tmp_path / "gpu")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "no CUDA device" in out.stderr
    assert not (tmp_path / "gpu").exists()


def test_interleaved_script_reports_the_three_optimizers():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "interleaved.py"), "--shapes", "200x64x64", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=HANG_LIMIT_S,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("bare", "mechanic_fast", "mechanic_pytorch", "speed-up vs mechanic-pytorch"):
        assert name in out.stdout


def test_lr_invariance_script_reports_the_three_methods():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "lr_invariance.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=HANG_LIMIT_S,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "| base lr | plain | paper | invariant |" in out.stdout
    # the invariant mode ends at the same loss whatever the base lr (float32: to rounding)
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| 0.")]
    assert len(rows) == 4, out.stdout  # 2 lrs x 2 bases
    for first, second in zip(rows[0::2], rows[1::2]):
        a, b = float(first[3]), float(second[3])
        assert abs(a - b) <= 1e-3 * abs(b), out.stdout


def test_fast_right_runs_and_its_ratios_are_the_runs(tmp_path):
    """bench/fast_right.py on a few steps: every method runs, the ratios are the runs' losses over the
    references', and --tables rebuilds the same table from the saved runs."""
    import json

    script = str(ROOT / "bench" / "fast_right.py")
    out = tmp_path / "runs.json"
    args = ["--tasks", "regress", "--bases", "sgd", "--horizons", "3,5", "--seeds", "1", "--jobs", "1"]
    result = subprocess.run(
        [sys.executable, script, *args, "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=HANG_LIMIT_S,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    saved = json.loads(out.read_text())
    first = next(r for r in saved["rows"] if r["steps"] == 3)
    runs = [r for r in saved["runs"] if r["method"] == "mechanic_pytorch"]
    assert len(runs) == 7 and all(list(r["res"]) == ["3"] for r in runs)  # to the first horizon only
    best = min(r["res"]["3"][0] for r in runs)
    default = first["mechanics"]["default"]
    assert default["fast"] == default["train"] / best
    tuned = min(r["res"]["3"][1] for r in saved["runs"] if r["method"] == "tuned")
    assert default["right"] == default["held_out"] / tuned
    tables = subprocess.run(
        [sys.executable, script, "--tables", str(out)], capture_output=True, text=True, timeout=HANG_LIMIT_S
    )
    assert tables.returncode == 0 and tables.stdout.strip() in result.stdout, tables.stderr


def test_tuner_trace_prints_the_tuners_state(tmp_path):
    """bench/tuner_trace.py on a few steps: one row per `--every` steps, with the effective lr that
    mechanic_scale * lr gives and one s_j per Mechanic beta, then the count of loss spikes."""
    script = str(ROOT / "bench" / "tuner_trace.py")
    args = ["--task", "regress", "--base", "sgd", "--steps", "6", "--every", "2"]
    result = subprocess.run(
        [sys.executable, script, *args], cwd=tmp_path, capture_output=True, text=True, timeout=HANG_LIMIT_S
    )
    assert result.returncode == 0, result.stdout + result.stderr
    *table, count = result.stdout.splitlines()[1:]
    rows = [line.split(" | ") for line in table]
    assert count == "0 spikes in 6 steps", result.stdout
    assert [int(r[0]) for r in rows] == [0, 2, 4], result.stdout
    first_effective_lr = 1e-3  # SGD's: 1e-2 of its usual lr, at the first step
    assert float(rows[0][2]) == pytest.approx(first_effective_lr, rel=1e-3)
    assert all(len(r[4].strip("[]").split()) == 4 for r in rows)  # the default's four tuners


def test_fast_right_candidates_take_json_lists():
    """--candidate NAME:KEY=VALUE,...: a value may be a JSON list, whose commas do not split pairs (in a
    process of its own: fast_right puts bench/ on sys.path)."""
    code = (
        "import json, fast_right; print(json.dumps(fast_right._candidate_options("
        "'slow:betas=[0.999,0.9999],s_decay=0.1,store_delta=true')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT / "bench", capture_output=True, text=True, timeout=HANG_LIMIT_S
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"betas": [0.999, 0.9999], "s_decay": 0.1, "store_delta": True}
