"""What one step works on, and the plans that keep finding it cheap.

A step gathers the parameters that have a gradient (`gather`), finds or creates their x_ref and Delta
(`refs`; new ones tile one flat buffer per device and dtype, and are put into `state` by `commit` after
the base step), and gets one `GroupPlan` per reduction domain, device, dtype and maximize flag from its
`Planner`, which keeps them, keyed by the parameters' ids, while the same parameters step: such a step
does O(1) Python work per tensor and decides nothing anew.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import _distributed, _state, _torch
from ._buffers import Tiled, Workspace, total_numel
from ._plan import GroupPlan
from .functional import select_impl

Refs = Dict[Tensor, Dict[str, Tensor]]


def _as_1d(tensors: List[Tensor]) -> List[Tensor]:
    """0-d tensors (a CLIP-style logit_scale) viewed as 1-element ones, which every multi-tensor op takes."""
    return [t if t.dim() else t.view(1) for t in tensors]


def _local_1d(tensors: List[Tensor]) -> List[Tensor]:
    return _as_1d([_distributed.local(t) for t in tensors])


def lr_is_zero(param_groups: List[Dict[str, Any]]) -> bool:
    """Every group's lr is 0 (read on the host: a Python number, or a CPU tensor in eager mode): the step
    torch.distributed.checkpoint takes to create an optimizer's state."""
    for group in param_groups:
        lr = group.get("lr")
        if torch.is_tensor(lr):
            if lr.device.type != "cpu" or torch.compiler.is_compiling() or lr.numel() != 1:
                return False  # reading it would sync with the device, or guard a compiled graph
            lr = lr.item()
        if not isinstance(lr, (int, float)) or lr != 0:
            return False
    return bool(param_groups)


def acc_dtype(dtypes: List[torch.dtype], tuner_dtype: torch.dtype) -> torch.dtype:
    """float64 sums where any parameter is float64 (with nothing here, the tuner's dtype), else float32."""
    wide = torch.float64 in dtypes or (not dtypes and tuner_dtype == torch.float64)
    return torch.float64 if wide else torch.float32


@_torch.eager  # traced in one frame with the base step, dynamo would drop the new state
def commit(state: Dict[Tensor, Dict[str, Any]], refs: Refs) -> None:
    """Put new per-parameter state in place, after the base step: torch's optimizers create their own
    state only while a parameter's state is empty."""
    for p, tensors in refs.items():
        state[p].update(tensors)


def gather(
    param_groups: List[Dict[str, Any]],
) -> Tuple[List[Tensor], List[Tensor], List[bool], List[Tensor]]:
    """Parameters that have a gradient, their gradients, whether each is in a `maximize` group, and
    the parameters taking no step (`_gaps`); refuses what Mechanic cannot handle before anything has
    changed. Runs every step over every parameter: kept to attribute reads and one set, no hashing
    of tensors."""
    params, grads, maximize, idle, seen = [], [], [], [], set()
    for group in param_groups:
        maximizes = bool(group.get("maximize", False))
        for p in group["params"]:
            g = p.grad
            # a frozen parameter whose gradient zero_grad(set_to_none=False) kept is left to the base
            # (else every change of S would move it); one listed twice counts once; an empty one
            # has nothing to tune
            if g is None or not p.requires_grad:
                if p.numel():
                    idle.append(p)
                continue
            if id(p) in seen or p.numel() == 0:
                continue
            seen.add(id(p))
            if g.is_sparse:
                raise RuntimeError(
                    "Mechanic does not support sparse gradients (inner products over them are not "
                    "implemented); nothing was changed"
                )
            if p.dtype.is_complex:
                raise RuntimeError("Mechanic does not support complex parameters; nothing was changed")
            whole = _distributed.whole_grad(p, g)
            if whole is not g:  # once, in place of p.grad: the base step reads it as it is
                p.grad = g = whole
            params.append(p)
            grads.append(g)
            maximize.append(maximizes)
    return params, grads, maximize, idle


def known_refs(state: Dict[Tensor, Any], params: List[Tensor]) -> Refs:
    """The state entries of those of `params` that have Mechanic state (x_ref or Delta)."""
    refs = {}
    for p in params:  # one lookup each (tensors hash in Python)
        entry = state.get(p)
        if entry is not None and (_state.DELTA in entry or _state.X_REF in entry):
            refs[p] = entry
    return refs


def check_shapes(state: Dict[Tensor, Any], params: List[Tensor]) -> None:
    """Refuse, by name, a parameter whose shape no longer matches its Mechanic state (its `.data`
    replaced by a tensor of another size). Run where a step's sums failed: not a cost of every step."""
    for i, p in enumerate(params):
        entry = state.get(p, {})
        kept = entry.get(_state.DELTA, entry.get(_state.X_REF))
        if kept is not None and kept.shape != p.shape:
            raise RuntimeError(
                f"parameter {i} of this step changed shape from {tuple(kept.shape)} to "
                f"{tuple(p.shape)} after Mechanic's state for it was made (its .data was replaced by a "
                "tensor of another size), so its x_ref/Delta no longer fit it; nothing was changed. "
                "Make a new optimizer for the resized model, or delete that parameter's entry from "
                "optimizer.state so that Mechanic starts it afresh"
            )


def refs(
    state: Dict[Tensor, Any],
    params: List[Tensor],
    known_refs: Refs,
    store_delta: bool,
    ref_dtype: Callable[[Tensor], torch.dtype],
) -> Tuple[Refs, bool]:
    """x_ref (and Delta) of `params`, and whether they are new and must be committed to `state`.

    A parameter seen for the first time gets x_ref = x_t (Delta = 0). Then every parameter that has
    Mechanic state is laid out anew so that each device/dtype tiles one flat buffer (a one-time copy;
    later steps read the buffer without a gather)."""
    if len(known_refs) == len(params):
        return known_refs, False
    known = {p: s for p, s in state.items() if isinstance(s, dict) and _state.has_state(s)}
    new = [p for p in params if p not in known]
    x_refs = {p: s[_state.X_REF] for p, s in known.items() if _state.X_REF in s}
    x_refs.update((p, p.detach()) for p in new if _state.keeps_x_ref(store_delta, p))
    deltas = None
    if store_delta:
        deltas = {p: s[_state.DELTA] for p, s in known.items()}
        deltas.update((p, torch.zeros_like(p.detach())) for p in new)
    return _state.laid_out(x_refs, deltas, ref_dtype), True


Plans = List[GroupPlan]
Key = Tuple[Any, ...]


class Planner:
    """The plans of one optimizer's steps (host state: never saved or copied) and the workspaces they
    use, which outlive a re-made layout (e.g. a parameter added)."""

    def __init__(self, backend: str, keep_workspace: Optional[bool]) -> None:
        self.backend = backend
        self.keep_workspace = keep_workspace  # None: on CPU only
        # the last step's plans, keyed by the parameters (ids) and maximize flags
        self.cached: Optional[Tuple[Key, Plans]] = None

    def plans(
        self,
        params: List[Tensor],
        grads: List[Tensor],
        refs: Refs,
        maximize: List[bool],
        new_refs: bool,
        store_delta: bool,
        domains: Dict[int, _distributed.Domain],
        tuner_dtype: torch.dtype,
    ) -> Tuple[Plans, List[List[Tensor]]]:
        """The plans of this step's groups, and each group's gradients (local, at least 1-D).

        Kept from step to step while the same parameters step; re-made when parameters come or go, when
        state is created or loaded, and always for sharded (DTensor) parameters, whose local tensors FSDP
        may swap."""
        compiling = torch.compiler.is_compiling()
        key = None if compiling else (tuple(map(id, params)), tuple(maximize))
        cached = self.cached
        if cached is not None and cached[0] == key and not new_refs and _views_current(cached[1]):
            return cached[1], [_as_1d([grads[i] for i in plan.index]) for plan in cached[1]]
        # plain parameters skip the per-tensor shard lookups (Python work that compile traces per tensor)
        sharded = any(_distributed.is_dtensor(p) for p in params)
        to_1d = _local_1d if sharded else _as_1d
        buckets: Dict[Key, List[int]] = {}
        for i, p in enumerate(params):
            local = _distributed.local(p) if sharded else p
            if local.numel() == 0:  # an empty shard adds nothing; its domain still joins (`total`)
                continue
            buckets.setdefault((domains[id(p)], local.device, local.dtype, maximize[i]), []).append(i)
        acc = acc_dtype([bucket[2] for bucket in buckets], tuner_dtype)
        plans, plan_grads = [], []
        tiled = list if compiling else Tiled  # the flat views it finds are eager-only
        for bucket, index in buckets.items():
            plan_grads.append(to_1d([grads[i] for i in index]))
            plans.append(
                self._plan(bucket, index, params, plan_grads[-1], refs, store_delta, acc, tiled, to_1d)
            )
        if not sharded and not compiling:
            self.cached = (key, plans)
        return plans, plan_grads

    def _plan(
        self,
        bucket: Key,
        index: List[int],
        params: List[Tensor],
        grads: List[Tensor],
        refs: Refs,
        store_delta: bool,
        acc: torch.dtype,
        tiled: Callable[[List[Tensor]], List[Tensor]],
        to_1d: Callable[[List[Tensor]], List[Tensor]],
    ) -> GroupPlan:
        """The plan of one bucket of parameters: its tensors, as `_state.keeps_x_ref` lays them out, and
        the implementation, decided here."""
        reduce_over, device, _, maximizes = bucket
        entries = [refs[params[i]] for i in index]
        x_ref = delta = None
        if _state.keeps_x_ref(store_delta, params[index[0]]):
            x_ref = tiled(to_1d([e[_state.X_REF] for e in entries]))
        if store_delta:
            delta = tiled(to_1d([e[_state.DELTA] for e in entries]))
        local = to_1d([params[i] for i in index])
        numel = total_numel(local, x_ref, delta)
        keep = self.keep_workspace if self.keep_workspace is not None else device.type == "cpu"
        workspace = None
        if keep:
            workspace = self._workspace(bucket)
        return GroupPlan(
            params=local,
            x_ref=x_ref,
            delta=delta,
            impl=select_impl(self.backend, local, (grads, x_ref, delta), numel),
            acc_dtype=acc,
            reduce_over=reduce_over,
            maximize=maximizes,
            workspace=workspace,
            index=index,
            numel=numel,
            views=[(params[i], t) for i, t in zip(index, local) if params[i].dim() == 0],
        )

    def _workspace(self, bucket: Key) -> Workspace:
        """The workspace the last plans of `bucket` used, or a new one."""
        if self.cached is not None:
            for plan in self.cached[1]:
                if plan.workspace is not None and plan.bucket() == bucket:
                    return plan.workspace
        return Workspace()


def _views_current(plans: Plans) -> bool:
    """Whether the 1-element views a cached layout made of 0-d parameters still view their storage: a
    parameter whose `.data` is replaced between steps (a clamped CLIP logit scale) keeps its id, but
    the old view would keep reading and writing the storage it had. Other tensors are held as they are,
    so they follow a replaced `.data` by themselves."""
    return all(view.data_ptr() == p.data_ptr() for plan in plans for p, view in plan.views)
