"""The inner products as one custom op, `mechanic_fast::inner_products`, that torch.compile keeps opaque.

Traced tensor by tensor on CPU, the four sums over n small tensors become ~3n reduction loops in
inductor's one C++ kernel, each its own OpenMP parallel region, and every one of them is a node in
inductor's fusion search and code for the C++ compiler. Measured over 200 64x64 tensors (AdamW base,
`torch.compile(opt.step)`, bench/compile_times.py): first 5 steps 105 s traced against 78 s with this op
(bare AdamW 42 s); the compiled step's overhead over bare AdamW 3.1 ms against 2.6 ms
(bench/compiled_sums_ab.py). The op runs the flat eager implementation (`_foreach`: one gather, BLAS)
and is one node of the graph, still captured whole (no graph break). `_pertensor` calls it where the
flat form is the faster eager form too (`_foreach.few_large` false) and only on CPU: on an accelerator
inductor's own reductions are left in place (not measured there: no GPU was lent).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import _foreach

_LIB = torch.library.Library("mechanic_fast", "DEF")  # the namespace, held for the process
# Registered with the low-level API: `torch.library.custom_op`'s Python wrapper checked its list arguments
# tensor by tensor, 1.1 ms per call over 200 tensors against 0.1 ms here.
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


def _inner_products_fake(
    d: List[Tensor],
    d_ref: List[Tensor],
    g: List[Tensor],
    x: List[Tensor],
    acc_dtype: torch.dtype,
    x_sums: bool,
) -> Tensor:
    return d[0].new_empty((4,), dtype=acc_dtype)


_LIB.impl("inner_products", _inner_products, "CompositeExplicitAutograd")
torch.library.register_fake("mechanic_fast::inner_products", _inner_products_fake, lib=_LIB)


def inner_products(
    d: Sequence[Tensor],
    d_ref: Optional[Sequence[Tensor]],
    g: Optional[Sequence[Tensor]],
    x: Optional[Sequence[Tensor]],
    *,
    acc_dtype: torch.dtype,
    x_sums: bool,
) -> Tensor:
    """``[<d, g>, <d, x>, ||g||^2, ||x||^2]`` as `_foreach.inner_products` gives them, through the op."""
    return torch.ops.mechanic_fast.inner_products(
        list(d), list(d_ref or ()), list(g or ()), list(x or ()), acc_dtype, x_sums
    )


def preferred(numel: int, count: int, device: torch.device) -> bool:
    """Whether the sums of `count` tensors of `numel` elements should go through the op: while
    torch.compile traces, on CPU, for many small tensors (eagerly `_pertensor` keeps its own math)."""
    return (
        torch.compiler.is_compiling()
        and device.type == "cpu"
        and not _foreach.few_large(numel, count, device)
    )
