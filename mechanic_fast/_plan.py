"""The per-group plan of a step and the contract of the implementations that carry it out.

A `GroupPlan` is everything the O(d) work of one parameter group needs, decided once when the step's
layout is made (`_layout.Planner`) and kept while it holds: the local tensors (x, and x_ref and Delta as
its `LayoutKind` keeps them), the `Implementation` that works on them, the accumulation dtype, the
workspace, the process groups the sums are partial over, and maximize. A step hands a plan its
gradients; nothing is chosen per step.

An `Implementation` is a pair of kernels with one contract (`SumsKernel`, `UpdateKernel`), one sibling
module each: `_foreach` (flat buffers and multi-tensor ops), `_pertensor` (what torch.compile traces),
`_opaque` (the sums as one custom op while compiling) and `_triton`. The copy of x_t that `sums` makes is
an opaque `XCopy` that only the same implementation's `update` reads.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, List, NamedTuple, Optional, Protocol, Sequence, Tuple

import torch
from torch import Tensor

from ._buffers import TensorsOrCopy, Workspace, XCopy


class LayoutKind(enum.Enum):
    """Which of x_ref and Delta a group keeps (`_state.keeps_x_ref`)."""

    DELTA = "delta"  # Delta alone: float32/float64 with store_delta (the default)
    X_REF_DELTA = "x_ref+delta"  # both: bfloat16/float16 with store_delta
    X_REF = "x_ref"  # x_ref alone, Delta recomputed as (x - x_ref) / S: store_delta=False

    @staticmethod
    def of(x_ref: Optional[Sequence[Tensor]], delta: Optional[Sequence[Tensor]]) -> LayoutKind:
        if x_ref is None:
            return LayoutKind.DELTA
        return LayoutKind.X_REF if delta is None else LayoutKind.X_REF_DELTA


class Scales(NamedTuple):
    """What the tuner hands the update (`tuner.step`): S, the S that made x_t, and the divisor of a
    recomputed Delta (S_old + eps, or S_old in the lr-invariant mode)."""

    scale: Tensor
    scale_old: Tensor
    denom: Tensor


class SumsKernel(Protocol):
    """``[<d - d_ref, g>, <d - d_ref, x>, ||g||^2, ||x||^2]`` in `acc_dtype` (zeros for an absent g, or x
    without `x_sums`) and, with `copy_x`, a copy of x."""

    def __call__(
        self,
        d: TensorsOrCopy,
        d_ref: Optional[Sequence[Tensor]],
        g: Optional[Sequence[Tensor]],
        x: Optional[Sequence[Tensor]],
        *,
        acc_dtype: torch.dtype,
        x_sums: bool = True,
        copy_x: bool = False,
        workspace: Optional[Workspace] = None,
    ) -> Tuple[Tensor, Optional[XCopy]]: ...


class UpdateKernel(Protocol):
    """The Mechanic update written into x (`functional.mechanic_update`); x_copy is consumed."""

    def __call__(
        self,
        x: Sequence[Tensor],
        x_copy: Any,
        x_ref: Optional[Sequence[Tensor]],
        delta: Optional[Sequence[Tensor]],
        scale: Tensor,
        scale_old: Tensor,
        denom: Tensor,
        workspace: Optional[Workspace] = None,
    ) -> None: ...


@dataclass(frozen=True)
class Implementation:
    """One way to do a group's O(d) work: `sums` before the base step, `update` after it."""

    name: str
    sums_kernel: SumsKernel
    update_kernel: UpdateKernel

    def sums(
        self, plan: GroupPlan, grads: Optional[Sequence[Tensor]], *, x_sums: bool, x_t: Optional[XCopy] = None
    ) -> Tuple[Tensor, Optional[XCopy]]:
        """The sums of `plan` (without `grads`: those of g are 0) and a copy of x_t; given the copy
        `x_t` (after the base step), Delta is formed from it and no copy or workspace is used."""
        before = x_t is None
        return self.sums_kernel(
            *plan.direction(x_t),
            grads,
            plan.params,
            acc_dtype=plan.acc_dtype,
            x_sums=x_sums,
            copy_x=before,
            workspace=plan.workspace if before else None,
        )

    def update(self, plan: GroupPlan, x_t: XCopy, scales: Scales) -> None:
        self.update_kernel(plan.params, x_t, plan.x_ref, plan.delta, *scales, workspace=plan.workspace)


@dataclass
class GroupPlan:
    """One group's tensors (local, at least 1-D, one device and dtype) and how its step is done."""

    params: List[Tensor]
    x_ref: Optional[List[Tensor]]  # where kept (`kind`)
    delta: Optional[List[Tensor]]
    impl: Implementation
    acc_dtype: torch.dtype
    reduce_over: Tuple[Any, ...] = ()  # process groups over which the sums are partial
    maximize: bool = False  # the base moves along +g: Mechanic's inner product must see -g
    workspace: Optional[Workspace] = None  # buffers kept from step to step (`keep_workspace`)
    index: List[int] = field(default_factory=list)  # positions in the step's parameter list
    numel: int = 0
    views: List[Tuple[Tensor, Tensor]] = field(default_factory=list)  # (0-d parameter, its 1-D view)

    @property
    def kind(self) -> LayoutKind:
        return LayoutKind.of(self.x_ref, self.delta)

    def direction(self, x_t: Optional[XCopy] = None) -> Tuple[TensorsOrCopy, Optional[List[Tensor]]]:
        """(d, d_ref) with Delta = d - d_ref: stored Delta, else x_t - x_ref (x_t: the copy, else x)."""
        if self.delta is not None:
            return self.delta, None
        return (self.params if x_t is None else x_t), self.x_ref  # type: ignore[return-value]

    def bucket(self) -> Tuple[Any, ...]:
        """What the layout groups tensors by: a workspace outlives a re-made layout under this key."""
        like = self.params[0]
        return (self.reduce_over, like.device, like.dtype, self.maximize)
