"""Mechanic's O(d) work in eager mode with multi-tensor torch ops, on any device (`functional` picks it).

Where a multi-tensor op is a loop over tensors (on CPU), passes over one flat buffer are cheaper: a step
gathers g into one weight-sized buffer with one `_torch.chunk_cat` and takes its inner products with
BLAS, then gathers x_t into the same buffer (the step's x_t copy). The update: with x_ref kept,
w = x_t - x_base in that buffer, Delta += -w and x_ref + S * Delta formed there and copied back; with
Delta alone, u = x_base - x_t in the parameters, Delta += u, and x = x_t + (S_old * u + (S - S_old) *
Delta) with multi-tensor ops, so that x_t, not x_base, carries the large part. Lists that already tile
one flat buffer in order (x_ref and Delta, which the optimizer allocates that way) are used in place,
without a gather. So the number of dispatched ops is constant in the number of tensors.

With `per_tensor=True` (few large tensors, where per-tensor dispatch is negligible and every pass
counts) gradients in the accumulation dtype are reduced where they are (no gather) and x_ref + S * Delta
is written straight into each parameter (no copy back). bfloat16/float16 values are gathered and
converted for the sums a chunk at a time, in small kept buffers (`_grouped_segments`, `_converted_sums`).
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _torch


class FlatCopy:
    """A copy of a list of tensors in one flat buffer (the x_t copy of a step)."""

    def __init__(self, tensors: Sequence[Tensor], flat: Optional[Tensor] = None) -> None:
        self.tensors = tensors
        self.flat = (
            flat
            if flat is not None
            else torch.empty(sum(self.numels), dtype=tensors[0].dtype, device=tensors[0].device)
        )

    @property
    def numels(self) -> List[int]:
        """Element counts of the copied tensors, in order (made on demand: most steps never need them)."""
        return [t.numel() for t in self.tensors]


class Workspace:
    """Flat buffers reused from step to step, by name (fresh ones would be page-faulted in at every step
    on CPU): the gathered g, then x_t ("flat"); with Delta recomputed, g and x_t side by side ("g_x", the
    g row then scratch for the update); for the sums of bfloat16/float16, a chunk of each list gathered
    ("gather_scratch_0", "_1") and its float32 conversion ("acc_scratch")."""

    def __init__(self) -> None:
        self.buffers: Dict[str, Tensor] = {}
        self.rows: Optional[Tuple[Tensor, ...]] = None
        self.views: Optional[Tuple[Tuple[Any, ...], TensorList]] = None

    def get(
        self, name: str, shape: Tuple[int, ...], like: Tensor, dtype: Optional[torch.dtype] = None
    ) -> Tensor:
        dtype = dtype or like.dtype
        buf = self.buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != like.device:
            buf = self.buffers[name] = torch.empty(shape, dtype=dtype, device=like.device)
        return buf

    def spare_row(self, x_t: Tensor) -> Optional[Tensor]:
        """The gradient row of the g/x_t buffer when `x_t` is its other row (free after the sums)."""
        both = self.buffers.get("g_x")
        if both is None:
            return None
        if self.rows is None or self.rows[0]._base is not both:  # views made once per buffer
            self.rows = tuple(both.unbind())
        grad_row, x_row = self.rows
        return grad_row if x_t.data_ptr() == x_row.data_ptr() and x_t.shape == x_row.shape else None

    def shaped(self, flat: Tensor, like: Sequence[Tensor]) -> TensorList:
        """`flat` split into views shaped as `like` (made once while `flat` and the shapes stay)."""
        shapes = tuple(t.shape for t in like)
        key = (flat.data_ptr(), flat.dtype, shapes)
        if self.views is None or self.views[0] != key:
            self.views = (key, _split(flat, like))
        return self.views[1]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


def workspace_buffer(
    workspace: Optional[Workspace],
    name: str,
    shape: Tuple[int, ...],
    like: Tensor,
    dtype: Optional[torch.dtype] = None,
) -> Optional[Tensor]:
    """The named buffer of `workspace` (`like`'s device, `dtype` or `like`'s), or None (a fresh tensor
    then) without one."""
    if workspace is None:
        return None
    return workspace.get(name, shape, like, dtype)


class Tiled(list):
    """A list of tensors that stays the same from step to step (x_ref, Delta of a cached layout), with
    the 1-D view of the buffer they tile (or None) found once instead of at every step."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        super().__init__(tensors)
        self.flat = flat_view(list(self)) if self else None


TensorList = List[Tensor]
TensorsOrCopy = Union[Sequence[Tensor], FlatCopy]


def flat_clones(tensors: Sequence[Tensor], dtype: torch.dtype) -> TensorList:
    """Copies of `tensors` (in `dtype`) that are views tiling one new flat buffer, so that later steps
    can use them as one 1-D tensor without a gather."""
    buffer = gather([t.detach() for t in tensors]).to(dtype)  # gather already copied
    return [v.view(t.shape) for v, t in zip(torch.split(buffer, [t.numel() for t in tensors]), tensors)]


def gather(tensors: Sequence[Tensor], out: Optional[Tensor] = None) -> Tensor:
    """A 1-D tensor holding the elements of `tensors` in order, new or written into `out` (one op;
    `_torch.chunk_cat` takes no 0-d tensor, so those are viewed as 1-element ones)."""
    parts = [t if t.dim() else t.view(1) for t in tensors]
    return _torch.chunk_cat(parts, None if out is None else out.view(1, -1)).view(-1)


def flat_view(tensors: TensorsOrCopy) -> Optional[Tensor]:
    """The 1-D storage `tensors` tile in order, without copying, or None if they do not. Read from the
    storage and offsets, not `Tensor._base`, which a deepcopy or unpickled optimizer loses."""
    if isinstance(tensors, (FlatCopy, Tiled)):
        return tensors.flat
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    start = offset = first.storage_offset()
    for t in tensors:
        if not t.is_contiguous() or t.storage_offset() != offset or t.untyped_storage().data_ptr() != storage:
            return None
        offset += t.numel()
    return first.as_strided((offset - start,), (1,), start)  # one view op


def flat(tensors: TensorsOrCopy) -> Tensor:
    """`tensors` as one 1-D tensor: a view when they tile one, else a gathered copy (read-only use)."""
    view = flat_view(tensors)
    return view if view is not None else gather(tensors)


def _total_numel(tensors: Sequence[Tensor], *aligned: Any) -> int:
    """Elements in `tensors`, read off an aligned list that tiles one buffer (x_ref, Delta, the x_t copy)
    where there is one: a sum over every tensor is Python work per tensor at every step."""
    for other in aligned:
        if isinstance(other, (Tiled, FlatCopy)) and other.flat is not None:
            return other.flat.numel()
    return sum(t.numel() for t in tensors)


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
    need_x = x is not None and (copy_x or x_sums)
    aligned = x if x is not None else g  # the lists are aligned: any one gives the element count
    numel = _total_numel(aligned, d, d_ref) if aligned is not None else 0
    d_first = d.flat if isinstance(d, FlatCopy) else d[0]
    g_scattered = g is not None and flat_view(g) is None  # else flat(g) is a view, not a gather
    # few large gradients in acc_dtype: BLAS dots where they are (a gather would write them once more
    # only for BLAS to read them)
    in_acc = g_scattered and g[0].dtype == acc_dtype == d_first.dtype
    g_in_place = per_tensor and in_acc
    # below acc_dtype with Delta stored: g (and x) converted chunk by chunk beside Delta, so that each
    # is converted once, gathered a chunk of tensors at a time (long tensors read where they are)
    g_converted = g_scattered and not in_acc and d_ref is None
    gather_g = g_scattered and not (g_in_place or g_converted)
    shares = gather_g and need_x and g[0].dtype == x[0].dtype  # one buffer (or matrix) for g and x
    sums: List[Optional[Tensor]] = [None] * 4
    x_flat = None
    if d_ref is None:
        d_flat = flat(d)
        buffer = None
        if shares or (need_x and copy_x):
            buffer = workspace_buffer(workspace, "flat", (numel,), x[0])
            buffer = x[0].new_empty(numel) if buffer is None else buffer
        if g_converted:
            # x_t is copied into the buffer group by group, where its sums read it
            rows = [g, x] if need_x and x_sums else [g]
            segments, longest = _grouped_segments(rows, d_flat, buffer, workspace)
            dots, norms = _converted_sums(segments, len(rows), acc_dtype, workspace, longest)
            sums[0::2] = dots[0], norms[0]
            if len(rows) == 2:
                sums[1::2] = dots[1], norms[1]
                x_flat = buffer
        elif g is not None:
            g_flat = gather(g, buffer if shares else None) if gather_g else None
            sums[0], sums[2] = _g_sums(g, g_flat, d_flat, acc_dtype, workspace)
            del g_flat  # freed before x is gathered
        if x is not None and x_flat is None and (copy_x or (x_sums and sums[1] is None)):
            # the x_t copy overwrites the gathered gradients (their sums are taken)
            x_flat = gather(x, buffer)
    else:
        both = None
        if need_x:
            if shares:
                both = gather(list(g) + list(x), workspace_buffer(workspace, "g_x", (2, numel), x[0])).view(
                    2, -1
                )
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
            sums[0], sums[2] = _g_sums(g, gather(g) if gather_g else None, d_flat, acc_dtype, workspace)
    if x_flat is not None and x_sums and sums[1] is None:
        dots, norms = _row_sums(x_flat, d_flat, acc_dtype, workspace)
        sums[1], sums[3] = dots[0], norms[0]
    zero = d_flat.new_zeros((), dtype=acc_dtype) if None in sums else None
    copy = FlatCopy(x, x_flat) if copy_x and x_flat is not None else None
    return torch.stack([zero if v is None else v for v in sums]), copy


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


# Elements per chunk where the sums convert to the accumulation dtype. CPU: a scratch that stays in
# cache, where whole-row float32 copies would be fresh memory, page-faulted in at every step. An
# accelerator: large chunks (few launches), so that the float32 scratch is not a transient of twice the
# weights' size beside a bfloat16 model (64 MiB per row).
SUM_CHUNK = 1 << 18
SUM_CHUNK_ACCELERATOR = 1 << 24


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


def _sum_chunk(device: torch.device) -> int:
    """Elements per chunk of the converted sums on `device` (see SUM_CHUNK)."""
    return SUM_CHUNK if device.type == "cpu" else SUM_CHUNK_ACCELERATOR


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
    groups = _chunk_groups(rows[0], _sum_chunk(d.device))
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
    width = max(1, min(longest, _sum_chunk(d_first.device)))
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
    x_t_parts = workspace.shaped(x_t, x) if workspace is not None else _split(x_t, x)
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
        torch._foreach_sub_(list(delta), _split(x_t, delta))
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
    width = _sum_chunk(x_t.device)
    size = min(width, x_t.numel())
    # kept only where it is small beside the weights: a small model's scratch would be one more copy
    kept = workspace if x_t.numel() >= 2 * width else None
    scratch = workspace_buffer(kept, "update_scratch", (size,), x_t)
    if scratch is None:
        scratch = x_t.new_empty(size)
    copied_back: List[int] = []
    for first, end, offset, size in _chunk_groups(x, width):
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


def _chunk_groups(tensors: Sequence[Tensor], width: int) -> List[Tuple[int, int, int, int]]:
    """Consecutive tensors in groups of at most `width` elements (a longer tensor alone), as (first
    tensor, end, offset in the flat layout, elements)."""
    groups: List[Tuple[int, int, int, int]] = []
    first = offset = size = 0
    for i, t in enumerate(tensors):
        if size and size + t.numel() > width:
            groups.append((first, i, offset, size))
            first, offset, size = i, offset + size, 0
        size += t.numel()
    groups.append((first, len(tensors), offset, size))
    return groups


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


def _split(source: Tensor, like: Sequence[Tensor]) -> TensorList:
    """Views of the 1-D `source` shaped as the tensors of `like`, in order."""
    return [p.view(t.shape) for p, t in zip(torch.split(source, [t.numel() for t in like]), like)]
