"""The inner products as one custom op, `mechanic_fast::inner_products`, that torch.compile keeps opaque.

Traced tensor by tensor on CPU, the four sums over n small tensors become ~3n reduction loops in one
C++ kernel, each its own parallel region and its own node in inductor's fusion search: slower to compile
and to run than the flat eager code (`_foreach`: one gather, BLAS), which this op runs as one node of
the graph, still captured whole. `functional.select_impl` uses it only while compiling, on CPU, for
many small tensors (bench/compile_times.py and bench/compiled_sums_ab.py measure both forms).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _foreach, _pertensor
from ._buffers import ListCopy, Workspace
from ._plan import Implementation

_LIB = torch.library.Library("mechanic_fast", "DEF")  # the namespace, held for the process
# The low-level API: `torch.library.custom_op`'s Python wrapper checks list arguments tensor by tensor.
_LIB.define(
    "inner_products(Tensor[] d, Tensor[] d_ref, Tensor[] g, Tensor[] x, ScalarType acc_dtype, bool x_sums)"
    " -> Tensor"
)


def _or_none(tensors: Sequence[Tensor]) -> Optional[Sequence[Tensor]]:
    return tensors if len(tensors) else None  # the schema has no optional list: empty means absent


def _inner_products(
    d: List[Tensor],
    d_ref: List[Tensor],
    g: List[Tensor],
    x: List[Tensor],
    acc_dtype: torch.dtype,
    x_sums: bool,
) -> Tensor:
    sums, _ = _foreach.inner_products(
        d, _or_none(d_ref), _or_none(g), _or_none(x), acc_dtype=acc_dtype, x_sums=x_sums
    )
    return sums


def _inner_products_fake(d: List[Tensor], *rest: Any) -> Tensor:
    return d[0].new_empty((4,), dtype=rest[3])  # acc_dtype, the op's fifth argument


_LIB.impl("inner_products", _inner_products, "CompositeExplicitAutograd")
torch.library.register_fake("mechanic_fast::inner_products", _inner_products_fake, lib=_LIB)


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
    """`_foreach.inner_products` through the op; the copy of x is `_pertensor`'s."""
    copy = _pertensor.copy_of(x, copy_x)
    sums = torch.ops.mechanic_fast.inner_products(
        _pertensor.as_list(d), list(d_ref or ()), list(g or ()), list(x or ()), acc_dtype, x_sums
    )
    return sums, copy


PER_TENSOR_OPAQUE_SUMS = Implementation("per_tensor_opaque_sums", inner_products, _pertensor.apply_update)
