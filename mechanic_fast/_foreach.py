"""Mechanic's sums in eager mode with multi-tensor torch ops and flat buffers, on any device; the update
is `_foreach_update`. Together they are the `FOREACH` and `FOREACH_PER_TENSOR` implementations.

Where a multi-tensor op is a loop over tensors (on CPU), passes over one flat buffer are cheaper: a step
gathers g into one weight-sized buffer with one `_torch.chunk_cat` and takes its inner products with
BLAS, then gathers x_t into the same buffer (the step's x_t copy). Lists that already tile one flat
buffer in order (x_ref and Delta, which the optimizer allocates that way) are used in place, without a
gather. So the number of dispatched ops is constant in the number of tensors.

With `per_tensor=True` (few large tensors, where per-tensor dispatch is negligible and every pass
counts) gradients in the accumulation dtype are reduced where they are (no gather). bfloat16/float16
values are gathered and converted for the sums a chunk at a time, in small kept buffers
(`_grouped_segments`, `_converted_sums`).
"""

from __future__ import annotations

import functools
import itertools
from typing import Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._buffers import (
    FlatCopy,
    TensorsOrCopy,
    Workspace,
    chunk_groups,
    flat,
    flat_view,
    gather,
    sum_chunk,
    total_numel,
    workspace_buffer,
)
from ._foreach_update import apply_update
from ._plan import Implementation


class _Route(NamedTuple):
    """How one call reads its lists (found from the lists themselves, which tile a buffer or not)."""

    need_x: bool  # x is read: copied, or its sums taken
    gather_g: bool  # g is gathered into a flat buffer for BLAS
    # few large gradients in acc_dtype with per_tensor: BLAS dots where they are (a gather would write
    # them once more only for BLAS to read them)
    g_in_place: bool
    # below acc_dtype with Delta stored: g (and x) converted chunk by chunk beside Delta, each once
    g_converted: bool
    shares: bool  # one buffer (or matrix) for the gathered g and x


def _route(
    d: TensorsOrCopy,
    d_ref: Optional[Sequence[Tensor]],
    g: Optional[Sequence[Tensor]],
    x: Optional[Sequence[Tensor]],
    acc_dtype: torch.dtype,
    x_sums: bool,
    copy_x: bool,
    per_tensor: bool,
) -> _Route:
    need_x = x is not None and (copy_x or x_sums)
    d_first = d.flat if isinstance(d, FlatCopy) else d[0]
    g_scattered = g is not None and flat_view(g) is None  # else flat(g) is a view, not a gather
    in_acc = g_scattered and g[0].dtype == acc_dtype == d_first.dtype
    g_in_place = per_tensor and in_acc
    g_converted = g_scattered and not in_acc and d_ref is None
    gather_g = g_scattered and not (g_in_place or g_converted)
    shares = gather_g and need_x and g[0].dtype == x[0].dtype
    return _Route(need_x, gather_g, g_in_place, g_converted, shares)


Sums = List[Optional[Tensor]]


class _Call(NamedTuple):
    """One `inner_products` call's inputs beside the direction, as both layouts' sums read them."""

    g: Optional[Sequence[Tensor]]
    x: Optional[Sequence[Tensor]]
    route: _Route
    numel: int
    acc_dtype: torch.dtype
    x_sums: bool
    copy_x: bool
    workspace: Optional[Workspace]


def inner_products(
    d: TensorsOrCopy,
    d_ref: Optional[Sequence[Tensor]],
    g: Optional[Sequence[Tensor]],
    x: Optional[Sequence[Tensor]],
    *,
    acc_dtype: torch.dtype,
    x_sums: bool = True,
    copy_x: bool = False,
    workspace: Optional[Workspace] = None,
    per_tensor: bool = False,
) -> Tuple[Tensor, Optional[FlatCopy]]:
    """Return ``sums = [<d, g>, <d, x>, ||g||^2, ||x||^2]`` (``acc_dtype``) and, with ``copy_x``, a copy of x.

    The direction is ``d - d_ref`` (``d`` alone when ``d_ref`` is None), formed elementwise so that a
    small displacement from x_ref keeps its precision. Sums of an absent ``g`` (or of ``x`` when
    ``x_sums`` is False) are zero. ``d`` may be a `FlatCopy` returned by an earlier call. With
    ``per_tensor``, gradients in ``acc_dtype`` are reduced tensor by tensor where they are. Below
    ``acc_dtype`` with Delta stored, g and x are converted chunk by chunk beside Delta (each once).

    With Delta stored (``d_ref`` None) one weight-sized buffer serves both gathers: the gradients for
    their sums, then the x_t copy, so the step's peak is Delta and that buffer. With ``d`` = x and
    ``d_ref`` = x_ref the direction needs x first: g and x are gathered side by side (one pass, BLAS
    reads them as a matrix) and the direction is a third buffer.
    """
    route = _route(d, d_ref, g, x, acc_dtype, x_sums, copy_x, per_tensor)
    aligned = x if x is not None else g  # the lists are aligned: any one gives the element count
    numel = total_numel(aligned, d, d_ref) if aligned is not None else 0
    sums: Sums = [None] * 4
    call = _Call(g, x, route, numel, acc_dtype, x_sums, copy_x, workspace)
    if d_ref is None:
        d_flat, x_flat = _stored_delta_sums(flat(d), call, sums)
    else:
        d_flat, x_flat = _recomputed_delta_sums(d, d_ref, call, sums)
    if x_flat is not None and x_sums and sums[1] is None:
        dots, norms = _row_sums(x_flat, d_flat, acc_dtype, workspace)
        sums[1], sums[3] = dots[0], norms[0]
    zero = d_flat.new_zeros((), dtype=acc_dtype) if None in sums else None
    copy = FlatCopy(x, x_flat) if copy_x and x_flat is not None else None
    return torch.stack([zero if v is None else v for v in sums]), copy


def _stored_delta_sums(d_flat: Tensor, call: _Call, sums: Sums) -> Tuple[Tensor, Optional[Tensor]]:
    """The sums of g (and of x where converted with them) into `sums`; returns Delta flat and x_t's
    flat copy, gathered into the buffer the gradients used before it."""
    g, x, route, numel, acc_dtype, x_sums, copy_x, workspace = call
    x_flat = buffer = None
    if route.shares or (route.need_x and copy_x):
        buffer = workspace_buffer(workspace, "flat", (numel,), x[0])
        buffer = x[0].new_empty(numel) if buffer is None else buffer
    if route.g_converted:
        # x_t is copied into the buffer group by group, where its sums read it
        rows = [g, x] if route.need_x and x_sums else [g]
        segments, longest = _grouped_segments(rows, d_flat, buffer, workspace)
        dots, norms = _converted_sums(segments, len(rows), acc_dtype, workspace, longest)
        sums[0::2] = dots[0], norms[0]
        if len(rows) == 2:
            sums[1::2] = dots[1], norms[1]
            x_flat = buffer
    elif g is not None:
        g_flat = gather(g, buffer if route.shares else None) if route.gather_g else None
        sums[0], sums[2] = _g_sums(g, g_flat, d_flat, acc_dtype, workspace)
        del g_flat  # freed before x is gathered
    if x is not None and x_flat is None and (copy_x or (x_sums and sums[1] is None)):
        # the x_t copy overwrites the gathered gradients (their sums are taken)
        x_flat = gather(x, buffer)
    return d_flat, x_flat


def _recomputed_delta_sums(
    d: TensorsOrCopy, d_ref: Sequence[Tensor], call: _Call, sums: Sums
) -> Tuple[Tensor, Optional[Tensor]]:
    """The sums with Delta = d - d_ref (x_t - x_ref) into `sums`: g and x gathered side by side where
    they share a dtype, so that one BLAS mv takes both dots. Returns Delta flat and x_t's flat copy."""
    g, x, route, numel, acc_dtype, x_sums, copy_x, workspace = call
    both = x_flat = None
    if route.need_x:
        if route.shares:
            out = workspace_buffer(workspace, "g_x", (2, numel), x[0])
            both = gather(list(g) + list(x), out).view(2, -1)
            x_flat = both[1]
        else:
            x_flat = gather(x, workspace_buffer(workspace, "flat", (numel,), x[0]) if copy_x else None)
    d_flat = (x_flat if d is x and x_flat is not None else flat(d)) - flat(d_ref)
    if both is not None:
        dots, norms = _row_sums(both if x_sums else both[:1], d_flat, acc_dtype, workspace)
        sums[0], sums[2] = dots[0], norms[0]
        if x_sums:
            sums[1], sums[3] = dots[1], norms[1]
    elif g is not None:
        sums[0], sums[2] = _g_sums(g, gather(g) if route.gather_g else None, d_flat, acc_dtype, workspace)
    return d_flat, x_flat


def _g_sums(
    g: Sequence[Tensor],
    g_flat: Optional[Tensor],
    d_flat: Tensor,
    acc_dtype: torch.dtype,
    workspace: Optional[Workspace],
) -> Tuple[Tensor, Tensor]:
    """<d, g> and ||g||^2: from the gathered `g_flat`, from g's own buffer where g tiles one, or, without
    either, tensor by tensor where the gradients are."""
    rows = g_flat if g_flat is not None else flat_view(g)
    if rows is not None:
        dots, norms = _row_sums(rows, d_flat, acc_dtype, workspace)
        return dots[0], norms[0]
    parts = [t.reshape(-1) for t in g]
    d_parts = torch.split(d_flat, [t.numel() for t in parts])
    dot = torch.stack([torch.dot(a, b) for a, b in zip(parts, d_parts)]).sum()
    return dot, torch.stack([torch.dot(a, a) for a in parts]).sum()


def _row_sums(
    rows: Tensor, d: Tensor, acc_dtype: torch.dtype, workspace: Optional[Workspace]
) -> Tuple[Sequence[Tensor], Sequence[Tensor]]:
    """``<r, d>`` and ``||r||^2`` (`acc_dtype`) for each row r of `rows` ((k, n), or 1-D for one row).

    In `acc_dtype` already, BLAS reads each row once: one mv for the dots with `d`, one dot per squared
    norm (the Gram matrix by mm would compute the cross term twice). Otherwise (bfloat16 or float16
    parameters) they are converted chunk by chunk (`_converted_sums`)."""
    if rows.dtype == acc_dtype and d.dtype == acc_dtype:
        if rows.dim() == 1:
            return [torch.dot(rows, d)], [torch.dot(rows, rows)]
        return torch.mv(rows, d).unbind(), [torch.dot(r, r) for r in rows.unbind()]
    rows = rows.view(1, -1) if rows.dim() == 1 else rows
    return _converted_sums([(rows.unbind(), d)], rows.shape[0], acc_dtype, workspace, rows.shape[1])


def _grouped_segments(
    rows: Sequence[Sequence[Tensor]],
    d: Tensor,
    x_out: Optional[Tensor],
    workspace: Optional[Workspace],
) -> Tuple[Iterator[Tuple[List[Tensor], Tensor]], int]:
    """Segments for `_converted_sums` over many tensors, and the longest one's length: consecutive
    tensors in groups of at most a chunk, each list gathered group by group into a chunk-sized scratch
    (a group of one tensor, as a tensor longer than a chunk is, is read where it is). With `x_out`, the
    second list (x) is gathered into its slice of `x_out` instead, which then holds the x_t copy."""
    groups = chunk_groups(rows[0], sum_chunk(d.device))
    longest = max(group[3] for group in groups)
    gathered = max((size for first, end, _, size in groups if end - first > 1), default=0)
    on_cpu = d.device.type == "cpu"
    scratches: List[Optional[Tensor]] = []
    for row, tensors in enumerate(rows):
        if gathered == 0 or (row == 1 and x_out is not None):
            scratches.append(None)  # nothing is gathered into it
            continue
        name = f"gather_scratch_{row}"
        scratch = workspace_buffer(workspace, name, (gathered,), tensors[0]) if on_cpu else None
        scratches.append(tensors[0].new_empty(gathered) if scratch is None else scratch)

    def segments() -> Iterator[Tuple[List[Tensor], Tensor]]:
        for first, end, offset, size in groups:
            parts = []
            for row, tensors in enumerate(rows):
                if row == 1 and x_out is not None:
                    parts.append(gather(tensors[first:end], x_out[offset : offset + size]))
                elif end - first == 1:
                    parts.append(tensors[first].reshape(-1))
                else:
                    parts.append(gather(tensors[first:end], scratches[row][:size]))
            yield parts, d[offset : offset + size]

    return segments(), longest


def _converted_sums(
    segments: Iterable[Tuple[Sequence[Tensor], Tensor]],
    k: int,
    acc_dtype: torch.dtype,
    workspace: Optional[Workspace],
    longest: int,
) -> Tuple[Sequence[Tensor], Sequence[Tensor]]:
    """``<r, d>`` and ``||r||^2`` in `acc_dtype` for k rows given as segments (k 1-D parts and the part
    of d they align with; `longest`: the longest segment's length):
    chunks of each segment are converted into one scratch buffer, d's once for all k rows, and reduced
    there (SUM_CHUNK; the scratch is kept in the workspace on CPU, fresh elsewhere), so the sums never
    hold a converted copy of the weights."""
    segments = iter(segments)
    head = next(segments)
    d_first = head[1]
    on_cpu = d_first.device.type == "cpu"
    width = max(1, min(longest, sum_chunk(d_first.device)))
    shape = (k + 1, width)
    scratch = workspace_buffer(workspace, "acc_scratch", shape, d_first, acc_dtype) if on_cpu else None
    if scratch is None:
        scratch = d_first.new_empty(shape, dtype=acc_dtype)
    dots = scratch.new_zeros(k)
    norms = scratch.new_zeros(k)
    for parts, d in itertools.chain([head], segments):
        for start in range(0, d.numel(), width):
            end = min(start + width, d.numel())
            part = scratch[:, : end - start]
            for i, row in enumerate(parts):
                part[i].copy_(row[start:end])
            part[k].copy_(d[start:end])
            dots.addmv_(part[:k], part[k])
            for i in range(k):
                norms[i].add_(torch.dot(part[i], part[i]))
    return dots.unbind(), norms.unbind()


FOREACH = Implementation("foreach", inner_products, apply_update)
FOREACH_PER_TENSOR = Implementation(
    "foreach_per_tensor",
    functools.partial(inner_products, per_tensor=True),
    functools.partial(apply_update, per_tensor=True),
)
