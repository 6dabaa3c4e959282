"""Mechanic's O(d) work with multi-tensor `torch._foreach_*` ops.

Every function takes aligned lists of tensors on one device (one dtype per list, as grouped by
`Optimizer._group_tensors_by_device_and_dtype`) and dispatches a fixed number of ops whatever the
number of tensors. `mechanic_fast._triton` implements the same two functions with Triton kernels.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

TensorList = List[Tensor]


def inner_products(
    d: TensorList,
    d_ref: Optional[TensorList],
    g: Optional[TensorList],
    x: Optional[TensorList],
    *,
    acc_dtype: torch.dtype,
    x_sums: bool = True,
    copy_x: bool = False,
) -> Tuple[Tensor, Optional[TensorList]]:
    """Return ``sums = [<d, g>, <d, x>, ||g||^2, ||x||^2]`` (``acc_dtype``) and, with ``copy_x``, a copy of x.

    The direction is ``d - d_ref`` (``d`` alone when ``d_ref`` is None), formed elementwise so that a
    small displacement from x_ref keeps its precision. Sums of an absent ``g`` (or of ``x`` when
    ``x_sums`` is False) are zero.
    """
    device = d[0].device
    zero = torch.zeros((), device=device, dtype=acc_dtype)
    direction = torch._foreach_sub(d, d_ref) if d_ref is not None else d
    use_x = x is not None and x_sums

    # Per-tensor products, then one flat concatenation and one reduction for all dot products:
    # torch has no foreach dot, and this keeps the op count independent of the number of tensors.
    products: TensorList = []
    if g is not None:
        products += torch._foreach_mul(direction, g)
    if use_x:
        products += torch._foreach_mul(direction, x)
    dots = [zero, zero]
    if products:
        flat = torch._chunk_cat(products, 0, 1)
        per = flat.view(len(products) // len(d), -1).sum(dim=1, dtype=acc_dtype)
        if g is not None and use_x:
            dots = [per[0], per[1]]
        elif g is not None:
            dots = [per[0], zero]
        else:
            dots = [zero, per[0]]

    grad_sq = torch.stack(torch._foreach_powsum(g, 2, dtype=acc_dtype)).sum() if g is not None else zero
    param_sq = torch.stack(torch._foreach_powsum(x, 2, dtype=acc_dtype)).sum() if use_x else zero
    sums = torch.stack([dots[0], dots[1], grad_sq, param_sq])
    copy = torch._foreach_mul(x, 1.0) if copy_x and x is not None else None
    return sums, copy


def apply_update(
    x: TensorList,
    x_copy: TensorList,
    x_ref: TensorList,
    delta: Optional[TensorList],
    scale: Tensor,
    denom: Tensor,
) -> None:
    """Write x = x_ref + scale * (Delta + u) into ``x``, which holds the base optimizer's result x_base.

    u = x_base - x_t (``x_copy`` holds x_t). Delta is recomputed as (x_t - x_ref) / denom with
    denom = S_old + eps, or, when stored (``delta`` given), is advanced in place: delta += u.
    The operations run in exactly this order (as in both reference implementations): x_t - x_ref is a
    small difference of large numbers, so any other rounding order changes later inner products.
    ``x_copy`` is consumed (overwritten).
    """
    torch._foreach_sub_(x, x_copy)  # u
    if delta is None:
        torch._foreach_sub_(x_copy, x_ref)
        torch._foreach_div_(x_copy, denom)  # Delta
        torch._foreach_add_(x, x_copy)  # Delta + u
    else:
        torch._foreach_add_(delta, x)  # Delta += u
        torch._foreach_copy_(x, delta)
    torch._foreach_mul_(x, scale)
    torch._foreach_add_(x, x_ref)
