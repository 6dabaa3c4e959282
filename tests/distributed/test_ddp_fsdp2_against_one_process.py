"""DDP and FSDP2 (DTensor parameters) with 2 CPU processes (gloo, 127.0.0.1) against one process."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from dist_problem import STEPS, batch, make_model, make_opt, result, train
from helpers import launch

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
HERE = os.path.dirname(__file__)


def run_ranks(mode: str, tmp_path, world: int = 2, extra=()) -> dict:
    """dist_worker.py in `mode` on `world` ranks; rank 0's result."""
    out = str(tmp_path / f"{mode}-{world}.pt")
    launch("dist_worker.py", world, [mode, out, *extra])
    return torch.load(out, weights_only=False)


def single_process() -> dict:
    model = make_model()
    opt = make_opt(model.parameters())
    for t in range(STEPS):
        x, y = batch(t)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return {"params": [p.detach() for p in model.parameters()], "scale": opt.mechanic_scale}


def assert_close(result: dict, ref: dict, rtol: float, min_scale: float = 1e-4) -> None:
    assert ref["scale"] > min_scale  # the tuner moved far from its start (1e-6)
    assert abs(result["scale"] - ref["scale"]) <= rtol * ref["scale"], (result["scale"], ref["scale"])
    for a, b in zip(result["params"], ref["params"]):
        assert a.shape == b.shape
        assert ((a - b).abs().max() / b.abs().max()) <= rtol


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process_on_the_full_batch(tmp_path):
    result = run_ranks("ddp", tmp_path)
    assert_close(result, single_process(), rtol=1e-5)
    assert result["collectives"] == []  # DDP already averaged the gradients: nothing to reduce


@pytest.mark.slow
def test_fsdp2_sharded_parameters_equal_one_process(tmp_path):
    result = run_ranks("fsdp", tmp_path)
    assert_close(result, single_process(), rtol=1e-5)
    # one all-reduce of the 4 sums per step, for all parameters together
    assert result["collectives"] == [4] * STEPS


# ------------------------------------------------------------------ torch.distributed.checkpoint (DCP)
def _assert_bit_identical(a: dict, b: dict) -> None:
    assert torch.equal(a["scale"], b["scale"]), (a["scale"], b["scale"])
    for x, y in zip(a["params"], b["params"]):
        assert torch.equal(x, y)


@pytest.mark.slow
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_fsdp2_dcp_checkpoint_resumes_bit_identically_and_reshards(base, tmp_path):
    """The documented FSDP2 recipe: get_state_dict + dcp.save after 10 steps; in new processes
    get_state_dict, dcp.load, set_state_dict and 10 more steps equal the uninterrupted 20 steps."""
    ckpt = str(tmp_path)
    uninterrupted = run_ranks("save", tmp_path, extra=(base, ckpt))
    assert uninterrupted["scale"] > 3e-5  # Mechanic moved far from its start (1e-6): its state matters
    _assert_bit_identical(run_ranks("load", tmp_path, extra=(base, ckpt)), uninterrupted)
    # resharded to one rank: the same math, summed in another order
    resharded = run_ranks("load", tmp_path, world=1, extra=(base, ckpt))
    assert_close(resharded, uninterrupted, rtol=1e-6, min_scale=3e-5)
    # the full, CPU-offloaded state dict into an unsharded model in this process
    from torch.distributed.checkpoint.state_dict import set_state_dict

    full = torch.load(os.path.join(ckpt, "full.pt"), weights_only=True)
    model = make_model()
    opt = make_opt(model.parameters(), base)
    set_state_dict(model, opt, model_state_dict=full["model"], optim_state_dict=full["optim"])
    train(model, opt, 10, 20)
    assert_close(result(model, opt), uninterrupted, rtol=1e-6, min_scale=3e-5)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_unsharded_dcp_checkpoint_resumes_bit_identically(base, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = make_model()
    opt = make_opt(model.parameters(), base)
    train(model, opt, 0, 10)
    model_sd, optim_sd = get_state_dict(model, opt)
    assert "mechanic" in optim_sd["param_groups"][0]
    assert all("mechanic_delta" in s for s in optim_sd["state"].values())
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path / "dcp"))
    train(model, opt, 10, 20)

    model2 = make_model()  # fresh objects: their state is created by DCP's zero-lr step
    opt2 = make_opt(model2.parameters(), base)
    model_sd, optim_sd = get_state_dict(model2, opt2)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(tmp_path / "dcp"))
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert opt2.param_groups[0]["mechanic"]["step"].item() == 10
    train(model2, opt2, 10, 20)
    _assert_bit_identical(result(model2, opt2), result(model, opt))
