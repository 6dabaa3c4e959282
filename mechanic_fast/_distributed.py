"""Sharded parameters (DTensor: FSDP2's fully_shard, tensor parallel): local shards and the collective
that turns per-rank partial sums into global ones. Plain tensors pass through untouched."""

from __future__ import annotations

from typing import Any, Tuple

from torch import Tensor

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    dist = None  # type: ignore[assignment]
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard (under no_grad this is the DTensor's own storage, not a copy)."""
    return t.to_local() if is_dtensor(t) else t


def reduce_groups(p: Tensor) -> Tuple[Any, ...]:
    """Process groups of the mesh dims `p` is sharded on; () for a plain or fully replicated tensor.

    A Replicate dim holds the same values on every rank of it, so summing over it would over-count.
    """
    if not is_dtensor(p):
        return ()
    mesh = p.device_mesh
    return tuple(mesh.get_group(dim) for dim, placement in enumerate(p.placements) if placement.is_shard())


def all_reduce(sums: Tensor, groups: Tuple[Any, ...]) -> Tensor:
    """Sum the partial sums over the given process groups: one collective per sharded mesh dim."""
    for group in groups:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return sums


def shard_like(p: Tensor, value: Tensor) -> Tensor:
    """`value` (of p's global shape) with p's layout: a full plain tensor becomes p's local shard
    (each rank cuts its own, no communication), anything else is returned as it is."""
    if not is_dtensor(p) or is_dtensor(value):
        return value
    from torch.distributed.tensor import distribute_tensor

    local_device = p.to_local().device
    return distribute_tensor(value.to(local_device), p.device_mesh, p.placements, src_data_rank=None)


def like(p: Tensor, local_value: Tensor) -> Tensor:
    """A DTensor with p's mesh and placements around `local_value` (p's local shard shape) when p is a
    DTensor; `local_value` itself otherwise."""
    if not is_dtensor(p):
        return local_value
    return DTensor.from_local(
        local_value, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
    )
