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
