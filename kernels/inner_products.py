"""Triton kernels for Mechanic's O(d) work, over whole lists of tensors in one launch each.

Multi-tensor layout: a per-tensor table of raw addresses and sizes (int64), and a per-block table
(tensor index, first element) so that every program handles BLOCK elements of one tensor, whatever the
tensors' sizes. Pointers are rebuilt from the addresses with `.to(tl.pointer_type(...))`.

`inner_products_kernel` writes one row of 4 partial sums per block; the caller reduces the rows in a
fixed order (no float atomics, so the same inputs give the same bits). Math is in ACC (float32 for
fp32/bf16/fp16 inputs, float64 for float64).
"""

import triton
import triton.language as tl

# columns of the per-tensor table of inner_products_kernel
IP_D, IP_D_REF, IP_G, IP_X, IP_COPY, IP_NUMEL, IP_COLS = range(7)
# columns of the per-tensor table of apply_update_kernel
UP_X, UP_COPY, UP_REF, UP_DELTA, UP_NUMEL, UP_COLS = range(6)


@triton.jit
def inner_products_kernel(
    blocks_ptr,
    table_ptr,
    partial_ptr,
    D_TY: tl.constexpr,
    REF_TY: tl.constexpr,
    X_TY: tl.constexpr,
    ACC: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_G: tl.constexpr,
    X_SUMS: tl.constexpr,
    COPY_X: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Partial [<d, g>, <d, x>, ||g||^2, ||x||^2] of one block, with d = d - d_ref; optional copy of x."""
    # this program's tensor (a row of the table) and its elements; no nested @triton.jit helpers here,
    # since Triton's interpreter stops running those once torch.compile has imported triton
    pid = tl.program_id(0)
    row = table_ptr + tl.load(blocks_ptr + 2 * pid) * IP_COLS
    offs = tl.load(blocks_ptr + 2 * pid + 1) + tl.arange(0, BLOCK)
    mask = offs < tl.load(row + IP_NUMEL)
    d = tl.load(tl.load(row + IP_D).to(tl.pointer_type(D_TY)) + offs, mask=mask, other=0.0).to(ACC)
    if HAS_REF:
        ref_ptr = tl.load(row + IP_D_REF).to(tl.pointer_type(REF_TY))
        d = d - tl.load(ref_ptr + offs, mask=mask, other=0.0).to(ACC)
    dg = tl.sum(d * 0.0, axis=0)
    gg = dg
    dx = dg
    xx = dg
    if HAS_G:
        g = tl.load(tl.load(row + IP_G).to(tl.pointer_type(X_TY)) + offs, mask=mask, other=0.0).to(ACC)
        dg = tl.sum(d * g, axis=0)
        gg = tl.sum(g * g, axis=0)
    if X_SUMS or COPY_X:
        x_ptr = tl.load(row + IP_X).to(tl.pointer_type(X_TY))
        x_raw = tl.load(x_ptr + offs, mask=mask, other=0.0)
        if X_SUMS:
            x = x_raw.to(ACC)
            dx = tl.sum(d * x, axis=0)
            xx = tl.sum(x * x, axis=0)
        if COPY_X:
            copy_ptr = tl.load(row + IP_COPY).to(tl.pointer_type(X_TY))
            tl.store(copy_ptr + offs, x_raw, mask=mask)
    out = partial_ptr + tl.program_id(0) * 4
    tl.store(out, dg)
    tl.store(out + 1, dx)
    tl.store(out + 2, gg)
    tl.store(out + 3, xx)


@triton.jit
def apply_update_kernel(
    blocks_ptr,
    table_ptr,
    scale_ptr,
    denom_ptr,
    X_TY: tl.constexpr,
    REF_TY: tl.constexpr,
    ACC: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The update, in the foreach implementation's operation order, u = x - x_copy:

    - HAS_REF and HAS_DELTA: Delta += u in place, x = x_ref + scale * Delta;
    - HAS_REF alone: Delta = (x_copy - x_ref) / denom + u, x = x_ref + scale * Delta;
    - HAS_DELTA alone: scale_ptr holds S - S_old and denom_ptr S_old; Delta += u and
      x = x_copy + (S_old * u + (S - S_old) * Delta).
    """
    pid = tl.program_id(0)
    row = table_ptr + tl.load(blocks_ptr + 2 * pid) * UP_COLS
    offs = tl.load(blocks_ptr + 2 * pid + 1) + tl.arange(0, BLOCK)
    mask = offs < tl.load(row + UP_NUMEL)
    scale = tl.load(scale_ptr).to(ACC)
    x_ptr = tl.load(row + UP_X).to(tl.pointer_type(X_TY))
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    x_t = tl.load(tl.load(row + UP_COPY).to(tl.pointer_type(X_TY)) + offs, mask=mask, other=0.0).to(ACC)
    if HAS_DELTA:
        delta_ptr = tl.load(row + UP_DELTA).to(tl.pointer_type(REF_TY))
        delta = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(ACC) - (x_t - x)
        delta = delta.to(REF_TY, fp_downcast_rounding="rtne")
        tl.store(delta_ptr + offs, delta, mask=mask)
        delta = delta.to(ACC)  # the stored value goes on, as in the other implementations
    if HAS_REF:
        ref = tl.load(tl.load(row + UP_REF).to(tl.pointer_type(REF_TY)) + offs, mask=mask, other=0.0).to(ACC)
        if not HAS_DELTA:
            delta = (x_t - ref) / tl.load(denom_ptr).to(ACC) + (x - x_t)
        # one rounding, as torch.addcmul in the other implementations
        new_x = tl.fma(delta, scale, ref)
    else:
        # each intermediate rounded to x's dtype, where the other implementations keep it
        u = (x - x_t).to(X_TY, fp_downcast_rounding="rtne").to(ACC)
        kept = (u * tl.load(denom_ptr).to(ACC)).to(X_TY, fp_downcast_rounding="rtne").to(ACC)
        new_x = x_t + tl.fma(delta, scale, kept).to(X_TY, fp_downcast_rounding="rtne").to(ACC)
    tl.store(x_ptr + offs, new_x.to(X_TY, fp_downcast_rounding="rtne"), mask=mask)
