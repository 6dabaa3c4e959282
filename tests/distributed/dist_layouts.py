"""One rank of the parallel-layout matrix in test_every_parallel_layout.py (gloo on 127.0.0.1, float64).

usage: python dist_layouts.py RANK WORLD PORT OUT_DIR LAYOUT [LAYOUT ...]

Every layout trains the same model on the same global batch as `reference()` (one process, the whole
model, the whole batch) and records, after every step, the scale and the full parameters by name. A
layout that raises records its traceback and the next one runs (a collective that hangs fails the
whole run instead, through gloo's timeout).
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from typing import Callable, Dict, List

import torch
import torch.distributed as dist

from mechanic_fast import mechanic_scale, mechanize

STEPS = 20
BATCH, SEQ, FEATURES, HIDDEN = 8, 4, 12, 16
LR, WEIGHT_DECAY = 3e-3, 0.01


def make_model(out: int = 5, hidden: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    if not hidden:  # one Linear(12, out)
        return torch.nn.Sequential(torch.nn.Linear(FEATURES, out)).to(torch.float64)
    model = torch.nn.Sequential(
        torch.nn.LayerNorm(FEATURES),
        torch.nn.Linear(FEATURES, HIDDEN),
        torch.nn.Tanh(),
        torch.nn.Linear(HIDDEN, out),
    )
    with torch.no_grad():  # LayerNorm starts at ones/zeros: give it values that tell ranks apart
        model[0].weight.add_(0.1 * torch.randn(FEATURES))
        model[0].bias.add_(0.1 * torch.randn(FEATURES))
    return model.to(torch.float64)


def batch(t: int, out: int):
    gen = torch.Generator().manual_seed(100 + t)
    x = torch.randn(BATCH, SEQ, FEATURES, generator=gen, dtype=torch.float64)
    return x, torch.sin(2 * x[..., :out])


def loss_of(pred: torch.Tensor, target: torch.Tensor, count: int) -> torch.Tensor:
    """Squared error summed over this rank's elements, divided by `count`: the local count where the
    gradients are averaged over data-parallel ranks, the global one where they are summed (the pieces
    of one sequence under sequence parallel); either way the gradient of the global mean."""
    return ((pred - target) ** 2).sum() / count


def make_opt(params) -> torch.optim.Optimizer:
    return mechanize(torch.optim.AdamW, lr_invariant=False)(params, lr=LR, weight_decay=WEIGHT_DECAY)


def clean(name: str) -> str:
    for prefix in ("_fsdp_wrapped_module.", "module.", "_checkpoint_wrapped_module."):
        name = name.replace(prefix, "")
    return name


def full_params(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[clean(name)] = full.detach().clone()
    return out


def in_gap(t: int) -> bool:
    """Steps at which the first layer takes no step (its gradients set to None): a long gap while the
    scale grows, and single skipped steps."""
    return 4 <= t < 12 or t % 5 == 4


def skip_first_layer(model: torch.nn.Module) -> None:
    for p in model[0].parameters():
        p.grad = None


def reference(out: int = 5, hidden: bool = True, gaps: bool = False) -> dict:
    """One process, the whole model and batch (with `gaps`, the first layer skips the steps `in_gap`)."""
    model = make_model(out, hidden)
    opt = make_opt(model.parameters())
    record: dict = {"scale": [], "params": [], "init": full_params(model)}
    for t in range(STEPS):
        x, y = batch(t, out)
        opt.zero_grad()
        loss_of(model(x), y, y.numel()).backward()
        if gaps and in_gap(t):
            skip_first_layer(model)
        opt.step()
        record["scale"].append(opt.mechanic_scale.item())
        record["params"].append(full_params(model))
    return record


def _train(
    model,
    opt,
    rank_batch: Callable,
    snapshot: Callable,
    out: int,
    after_step=None,
    summed: bool = False,
    gaps: bool = False,
) -> dict:
    record: dict = {"scale": [], "params": []}
    for t in range(STEPS):
        x, y = batch(t, out)
        x_local, y_local = rank_batch(x, y)
        opt.zero_grad()
        pred = model(x_local)
        pred = pred.to_local() if hasattr(pred, "to_local") else pred
        loss_of(pred, y_local, y.numel() if summed else y_local.numel()).backward()
        if gaps and in_gap(t):
            skip_first_layer(model)
        opt.step()
        if after_step is not None:
            after_step()
        record["scale"].append(mechanic_scale(opt).item())
        record["params"].append(snapshot())
    return record


def _slice(rank: int, world: int):
    """This rank's part of the batch (data parallel over `world` ranks)."""
    return lambda x, y: (x.chunk(world)[rank], y.chunk(world)[rank])


def _whole(x, y):
    return x, y


def _fsdp2(rank, world, mesh=None, out=5, hidden=True):
    from torch.distributed.fsdp import fully_shard

    model = make_model(out, hidden)
    for layer in model:
        if isinstance(layer, (torch.nn.Linear, torch.nn.LayerNorm)):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def layout_ddp(rank, world):
    model = torch.nn.parallel.DistributedDataParallel(make_model())
    opt = make_opt(model.parameters())
    return _train(model, opt, _slice(rank, world), lambda: full_params(model), 5)


def layout_fsdp2_gaps(rank, world):
    """FSDP2 with the first layer's gradients set to None on some steps (a frozen or unrouted layer)."""
    model = _fsdp2(rank, world)
    opt = make_opt(model.parameters())
    return _train(model, opt, _slice(rank, world), lambda: full_params(model), 5, gaps=True)


def layout_fsdp2_empty_shards(rank, world):
    model = _fsdp2(rank, world)  # on 4 ranks the 5-row layer splits 2, 2, 1, 0
    return _train(model, make_opt(model.parameters()), _slice(rank, world), lambda: full_params(model), 5)


def layout_fsdp2_bias_of_one(rank, world):
    model = _fsdp2(rank, world, out=1)  # the output bias has one element: rank 1's shard is empty
    return _train(model, make_opt(model.parameters()), _slice(rank, world), lambda: full_params(model), 1)


def layout_fsdp2_rank_holds_nothing(rank, world):
    model = _fsdp2(rank, world, out=1, hidden=False)  # Linear(12, 1): rank 1's shards are all empty
    return _train(model, make_opt(model.parameters()), _slice(rank, world), lambda: full_params(model), 1)


def layout_hsdp(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    model = _fsdp2(rank, world, mesh=mesh)
    return _train(model, make_opt(model.parameters()), _slice(rank, world), lambda: full_params(model), 5)


def _tp_plan(sequence_parallel: bool):
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    if not sequence_parallel:
        return {"1": ColwiseParallel(), "3": RowwiseParallel()}
    return {
        "0": SequenceParallel(),
        "1": ColwiseParallel(input_layouts=Shard(1)),
        "3": RowwiseParallel(output_layouts=Shard(1)),
    }


def layout_tp(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    model = parallelize_module(make_model(), init_device_mesh("cpu", (world,)), _tp_plan(False))
    return _train(model, make_opt(model.parameters()), _whole, lambda: full_params(model), 5)


def layout_tp_sequence_parallel(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    model = parallelize_module(make_model(), init_device_mesh("cpu", (world,)), _tp_plan(True))

    def sequence_piece(x, y):  # SequenceParallel takes this rank's piece of the sequence
        return x.chunk(world, dim=1)[rank], y.chunk(world, dim=1)[rank]

    opt = make_opt(model.parameters())
    return _train(model, opt, sequence_piece, lambda: full_params(model), 5, summed=True)


def _fsdp2_tp(world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    model = parallelize_module(make_model(), mesh["tp"], _tp_plan(False))
    for layer in (model[0], model[1], model[3]):
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model, mesh["dp"].get_local_rank()


def layout_fsdp2_tp(rank, world):
    model, dp_rank = _fsdp2_tp(world)
    return _train(model, make_opt(model.parameters()), _slice(dp_rank, 2), lambda: full_params(model), 5)


def layout_fsdp2_tp_dcp(rank, world):
    """2-D FSDP2 x TP through torch.distributed.checkpoint: saved after 10 steps, loaded into fresh
    objects the documented way, 10 more steps equal the uninterrupted run bit for bit."""
    import tempfile

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def train(model, opt, dp_rank, start, stop):
        for t in range(start, stop):
            x, y = batch(t, 5)
            x, y = _slice(dp_rank, 2)(x, y)
            opt.zero_grad()
            loss_of(model(x), y, y.numel()).backward()
            opt.step()

    path = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(path)
    model, dp_rank = _fsdp2_tp(world)
    opt = make_opt(model.parameters())
    train(model, opt, dp_rank, 0, 10)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path[0])
    train(model, opt, dp_rank, 10, 20)

    model2, _ = _fsdp2_tp(world)
    opt2 = make_opt(model2.parameters())
    model_sd, optim_sd = get_state_dict(model2, opt2)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path[0])
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(model2, opt2, dp_rank, 10, 20)
    return {
        "uninterrupted": {"scale": opt.mechanic_scale.item(), "params": full_params(model)},
        "resumed": {"scale": opt2.mechanic_scale.item(), "params": full_params(model2)},
    }


def _fsdp1(rank, world, use_orig_params: bool, **options):
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    model = FullyShardedDataParallel(
        make_model(),
        device_id=torch.device("cpu"),
        use_orig_params=use_orig_params,
        auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}),
        **options,
    )
    opt = make_opt(model.parameters())

    def snapshot():
        with FullyShardedDataParallel.summon_full_params(model):
            return full_params(model)

    return _train(model, opt, _slice(rank, world), snapshot, 5)


def layout_fsdp1_flat(rank, world):
    return _fsdp1(rank, world, use_orig_params=False)


def layout_fsdp1_orig_params(rank, world):
    return _fsdp1(rank, world, use_orig_params=True)


def layout_fsdp1_hybrid(rank, world):
    """HYBRID_SHARD: sharded within a node (2 ranks), replicated across nodes; the sums are partial over
    the shard group only."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import ShardingStrategy

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    return _fsdp1(rank, world, False, sharding_strategy=ShardingStrategy.HYBRID_SHARD, device_mesh=mesh)


def _zero(rank, world, naive: bool):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = torch.nn.parallel.DistributedDataParallel(make_model())
    if naive:
        opt = ZeroRedundancyOptimizer(
            model.parameters(),
            optimizer_class=mechanize(torch.optim.AdamW, lr_invariant=False),
            lr=LR,
            weight_decay=WEIGHT_DECAY,
        )
    else:  # the documented route: mechanize the ZeRO instance
        opt = mechanize(
            ZeroRedundancyOptimizer(
                model.parameters(), optimizer_class=torch.optim.AdamW, lr=LR, weight_decay=WEIGHT_DECAY
            ),
            lr_invariant=False,
        )
    return _train(model, opt, _slice(rank, world), lambda: full_params(model), 5)


def layout_zero(rank, world):
    return _zero(rank, world, naive=False)


def layout_zero_naive(rank, world):
    return _zero(rank, world, naive=True)


def layout_partition(rank, world):
    """A hand-made 2-way partition (what a pipeline stage's optimizer sees): every rank runs the whole
    model on the whole batch, rank 0's optimizer owns the first two layers, rank 1's the last, and each
    part is sent to the other rank after the step."""
    model = make_model()
    owners = {name: 0 if name.startswith(("0.", "1.")) else 1 for name, _ in model.named_parameters()}
    mine = [p for name, p in model.named_parameters() if owners[name] == rank]
    opt = mechanize(torch.optim.AdamW, partition_group=dist.group.WORLD, lr_invariant=False)(
        mine, lr=LR, weight_decay=WEIGHT_DECAY
    )

    def share():
        for name, p in model.named_parameters():
            dist.broadcast(p.data, src=owners[name])

    return _train(model, opt, _whole, lambda: full_params(model), 5, after_step=share)


LAYOUTS: Dict[str, Callable[[int, int], dict]] = {
    name[len("layout_") :]: fn for name, fn in globals().items() if name.startswith("layout_")
}


def main(argv: List[str]) -> None:
    rank, world, port, out_dir = int(argv[0]), int(argv[1]), argv[2], argv[3]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    torch.set_num_threads(1)
    results = {}
    for name in argv[4:]:
        try:
            results[name] = LAYOUTS[name](rank, world)
        except Exception:  # recorded per layout: one broken layout does not hide the others
            results[name] = {"error": traceback.format_exc()}
        dist.barrier()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # gloo's teardown sometimes hangs in the rank that leaves second


if __name__ == "__main__":
    main(sys.argv[1:])
