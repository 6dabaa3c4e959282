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
    direction = torch._foreach_sub(d, d_ref) if d_ref is not None else d
    others = [t for t in (g, x if x_sums else None) if t is not None]  # [g], [x] or [g, x]
    k = len(others)
    flat_others = [t for tensors in others for t in tensors]
    # torch has no foreach dot: one op forms every product, one concatenation and one reduction sum
    # them per vector, so the op count does not depend on the number of tensors.
    products = torch._foreach_mul(direction * k, flat_others)
    dots = torch._chunk_cat(products, 0, 1).view(k, -1).sum(dim=1, dtype=acc_dtype)
    # (_foreach_powsum would skip the square root, but torch.compile cannot trace it)
    norms = torch.stack(torch._foreach_norm(flat_others, 2, dtype=acc_dtype)).view(k, -1)
    squares = norms.square().sum(dim=1)
    if k == 2:
        sums = torch.cat([dots, squares])
    else:
        zero = dots.new_zeros(1)
        sums = torch.cat([dots, zero, squares, zero] if g is not None else [zero, dots, zero, squares])
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
