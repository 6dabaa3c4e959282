"""The tuned part of one mechanized step as functions of explicit inputs (`Mechanic` sequences them
around the base step): the sums of every group's plan, added over ranks (`sums`), and, after the base
step, the tuner's step and every group's update (`update`); and the base step itself at its lrs times
the tuner's `base_lr_factor` (`base_step_at`)."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _distributed, _layout, _state, tuner
from ._config import MechanicConfig
from ._plan import GroupPlan, Scales
from .functional import mechanic_sums, mechanic_update


class Gathered(NamedTuple):
    """What a step found before its tuned part (found once per step)."""

    params: List[Tensor]  # with a gradient
    grads: List[Tensor]
    maximize: List[bool]
    everything: List[Tensor]  # every parameter of the optimizer
    refs: _layout.Refs
    new_refs: bool
    entry: Dict[str, Any]  # the tuner
    joins_others: bool
    cfg: MechanicConfig  # the options the step runs with (`_state.RunCache`)
    constants: tuner.Constants  # the tuner's, on its device


class Before(NamedTuple):
    """The sums taken before the base step, and what the update after it needs."""

    sums: Tensor
    plans: List[GroupPlan]
    copies: List[Any]  # each plan's x_t copy
    total: Callable[[List[Tuple[Tensor, Any]]], Tensor]  # per-group sums added over groups and ranks


def sums(
    gathered: Gathered,
    planner: _layout.Planner,
    reduction: _distributed.Reduction,
    partition: Optional[_distributed.GroupRef],
    state: Dict[Tensor, Any],
) -> Before:
    """The four sums over every parameter with a gradient, added over ranks, and the x_t copies."""
    params, grads, maximize, everything, refs, new_refs, entry, _, cfg, _ = gathered
    device, tuner_dtype = entry["s"].device, entry["s"].dtype
    domains, _ = reduction.domains(everything)
    plans, plan_grads = planner.plans(
        params, grads, refs, maximize, new_refs, cfg.store_delta, domains, tuner_dtype
    )
    acc = plans[0].acc_dtype if plans else _layout.acc_dtype([], tuner_dtype)

    def total(parts: List[Tuple[Tensor, Any]]) -> Tensor:
        return reduction.total(parts, device, acc, everything, partition)

    try:
        parts, copies = group_sums(plans, plan_grads, x_sums=cfg.variant == "paper")
    except RuntimeError:
        _layout.check_shapes(state, params)  # a resized parameter, named
        raise
    return Before(total(parts), plans, copies, total)


def update(before: Before, gathered: Gathered) -> None:
    """After the base step: the tuner's step, committed to the tuner entry, and every group's update."""
    entry, cfg, constants, sums = gathered.entry, gathered.cfg, gathered.constants, before.sums
    if cfg.variant == "mechanic_pytorch":  # its weight-decay term uses x after the base step
        post, _ = group_sums(before.plans, None, x_sums=True, copies=before.copies)
        sums = sums + before.total(post)
    scales = _state.advance_tuner(entry, sums, constants, cfg)
    for plan, copy in zip(before.plans, before.copies):
        # in the parameters' precision where it is higher (S - S_old of a float32 tuner loses digits
        # that float64 parameters hold)
        like = plan.params[0]
        wide = torch.promote_types(scales[0].dtype, like.dtype)
        mechanic_update(plan, copy, Scales(*(t.to(like.device, wide, non_blocking=True) for t in scales)))


def group_sums(
    plans: List[GroupPlan],
    grads: Optional[List[List[Tensor]]],
    x_sums: bool,
    copies: Optional[List[Any]] = None,
) -> Tuple[List[Tuple[Tensor, Tuple[Any, ...]]], List[Any]]:
    """`mechanic_sums` of every group, with the group's reduction domain, and the x_t copies: before the
    base step, or, given the `copies`, after it (mechanic_pytorch's weight-decay term: no g, Delta from
    the copies where it is not stored)."""
    parts, made = [], []
    for i, plan in enumerate(plans):
        x_t = None if copies is None else copies[i]
        plan_sums, copy = mechanic_sums(plan, None if grads is None else grads[i], x_sums=x_sums, x_t=x_t)
        parts.append((plan_sums, plan.reduce_over))
        made.append(copy)
    return parts, made


def nonfinite(sums: Tensor, grads: List[Tensor], joins_others: bool) -> bool:
    """skip_nonfinite: whether this step's gradients hold NaN/Inf (the one host sync per step).
    Non-finite gradients make the sums non-finite; finite ones that overflow them are not skipped
    (`tuner.step` then leaves the tuner as it was). Summed over ranks, the sums decide alone: all ranks
    skip alike."""
    if bool(torch.isfinite(sums).all()):
        return False
    return joins_others or not all(bool(torch.isfinite(g).all()) for g in grads)


def base_step_at(opt: Any, closure: Optional[Callable[[], Any]], loss: Any, factor: float) -> Any:
    """The base step (`Mechanic._mechanic_base_step`) with every group's lr multiplied by `factor`
    (`_state.base_lr_factor`: its update is then factor times the one at the group's lr, which
    Mechanic's scale divides back out), and the lrs put back after it, whatever happens."""
    if factor == 1.0:
        return opt._mechanic_base_step(closure, loss)
    groups = opt.param_groups
    lrs = [group["lr"] for group in groups]
    if not torch.compiler.is_compiling():
        opt._mechanic_capturable = capturable(groups)
    try:
        for group, lr in zip(groups, lrs):
            group["lr"] = lr * factor
        return opt._mechanic_base_step(closure, loss)
    finally:
        for group, lr in zip(groups, lrs):
            group["lr"] = lr
        if torch.compiler.is_compiling():
            _restore_capturable(groups, opt._mechanic_capturable)


_NO_KEY = object()


def capturable(groups: List[Dict[str, Any]]) -> List[Any]:
    """Each group's `capturable` (`_NO_KEY` where it has none), read outside compiled code."""
    return [group.get("capturable", _NO_KEY) for group in groups]


def _restore_capturable(groups: List[Dict[str, Any]], kept: List[Any]) -> None:
    """torch.compile traces every optimizer group as capturable=True and, where the traced code writes
    to a group (the lrs above), writes the group back as traced, capturable=True included: each group's
    own value, read in the last eager step (or when the optimizer was made or loaded), is written back."""
    for group, capturable in zip(groups, kept):
        if capturable is _NO_KEY:
            group.pop("capturable", None)
        else:
            group["capturable"] = capturable
