"""Mechanizing an optimizer that exists already (`mechanize(opt)`): in place, through framework wrappers
(accelerate, Lightning, ZeroRedundancyOptimizer), keeping its state and its LR scheduler's wrapper."""

from __future__ import annotations

import functools
import sys
import weakref
from typing import Any, Callable, Dict, Iterator, Optional

import torch

from . import _checkpoint, _state, _torch
from ._config import MechanicConfig
from ._named import check_base
from .optimizer import check_group


def _flag_step_called(opt: torch.optim.Optimizer) -> None:
    """What torch's LRScheduler wraps `opt.step` in (it only records that the step ran), around the
    mechanized step."""
    opt_ref = weakref.ref(opt)
    func = type(opt).step

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        inner = opt_ref()
        _torch.record_step_called(inner)
        return func.__get__(inner, type(inner))(*args, **kwargs)

    setattr(wrapper, _torch.LR_SCHEDULER_WRAPPED, True)
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


def unwrap(opt: Any) -> Any:
    """The optimizer inside framework wrappers (`_wrapped`)."""
    *_, inner = _wrapped(opt)
    return inner


def _zero_redundancy(wrapper: Any) -> Optional[Any]:
    """`wrapper` itself, or an optimizer it wraps, if that is a ZeroRedundancyOptimizer."""
    zero = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if zero is None:
        return None
    return next((w for w in _wrapped(wrapper) if isinstance(w, zero.ZeroRedundancyOptimizer)), None)


def mechanize_instance(
    wrapper: torch.optim.Optimizer,
    cfg: MechanicConfig,
    log_func: Optional[Callable[[Dict[str, Any]], Any]],
    partition_group: Any,
    mechanized_class: Callable[[type, MechanicConfig, Optional[Callable[..., Any]]], type],
) -> torch.optim.Optimizer:
    """Mechanize an existing optimizer in place (through framework wrappers), keeping its state:
    Mechanic starts from the current parameters at the next step (`mechanized_class` makes the class it
    becomes). Returns what it was given."""

    opt = unwrap(wrapper)
    check_base(type(opt))  # an optimizer class Mechanic can wrap, not mechanized already
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
        check_group(cfg, group)
    instance_step = vars(opt).get("step")
    lr_sched_wrapper = getattr(instance_step, _torch.LR_SCHEDULER_WRAPPED, False)
    if instance_step is not None and not lr_sched_wrapper:
        bound_self = getattr(instance_step, "__self__", None)
        if bound_self is not opt or getattr(instance_step, "__func__", None) is not type(opt).step:
            raise TypeError(
                f"{type(opt).__name__}.step was replaced on the instance by {instance_step!r}; it would "
                "keep running the plain optimizer. Mechanize the optimizer before wrapping its step "
                "(e.g. before a framework's prepare/setup)"
            )
    # Mechanic's state, checked and made before anything changes: a refusal leaves `opt` as it was (the
    # class is made aside, with the config it settles for this base)
    cls = mechanized_class(type(opt), cfg, log_func)
    cfg = cls._mechanic_spec.config
    entry, per_param = _checkpoint.adopt(opt, cfg, functools.partial(_state.ref_dtype, cfg))
    opt.__class__ = cls
    for p, tensors in per_param.items():
        opt.state[p].update(tensors)
    opt.param_groups[0][_state.TUNER_KEY] = entry
    if instance_step is not None:
        del opt.step  # the class's (mechanized) step shows through again
    if partition_group is not None:
        opt._mechanic_partition(partition_group)  # type: ignore[attr-defined]
    opt._mechanic_attach()  # type: ignore[attr-defined]
    _torch.patch_step_function(opt)  # so step hooks wrap the mechanized step
    if lr_sched_wrapper:  # torch's LR schedulers only record that the step ran: keep doing that
        _flag_step_called(opt)
    return wrapper
