"""Mechanic's O(d) work as two functions of a group's plan (`_plan.GroupPlan`), and the one place that
picks the implementation doing it (`select_impl`, run when the plan is made).

For one group of parameters x (one device, one dtype) with gradients g, reference point x_ref and
Delta = sum of the base's updates:

- `mechanic_sums`: ``[<Delta, g>, <Delta, x>, ||g||^2, ||x||^2]``, taken before the base step (the
  tuner's inputs; with Delta not stored, x - x_ref stands for S * Delta), and a copy of x_t;
- `mechanic_update`: after the base step moved x to x_base, with u = x_base - x_t,
  ``Delta <- Delta + u; x <- x_t + (S_old * u + (S - S_old) * Delta)`` (the identity x = x_ref + S * Delta
  without keeping x_ref), or, where x_ref is kept, ``x <- x_ref + S * Delta`` (Delta not stored:
  ``(x_t - x_ref) / denom + u``, denom = S_old + eps, or S_old in the lr-invariant mode).

Every implementation rounds the update in that order, so they agree exactly on the update and to
summation order on the sums (tests/implementations/test_implementation_sweep.py sweeps them against
each other):

- ``foreach``: flat buffers and multi-tensor torch ops, eager, any device;
- ``foreach_per_tensor``: the same, but reducing and writing tensor by tensor, for few large tensors
  (where a gather into one buffer is a pass that costs more than the per-tensor dispatch it saves);
- ``per_tensor``: plain per-tensor ops, what torch.compile traces and fuses into its own kernels;
- ``per_tensor_opaque_sums``: the same, but the sums of many small CPU tensors go through one custom op
  that runs the flat code (pays in compile time: bench/compile_times.py);
- ``triton``: one Triton kernel per function, eager, CUDA (or its CPU interpreter).
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import torch
from torch import Tensor

from ._buffers import XCopy
from ._foreach import FOREACH, FOREACH_PER_TENSOR
from ._opaque import PER_TENSOR_OPAQUE_SUMS
from ._pertensor import PER_TENSOR
from ._plan import GroupPlan, Implementation, Scales

# Mean elements per tensor from which per-tensor work beats one more pass over a flat buffer: on CPU a
# multi-tensor op is a loop costing about as much per tensor as a pass over this many elements; on an
# accelerator a kernel launch costs what a pass over millions of elements does.
PER_TENSOR_MIN_NUMEL = 1 << 15
PER_TENSOR_MIN_NUMEL_ACCELERATOR = 1 << 22

__all__ = [
    "FOREACH",
    "FOREACH_PER_TENSOR",
    "PER_TENSOR",
    "PER_TENSOR_OPAQUE_SUMS",
    "mechanic_sums",
    "mechanic_update",
    "select_impl",
]


@functools.cache
def _triton_impl() -> Implementation:
    from ._triton import TRITON  # imports triton: only when asked for

    return TRITON


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_runnable(device: torch.device) -> bool:
    """Triton compiles for CUDA; on other devices only its interpreter (TRITON_INTERPRET=1) runs it."""
    if not triton_importable():
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _check_triton(device: torch.device) -> None:
    """Refuse an explicit backend="triton" that cannot run on `device` (before anything changed)."""
    if not triton_importable():
        raise RuntimeError(
            "backend='triton' was requested but triton cannot be imported (pip install triton)"
        )
    if not triton_runnable(device):
        raise RuntimeError(
            f"backend='triton' cannot run on {device.type} tensors: Triton compiles for CUDA only; "
            "set TRITON_INTERPRET=1 to run its interpreter on CPU, or use backend='foreach'"
        )


def select_impl(
    backend: str,
    x: Sequence[Tensor],
    aligned: Sequence[Optional[Sequence[Tensor]]] = (),
    numel: Optional[int] = None,
) -> Implementation:
    """The implementation for one group: parameters `x` (`numel` elements in all, counted if None) and
    the lists aligned with them (`aligned`: gradients, x_ref, Delta). The only place that decides."""
    device = x[0].device
    if numel is None:
        numel = sum(t.numel() for t in x)
    threshold = PER_TENSOR_MIN_NUMEL if device.type == "cpu" else PER_TENSOR_MIN_NUMEL_ACCELERATOR
    few_large = numel >= threshold * len(x)
    if torch.compiler.is_compiling():
        # inductor fuses per-tensor code into its own kernels; Triton's host-built pointer tables
        # cannot be traced, whatever `backend` says
        return PER_TENSOR if few_large or device.type != "cpu" else PER_TENSOR_OPAQUE_SUMS
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_importable() else "foreach"
    if backend == "triton":
        _check_triton(device)
        from . import _triton

        if _triton.contiguous(x, *aligned):  # its kernels read tensors as flat memory
            return _triton_impl()
    return FOREACH_PER_TENSOR if few_large else FOREACH


def mechanic_sums(
    plan: GroupPlan,
    grads: Optional[Sequence[Tensor]],
    *,
    x_sums: bool = True,
    x_t: Optional[XCopy] = None,
) -> tuple[Tensor, Optional[XCopy]]:
    """``[<Delta, g>, <Delta, x>, ||g||^2, ||x||^2]`` in the plan's accumulation dtype, and a copy of x_t
    for `mechanic_update`.

    Delta is the stored one, else ``x_t - x_ref`` (x_t: the copy `x_t` made by an earlier call, else x
    itself), formed elementwise so that a small displacement from x_ref keeps its precision. The sums
    of absent `grads` (or of x when not `x_sums`) are 0. Given `x_t` (after the base step), no copy is
    made. With the plan's `maximize` the base moves along +g, so the inner product is taken with -g."""
    sums, copy = plan.impl.sums(plan, grads, x_sums=x_sums, x_t=x_t)
    if plan.maximize and grads is not None:  # <Delta, -g>; the norms do not change
        sums = torch.cat([sums[:1].neg(), sums[1:]])
    return sums, copy


def mechanic_update(plan: GroupPlan, x_t: XCopy, scales: Scales) -> None:
    """The Mechanic update of the plan's x, which holds the base step's result x_base; `x_t` is the copy
    `mechanic_sums` made (consumed), u = x_base - x_t, Delta_new = Delta + u, and S = `scales.scale`:

    - Delta stored alone: x <- x_t + (S_old * u + (S - S_old) * Delta_new);
    - x_ref alone: Delta = (x_t - x_ref) / denom (denom = S_old + eps, or S_old),
      x <- x_ref + S * Delta_new;
    - both: x <- x_ref + S * Delta_new.

    Stored Delta is advanced in place."""
    plan.impl.update(plan, x_t, scales)
