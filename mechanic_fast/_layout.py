"""What one step works on, and the host-side caches that keep finding it cheap.

A step gathers the parameters that have a gradient (`StepLayout.gather`), finds or creates their x_ref
and Delta (`refs`; new ones tile one flat buffer per device and dtype, and are put into `state` by
`commit` after the base step), buckets them by reduction domain, device, dtype and maximize (`groups`),
and adds the per-group sums over groups and ranks (`total`). The caches are keyed by the parameters'
ids: a step with the same parameters as the last does O(1) Python work per tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _distributed, _foreach, _state, _torch, tuner
from ._config import MechanicConfig


class Group(NamedTuple):
    """Aligned lists of local tensors on one device with one dtype, and the process groups (if any)
    over which their sums are partial."""

    params: List[Tensor]
    grads: List[Tensor]
    refs: Optional[List[Tensor]]  # x_ref, where kept (`_state.keeps_x_ref`)
    deltas: Optional[List[Tensor]]
    reduce_over: Tuple[Any, ...]
    maximize: bool  # the base moves along +g: Mechanic's inner product must see -g
    # flat buffers kept from step to step (`keep_workspace`; by default on CPU only), or None
    workspace: Optional[_foreach.Workspace]
    index: List[int]  # positions of the group's tensors in the step's parameter list
    numel: int
    views: List[Tuple[Tensor, Tensor]]  # (0-d parameter, the 1-element view of it in `params`)


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


def acc_dtype(groups: List[Group], tuner_dtype: torch.dtype) -> torch.dtype:
    """float64 sums where any parameter is float64 (with nothing here, the tuner's dtype), else float32."""
    wide = any(g.params[0].dtype == torch.float64 for g in groups) or (
        not groups and tuner_dtype == torch.float64
    )
    return torch.float64 if wide else torch.float32


@_torch.eager  # traced in one frame with the base step, dynamo would drop the new state
def commit(state: Dict[Tensor, Dict[str, Any]], refs: Refs) -> None:
    """Put new per-parameter state in place, after the base step: torch's optimizers create their own
    state only while a parameter's state is empty."""
    for p, tensors in refs.items():
        state[p].update(tensors)


class StepLayout:
    """The host caches of one optimizer's steps: never saved or copied, rebuilt when needed."""

    def __init__(self) -> None:
        # the last step's groups without gradients, keyed by the parameters (ids) and maximize flags
        self.cached: Optional[Tuple[Tuple[Any, ...], List[Group]]] = None
        # every parameter's reduction domain and the distinct non-empty ones, keyed by parameter ids
        self._domains: Optional[
            Tuple[Tuple[int, ...], Dict[int, _distributed.Domain], List[_distributed.Domain]]
        ] = None
        self._run_cfg: Optional[MechanicConfig] = None
        self._const: Optional[Tuple[Tuple[Any, ...], tuner.Constants]] = None

    def run_config(self, cfg: MechanicConfig, entry: Dict[str, Any]) -> MechanicConfig:
        """The options as the tuner `entry` has them (decided when the tuner was made, or as loaded, where
        an option was left at None): `store_delta`, and the mode with its constants; kept, so that a
        compiled step reads an attribute."""
        store_delta, invariant = entry["store_delta"], entry.get("lr_invariant", False)
        run = self._run_cfg
        if run is None or run.store_delta != store_delta or run.lr_invariant != invariant:
            self._run_cfg = dataclasses.replace(cfg, store_delta=store_delta).resolved(invariant)
        return self._run_cfg

    def constants(self, cfg: MechanicConfig, like: Tensor) -> tuner.Constants:
        """The tuner's constants on `like`'s device, made once (per step they would copy from the host)."""
        key = (like.device, like.dtype)
        if self._const is None or self._const[0] != key:
            self._const = (key, tuner.constants(cfg, like.device, like.dtype))
        return self._const[1]

    @staticmethod
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

    def domains(
        self, params: List[Tensor]
    ) -> Tuple[Dict[int, _distributed.Domain], List[_distributed.Domain]]:
        """Every parameter's reduction domain (`_distributed.domain`), with or without a gradient, and the
        distinct non-empty ones in parameter order: a rank whose piece of a parameter is empty, or has no
        gradient, still joins the collectives of its domain, in the order the other ranks issue them."""
        key = tuple(map(id, params))
        if self._domains is not None and self._domains[0] == key:
            return self._domains[1], self._domains[2]
        fsdp1 = _distributed.fsdp1_domains(params)
        domains = {id(p): _distributed.domain(p, fsdp1) for p in params}
        ordered = [d for d in dict.fromkeys(domains.values()) if d]
        if not torch.compiler.is_compiling():
            self._domains = (key, domains, ordered)
        return domains, ordered

    @staticmethod
    def known_refs(state: Dict[Tensor, Any], params: List[Tensor]) -> Refs:
        """The state entries of those of `params` that have Mechanic state (x_ref or Delta)."""
        refs = {}
        for p in params:  # one lookup each (tensors hash in Python)
            entry = state.get(p)
            if entry is not None and (_state.DELTA in entry or _state.X_REF in entry):
                refs[p] = entry
        return refs

    @staticmethod
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

    @staticmethod
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

    def groups(
        self,
        params: List[Tensor],
        grads: List[Tensor],
        refs: Refs,
        maximize: List[bool],
        new_refs: bool,
        store_delta: bool,
        all_params: List[Tensor],
        keep_workspace: Optional[bool] = None,
    ) -> List[Group]:
        """Aligned lists of local tensors per reduction domain, device, dtype and maximize flag.

        All but the gradients are kept from step to step while the same parameters step; they are re-made
        when parameters come or go, when state is created or loaded, and always for sharded (DTensor)
        parameters, whose local tensors FSDP may swap."""
        compiling = torch.compiler.is_compiling()
        key = None if compiling else (tuple(map(id, params)), tuple(maximize))
        if (
            self.cached is not None
            and self.cached[0] == key
            and not new_refs
            and _views_current(self.cached[1])
        ):
            return [grp._replace(grads=_as_1d([grads[i] for i in grp.index])) for grp in self.cached[1]]
        workspaces = {}
        if self.cached is not None:  # buffers outlive a re-made layout (e.g. a parameter added)
            workspaces = {_bucket_key(g): g.workspace for g in self.cached[1] if g.workspace is not None}
        # plain parameters skip the per-tensor shard lookups (Python work that compile traces per tensor)
        sharded = any(_distributed.is_dtensor(p) for p in params)
        to_1d = _local_1d if sharded else _as_1d
        tiled = list if compiling else _foreach.Tiled  # the flat views it finds are eager-only
        domains, _ = self.domains(all_params)
        buckets: Dict[Tuple[Any, ...], List[int]] = {}
        for i, p in enumerate(params):
            local = _distributed.local(p) if sharded else p
            if local.numel() == 0:  # an empty shard adds nothing; its domain still joins (`total`)
                continue
            buckets.setdefault((domains[id(p)], local.device, local.dtype, maximize[i]), []).append(i)
        groups = []
        for key_of_bucket, idx in buckets.items():
            reduce_over, _, _, maximizes = key_of_bucket
            entries = [refs[params[i]] for i in idx]
            refs_1d = tiled(to_1d([e[_state.X_REF] for e in entries])) if _state.X_REF in entries[0] else None
            deltas = tiled(to_1d([e[_state.DELTA] for e in entries])) if store_delta else None
            local = to_1d([params[i] for i in idx])
            views = [(params[i], t) for i, t in zip(idx, local) if params[i].dim() == 0]
            tiling = refs_1d if refs_1d is not None else deltas
            numel = tiling.flat.numel() if getattr(tiling, "flat", None) is not None else None
            device = local[0].device
            keep = keep_workspace if keep_workspace is not None else device.type == "cpu"
            grp = Group(
                local,
                to_1d([grads[i] for i in idx]),
                refs_1d,
                deltas,
                reduce_over,
                maximizes,
                (workspaces.get(key_of_bucket) or _foreach.Workspace()) if keep else None,
                idx,
                numel or sum(t.numel() for t in local),
                views,
            )
            groups.append(grp)
        if not sharded and not compiling:  # without this step's gradients, which it would keep alive
            self.cached = (key, [grp._replace(grads=[]) for grp in groups])
        return groups

    def joins_others(self, all_params: List[Tensor], partition: Any) -> bool:
        """Whether this optimizer's sums are added over ranks (its steps are collective)."""
        return partition is not None or bool(self.domains(all_params)[1])

    def total(
        self,
        parts: List[Tuple[Tensor, Tuple[Any, ...]]],
        device: torch.device,
        acc_dtype: torch.dtype,
        all_params: List[Tensor],
        partition: Any,
    ) -> Tensor:
        """Per-group sums added on the tuner's device: one all-reduce per reduction domain (one in all for
        FSDP2), never one per tensor, then one over the `partition` group if there is one. Every domain
        of the optimizer joins, with zeros where this rank holds nothing of it, so that all ranks issue
        the same collectives in the same order."""
        by_domain: Dict[Tuple[Any, ...], List[Tensor]] = {d: [] for d in self.domains(all_params)[1]}
        if not by_domain and not parts:  # nothing here: this rank still joins the partition's collective
            by_domain[()] = []
        for sums, reduce_over in parts:
            by_domain.setdefault(reduce_over, []).append(sums.to(device, non_blocking=True))
        totals = []
        for reduce_over, sums_list in by_domain.items():
            if not sums_list:
                sums_list = [torch.zeros(4, dtype=acc_dtype, device=device)]
            total = torch.stack(sums_list).sum(0) if len(sums_list) > 1 else sums_list[0]
            totals.append(_distributed.all_reduce(total, reduce_over))
        total = torch.stack(totals).sum(0) if len(totals) > 1 else totals[0]
        return total if partition is None else _distributed.all_reduce(total, (partition.group,))


def _views_current(groups: List[Group]) -> bool:
    """Whether the 1-element views a cached layout made of 0-d parameters still view their storage: a
    parameter whose `.data` is replaced between steps (a clamped CLIP logit scale) keeps its id, but
    the old view would keep reading and writing the storage it had. Other tensors are held as they are,
    so they follow a replaced `.data` by themselves."""
    return all(view.data_ptr() == p.data_ptr() for grp in groups for p, view in grp.views)


def _bucket_key(grp: Group) -> Tuple[Any, ...]:
    """The key `StepLayout.groups` buckets `grp`'s tensors by: its workspace outlives a re-made layout."""
    like = grp.params[0]
    return (grp.reduce_over, like.device, like.dtype, grp.maximize)
