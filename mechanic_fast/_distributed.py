"""Parameters split over processes, and the collectives that make per-rank partial sums global.

Mechanic tunes one scale from four sums over the whole model, so every rank must add up the same sums.
A rank's sums are partial over a process group exactly when its tensors are disjoint pieces of the
model across that group. One rule decides it, per parameter (`domain`), from the layouts of the tensors
read (a gradient is first brought to its parameter's layout, `whole_grad`):

- DTensor (FSDP2, tensor/sequence parallel, HSDP, 2-D meshes): every mesh dim whose placement splits
  the tensor (Shard, _StridedShard, or any placement that is neither Replicate nor Partial);
- FSDP1 (FullyShardedDataParallel): the flat parameters and their `use_orig_params` views, over the
  group that shards them (HYBRID_SHARD: the shard group; NO_SHARD: none);
- and, over all of that, the optimizer's partition group: its parameters are disjoint parts of one model
  across that group (ZeroRedundancyOptimizer, pipeline stages, an explicit `partition_group`).

Plain tensors (single process, DDP) give () and cost nothing.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

from . import _torch

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    dist = None  # type: ignore[assignment]
    DTensor = None  # type: ignore[assignment,misc]

Domain = Tuple[Any, ...]  # the process groups a parameter's sums are partial over, in mesh-dim order


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard (under no_grad this is the DTensor's own storage, not a copy)."""
    return t.to_local() if is_dtensor(t) else t


def _splits(placement: Any) -> bool:
    """A placement that gives each rank of its mesh dim a different piece of the tensor. Replicate holds
    the same values on every rank (summing over it would over-count) and a parameter is never Partial;
    everything else (Shard, _StridedShard, whatever torch adds next) splits."""
    return not (placement.is_replicate() or placement.is_partial())


def domain(p: Tensor, fsdp1: Optional[Dict[int, Domain]] = None) -> Domain:
    """The process groups over which the sums of `p` are partial (see the module docstring)."""
    if is_dtensor(p):
        mesh = p.device_mesh
        return tuple(mesh.get_group(dim) for dim, placement in enumerate(p.placements) if _splits(placement))
    if fsdp1 is not None and _torch.is_fsdp1_flat(p):
        return fsdp1.get(id(p), ())
    return ()


def fsdp1_domains(params: Sequence[Tensor]) -> Optional[Dict[int, Domain]]:
    """For FSDP1 parameters among `params`: id -> the group that shards them; None when there are none.

    A flat parameter does not point to the handle that knows its process group, so the handles are
    found among live objects once per layout (parameters that come or go make a new layout)."""
    if not any(_torch.is_fsdp1_flat(p) for p in params):
        return None
    out: Dict[int, Domain] = {}
    for handle in _torch.fsdp1_handles():
        group = (handle.process_group,) if handle.uses_sharded_strategy else ()
        out[id(handle.flat_param)] = group
        for view in _torch.fsdp1_views(handle):
            out[id(view)] = group
    return out


def whole_grad(p: Tensor, g: Tensor) -> Tensor:
    """`g` in p's layout. A DTensor gradient may be Partial (sequence parallel leaves the gradients of
    replicated norms as per-rank partial sums) or otherwise laid out differently from its parameter:
    its local piece would then not be the gradient of p's local piece."""
    if is_dtensor(p) and is_dtensor(g) and (g.placements != p.placements or g.device_mesh != p.device_mesh):
        return g.redistribute(p.device_mesh, p.placements)
    return g


def all_reduce(sums: Tensor, groups: Domain) -> Tensor:
    """Sum the partial sums over the given process groups, in float64 (four numbers: exact enough for
    any rank count, and ranks with different parameter dtypes still send the same dtype)."""
    if not groups:
        return sums
    wide = sums.to(torch.float64)
    for group in groups:
        dist.all_reduce(wide, op=dist.ReduceOp.SUM, group=group)
    return wide.to(sums.dtype)


class Reduction:
    """How one optimizer's per-group sums become global: every parameter's domain (`domain`; found once
    while the same parameters stay) and the optimizer's partition group."""

    def __init__(self) -> None:
        # every parameter's reduction domain and the distinct non-empty ones, keyed by parameter ids
        self._domains: Optional[Tuple[Tuple[int, ...], Dict[int, Domain], List[Domain]]] = None

    def domains(self, params: List[Tensor]) -> Tuple[Dict[int, Domain], List[Domain]]:
        """Every parameter's reduction domain, with or without a gradient, and the distinct non-empty
        ones in parameter order: a rank whose piece of a parameter is empty, or has no gradient, still
        joins the collectives of its domain, in the order the other ranks issue them."""
        key = tuple(map(id, params))
        if self._domains is not None and self._domains[0] == key:
            return self._domains[1], self._domains[2]
        fsdp1 = fsdp1_domains(params)
        domains = {id(p): domain(p, fsdp1) for p in params}
        ordered = [d for d in dict.fromkeys(domains.values()) if d]
        if not torch.compiler.is_compiling():
            self._domains = (key, domains, ordered)
        return domains, ordered

    def joins_others(self, params: List[Tensor], partition: Optional[GroupRef]) -> bool:
        """Whether this optimizer's sums are added over ranks (its steps are collective)."""
        return partition is not None or bool(self.domains(params)[1])

    def total(
        self,
        parts: List[Tuple[Tensor, Domain]],
        device: torch.device,
        acc_dtype: torch.dtype,
        params: List[Tensor],
        partition: Optional[GroupRef],
    ) -> Tensor:
        """Per-group sums added on the tuner's device: one all-reduce per reduction domain (one in all for
        FSDP2), never one per tensor, then one over the `partition` group if there is one. Every domain
        of the optimizer joins, with zeros where this rank holds nothing of it, so that all ranks issue
        the same collectives in the same order."""
        by_domain: Dict[Domain, List[Tensor]] = {d: [] for d in self.domains(params)[1]}
        if not by_domain and not parts:  # nothing here: this rank still joins the partition's collective
            by_domain[()] = []
        for sums, reduce_over in parts:
            by_domain.setdefault(reduce_over, []).append(sums.to(device, non_blocking=True))
        totals = []
        for reduce_over, sums_list in by_domain.items():
            if not sums_list:
                sums_list = [torch.zeros(4, dtype=acc_dtype, device=device)]
            total = torch.stack(sums_list).sum(0) if len(sums_list) > 1 else sums_list[0]
            totals.append(all_reduce(total, reduce_over))
        total = torch.stack(totals).sum(0) if len(totals) > 1 else totals[0]
        return total if partition is None else all_reduce(total, (partition.group,))


def check_process_group(group: Any) -> None:
    """Refuse a `partition_group` that is not a torch.distributed process group (at `mechanize`, not at
    the first step)."""
    process_group = getattr(dist, "ProcessGroup", None) if dist is not None else None
    if process_group is None or not isinstance(group, process_group):
        raise TypeError(
            f"partition_group must be a torch.distributed ProcessGroup (e.g. dist.new_group(ranks)), "
            f"got {group!r}"
        )


_ZERO_HOOK: List[Any] = []  # the handle of the step pre-hook `watch_zero_redundancy` registers


def watch_zero_redundancy(join: Callable[[Any], None]) -> None:
    """Call `join(zero)` before every step of a ZeroRedundancyOptimizer, through torch's global optimizer
    step pre-hook, registered once per process and only where ZeroRedundancyOptimizer is in use (its
    module is loaded): `join` finds the mechanized optimizer it made for this rank (`optimizer_class=
    mechanize(...)`) before that one steps, which is when its partition group is first needed."""
    zero = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if zero is None or _ZERO_HOOK:
        return

    def hook(opt: Any, args: Any, kwargs: Any) -> None:
        if isinstance(opt, zero.ZeroRedundancyOptimizer):
            join(opt)

    _ZERO_HOOK.append(register_optimizer_step_pre_hook(hook))


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


class GroupRef:
    """A process group kept by an optimizer: deepcopy shares it (a group cannot be copied), pickling
    refuses with a clear message (a group belongs to one process)."""

    def __init__(self, group: Any) -> None:
        self.group = group

    def __deepcopy__(self, memo: Dict[int, Any]) -> GroupRef:
        return self

    def __reduce__(self) -> Any:
        raise TypeError(
            "a mechanized optimizer with a partition_group cannot be pickled: a process group belongs to "
            "one process. Save its state_dict() instead, and load it into an optimizer made with "
            "partition_group= in the new process"
        )
