"""One rank of the multi-process tests in test_ddp_fsdp2_against_one_process.py (gloo on 127.0.0.1).

usage: python dist_worker.py RANK WORLD PORT MODE OUT [BASE CKPT_DIR]
MODE ddp | fsdp: train STEPS steps; rank 0 writes the parameters, the scale and Mechanic's collectives.
MODE save: FSDP2, train 10 steps, write a sharded DCP checkpoint to CKPT_DIR/dcp and a full, CPU-offloaded
  state dict to CKPT_DIR/full.pt, then train 10 more (the uninterrupted run) and write the result.
MODE load: FSDP2 on WORLD ranks (any number: DCP reshards), load CKPT_DIR/dcp into fresh objects the
  documented way, train steps 10-19, write the result.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from dist_problem import STEPS, batch, make_model, make_opt, result, train  # noqa: E402


def sharded_model() -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def count_collectives(model, opt, world: int, rank: int, ddp: bool) -> list:
    collectives = []  # Mechanic's own collectives during opt.step()
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        collectives.append(args[0].numel())
        return real_all_reduce(*args, **kwargs)

    for t in range(STEPS):
        x, y = batch(t)
        if ddp:  # each rank takes its half of the batch; DDP averages the gradients
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        dist.all_reduce = counting_all_reduce
        try:
            opt.step()
        finally:
            dist.all_reduce = real_all_reduce
    return collectives


def main() -> None:
    rank, world, port, mode, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    base, ckpt = (sys.argv[6], sys.argv[7]) if len(sys.argv) > 7 else ("adamw", "")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    # a bounded timeout: if the other rank dies, fail instead of waiting for torch's default 30 minutes
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    if mode in ("ddp", "fsdp"):
        model = torch.nn.parallel.DistributedDataParallel(make_model()) if mode == "ddp" else sharded_model()
        opt = make_opt(model.parameters(), base)
        collectives = count_collectives(model, opt, world, rank, mode == "ddp")
        out_dict = {**result(model, opt), "collectives": collectives}
        if mode == "fsdp":
            assert all(hasattr(p, "full_tensor") for p in model.parameters()), "parameters are not DTensors"
    elif mode == "save":
        model = sharded_model()
        opt = make_opt(model.parameters(), base)
        train(model, opt, 0, 10)
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(ckpt, "dcp"))
        full = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            torch.save({"model": full[0], "optim": full[1]}, os.path.join(ckpt, "full.pt"))
        train(model, opt, 10, 20)
        out_dict = result(model, opt)
    elif mode == "load":
        model = sharded_model()
        opt = make_opt(model.parameters(), base)
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=os.path.join(ckpt, "dcp"))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        train(model, opt, 10, 20)
        out_dict = result(model, opt)
    else:
        raise SystemExit(f"unknown mode {mode}")
    if rank == 0:
        torch.save(out_dict, out)
    # Both ranks are done with collectives here; gloo's teardown (destroy_process_group) sometimes hangs
    # in the rank that leaves second, so end the worker without it.
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
