"""The Mechanic update in eager mode with multi-tensor torch ops and flat buffers (`_foreach`'s sums made
the x_t copy it consumes).

With x_ref kept, w = x_t - x_base is formed in the x_t buffer, Delta += -w, and x_ref + S * Delta formed
there and copied back (with `per_tensor`, written straight into each parameter: no copy back); with
Delta alone, u = x_base - x_t, Delta += u, and x = x_t + (S_old * u + (S - S_old) * Delta), chunk by
chunk, so that x_t, not x_base, carries the large part.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ._buffers import (
    FlatCopy,
    TensorList,
    TensorsOrCopy,
    Workspace,
    chunk_groups,
    flat,
    flat_view,
    gather,
    split,
    sum_chunk,
    workspace_buffer,
)


def apply_update(
    x: Sequence[Tensor],
    x_copy: TensorsOrCopy,
    x_ref: Optional[Sequence[Tensor]],
    delta: Optional[Sequence[Tensor]],
    scale: Tensor,
    scale_old: Tensor,
    denom: Tensor,
    workspace: Optional[Workspace] = None,
    per_tensor: bool = False,
) -> None:
    """Write the update into ``x``, which holds the base optimizer's result x_base; u = x_base - x_t
    (``x_copy`` holds x_t and is consumed as scratch).

    - Delta stored, no x_ref (``x_ref`` None): Delta += u and x = x_t + S * Delta_new - S_old * Delta,
      formed as x_t + (S_old * u + (S - S_old) * Delta_new) (the sum one addcmul): x_t carries the large
      part, so a base step far larger than x (a large base lr) costs x no precision;
    - x_ref and stored Delta: Delta += u, x = x_ref + S * Delta (one addcmul);
    - x_ref alone: Delta = (x_t - x_ref) / denom (denom = S_old + eps, or S_old) + u, x = x_ref + S * Delta.

    Each value is rounded in the same order in every implementation. With x_ref, w = x_t - x_base is
    formed in x_t's buffer (one multi-tensor op, no gather of x_base; negation is exact, so Delta - w
    rounds as Delta + u) and the new x formed there and copied out, or, with ``per_tensor``, written into
    each parameter by one addcmul. Without it, u is formed in the parameters, whose x_t stays in the
    buffer until the last op.
    """
    x_t = x_copy.flat if isinstance(x_copy, FlatCopy) else gather(x_copy)
    x_t_parts = workspace.shaped(x_t, x) if workspace is not None else split(x_t, x)
    x = list(x)
    if delta is None:
        ref = flat(x_ref)
        # d = x_t - x_ref into the spare gradient row; then w - d / denom = -(Delta + u), negated back exactly
        spare = workspace.spare_row(x_t) if workspace is not None else None
        d = torch.sub(x_t, ref) if spare is None else torch.sub(x_t, ref, out=spare)
        torch._foreach_sub_(x_t_parts, x)
        new_neg = x_t.addcdiv_(d, denom, value=-1)  # -(Delta + u)
        _write_x(x, x_t, x_t_parts, x_ref, ref, x_t_parts, new_neg, scale, -1, per_tensor)
        return
    if x_ref is None:
        _delta_only_update(x, x_t, x_t_parts, delta, scale, scale_old, workspace)
        return
    torch._foreach_sub_(x_t_parts, x)  # w = -u
    stored = flat_view(delta)
    if stored is None:  # Delta not in one buffer: advance it tensor by tensor
        torch._foreach_sub_(list(delta), split(x_t, delta))
    else:
        stored.sub_(x_t)  # Delta + u
    _write_x(x, x_t, x_t_parts, x_ref, None, delta, stored, scale, 1, per_tensor)


def _delta_only_update(
    x: TensorList,
    x_t: Tensor,
    x_t_parts: TensorList,
    delta: Sequence[Tensor],
    scale: Tensor,
    scale_old: Tensor,
    workspace: Optional[Workspace],
) -> None:
    """Delta += u; x = x_t + (S_old * u + (S - S_old) * Delta), x_t carrying the large part (a base step
    far larger than x, as a large base lr makes, then costs x no precision).

    Chunk by chunk (SUM_CHUNK elements of consecutive tensors, gathered into a small scratch; a tensor
    longer than a chunk read where it is): u in the scratch, then Delta, the correction and x_t + it in
    the x_t buffer, flat ops on cache-sized pieces; one multi-tensor copy writes x back. Where Delta does
    not tile one buffer, multi-tensor ops do it tensor by tensor, in the same rounding order."""
    grow = scale - scale_old
    stored = flat_view(delta)
    if stored is None:
        torch._foreach_sub_(x, x_t_parts)  # u, in the parameters
        torch._foreach_add_(list(delta), x)  # Delta + u
        torch._foreach_mul_(x, scale_old)
        torch._foreach_addcmul_(x, list(delta), [grow] * len(x))
        torch._foreach_add_(x, x_t_parts)
        return
    width = sum_chunk(x_t.device)
    size = min(width, x_t.numel())
    # kept only where it is small beside the weights: a small model's scratch would be one more copy
    kept = workspace if x_t.numel() >= 2 * width else None
    scratch = workspace_buffer(kept, "update_scratch", (size,), x_t)
    if scratch is None:
        scratch = x_t.new_empty(size)
    copied_back: List[int] = []
    for first, end, offset, size in chunk_groups(x, width):
        in_place = end - first == 1 and x[first].is_contiguous()  # a long tensor: read and written there
        if in_place:
            source = x[first].view(-1)
        else:  # x_base gathered (or a non-contiguous tensor copied): x is formed in x_t's buffer
            source = gather(x[first:end], scratch[:size]) if end - first > 1 else x[first].reshape(-1)
            copied_back.extend(range(first, end))
        for start in range(0, size, width):
            stop = min(start + width, size)
            u, here = scratch[: stop - start], slice(offset + start, offset + stop)
            torch.sub(source[start:stop], x_t[here], out=u)
            stored[here].add_(u)  # Delta + u
            u.mul_(scale_old).addcmul_(stored[here], grow)
            if in_place:
                torch.add(x_t[here], u, out=source[start:stop])
            else:
                x_t[here].add_(u)
    if copied_back:
        torch._foreach_copy_([x[i] for i in copied_back], [x_t_parts[i] for i in copied_back])


def _write_x(
    x: TensorList,
    x_t: Tensor,
    x_t_parts: TensorList,
    ref_parts: Sequence[Tensor],
    ref: Optional[Tensor],
    step_parts: Sequence[Tensor],
    step: Optional[Tensor],
    scale: Tensor,
    value: int,
    per_tensor: bool,
) -> None:
    """x = x_ref + value * scale * step, rounded as one addcmul; `x_t` is free scratch. The flat forms of
    x_ref and step (`ref`, `step`: None where not made yet) are needed, and gathered if not given, only
    where the result is formed flat."""
    if per_tensor:
        for x_i, ref_i, step_i in zip(x, ref_parts, step_parts):
            torch.addcmul(ref_i, step_i, scale, value=value, out=x_i)
    else:
        ref = flat(ref_parts) if ref is None else ref
        step = gather(step_parts) if step is None else step
        torch.addcmul(ref, step, scale, value=value, out=x_t)
        torch._foreach_copy_(x, x_t_parts)
