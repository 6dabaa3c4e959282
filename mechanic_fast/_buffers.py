"""The buffer types every implementation of the O(d) work shares: the x_t copy of a step (`XCopy`: a
`FlatCopy` or a `ListCopy`, opaque to the caller), the `Workspace` of buffers kept from step to step,
`Tiled` lists of x_ref/Delta views, and the flat-buffer helpers (`gather`, `flat_view`, `flat`)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _torch

TensorList = List[Tensor]

# Elements per chunk where the sums convert to the accumulation dtype and the Delta-only update works.
# CPU: a scratch that stays in cache, where whole-row float32 copies would be fresh memory, page-faulted
# in at every step. An accelerator: large chunks (few launches), so that the float32 scratch is not a
# transient of twice the weights' size beside a bfloat16 model (64 MiB per row).
SUM_CHUNK = 1 << 18
SUM_CHUNK_ACCELERATOR = 1 << 24


def sum_chunk(device: torch.device) -> int:
    """Elements per chunk of the converted sums and of the Delta-only update on `device`."""
    return SUM_CHUNK if device.type == "cpu" else SUM_CHUNK_ACCELERATOR


class XCopy:
    """The copy of x_t a step's `sums` makes and its `update` consumes: what it holds is the business of
    the implementation that made it."""


class FlatCopy(XCopy):
    """A copy of a list of tensors in one flat buffer (the flat implementations' x_t copy)."""

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


class ListCopy(XCopy):
    """A copy of a list of tensors, tensor by tensor (the per-tensor implementations' x_t copy)."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.tensors = [t.clone() for t in tensors]


class Workspace:
    """Flat buffers reused from step to step, by name (fresh ones would be page-faulted in at every step
    on CPU): the gathered g, then x_t ("flat"); with Delta recomputed, g and x_t side by side ("g_x", the
    g row then scratch for the update); for the sums of bfloat16/float16, a chunk of each list gathered
    ("gather_scratch_0", "_1") and its float32 conversion ("acc_scratch")."""

    def __init__(self) -> None:
        self.buffers: Dict[str, Tensor] = {}
        self.rows: Optional[Tuple[Tensor, Tuple[Tensor, ...]]] = None  # a buffer and its rows
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
        if self.rows is None or self.rows[0] is not both:  # views made once per buffer
            self.rows = (both, tuple(both.unbind()))
        grad_row, x_row = self.rows[1]
        return grad_row if x_t.data_ptr() == x_row.data_ptr() and x_t.shape == x_row.shape else None

    def shaped(self, flat: Tensor, like: Sequence[Tensor]) -> TensorList:
        """`flat` split into views shaped as `like` (made once while `flat` and the shapes stay)."""
        shapes = tuple(t.shape for t in like)
        key = (flat.data_ptr(), flat.dtype, shapes)
        if self.views is None or self.views[0] != key:
            self.views = (key, split(flat, like))
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
    storage and offsets, which a deepcopy or unpickled optimizer keeps."""
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


def total_numel(tensors: Sequence[Tensor], *aligned: Any) -> int:
    """Elements in `tensors`, read off an aligned list that tiles one buffer (x_ref, Delta, the x_t copy)
    where there is one: a sum over every tensor is Python work per tensor at every step."""
    for other in aligned:
        if isinstance(other, (Tiled, FlatCopy)) and other.flat is not None:
            return other.flat.numel()
    return sum(t.numel() for t in tensors)


def chunk_groups(tensors: Sequence[Tensor], width: int) -> List[Tuple[int, int, int, int]]:
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


def split(source: Tensor, like: Sequence[Tensor]) -> TensorList:
    """Views of the 1-D `source` shaped as the tensors of `like`, in order."""
    return [p.view(t.shape) for p, t in zip(torch.split(source, [t.numel() for t in like]), like)]
