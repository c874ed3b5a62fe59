"""The per-row kernels around the GEMM passes: inverse row norms of W, and the
projection of a row gradient off its row (d/dw from d/d(w / ||w||))."""
from __future__ import annotations

import triton
import triton.language as tl

from .tiles import offsets


def norm_grid(c: int, block_r: int = 64) -> tuple[int]:
    return (triton.cdiv(c, block_r),)


def project_grid(c: int) -> tuple[int]:
    return (c,)


@triton.jit
def row_inv_norm_kernel(W, CLASS_INDEX, OUT, C, D, stride_w, eps,
                        HAS_INDEX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT[j] = 1 / max(||W[index[j]]||, eps) in fp32; NaN for a row with a NaN,
    0 for one with an Inf."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < C
    if HAS_INDEX:
        w_rows = tl.load(CLASS_INDEX + rows, mask=ok, other=0)
    else:
        w_rows = rows
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(W + offsets(w_rows, stride_w, ks), mask=ok[:, None] & (ks < D)[None, :], other=0.0)
        v = v.to(tl.float32)
        acc += tl.sum(v * v, axis=1)
    norm = tl.sqrt(acc)
    # not tl.maximum: a NaN norm must stay NaN (the callers' NaN check reads it)
    tl.store(OUT + rows, 1.0 / tl.where(norm < eps, eps, norm), mask=ok)


@triton.jit
def project_rows_kernel(G, W, W_INV, CLASS_INDEX, OUT, C, D, stride_w,
                        HAS_INDEX: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[j] = G[j] - w_j inv_j^2 (w_j . G[j]), cast to OUT's dtype: d/dw from
    G = inv_j d/d(w_hat_j). One program per class row; BLOCK_D >= D."""
    j = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_D)
    k_ok = ks < D
    if HAS_INDEX:
        w_row = tl.load(CLASS_INDEX + j)
    else:
        w_row = j
    g = tl.load(G + (j * D + ks), mask=k_ok, other=0.0)
    w = tl.load(W + (w_row * stride_w + ks), mask=k_ok, other=0.0).to(tl.float32)
    inv = tl.load(W_INV + j)
    out = g - w * (inv * inv * tl.sum(w * g, axis=0))
    tl.store(OUT + (j * D + ks), out.to(OUT.dtype.element_ty), mask=k_ok)
