"""`mechanize`: wrap any torch optimizer in the Mechanic learning-rate tuner.

The class here only orchestrates: the scalar math is `tuner`, the O(d) work is a backend (`_foreach` or
`_triton`, chosen in `_backend`), and where the state lives (inside torch's `state` and `param_groups`)
is `_state`. One step, with x_t the parameters before it:

1. `_mechanic_pre`: inner products over all parameters with a gradient (before the base step, so
   gradients need no copy), plus a copy of x_t; with DTensor parameters, one all-reduce of the sums;
2. the base optimizer's own step gives x_base;
3. `_mechanic_post`: (mechanic_pytorch only: the sums of its weight-decay term, which uses x_base) the tuner
   step, then x = x_ref + S * (Delta + x_base - x_t).

Nothing in a step reads a tensor's value on the host, except on logging steps and with skip_nonfinite.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import warnings
import weakref
from collections import OrderedDict
from types import ModuleType
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Type,
    TypeVar,
    overload,
)

import torch
from torch import Tensor
from torch.optim.optimizer import _use_grad_for_differentiable

from . import _backend, _distributed, _foreach, _state, tuner
from ._config import MechanicConfig

logger = logging.getLogger("mechanic_fast")


class _Group(NamedTuple):
    """Aligned lists of local tensors on one device with one dtype, and the process groups (if any)
    over which their sums are partial."""

    params: List[Tensor]
    grads: List[Tensor]
    refs: List[Tensor]
    deltas: Optional[List[Tensor]]
    impl: ModuleType
    reduce_over: Tuple[Any, ...]
    maximize: bool  # the base moves along +g: Mechanic's inner product must see -g
    workspace: _foreach.Workspace  # flat buffers kept from step to step
    index: List[int]  # positions of the group's tensors in the step's parameter list


def _default_log_func(data: Dict[str, Any]) -> None:
    logger.info(f"(iter={data['iter_count']}), s_sum (global scaling): {data['s']}")


# Inductor options for a user's `torch.compile(opt.step, options=INDUCTOR_OPTIONS)` over many tensors.
# Inductor's fusion search checks every two nodes that use one buffer, each against up to 64 neighbours
# (`max_fusion_buffer_group_pairwise_attempts`), in every fusion round. Every tensor's update reads the
# scale S and waits on the op that took the sums, so over n tensors it checks ~64n pairs that never fuse,
# ~0.6 ms each on CPU (over 200 tensors: 28 s of the compile against 1.9 s for bare AdamW). With 8
# neighbours inductor writes the same code (compared over 20 and 200 tensors) in less time. Not set by
# Mechanic itself: inductor's config is global, and a compiled training step holds the model's graph
# too. `compile=True` does not use it either: its graphs are small (the base step runs eagerly), and
# their compile time did not change with it (bench/compile_times.py --mechanized own).
INDUCTOR_OPTIONS: Dict[str, Any] = {"max_fusion_buffer_group_pairwise_attempts": 8}


class Mechanic(torch.optim.Optimizer):
    """Mixin that turns a torch optimizer into its Mechanic-tuned version; built by `mechanize`."""

    _mechanic_config: MechanicConfig
    _mechanic_base_class: type
    _mechanic_log_func: Callable[[Dict[str, Any]], Any]
    _mechanic_base_step_fn: Callable[..., Any]
    _mechanic_base_sets_grad_mode: bool
    # the process group over which this optimizer's parameters are disjoint parts of one model (None: it
    # holds the whole model, or its sharding is visible in the parameters themselves)
    _mechanic_partition_group: Optional[_distributed.GroupRef] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # ZeroRedundancyOptimizer(params, optimizer_class=mechanize(...)) hands each rank's optimizer a
        # partition of the parameters: their sums are added over ZeRO's process group.
        zero = _distributed.zero_redundancy_caller()
        if zero is not None:
            self._mechanic_partition_group = _distributed.GroupRef(zero.process_group)
        super().__init__(*args, **kwargs)
        self._mechanic_attach()
        self._mechanic_tuner_entry()  # the tuner exists from the start, like the options it records

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """torch's `add_param_group` (construction calls it too), refusing first what Mechanic cannot
        tune: differentiable=True, and float16/bfloat16 parameters with store_delta=False."""
        params = param_group.get("params")
        if params is not None and not isinstance(params, (Tensor, set)):
            param_group["params"] = list(params)  # as torch does, so that checking does not consume it
        _check_group(self._mechanic_config, {**self.defaults, **param_group})
        super().add_param_group(param_group)

    def _mechanic_attach(self) -> None:
        """Instance attributes beside the state (after construction, unpickling or `mechanize(opt)`)."""
        # steps skipped for non-finite gradients (skip_nonfinite=True)
        self.__dict__.setdefault("mechanic_skipped_steps", 0)
        # GradScaler must unscale gradients before our inner products read them, so it may not hand the
        # scale to a fused base kernel that would unscale them only inside the base step.
        self._step_supports_amp_scaling = False
        self._mechanic_reset_caches()

    def _mechanic_reset_caches(self) -> None:
        """Host-side caches derived from the state: never saved or copied, rebuilt when needed."""
        self._mechanic_const: Optional[Tuple[Tuple[Any, ...], tuner.Constants]] = None
        self._mechanic_compiled: Optional[Tuple[Callable[..., Any], Callable[..., Any]]] = None
        self._mechanic_log_count: Optional[int] = None  # host copy of the step count, logging only
        self._mechanic_acc_dtype = torch.float32
        self._mechanic_run_cfg: Optional[MechanicConfig] = None
        # the last step's groups without gradients, keyed by the parameters (ids) and maximize flags
        self._mechanic_layout: Optional[Tuple[Tuple[Any, ...], List[_Group]]] = None
        # every parameter's reduction domain and the distinct non-empty ones in order, keyed by the
        # optimizer's parameters (ids)
        self._mechanic_domain_cache: Optional[
            Tuple[Tuple[int, ...], Dict[int, _distributed.Domain], List[_distributed.Domain]]
        ] = None

    # ------------------------------------------------------------------------- copy and pickle
    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        state["mechanic_skipped_steps"] = self.mechanic_skipped_steps
        if self._mechanic_partition_group is not None:
            state["_mechanic_partition_group"] = self._mechanic_partition_group
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self._mechanic_attach()

    def __reduce_ex__(self, protocol: Any) -> Any:
        # The class is made at run time, so pickle cannot find it by name: rebuild it from what made it.
        log_func = self._mechanic_log_func
        log_func = None if log_func is _default_log_func else log_func
        args = (self._mechanic_base_class, self._mechanic_config, log_func)
        return (_rebuild, args, self.__getstate__())

    # ----------------------------------------------------------------------------------------- state
    def _mechanic_params(self) -> List[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _mechanic_device(self) -> torch.device:
        for group in self.param_groups:
            if group["params"]:
                return group["params"][0].device
        return torch.device("cpu")

    def _mechanic_ref_dtype(self, p: Tensor) -> torch.dtype:
        low = p.dtype in (torch.float16, torch.bfloat16)
        return torch.float32 if self._mechanic_config.ref_dtype == "float32" and low else p.dtype

    def _mechanic_tuner_entry(self) -> Dict[str, Any]:
        """The tuner in param_groups[0], created in its initial state where it is missing (a new
        optimizer, or one that loaded a plain base checkpoint) and moved to where the parameters are."""
        group = self.param_groups[0]
        entry = group.get(_state.TUNER_KEY)
        if entry is None:
            params = self._mechanic_params()
            cfg = self._mechanic_config.with_store_delta({self._mechanic_ref_dtype(p) for p in params})
            dtype = tuner.state_dtype(cfg, {p.dtype for p in params})
            device = self._mechanic_device()
            entry = group[_state.TUNER_KEY] = _state.new_tuner(cfg, device, dtype, group.get("lr"))
        elif entry["s"].device != self._mechanic_device():  # the model moved after the optimizer was made
            device = self._mechanic_device()
            for name in (*tuner.TunerState._fields, "step"):
                entry[name] = entry[name].to(device)
        return entry

    def _mechanic_run_config(self) -> MechanicConfig:
        """The options with `store_delta` as this optimizer's state has it (decided when its tuner was
        made, or as loaded from a checkpoint, when the option was left at None)."""
        store_delta = self._mechanic_tuner_entry()["store_delta"]
        if self._mechanic_run_cfg is None or self._mechanic_run_cfg.store_delta != store_delta:
            self._mechanic_run_cfg = dataclasses.replace(self._mechanic_config, store_delta=store_delta)
        return self._mechanic_run_cfg

    def _mechanic_constants(self, like: Tensor) -> tuner.Constants:
        key = (like.device, like.dtype)
        if self._mechanic_const is None or self._mechanic_const[0] != key:
            self._mechanic_const = (key, tuner.constants(self._mechanic_config, like.device, like.dtype))
        return self._mechanic_const[1]

    @property
    def mechanic_scale(self) -> Tensor:
        """The current total scale S = sum(s), a 0-d float32 tensor on the parameters' device (no sync).

        The effective learning rate of a group is ``mechanic_scale * group["lr"]``. Before the first step
        it reads n * s_init for the paper variant (every one of the n tuners starts at s_init) and 0 for
        mechanic_pytorch; neither is applied to any update. After the first step (where Delta = 0, so
        h = 0) the paper variant has S = s_init exactly, the scale of the first update; mechanic_pytorch
        has S = sum(beta_j) * 1e-6 * (s_init / n) / eps (9.8e-7 with its defaults).
        """
        entry = self._mechanic_tuner_entry()
        scale = tuner.effective_scale(_state.tuner_state(entry), self._mechanic_config)
        return (scale / _state.lr_ref(entry)).to(torch.float32)

    # ------------------------------------------------------------------------------------------ step
    def _mechanic_gather(self) -> Tuple[List[Tensor], List[Tensor], List[bool]]:
        """Parameters that have a gradient, their gradients, and whether each is in a `maximize` group;
        refuses what Mechanic cannot handle before anything has changed. (Runs every step over every
        parameter: kept to attribute reads and one set per step, no hashing of tensors.)"""
        params, grads, maximize, seen = [], [], [], set()
        for group in self.param_groups:
            maximizes = bool(group.get("maximize", False))
            for p in group["params"]:
                g = p.grad
                # a parameter listed twice counts once; an empty one has nothing to tune; a frozen one
                # (requires_grad=False, its gradient kept by zero_grad(set_to_none=False)) is left to
                # the base, as if it had no gradient (else every change of S would move it)
                if g is None or not p.requires_grad:
                    continue
                key = id(p)
                if key in seen or p.numel() == 0:
                    continue
                seen.add(key)
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
        return params, grads, maximize

    def _mechanic_domains(self) -> Tuple[Dict[int, _distributed.Domain], List[_distributed.Domain]]:
        """Every parameter's reduction domain (`_distributed.domain`), with or without a gradient, and
        the distinct non-empty domains in the optimizer's parameter order: a rank whose piece of a
        parameter is empty, or has no gradient, still joins the collectives of its domain, in the
        order the other ranks issue them."""
        params = self._mechanic_params()
        key = tuple(map(id, params))
        cache = self._mechanic_domain_cache
        if cache is not None and cache[0] == key:
            return cache[1], cache[2]
        fsdp1 = _distributed.fsdp1_domains(params)
        domains = {id(p): _distributed.domain(p, fsdp1) for p in params}
        ordered = [d for d in dict.fromkeys(domains.values()) if d]
        if not torch.compiler.is_compiling():
            self._mechanic_domain_cache = (key, domains, ordered)
        return domains, ordered

    def _mechanic_lr_is_zero(self) -> bool:
        """Every group's lr is 0 (read on the host: a Python number, or a CPU tensor in eager mode).

        Such a step is how torch.distributed.checkpoint creates an optimizer's state (zero gradients,
        lr 0); the base does not move, so neither does Mechanic (see `step`)."""
        for group in self.param_groups:
            lr = group.get("lr")
            if torch.is_tensor(lr):
                if lr.device.type != "cpu" or torch.compiler.is_compiling() or lr.numel() != 1:
                    return False  # reading it would sync with the device, or guard a compiled graph
                lr = lr.item()
            if not isinstance(lr, (int, float)) or lr != 0:
                return False
        return bool(self.param_groups)

    def _mechanic_base_step(self, closure: Optional[Callable[[], Any]], loss: Any) -> Any:
        """Run the base optimizer's own step, bypassing its step hooks (ours already fire around this)."""
        func = self._mechanic_base_step_fn
        if self._mechanic_base_sets_grad_mode:  # what torch's _use_grad_for_differentiable would do
            with torch.set_grad_enabled(self.defaults.get("differentiable", False)):
                return self._mechanic_call_base(func, closure, loss)
        return self._mechanic_call_base(func, closure, loss)

    def _mechanic_call_base(
        self, func: Callable[..., Any], closure: Optional[Callable[[], Any]], loss: Any
    ) -> Any:
        if closure is None:
            return func(self)
        # The closure was evaluated once already for Mechanic's inner products: no doubled gradients.
        return func(self, _evaluated_once(closure, loss))

    def _mechanic_known_refs(self, params: List[Tensor]) -> Dict[Tensor, Dict[str, Tensor]]:
        """The state entries of those of `params` that have Mechanic state (x_ref)."""
        state = self.state
        refs = {}
        for p in params:  # one lookup each (tensors hash in Python)
            entry = state.get(p)
            if entry is not None and _state.X_REF in entry:
                refs[p] = entry
        return refs

    def _mechanic_refs(
        self, params: List[Tensor], known_refs: Dict[Tensor, Dict[str, Tensor]]
    ) -> Tuple[Dict[Tensor, Dict[str, Tensor]], bool]:
        """x_ref (and Delta) of `params` (`known_refs`: the state entries of those that have them), and
        whether they are new and must be committed to `state`.

        A parameter seen for the first time gets x_ref = x_t (Delta = 0). Then every parameter that has
        Mechanic state is laid out anew so that each device/dtype tiles one flat buffer (a one-time
        copy; later steps read the buffer without a gather)."""
        if len(known_refs) == len(params):
            return known_refs, False
        known = {p: s for p, s in self.state.items() if isinstance(s, dict) and _state.X_REF in s}
        values = {p: s[_state.X_REF] for p, s in known.items()}
        values.update((p, p.detach()) for p in params if p not in known)
        x_refs = _state.tiled(values, self._mechanic_ref_dtype)
        fresh = {p: {_state.X_REF: x} for p, x in x_refs.items()}
        if self._mechanic_run_config().store_delta:
            deltas = {
                p: known[p][_state.DELTA] if p in known else torch.zeros_like(x) for p, x in x_refs.items()
            }
            for p, d in _state.tiled(deltas, self._mechanic_ref_dtype).items():
                fresh[p][_state.DELTA] = d
        return fresh, True

    @torch._dynamo.disable  # traced in one frame with the base step, torch 2.13's dynamo drops the state
    def _mechanic_commit(self, refs: Dict[Tensor, Dict[str, Tensor]]) -> None:
        """Put new per-parameter state in place. Done after the base step: torch's
        optimizers create their own state only while a parameter's state is empty. Runs eagerly (the
        base just created in the same defaultdict entries); only steps that create state come here."""
        for p, tensors in refs.items():
            self.state[p].update(tensors)

    def _mechanic_groups(
        self,
        params: List[Tensor],
        grads: List[Tensor],
        refs: Dict[Tensor, Dict[str, Tensor]],
        maximize: List[bool],
        new_refs: bool,
    ) -> List[_Group]:
        """Aligned lists of local tensors per reduction domain, device and dtype.

        The lists other than the gradients are kept from step to step while the same parameters step
        (so a step does O(1) Python work per tensor: one list of gradients); they are re-made when
        parameters come or go, when state is created or loaded, and always for sharded (DTensor)
        parameters, whose local tensors FSDP may swap."""
        compiling = torch.compiler.is_compiling()
        layout = self._mechanic_layout
        key = None if compiling else (tuple(map(id, params)), tuple(maximize))
        if layout is not None and layout[0] == key and not new_refs:
            # a cached layout has no sharded parameter: no local shard to take
            return [grp._replace(grads=_as_1d([grads[i] for i in grp.index])) for grp in layout[1]]
        store_delta = self._mechanic_run_cfg.store_delta
        workspaces = {}
        if layout is not None:
            workspaces = {
                _workspace_key(g.impl, g.reduce_over, g.maximize, g.params[0]): g.workspace for g in layout[1]
            }
        # Sharded (DTensor) parameters give partial sums, reduced over the mesh dims they are sharded on.
        # Checked once: plain ones then skip the per-tensor shard lookups (Python work that torch.compile
        # traces again for every tensor).
        sharded = any(_distributed.is_dtensor(p) for p in params)
        to_1d = _local_1d if sharded else _as_1d
        tiled = list if compiling else _foreach.Tiled  # the flat views it finds are eager-only
        domains, _ = self._mechanic_domains()
        buckets: Dict[Tuple[Any, ...], List[int]] = {}
        for i, p in enumerate(params):
            local = _distributed.local(p) if sharded else p
            if local.numel() == 0:  # an empty shard adds nothing; its domain still joins (_mechanic_total)
                continue
            buckets.setdefault((domains[id(p)], local.device, local.dtype, maximize[i]), []).append(i)
        groups = []
        for (reduce_over, device, _, maximizes), idx in buckets.items():
            entries = [refs[params[i]] for i in idx]
            impl = _backend.select(self._mechanic_config.backend, device)
            local = to_1d([params[i] for i in idx])
            groups.append(
                _Group(
                    local,
                    to_1d([grads[i] for i in idx]),
                    tiled(to_1d([e[_state.X_REF] for e in entries])),
                    tiled(to_1d([e[_state.DELTA] for e in entries])) if store_delta else None,
                    impl,
                    reduce_over,
                    maximizes,
                    workspaces.get(
                        _workspace_key(impl, reduce_over, maximizes, local[0]), _foreach.Workspace()
                    ),
                    idx,
                )
            )
        if not sharded and not compiling:
            self._mechanic_layout = (key, groups)
        return groups

    def _mechanic_total(self, parts: List[Tuple[Tensor, Tuple[Any, ...]]], device: torch.device) -> Tensor:
        """Sum per-group sums on the tuner's device: one all-reduce per reduction domain (one in all for
        FSDP2), never one per tensor, then one over the partition group if there is one. Every domain of
        the optimizer joins, with zeros where this rank holds nothing of it, so that all ranks issue the
        same collectives in the same order."""
        by_domain: Dict[Tuple[Any, ...], List[Tensor]] = {d: [] for d in self._mechanic_domains()[1]}
        for sums, reduce_over in parts:
            by_domain.setdefault(reduce_over, []).append(sums.to(device, non_blocking=True))
        totals = []
        for reduce_over, sums_list in by_domain.items():
            if not sums_list:
                total = torch.zeros(4, dtype=self._mechanic_acc_dtype, device=device)
            else:
                total = torch.stack(sums_list).sum(0) if len(sums_list) > 1 else sums_list[0]
            totals.append(_distributed.all_reduce(total, reduce_over))
        if not totals:  # this rank has nothing to sum: it still joins the partition's collective
            totals.append(torch.zeros(4, dtype=self._mechanic_acc_dtype, device=device))
        total = torch.stack(totals).sum(0) if len(totals) > 1 else totals[0]
        partition = self._mechanic_partition_group
        return total if partition is None else _distributed.all_reduce(total, (partition.group,))

    def _mechanic_pre(self, groups: List[_Group], device: torch.device) -> Tuple[Tensor, List[Any]]:
        """Inner products over every parameter with a gradient, and the x_t copies (before the base step,
        so gradients need no copy)."""
        cfg = self._mechanic_run_cfg  # set by step (a plain attribute read when compiled)
        parts, copies = [], []
        for grp in groups:
            sums, copy = _backend.current(grp.impl).inner_products(
                grp.deltas if cfg.store_delta else grp.params,
                None if cfg.store_delta else grp.refs,
                grp.grads,
                grp.params,
                acc_dtype=self._mechanic_acc_dtype,
                x_sums=cfg.variant == "paper",  # mechanic_pytorch uses x after the base step
                copy_x=True,
                workspace=grp.workspace,
            )
            if grp.maximize:  # <d, -g>; the norms do not change
                sums = torch.cat([sums[:1].neg(), sums[1:]])
            parts.append((sums, grp.reduce_over))
            copies.append(copy)
        return self._mechanic_total(parts, device), copies

    def _mechanic_post(
        self,
        groups: List[_Group],
        copies: List[Any],
        sums: Tensor,
        old: tuner.TunerState,
        const: tuner.Constants,
        count: Tensor,
        lr_ref: float = 1.0,
    ) -> None:
        """The tuner step and x = x_ref + S_new * (Delta + u), after the base step gave x_base."""
        cfg = self._mechanic_run_cfg  # set by step
        if cfg.variant == "mechanic_pytorch":  # its weight-decay term uses x after the base step
            parts = []
            for grp, copy in zip(groups, copies):
                post, _ = _backend.current(grp.impl).inner_products(
                    grp.deltas if cfg.store_delta else copy,
                    None if cfg.store_delta else grp.refs,
                    None,
                    grp.params,
                    acc_dtype=self._mechanic_acc_dtype,
                )
                parts.append((post, grp.reduce_over))
            sums = sums + self._mechanic_total(parts, old.s.device)
        new, scale, denom = tuner.step(old, sums, const, cfg, lr_ref)
        for grp, copy in zip(groups, copies):
            device = grp.params[0].device
            _backend.current(grp.impl).apply_update(
                grp.params,
                copy,
                grp.refs,
                grp.deltas,
                scale.to(device, non_blocking=True),
                denom.to(device, non_blocking=True),
                grp.workspace,
            )
        # Commit in place (stable addresses for CUDA graphs). Not one _foreach_copy_: inductor (torch
        # 2.13) fuses it so that r_new reads the already-overwritten s; see test_compile.py.
        for buf, value in zip(old, new):
            buf.copy_(value)
        count.add_(1)

    def _mechanic_fns(self) -> Tuple[Callable[..., Any], Callable[..., Any]]:
        if not self._mechanic_config.compile:
            return self._mechanic_pre, self._mechanic_post
        if self._mechanic_compiled is None:  # compiled lazily, once per optimizer
            self._mechanic_compiled = (
                torch.compile(self._mechanic_pre, fullgraph=True),
                torch.compile(self._mechanic_post, fullgraph=True),
            )
        return self._mechanic_compiled

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """One mechanized step. Returns the closure's loss when a closure is given.

        A step in which every group's lr is 0 only creates Mechanic's state where it is missing (x_ref
        = the current parameters, a fresh tuner) and runs the base step: with no base update there is
        nothing for Mechanic to scale, and a tuner step would still move the parameters along Delta.
        This is the step torch.distributed.checkpoint takes to create an optimizer's state.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, grads, maximize = self._mechanic_gather()
        # a rank whose parameters have no gradient (or an empty piece of each) still takes the tuner step
        # with the others when the sums are added over ranks
        if not params and not self._mechanic_joins_others():
            return self._mechanic_base_step(closure, loss)
        known = self._mechanic_known_refs(params)
        if len(known) < len(params) and torch.compiler.is_compiling():
            # A step that creates state runs eagerly: traced, it would be compiled once more (and its
            # state-creating graph recompiled), which over 200 tensors costs minutes.
            return self._mechanic_eager_step(closure, loss)

        entry = self._mechanic_tuner_entry()
        cfg = self._mechanic_run_config()
        with torch.no_grad():
            refs, new_refs = self._mechanic_refs(params, known)
        if self._mechanic_lr_is_zero():
            result = self._mechanic_base_step(closure, loss)
            if new_refs:
                self._mechanic_commit(refs)
            return loss if closure is not None else result

        pre, post = self._mechanic_fns()
        old = _state.tuner_state(entry)
        with torch.no_grad():
            groups = self._mechanic_groups(params, grads, refs, maximize, new_refs)
            # float64 sums where any parameter is float64 (groups have one dtype each: no loop over params)
            wide = any(grp.params[0].dtype == torch.float64 for grp in groups)
            wide = wide or (not groups and old.s.dtype == torch.float64)  # nothing here: the tuner's dtype
            self._mechanic_acc_dtype = torch.float64 if wide else torch.float32
            sums, copies = pre(groups, old.s.device)
            # Opt-in: the one host sync per step. Non-finite gradients make ||g||^2 or <d, g> non-finite;
            # so do finite ones that overflow them, which are not skipped (the tuner step is then
            # skipped on the device, see tuner.step). Nothing new was committed yet, so a skipped step
            # leaves no trace.
            if cfg.skip_nonfinite and not bool(torch.isfinite(sums).all()):
                # summed over ranks, the sums decide alone: every rank must skip alike
                if self._mechanic_joins_others() or not all(bool(torch.isfinite(g).all()) for g in grads):
                    self.mechanic_skipped_steps += 1
                    return loss

        result = self._mechanic_base_step(closure, loss)
        with torch.no_grad():
            const = self._mechanic_constants(old.s)
            post(groups, copies, sums, old, const, entry["step"], _state.lr_ref(entry))
        if new_refs:
            self._mechanic_commit(refs)

        if cfg.log_every > 0:
            self._mechanic_log(entry)
        return loss if closure is not None else result

    def _mechanic_joins_others(self) -> bool:
        """Whether this optimizer's sums are added over ranks (its steps are collective)."""
        return self._mechanic_partition_group is not None or bool(self._mechanic_domains()[1])

    @torch._dynamo.disable
    def _mechanic_eager_step(self, closure: Optional[Callable[[], Any]], loss: Any) -> Any:
        """`step` run eagerly (the closure, if any, was evaluated already: its loss is handed back)."""
        if closure is None:
            return Mechanic.step(self)
        Mechanic.step(self, _evaluated_once(closure, loss))
        return loss

    @torch._dynamo.disable
    def _mechanic_log(self, entry: Dict[str, Any]) -> None:
        """Logging steps are the only ones that read a value on the host. Steps are counted on the host
        only when logging is on (a host counter in compiled code would be guarded on and recompiled)."""
        if self._mechanic_log_count is None:  # resumed or copied: one sync to number the lines on
            self._mechanic_log_count = int(entry["step"]) - 1
        self._mechanic_log_count += 1
        if self._mechanic_log_count % self._mechanic_config.log_every == 0:
            scale = entry["s"].sum().item()
            self._mechanic_log_func({"iter_count": self._mechanic_log_count, "s": scale})

    # ----------------------------------------------------------------------------------- checkpoints
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a mechanized checkpoint, or a plain base-optimizer one (Mechanic
        then starts afresh from the current parameters at the next step).

        torch's contract holds: load-state-dict pre-hooks run first and may replace the checkpoint, post
        hooks see the loaded optimizer. In between, everything is validated before anything changes, and
        Mechanic's tensors keep their dtypes (torch would cast x_ref to the parameter's dtype)."""
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            replaced = pre_hook(self, state_dict)
            if replaced is not None:
                state_dict = replaced
        cfg = self._mechanic_config
        torch_base = self._mechanic_base_class.__module__.startswith("torch.optim")
        base_sd, per_param, entry = _state.parse(self, cfg, state_dict, self._mechanic_ref_dtype, torch_base)
        pre_hooks, post_hooks = (
            self._optimizer_load_state_dict_pre_hooks,
            self._optimizer_load_state_dict_post_hooks,
        )
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        try:
            super().load_state_dict(base_sd)
        finally:
            self._optimizer_load_state_dict_pre_hooks = pre_hooks
            self._optimizer_load_state_dict_post_hooks = post_hooks
        for p, tensors in per_param.items():
            self.state[p].update(tensors)
        if entry is not None:
            self.param_groups[0][_state.TUNER_KEY] = entry
        self._mechanic_tuner_entry()  # a plain base checkpoint: Mechanic starts afresh
        self._mechanic_reset_caches()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)


def _check_group(cfg: MechanicConfig, group: Dict[str, Any]) -> None:
    """Refuse a parameter group Mechanic cannot tune, before it is added."""
    if group.get("differentiable", False):
        raise ValueError(
            "Mechanic does not support differentiable=True: its update overwrites the parameters "
            "outside autograd, so gradients through the step would be wrong"
        )
    params = group.get("params", [])
    params = [params] if isinstance(params, Tensor) else list(params)
    low = {p.dtype for p in params if isinstance(p, Tensor) and p.dtype in (torch.float16, torch.bfloat16)}
    if low and cfg.store_delta is False:
        raise ValueError(
            f"Mechanic with store_delta=False cannot tune {sorted(map(str, low))} parameters: Delta "
            "recomputed as (x - x_ref) / S from them is lost while S * Delta is below their resolution "
            "(the scale cannot grow) and overflows float16 while S is small. Leave store_delta at its "
            "default (Delta is kept as state), with ref_dtype='float32' to keep it in float32"
        )


def _evaluated_once(closure: Callable[[], Any], loss: Any) -> Callable[[], Any]:
    """`closure` for a step whose closure was evaluated already: the first call hands `loss` back
    instead of evaluating (and accumulating gradients) again; later calls evaluate."""
    calls = 0

    def closure_once() -> Any:
        nonlocal calls
        calls += 1
        return loss if calls == 1 else closure()

    return closure_once


def _workspace_key(
    impl: ModuleType, reduce_over: Tuple[Any, ...], maximize: bool, like: Tensor
) -> Tuple[Any, ...]:
    """Which workspace a group uses: buffers outlive a re-made layout (e.g. a parameter added)."""
    return (impl, reduce_over, maximize, like.dtype, like.device)


def _as_1d(tensors: List[Tensor]) -> List[Tensor]:
    """0-d tensors (a CLIP-style logit_scale) viewed as 1-element ones, which every multi-tensor op takes."""
    return [t if t.dim() else t.view(1) for t in tensors]


def _local_1d(tensors: List[Tensor]) -> List[Tensor]:
    """Local shards, 0-d ones viewed as 1-element ones (`_as_1d`)."""
    return _as_1d([_distributed.local(t) for t in tensors])


def _rebuild(base: type, cfg: MechanicConfig, log_func: Optional[Callable[..., Any]]) -> Mechanic:
    """An empty instance of the mechanized class (pickle and deepcopy then set its state)."""
    cls = mechanize(base, log_func=log_func, **cfg.options())
    return cls.__new__(cls)


def _flag_step_called(opt: torch.optim.Optimizer) -> None:
    """What torch's LRScheduler wraps `opt.step` in (it only records that the step ran), around the
    mechanized step."""
    opt_ref = weakref.ref(opt)
    func = type(opt).step

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        inner = opt_ref()
        inner._opt_called = True  # type: ignore[union-attr]
        return func.__get__(inner, type(inner))(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    opt.step = wrapper  # type: ignore[method-assign]


def _wrapped(opt: Any) -> Iterator[Any]:
    """`opt` and the optimizers inside it, outermost first: accelerate's AcceleratedOptimizer keeps its
    optimizer as `.optimizer`, Lightning's LightningOptimizer as `._optimizer`, ZeroRedundancyOptimizer
    this rank's as `.optim`."""
    yield opt
    while True:
        attrs = getattr(opt, "__dict__", {})
        inner = attrs.get("optimizer", attrs.get("_optimizer", attrs.get("optim")))
        if not isinstance(inner, torch.optim.Optimizer) or inner is opt:
            return
        yield inner
        opt = inner


def _unwrap(opt: Any) -> Any:
    """The optimizer inside framework wrappers (`_wrapped`)."""
    *_, inner = _wrapped(opt)
    return inner


def _zero_redundancy(wrapper: Any) -> Optional[Any]:
    """`wrapper` itself, or an optimizer it wraps, if that is a ZeroRedundancyOptimizer."""
    zero = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if zero is None:
        return None
    return next((w for w in _wrapped(wrapper) if isinstance(w, zero.ZeroRedundancyOptimizer)), None)


def _mechanize_instance(
    wrapper: torch.optim.Optimizer,
    cfg: MechanicConfig,
    log_func: Optional[Callable[[Dict[str, Any]], Any]],
    partition_group: Any = None,
) -> torch.optim.Optimizer:
    """Mechanize an existing optimizer in place (through framework wrappers), keeping its state:
    Mechanic starts from the current parameters at the next step. Returns what it was given."""
    opt = _unwrap(wrapper)
    if is_mechanized(opt):
        raise TypeError(f"{type(opt).__name__} is already mechanized")
    zero = _zero_redundancy(wrapper)
    if zero is not None and partition_group is None:  # each rank's `.optim` holds its partition
        partition_group = zero.process_group
    # Something may hold the bare step already: after the class changes it would keep running the
    # plain optimizer, and Mechanic would silently take no step.
    holders = [wrapper] if wrapper is not opt else []
    for holder in holders:
        for name, value in vars(holder).items():
            if getattr(value, "__self__", None) is opt and getattr(value, "__name__", "") == "step":
                raise TypeError(
                    f"{type(holder).__name__}.{name} holds {type(opt).__name__}'s own step (a framework "
                    "wrapper made with a gradient scaler?); mechanize the optimizer before wrapping it"
                )
    for group in opt.param_groups:
        _check_group(cfg, group)
    instance_step = vars(opt).get("step")
    lr_sched_wrapper = getattr(instance_step, "_wrapped_by_lr_sched", False)
    if instance_step is not None and not lr_sched_wrapper:
        bound_self = getattr(instance_step, "__self__", None)
        if bound_self is not opt or getattr(instance_step, "__func__", None) is not type(opt).step:
            raise TypeError(
                f"{type(opt).__name__}.step was replaced on the instance by {instance_step!r}; it would "
                "keep running the plain optimizer. Mechanize the optimizer before wrapping its step "
                "(e.g. before a framework's prepare/setup)"
            )
    opt.__class__ = mechanize(type(opt), log_func=log_func, **cfg.options())
    if instance_step is not None:
        del opt.step  # the class's (mechanized) step shows through again
    if partition_group is not None:
        opt._mechanic_partition_group = _distributed.GroupRef(partition_group)  # type: ignore[attr-defined]
    opt._mechanic_attach()  # type: ignore[attr-defined]
    opt._mechanic_tuner_entry()  # type: ignore[attr-defined]
    opt._patch_step_function()  # so step hooks wrap the mechanized step
    if lr_sched_wrapper:  # torch's LR schedulers only record that the step ran: keep doing that
        _flag_step_called(opt)
    return wrapper


# torch's `_use_grad_for_differentiable` wrapper, recognised by its code object.
_USE_GRAD_CODE = _use_grad_for_differentiable(lambda self: None).__code__


def _unwrapped(step: Callable[..., Any]) -> Tuple[Callable[..., Any], bool]:
    """The base's own step, resolved once per class: without torch's step-hook wrapper (ours fires
    around the mechanized step), and without `_use_grad_for_differentiable`, whose graph breaks would
    split a compiled mechanized step in three; we apply its grad mode ourselves (second value True)."""
    if getattr(step, "hooked", False):
        step = step.__wrapped__
    if getattr(step, "__code__", None) is _USE_GRAD_CODE:
        return step.__wrapped__, True
    return step, False


def is_mechanized(opt: Any) -> bool:
    """True for a mechanized optimizer, also inside accelerate's or Lightning's optimizer wrappers."""
    return isinstance(_unwrap(opt), Mechanic)


def mechanic_scale(opt: Any) -> Tensor:
    """``opt.mechanic_scale`` of a mechanized optimizer, also inside framework wrappers: the factor by
    which Mechanic multiplies every group's lr (effective lr = ``mechanic_scale(opt) * group["lr"]``)."""
    inner = _unwrap(opt)
    if not isinstance(inner, Mechanic):
        raise TypeError(f"{type(inner).__name__} is not mechanized")
    return inner.mechanic_scale


_UNSUPPORTED = (torch.optim.LBFGS, torch.optim.SparseAdam)

# One class per (base, options, log_func): an optimizer, its deepcopy and its unpickled copy share it.
_CLASSES: Dict[Tuple[type, MechanicConfig, Optional[Callable[..., Any]], Any], type] = {}


OptimizerT = TypeVar("OptimizerT", bound=torch.optim.Optimizer)


@overload
def mechanize(
    Base: Type[OptimizerT],
    s_decay: Optional[float] = ...,
    betas: Sequence[float] = ...,
    s_init: Optional[float] = ...,
    eps: float = ...,
    store_delta: Optional[bool] = ...,
    log_func: Optional[Callable[[Dict[str, Any]], Any]] = ...,
    log_every: int = ...,
    *,
    variant: str = ...,
    backend: str = ...,
    compile: bool = ...,
    ref_dtype: Optional[str] = ...,
    skip_nonfinite: bool = ...,
    lr_invariant: bool = ...,
    partition_group: Any = ...,
) -> Type[OptimizerT]: ...


@overload
def mechanize(
    Base: OptimizerT,
    s_decay: Optional[float] = ...,
    betas: Sequence[float] = ...,
    s_init: Optional[float] = ...,
    eps: float = ...,
    store_delta: Optional[bool] = ...,
    log_func: Optional[Callable[[Dict[str, Any]], Any]] = ...,
    log_every: int = ...,
    *,
    variant: str = ...,
    backend: str = ...,
    compile: bool = ...,
    ref_dtype: Optional[str] = ...,
    skip_nonfinite: bool = ...,
    lr_invariant: bool = ...,
    partition_group: Any = ...,
) -> OptimizerT: ...


def mechanize(
    Base: Any,
    s_decay: Optional[float] = None,
    betas: Sequence[float] = (0.9, 0.99, 0.999, 0.9999, 0.99999, 0.999999),
    s_init: Optional[float] = None,
    eps: float = 1e-8,
    store_delta: Optional[bool] = None,
    log_func: Optional[Callable[[Dict[str, Any]], Any]] = None,
    log_every: int = 0,
    *,
    variant: str = "paper",
    backend: str = "auto",
    compile: bool = False,
    ref_dtype: Optional[str] = None,
    skip_nonfinite: bool = False,
    lr_invariant: bool = False,
    partition_group: Any = None,
) -> Any:
    """Wrap a torch optimizer in the Mechanic learning-rate tuner.

    ``mechanize(torch.optim.AdamW)`` returns a subclass of AdamW (and of `Mechanic`) used exactly like
    AdamW: ``opt = mechanize(torch.optim.AdamW)(model.parameters(), lr=1e-3)``. Every step runs the base
    optimizer, then rescales its update by a learned scale S: the parameters become
    ``x_ref + S * Delta``, where ``x_ref`` are the parameters at the first step and ``Delta`` the sum of
    the base's updates. The effective learning rate of a group is ``S * group["lr"]``
    (`mechanic_scale`). Given an optimizer instance instead of a class (also inside accelerate's,
    Lightning's or ZeroRedundancyOptimizer's wrapper), it is mechanized in place, keeps its state, and
    is returned.

    Args:
        Base: a ``torch.optim.Optimizer`` subclass, or an optimizer instance.
        s_decay: lambda in the paper, the weight of the ``lambda * S * ||g|| / ||x|| * x`` term that
            Mechanic adds to the gradient in its inner product; 0 turns it off. None: 0.01 (10 with
            ``lr_invariant``, where S is measured in units of the reference lr).
        betas: Mechanic's own betas: one tuner per value, each with its own discount, and S is the sum of
            their scales (default 6 values ``1 - 10**-i``). These are not the base optimizer's betas:
            Adam's ``(beta1, beta2)`` go to the base, ``mechanize(AdamW)(params, betas=(0.9, 0.999))``.
        s_init: S of the first update for ``variant="paper"`` (None: 1e-6; 1e-8 for mechanic_pytorch;
            with ``lr_invariant``, the first effective lr relative to the reference lr: 1e-9).
        eps: floor of the tuner's divisions.
        store_delta: keep Delta as state (True) or recompute it as (x - x_ref) / S (False). None decides
            from the parameters: kept unless every x_ref is float64 (recomputed in float32 it can be lost
            to rounding while S is small, and then S never grows).
        log_func, log_every: call ``log_func({"iter_count": int, "s": float})`` every ``log_every``
            steps (default: the ``mechanic_fast`` logger); only logging steps sync with the host.
        variant: ``"paper"`` (the math of optax.contrib.mechanize) or ``"mechanic_pytorch"`` (that of
            the mechanic-pytorch package, to float rounding).
        backend: ``"foreach"`` (torch multi-tensor ops), ``"triton"`` (Triton kernels; raises where they
            cannot run) or ``"auto"`` (Triton on CUDA when it imports, else foreach).
        compile: compile Mechanic's own work with ``torch.compile(fullgraph=True)``.
        ref_dtype: ``"float32"`` keeps x_ref and Delta in float32 for bfloat16/float16 parameters.
        skip_nonfinite: skip (and count in ``opt.mechanic_skipped_steps``) a step whose gradients hold
            NaN/Inf, at the cost of one host sync per step.
        lr_invariant: measure the scale in units of a reference lr (group 0's lr when the tuner is
            made), so that multiplying every lr by a constant changes nothing for a base whose update is
            proportional to lr: the same effective lr and parameters at every step. ``s_init`` and
            ``s_decay`` are then in those units (None: 1e-9 and 10, the paper's defaults at lr 1e-3).
            Off by default: the paper variant is the default.
        partition_group: a process group over which this optimizer's parameters are disjoint parts of one
            model (pipeline stages, a hand-made partition): the sums are added over it. DDP, FSDP1/2,
            tensor/sequence parallel and ZeroRedundancyOptimizer are recognised without it.

    Returns:
        The mechanized class, or the given instance, mechanized.

    Raises:
        TypeError: ``Base`` is not an optimizer, is mechanized already, or cannot be (LBFGS, SparseAdam).
        ValueError: an option is out of range.
    """
    cfg = MechanicConfig(
        s_decay=s_decay,
        betas=tuple(betas) if not isinstance(betas, (str, bytes)) else betas,  # type: ignore[arg-type]
        s_init=s_init,
        eps=eps,
        store_delta=store_delta,
        log_every=log_every,
        variant=variant,
        backend=backend,
        compile=compile,
        ref_dtype=ref_dtype,
        skip_nonfinite=skip_nonfinite,
        lr_invariant=lr_invariant,
    )
    if log_func is not None and not callable(log_func):
        raise TypeError(f"log_func must be callable, got {log_func!r}")
    if len(cfg.betas) == 2 and cfg.betas[0] < cfg.betas[1]:
        warnings.warn(
            f"mechanize(betas={cfg.betas}) looks like an Adam (beta1, beta2) pair, but these are "
            "Mechanic's betas: one tuner per value, whose scales are summed (default 6 values 1 - 10^-i). "
            "Adam's betas go to the base optimizer: mechanize(torch.optim.AdamW)(params, betas=(0.9, "
            "0.999)). Keep these if two tuners are what you meant.",
            UserWarning,
            stacklevel=2,
        )
    if isinstance(Base, torch.optim.Optimizer) or isinstance(_unwrap(Base), torch.optim.Optimizer):
        return _mechanize_instance(Base, cfg, log_func, partition_group)
    if not (isinstance(Base, type) and issubclass(Base, torch.optim.Optimizer)):
        raise TypeError(f"mechanize expects a torch.optim.Optimizer subclass (or instance), got {Base!r}")
    if issubclass(Base, Mechanic):
        raise TypeError(f"{Base.__name__} is already mechanized")
    if issubclass(Base, _UNSUPPORTED):
        raise TypeError(
            f"Mechanic cannot wrap {Base.__name__}: "
            + (
                "its line search and curvature history assume the step it took, which Mechanic rescales"
                if issubclass(Base, torch.optim.LBFGS)
                else "it takes sparse gradients, over which Mechanic's inner products are not implemented"
            )
        )
    key = (Base, cfg, log_func, partition_group)
    cls = _CLASSES.get(key)
    if cls is None:
        base_step, sets_grad_mode = _unwrapped(Base.step)
        cls = _CLASSES[key] = type(
            f"Mechanized{Base.__name__}",
            (Mechanic, Base),
            {
                "_mechanic_config": cfg,
                "_mechanic_base_class": Base,
                "_mechanic_log_func": staticmethod(log_func or _default_log_func),
                "_mechanic_base_step_fn": staticmethod(base_step),
                "_mechanic_base_sets_grad_mode": sets_grad_mode,
                "_mechanic_partition_group": (
                    None if partition_group is None else _distributed.GroupRef(partition_group)
                ),
                "__qualname__": f"Mechanized{Base.__name__}",
                "__module__": __name__,
            },
        )
    return cls
