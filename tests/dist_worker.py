"""One rank of the 2-process tests in test_distributed.py (gloo on 127.0.0.1).

usage: python dist_worker.py MODE RANK WORLD PORT OUT   (MODE: ddp | fsdp)
Writes the final parameters (full tensors) and Mechanic's scale to OUT (rank 0 only).
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from dist_problem import STEPS, batch, make_model, make_opt  # noqa: E402


def main() -> None:
    mode, rank, world, port, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    # a bounded timeout: if the other rank dies, fail instead of waiting for torch's default 30 minutes
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    model = make_model()
    if mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        wrapped = fully_shard(model)
    opt = make_opt(wrapped.parameters())
    collectives = []  # Mechanic's own collectives during opt.step()
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        collectives.append(args[0].numel())
        return real_all_reduce(*args, **kwargs)

    for t in range(STEPS):
        x, y = batch(t)
        if mode == "ddp":  # each rank takes its half of the batch; DDP averages the gradients
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        loss = ((wrapped(x) - y) ** 2).mean()
        loss.backward()
        dist.all_reduce = counting_all_reduce
        try:
            opt.step()
        finally:
            dist.all_reduce = real_all_reduce
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in wrapped.parameters()]
    if mode == "fsdp":
        assert all(hasattr(p, "full_tensor") for p in wrapped.parameters()), "parameters are not DTensors"
    if rank == 0:
        torch.save(
            {"params": [p.detach() for p in params], "scale": opt.mechanic_scale, "collectives": collectives},
            out,
        )
    # Both ranks are done with collectives here; gloo's teardown (destroy_process_group) sometimes hangs
    # in the rank that leaves second, so end the worker without it.
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
