"""Mechanic's O(d) work tensor by tensor: what torch.compile traces (`functional` picks it there).

Traced, flat buffers cost: gathers become copies, BLAS calls need their inputs materialised, and inductor
cannot fuse across them. Written per tensor, inductor makes one reduction pass per tensor for the four
inner products and fuses the update (Delta += u; x = x_ref + S * Delta) into the pointwise kernel that
already computes the base optimizer's step. Plain per-tensor ops, not multi-tensor ones: traced, a
multi-tensor op is a list node that inductor's lowering takes apart again, for the same kernels (and
torch has no multi-tensor dot product).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._buffers import FlatCopy, ListCopy, TensorList, Workspace
from ._plan import Implementation


def as_list(tensors: Any) -> TensorList:
    """The tensors as a plain list (a `ListCopy`'s); a flat copy made by the flat implementation is
    refused."""
    if isinstance(tensors, FlatCopy):
        raise TypeError("the per-tensor implementation takes lists of tensors, not a flat copy")
    return list(tensors.tensors if isinstance(tensors, ListCopy) else tensors)


def _dots(a: TensorList, b: TensorList, acc_dtype: torch.dtype) -> Tensor:
    """sum_i <a_i, b_i> accumulated in `acc_dtype`: a product inlined into its sum per tensor, which
    inductor fuses with the tensor's other sums into one pass over it."""
    return torch.stack([(p.to(acc_dtype) * q.to(acc_dtype)).sum() for p, q in zip(a, b)]).sum()


def copy_of(x: Optional[Sequence[Tensor]], copy_x: bool) -> Optional[ListCopy]:
    """The x_t copy of the per-tensor implementations."""
    return ListCopy(x) if copy_x and x is not None else None


def inner_products(
    d: Any,
    d_ref: Optional[Sequence[Tensor]],
    g: Optional[Sequence[Tensor]],
    x: Optional[Sequence[Tensor]],
    *,
    acc_dtype: torch.dtype,
    x_sums: bool = True,
    copy_x: bool = False,
    workspace: Optional[Workspace] = None,
) -> Tuple[Tensor, Optional[ListCopy]]:
    """``sums = [<d, g>, <d, x>, ||g||^2, ||x||^2]`` and, with ``copy_x``, a copy of x (see `_foreach`)."""
    d = as_list(d)
    x = as_list(x) if x is not None else None
    direction = [a - b for a, b in zip(d, d_ref)] if d_ref is not None else d
    zero = torch.zeros((), dtype=acc_dtype, device=d[0].device)
    sums = [zero] * 4  # those of an absent g (or x) are zero
    if g is not None:
        g = as_list(g)
        sums[0], sums[2] = _dots(direction, g, acc_dtype), _dots(g, g, acc_dtype)
    if x is not None and x_sums:
        sums[1], sums[3] = _dots(direction, x, acc_dtype), _dots(x, x, acc_dtype)
    return torch.stack(sums), copy_of(x, copy_x)


def apply_update(
    x: Sequence[Tensor],
    x_copy: Any,
    x_ref: Optional[Sequence[Tensor]],
    delta: Optional[Sequence[Tensor]],
    scale: Tensor,
    scale_old: Tensor,
    denom: Tensor,
    workspace: Optional[Workspace] = None,
) -> None:
    """The update of `_foreach.apply_update`, tensor by tensor, each value rounded as it rounds it."""
    x, x_t = as_list(x), as_list(x_copy)
    if delta is None:
        for x_i, t_i, ref_i in zip(x, x_t, as_list(x_ref)):
            # u + Delta with Delta = (x_t - x_ref) / denom
            x_i.copy_(torch.addcmul(ref_i, (x_i - t_i) + (t_i - ref_i) / denom, scale))
    elif x_ref is None:
        grow = scale - scale_old
        for x_i, t_i, delta_i in zip(x, x_t, as_list(delta)):
            u = x_i - t_i
            delta_i.add_(u)  # Delta += u
            x_i.copy_(t_i + torch.addcmul(u * scale_old, delta_i, grow))
    else:
        for x_i, t_i, ref_i, delta_i in zip(x, x_t, as_list(x_ref), as_list(delta)):
            delta_i.sub_(t_i - x_i)  # Delta += u
            x_i.copy_(torch.addcmul(ref_i, delta_i, scale))


PER_TENSOR = Implementation("per_tensor", inner_products, apply_update)
