"""`Mechanic`: the mixin that makes a torch optimizer class Mechanic-tuned (`mechanize` builds it).

The class only sequences a step and keeps state where torch keeps it. One step, with x_t the
parameters before it: the inner products over every parameter with a gradient and a copy of x_t (per
group plan, added over ranks: `_step.sums`), the base optimizer's own step (x_t -> x_base), then the
tuner's scalar step and the update x = x_ref + S * Delta (`_step.update`); docs/design.md draws it.
Nothing in a step reads a tensor's value on the host, except on logging steps and with skip_nonfinite.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor

from . import _checkpoint, _distributed, _gaps, _layout, _state, _step, _torch, tuner
from ._config import MechanicConfig
from ._distributed import GroupRef

logger = logging.getLogger("mechanic_fast")


_SKIPPED = object()  # a step skip_nonfinite skipped


def _default_log_func(data: Dict[str, Any]) -> None:
    logger.info(
        f"(iter={data['iter_count']}), s_sum (global scaling): {data['s']}, "
        f"effective lr (group 0): {data['effective_lr']}"
    )


@dataclasses.dataclass(frozen=True)
class MechanicSpec:
    """What a mechanized class is made from (`_api.mechanized_class`), its one class attribute; an
    instance of a named class, or one mechanized in place or by ZeroRedundancyOptimizer, holds its own
    copy with its options or partition group."""

    base: type
    config: MechanicConfig
    log_func: Callable[[Dict[str, Any]], Any]
    base_step: Callable[..., Any]  # the base's step without hooks or grad-mode wrapper
    base_sets_grad_mode: bool
    rebuild: Callable[..., Any]  # how pickle remakes an instance: the class is made at run time
    # the process group over which this optimizer's parameters are disjoint parts of one model (None:
    # it holds the whole model, or its sharding is visible in the parameters themselves)
    partition_group: Optional[_distributed.GroupRef] = None
    named: bool = False  # a class of mechanic_fast.optim


class Mechanic(torch.optim.Optimizer):
    """Mixin that turns a torch optimizer into its Mechanic-tuned version; built by `mechanize`."""

    _mechanic_spec: MechanicSpec

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._mechanic_tuner()  # the tuner exists from the start, like the options it records
        self._mechanic_attach()
        _distributed.watch_zero_redundancy(_join_zero_partition)

    @property
    def _mechanic_config(self) -> MechanicConfig:
        return self._mechanic_spec.config

    @property
    def _mechanic_partition_group(self) -> Optional[_distributed.GroupRef]:
        return self._mechanic_spec.partition_group

    def _mechanic_partition(self, group: Any) -> None:
        """Add this optimizer's sums over `group` (a process group), its partition's."""
        self._mechanic_spec = dataclasses.replace(self._mechanic_spec, partition_group=GroupRef(group))

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """torch's `add_param_group`, refusing first what Mechanic cannot tune (`check_group`)."""
        params = param_group.get("params")
        if params is not None and not isinstance(params, (Tensor, set)):
            param_group["params"] = list(params)  # as torch does, so that checking does not consume it
        check_group(self._mechanic_config, {**self.defaults, **param_group})
        super().add_param_group(param_group)

    def _mechanic_attach(self) -> None:
        """Instance attributes beside the state (after construction, unpickling, loading or `mechanize(opt)`):
        host caches, never saved or copied. Not the tuner: torch's `load_state_dict` unpickles through
        here before Mechanic's part of the checkpoint is in place."""
        self.__dict__.setdefault("mechanic_skipped_steps", 0)  # steps skipped by skip_nonfinite
        _torch.no_fused_amp_unscaling(self)  # GradScaler unscales before the inner products read them
        cfg = self._mechanic_config
        self._mechanic_planner = _layout.Planner(cfg.backend, cfg.keep_workspace)
        self._mechanic_reduction = _distributed.Reduction()
        self._mechanic_run = _state.RunCache(cfg)  # the options a step runs with, resolved once
        self._mechanic_compiled: Optional[Callable[..., Any]] = None  # compile=True: the compiled step
        self._mechanic_log_count: Optional[int] = None  # host copy of the step count, logging only
        self._mechanic_capturable = _step.capturable(self.__dict__.get("param_groups", []))
        # an lr-invariant tuner's reference lr is settled at its first step (`_state.settle_lr_ref`)
        groups = self.__dict__.get("param_groups") or [{}]
        self._mechanic_lr_ref_pending = _state.lr_ref_pending(groups[0].get(_state.TUNER_KEY))

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        state["mechanic_skipped_steps"] = self.mechanic_skipped_steps
        if self._mechanic_partition_group is not None:  # refuses pickling; deepcopy shares it
            state["_mechanic_partition_group"] = self._mechanic_partition_group
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        partition = state.pop("_mechanic_partition_group", None)
        super().__setstate__(state)
        if partition is not None:
            self._mechanic_partition(partition.group)
        self._mechanic_attach()

    def __reduce_ex__(self, protocol: Any) -> Any:
        spec = self._mechanic_spec
        log_func = None if spec.log_func is _default_log_func else spec.log_func
        named = type(self) if spec.named else None
        return (spec.rebuild, (spec.base, spec.config, log_func, named), self.__getstate__())

    def _mechanic_tuner(self) -> Dict[str, Any]:
        """The tuner entry in param_groups[0], made where missing, on the parameters' device."""
        return _state.tuner_entry(self.param_groups, self._mechanic_config)

    @property
    def mechanic_scale(self) -> Tensor:
        """The current total scale S = sum(s), a 0-d float32 tensor on the parameters' device (no sync).

        The effective learning rate of a group is ``mechanic_scale * group["lr"]``. Before the first step
        it reads n * s_init for the paper variant (n tuners; n * s_init / lr_ref in the lr-invariant
        default) and 0 for mechanic_pytorch, neither applied to any update. After the first step the
        paper variant has S = s_init (s_init / lr_ref), the scale of the first update (docs/math.md).
        """
        entry = self._mechanic_tuner()
        scale = tuner.effective_scale(_state.tuner_state(entry), self._mechanic_config)
        return (scale / _state.lr_ref(entry)).to(torch.float32)

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """One mechanized step; returns the closure's loss when a closure is given. A step in which every
        group's lr is 0 (torch.distributed.checkpoint's, to create state) only creates Mechanic's state
        where it is missing and runs the base step: there is no base update to scale."""
        if self._mechanic_config.compile and not torch.compiler.is_compiling():
            if self._mechanic_compiled is None:  # the whole step, base included, compiled once
                self._mechanic_compiled = torch.compile(self._mechanic_step)
            return self._mechanic_compiled(closure)
        return self._mechanic_step(closure)

    def _mechanic_step(self, closure: Optional[Callable[[], Any]]) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        everything = [p for group in self.param_groups for p in group["params"]]
        partition = self._mechanic_partition_group
        params, grads, maximize, idle = _layout.gather(self.param_groups)
        joins_others = self._mechanic_reduction.joins_others(everything, partition)
        if not params and not joins_others:  # a rank with nothing here still steps with the others
            return self._mechanic_base_step(closure, loss)
        known = _layout.known_refs(self.state, params)
        stopped, resumed = _gaps.unrecorded(self.state, idle), _gaps.resumed(known)
        entry = self._mechanic_tuner()
        changes_keys = len(known) < len(params) or stopped or resumed or self._mechanic_lr_ref_pending
        if changes_keys and torch.compiler.is_compiling():
            # a step that creates or changes state keys runs eagerly: traced, it would compile once more
            return self._mechanic_eager_step(closure, loss)
        cfg, constants = self._mechanic_run.get(entry)
        with torch.no_grad():
            ref_dtype = functools.partial(_state.ref_dtype, self._mechanic_config)
            refs, new_refs = _layout.refs(self.state, params, known, cfg.store_delta, ref_dtype)
        if _layout.lr_is_zero(self.param_groups):
            result = self._mechanic_base_step(closure, loss)
            if new_refs:
                _layout.commit(self.state, refs)
            return loss if closure is not None else result

        with torch.no_grad():
            corrections = _gaps.prepare(resumed, refs, entry, cfg) if resumed else []
        gathered = _step.Gathered(
            params, grads, maximize, everything, refs, new_refs, entry, joins_others, cfg, constants
        )
        try:
            result = self._mechanic_tuned_step(closure, loss, gathered, bool(stopped))
        except BaseException:
            _gaps.restore(corrections)  # a refused or failed step leaves the state as it was
            raise
        if result is _SKIPPED:
            _gaps.restore(corrections)
            return loss
        with torch.no_grad():
            if stopped:  # the S their x was made with, before it moved on in this step
                _gaps.record(self.state, stopped, result[1])
            if resumed:
                _gaps.apply(corrections, resumed)
        if new_refs:
            _layout.commit(self.state, refs)
        if cfg.log_every > 0:
            _log(self, entry)
        return loss if closure is not None else result[0]

    def _mechanic_tuned_step(
        self, closure: Optional[Callable[[], Any]], loss: Any, gathered: _step.Gathered, wants_applied: bool
    ) -> Any:
        """The sums, the base step, the tuner and the update (`_step`). Returns the base step's result
        and, if `wants_applied`, the S that made x_t (the tuner's units), or _SKIPPED (skip_nonfinite)
        before anything changed."""
        entry, cfg = gathered.entry, gathered.cfg
        with torch.no_grad():
            partition = self._mechanic_partition_group
            before = _step.sums(
                gathered, self._mechanic_planner, self._mechanic_reduction, partition, self.state
            )
            if cfg.skip_nonfinite and _skips(self, before.sums, gathered):
                return _SKIPPED  # nothing was committed yet
            if self._mechanic_lr_ref_pending:
                _state.settle_lr_ref(entry, self.param_groups[0], cfg, {p.dtype for p in gathered.everything})
                self._mechanic_lr_ref_pending = False
            state = _state.tuner_state(entry)
            applied = tuner.effective_scale(state, cfg).clone() if wants_applied else None
        result = _step.base_step_at(self, closure, loss, entry.get(_state.BASE_LR_FACTOR, 1.0))
        with torch.no_grad():
            _step.update(before, gathered)
        return result, applied

    def _mechanic_base_step(self, closure: Optional[Callable[[], Any]], loss: Any) -> Any:
        """The base optimizer's own step, without its step hooks (ours fire around this one); the
        closure, evaluated once already for the inner products, hands that loss back first."""
        args = () if closure is None else (evaluated_once(closure, loss),)
        spec = self._mechanic_spec
        if spec.base_sets_grad_mode:  # what torch's _use_grad_for_differentiable would do
            with torch.set_grad_enabled(self.defaults.get("differentiable", False)):
                return spec.base_step(self, *args)
        return spec.base_step(self, *args)

    @_torch.eager
    def _mechanic_eager_step(self, closure: Optional[Callable[[], Any]], loss: Any) -> Any:
        """The step run eagerly (the closure, if any, was evaluated already: its loss is handed back)."""
        if closure is None:
            return self._mechanic_step(None)
        self._mechanic_step(evaluated_once(closure, loss))
        return loss

    def mechanic_log_data(self, iter_count: int) -> Dict[str, Any]:
        """What `log_func` receives (one host sync): the step, S as `mechanic_scale` reads it ("s") and
        group 0's effective lr, S * its lr ("effective_lr")."""
        scale = float(self.mechanic_scale)
        lr = _state.lr_value(self.param_groups[0].get("lr"))
        return {"iter_count": iter_count, "s": scale, "effective_lr": scale * lr}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a mechanized checkpoint, or a plain base-optimizer one (Mechanic then starts afresh from
        the current parameters at the next step). torch's hooks run as torch runs them; everything is
        validated before anything changes, and Mechanic's tensors keep their dtypes (`_state.load`)."""
        _checkpoint.load(self, state_dict, super().load_state_dict)


@_torch.eager
def _log(opt: Mechanic, entry: Dict[str, Any]) -> None:
    """Logging steps are the only ones that read a value on the host; steps are counted on the host only
    when logging is on (a host counter in compiled code would be guarded on and recompiled)."""
    if opt._mechanic_log_count is None:  # resumed or copied: one sync to number the lines on
        opt._mechanic_log_count = int(entry["step"]) - 1
    opt._mechanic_log_count += 1
    if opt._mechanic_log_count % opt._mechanic_config.log_every == 0:
        opt._mechanic_spec.log_func(opt.mechanic_log_data(opt._mechanic_log_count))


@_torch.eager  # run eagerly: a compiled step would not replay the counter's increment
def _skips(opt: Mechanic, sums: Tensor, gathered: _step.Gathered) -> bool:
    """skip_nonfinite (`_step.nonfinite`): skipped steps are counted in `mechanic_skipped_steps`."""
    skips = _step.nonfinite(sums, gathered.grads, gathered.joins_others)
    opt.mechanic_skipped_steps += skips
    return skips


def _join_zero_partition(zero: Any) -> None:
    """ZeroRedundancyOptimizer(params, optimizer_class=mechanize(...)) hands each rank's optimizer a
    partition of the parameters: their sums are added over ZeRO's process group (`_distributed`)."""
    inner = zero.optim
    if isinstance(inner, Mechanic) and inner._mechanic_partition_group is None:
        inner._mechanic_partition(zero.process_group)


def check_group(cfg: MechanicConfig, group: Dict[str, Any]) -> None:
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


def evaluated_once(closure: Callable[[], Any], loss: Any) -> Callable[[], Any]:
    """`closure` for a step whose closure was evaluated already: the first call hands `loss` back
    instead of evaluating (and accumulating gradients) again; later calls evaluate."""
    calls = 0

    def closure_once() -> Any:
        nonlocal calls
        calls += 1
        return loss if calls == 1 else closure()

    return closure_once
