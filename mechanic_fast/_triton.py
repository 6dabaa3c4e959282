"""Mechanic's O(d) work with Triton kernels: the same contract as `_foreach`, one launch per call.

`inner_products` makes one pass over d, d_ref, g and x (writing the x_t copy in the same pass), and
`apply_update` one pass over x, the copy, x_ref (and Delta). The copy is one flat buffer (`FlatCopy`)
that only these two functions read. Tensors must be contiguous (`contiguous`; `functional.select_impl`
picks the foreach implementation otherwise).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Hashable, List, Optional, Sequence, Tuple

import torch
import triton.language as tl
from torch import Tensor

from ._buffers import FlatCopy, TensorsOrCopy, Workspace, workspace_buffer
from ._plan import Implementation
from .kernels import inner_products as kernels

TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


def _block_size() -> int:
    # the interpreter runs blocks one by one in numpy: fewer, larger blocks are faster there
    return 4096 if os.environ.get("TRITON_INTERPRET") == "1" else 2048


class _DeviceTables:
    """int64 tables on a device by content, the least recently used dropped beyond `size`: block tables
    (by tensor sizes, which do not change between steps) and pointer tables (addresses of parameters,
    x_ref and Delta do not change between steps, nor, usually, those of gradients: the caching allocator
    hands the same blocks back), so a step finds its tables here and copies nothing to the device. A few
    entries: alternating layouts (two optimizers) hit."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.tables: OrderedDict[Hashable, Tensor] = OrderedDict()

    def get(self, key: Hashable, values: Any, device: torch.device) -> Tensor:
        """The table under `key`, made from `values()` where missing."""
        table = self.tables.get(key)
        if table is None:
            table = self.tables[key] = _to_device(values(), device)
            if len(self.tables) > self.size:
                self.tables.popitem(last=False)
        else:
            self.tables.move_to_end(key)
        return table


_BLOCKS = _DeviceTables(16)
_TABLES = _DeviceTables(16)


def _blocks(numels: Sequence[int], device: torch.device) -> Tensor:
    block = _block_size()

    def rows() -> List[int]:
        return [v for i, n in enumerate(numels) for start in range(0, n, block) for v in (i, start)]

    return _BLOCKS.get((tuple(numels), block, device), rows, device)


def _device_table(values: List[int], device: torch.device) -> Tensor:
    return _TABLES.get((tuple(values), device), lambda: values, device)


def _to_device(values: List[int], device: torch.device) -> Tensor:
    """An int64 table on `device`, copied without making the host wait for the device."""
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _addresses(tensors: Optional[TensorsOrCopy], n: int) -> List[int]:
    if tensors is None:
        return [0] * n
    if isinstance(tensors, FlatCopy):
        base, size, out = tensors.flat.data_ptr(), tensors.flat.element_size(), []
        for n in tensors.numels:
            out.append(base)
            base += n * size
        return out
    return [t.data_ptr() for t in tensors]


def _table(columns: Sequence[List[int]]) -> List[int]:
    return [v for row in zip(*columns) for v in row]


def contiguous(*lists: Optional[TensorsOrCopy]) -> bool:
    """Whether the kernels can read every list as flat memory."""
    return all(
        isinstance(ts, FlatCopy) or all(t.is_contiguous() for t in ts) for ts in lists if ts is not None
    )


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
) -> Tuple[Tensor, Optional[FlatCopy]]:
    """Same contract as `_foreach.inner_products`; the copy is a `FlatCopy` (in the workspace). The
    kernel reads tensors as flat memory: gradients that are not contiguous are read from a copy."""
    if g is not None and not contiguous(g):
        g = [t.contiguous() for t in g]
    like = x if x is not None else (g if g is not None else d_ref)
    assert like is not None
    n = len(like)
    device = like[0].device
    numels = [t.numel() for t in like]
    copy = None  # written by the kernel
    if copy_x and x is not None:
        copy = FlatCopy(x, workspace_buffer(workspace, "flat", (sum(numels),), x[0]))
    stored = d.flat if isinstance(d, FlatCopy) else getattr(d, "flat", None)
    if stored is not None and stored.numel() != sum(numels):  # the kernel reads raw memory: never past it
        raise RuntimeError(f"inconsistent tensor sizes: {sum(numels)} elements against {stored.numel()}")
    blocks = _blocks(numels, device)
    table = _table(
        [
            _addresses(d, n),
            _addresses(d_ref, n),
            _addresses(g, n),
            _addresses(x, n),
            _addresses(copy, n),
            numels,
        ]
    )
    partial = torch.empty(blocks.numel() // 2, 4, dtype=acc_dtype, device=device)
    d_dtype = d.flat.dtype if isinstance(d, FlatCopy) else d[0].dtype
    kernels.inner_products_kernel[(partial.shape[0],)](
        blocks,
        _device_table(table, device),
        partial,
        D_TY=TL_DTYPES[d_dtype],
        REF_TY=TL_DTYPES[d_ref[0].dtype] if d_ref is not None else TL_DTYPES[d_dtype],
        X_TY=TL_DTYPES[like[0].dtype],
        ACC=TL_DTYPES[acc_dtype],
        HAS_REF=d_ref is not None,
        HAS_G=g is not None,
        X_SUMS=x is not None and x_sums,
        COPY_X=copy is not None,
        BLOCK=_block_size(),
    )
    return partial.sum(dim=0), copy  # rows reduced in a fixed order: deterministic


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
    """Same contract as `_foreach.apply_update`, in one pass."""
    n = len(x)
    device = x[0].device
    numels = [t.numel() for t in x]
    acc = torch.float64 if x[0].dtype == torch.float64 else torch.float32
    if x_ref is None:  # the kernel reads S - S_old and S_old, made as the other implementations make them
        scale, denom = scale - scale_old, scale_old
    blocks = _blocks(numels, device)
    table = _table(
        [_addresses(x, n), _addresses(x_copy, n), _addresses(x_ref, n), _addresses(delta, n), numels]
    )
    kernels.apply_update_kernel[(blocks.numel() // 2,)](
        blocks,
        _device_table(table, device),
        scale,
        denom,
        X_TY=TL_DTYPES[x[0].dtype],
        REF_TY=TL_DTYPES[(x_ref if x_ref is not None else delta)[0].dtype],
        ACC=TL_DTYPES[acc],
        HAS_REF=x_ref is not None,
        HAS_DELTA=delta is not None,
        BLOCK=_block_size(),
    )


TRITON = Implementation("triton", inner_products, apply_update)

__all__ = ["TRITON", "apply_update", "contiguous", "inner_products"]
