"""DDP and FSDP2 (DTensor parameters) with 2 CPU processes (gloo, 127.0.0.1) against one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from dist_problem import STEPS, batch, make_model, make_opt

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
HERE = os.path.dirname(__file__)


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_two_ranks(mode: str, tmp_path, attempts: int = 3) -> dict:
    """Run both ranks; if one fails, stop the other at once (no waiting on a dead peer) and show both
    logs. A port taken between choosing it and binding it is retried with a new one."""
    out = str(tmp_path / f"{mode}.pt")
    for attempt in range(attempts):
        port = free_port()
        procs = [
            subprocess.Popen(
                [sys.executable, os.path.join(HERE, "dist_worker.py"), mode, str(r), "2", port, out],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for r in range(2)
        ]
        deadline = time.monotonic() + 240
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
        for p in procs:
            if p.poll() is None:
                p.kill()
        logs = "\n".join(
            f"--- rank {r} (exit {p.wait()})\n{p.stdout.read().decode()}" for r, p in enumerate(procs)
        )
        if all(p.returncode == 0 for p in procs):
            return torch.load(out, weights_only=False)
        if "address already in use" not in logs.lower() or attempt == attempts - 1:
            raise AssertionError(logs)
    raise AssertionError("unreachable")


def single_process() -> dict:
    model = make_model()
    opt = make_opt(model.parameters())
    for t in range(STEPS):
        x, y = batch(t)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return {"params": [p.detach() for p in model.parameters()], "scale": opt.mechanic_scale}


def assert_close(result: dict, ref: dict, rtol: float) -> None:
    assert ref["scale"] > 1e-4  # the tuner moved 100x from its start
    assert abs(result["scale"] - ref["scale"]) <= rtol * ref["scale"], (result["scale"], ref["scale"])
    for a, b in zip(result["params"], ref["params"]):
        assert a.shape == b.shape
        assert ((a - b).abs().max() / b.abs().max()) <= rtol


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process_on_the_full_batch(tmp_path):
    result = run_two_ranks("ddp", tmp_path)
    assert_close(result, single_process(), rtol=1e-5)
    assert result["collectives"] == []  # DDP already averaged the gradients: nothing to reduce


@pytest.mark.slow
def test_fsdp2_sharded_parameters_equal_one_process(tmp_path):
    result = run_two_ranks("fsdp", tmp_path)
    assert_close(result, single_process(), rtol=1e-5)
    # one all-reduce of the 4 sums per step, for all parameters together
    assert result["collectives"] == [4] * STEPS
