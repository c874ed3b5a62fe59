"""The pieces every tiled kernel is built from: fp32-accumulated dots, int64
offsets, one logits tile, the class cosines (max over sub-centers), the
hard-negative rule, and the gradient tile dL/dc with its fp16 operand scaling.

Offsets into the [C, D] and [B, D] buffers are int64 (``offsets``): C·D passes
2^31 at C > 4,194,304 for D = 512, and an int32 offset would wrap onto another
valid row.
"""
from __future__ import annotations

import triton
import triton.language as tl

# 2^14: gradient tiles are scaled below it before an fp16 cast (fp16 max 65,504)
FP16_MAX_OPERAND = tl.constexpr(16384.0)



@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """a . b accumulated in fp32; full-precision fp32 products when IEEE."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def offsets(rows, stride, ks):
    """int64 offsets of the elements (rows[i], ks[k]) of a matrix whose rows are
    ``stride`` apart: the row index is widened before the multiply."""
    return rows.to(tl.int64)[:, None] * stride + ks[None, :]


@triton.jit
def fp16_scale(e, AXIS: tl.constexpr):
    """A power-of-two scale per row (AXIS=1) or per column (AXIS=0) of e that
    brings its largest |value| to at most 2^14, so that the cast to an fp16
    operand cannot overflow: e = g s p / ||w|| passes fp16's 65,504 under a
    loss scale (GradScaler's g = 2^16 times s = 64) or a small-norm class row,
    and one such entry must not turn the tile into inf. Powers of two: scaling
    and unscaling are exact."""
    amax = tl.max(tl.abs(e), axis=AXIS)
    return tl.exp2(-tl.ceil(tl.log2(tl.maximum(amax / FP16_MAX_OPERAND, 1.0))))


@triton.jit
def grad_operands(e, blk, UPCAST: tl.constexpr):
    """The fp32 gradient tile e and a loaded block as operands of one dtype: the
    block's (tensor cores), or fp32 when upcasting."""
    if UPCAST:
        return e, blk.to(tl.float32)
    else:
        return e.to(blk.dtype), blk


@triton.jit
def operand_scale(e, AXIS: tl.constexpr, SCALE: tl.constexpr):
    """With SCALE (fp16 operands), ``fp16_scale`` of each row (AXIS=1, for
    dx) or column (AXIS=0, for dW) of a gradient tile: computed once per tile,
    not once per D chunk (only the two small vectors stay live across the D
    loop, not a scaled copy of the tile); without, 1."""
    if SCALE:
        return fp16_scale(e, AXIS)
    else:
        return 1.0


@triton.jit
def grad_dx(e, scale, w_blk, UPCAST: tl.constexpr, IEEE: tl.constexpr, SCALE: tl.constexpr):
    """e . W_blk in fp32; with SCALE, e's rows scaled by ``scale`` (``operand_scale(e, 1)``) first."""
    if SCALE:
        a, b = grad_operands(e * scale[:, None], w_blk, UPCAST)
        return dot(a, b, IEEE) / scale[:, None]
    else:
        a, b = grad_operands(e, w_blk, UPCAST)
        return dot(a, b, IEEE)


@triton.jit
def grad_dw(e, scale, x_blk, UPCAST: tl.constexpr, IEEE: tl.constexpr, SCALE: tl.constexpr):
    """e^T . x_blk in fp32; with SCALE, e's columns scaled by ``scale`` (``operand_scale(e, 0)``) first."""
    if SCALE:
        a, b = grad_operands(e * scale[None, :], x_blk, UPCAST)
        return dot(tl.trans(a), b, IEEE) / scale[:, None]
    else:
        a, b = grad_operands(e, x_blk, UPCAST)
        return dot(tl.trans(a), b, IEEE)


@triton.jit
def logits_tile(X, W, rows, w_rows, D, stride_x, stride_w,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """x_hat[rows] . W[w_rows]^T for one tile, accumulated in fp32. ``rows`` and
    ``w_rows`` are clamped in range by the caller, so only D needs a mask: the
    loads stay vectorizable, and the tile's out-of-range rows and columns (copies
    of the last valid one) are masked in the epilogue."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = (ks < D)[None, :]
        a = tl.load(X + offsets(rows, stride_x, ks), mask=k_ok, other=0.0)
        b = tl.load(W + offsets(w_rows, stride_w, ks), mask=k_ok, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        else:
            a = a.to(b.dtype)
        acc += dot(a, tl.trans(b), IEEE)
    return acc


@triton.jit
def tile_rows(pid_m, B, BLOCK_M: tl.constexpr):
    """Rows of row tile pid_m, their validity, and the rows loads read (clamped
    to the last row so that loads need no row mask)."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return rows, rows < B, tl.minimum(rows, B - 1)


@triton.jit
def split_tiles(pid_s, n_splits, C, BLOCK_N: tl.constexpr):
    """[first, end) of the class tiles that class split pid_s sweeps."""
    tiles = tl.cdiv(C, BLOCK_N)
    per_split = tl.cdiv(tiles, n_splits)
    return pid_s * per_split, tl.minimum((pid_s + 1) * per_split, tiles)


@triton.jit
def tile_columns(pid_n, C, BLOCK_N: tl.constexpr):
    """Classes of class tile pid_n and their validity."""
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return cols, cols < C


@triton.jit
def subcenter_rows(cols, C, CLASS_INDEX, k, SUBCENTERS: tl.constexpr, HAS_INDEX: tl.constexpr):
    """Sub-center k of each class in ``cols``: its row of the shard (of W_INV,
    DW: class j's at j * SUBCENTERS + k) and the W row it reads (through the
    index with HAS_INDEX). Clamped to the last class, so loads need no row mask."""
    local = tl.minimum(cols, C - 1) * SUBCENTERS + k
    if HAS_INDEX:
        w_rows = tl.load(CLASS_INDEX + local)
    else:
        w_rows = local
    return local, w_rows


@triton.jit
def class_cosines(X, W, W_INV, CLASS_INDEX, safe_rows, cols, col_ok, C, D, stride_x, stride_w,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_INDEX: tl.constexpr,
                   SUBCENTERS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """A tile's cosines: the max over each class's SUBCENTERS rows of
    logits / ||w||, and the arg-max sub-center (the first of ties; 0 without
    sub-centers). One GEMM tile per sub-center, never a B x C x K tensor."""
    best = tl.full((BLOCK_M, BLOCK_N), float("-inf"), dtype=tl.float32)
    arg = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in tl.static_range(SUBCENTERS):
        local, w_rows = subcenter_rows(cols, C, CLASS_INDEX, k, SUBCENTERS, HAS_INDEX)
        acc = logits_tile(X, W, safe_rows, w_rows, D, stride_x, stride_w, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE)
        c = acc * tl.load(W_INV + local, mask=col_ok, other=0.0)[None, :]
        if k == 0:
            best = c
        else:
            arg = tl.where(c > best, k, arg)
            best = tl.maximum(best, c)
    return best, arg


@triton.jit
def hard_rule(rows, row_ok, HARD, B):
    """A row's hard-negative rule from HARD [4, B]: (threshold, a, b, d) of
    m(c) = (a c + b) c + d above the threshold; a masked row is never hard."""
    threshold = tl.load(HARD + rows, mask=row_ok, other=float("inf"))
    a = tl.load(HARD + B + rows, mask=row_ok, other=0.0)
    b = tl.load(HARD + 2 * B + rows, mask=row_ok, other=1.0)
    d = tl.load(HARD + 3 * B + rows, mask=row_ok, other=0.0)
    return threshold[:, None], a[:, None], b[:, None], d[:, None]


@triton.jit
def grad_tile(c, rows, row_ok, cols, col_ok, LABELS, LSE, GRAD, HARD, B, scale, HAS_HARD: tl.constexpr):
    """From a tile's cosines: d loss / d c = g s p (times m'(c) = 2 a c + b at
    hard negatives); zero at the target columns (their share is added outside the
    kernels) and outside the valid rows and columns."""
    label = tl.load(LABELS + rows, mask=row_ok, other=-1)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    coef = tl.load(GRAD + rows, mask=row_ok, other=0.0) * scale
    if HAS_HARD:
        threshold, a, b, d = hard_rule(rows, row_ok, HARD, B)
        hard = c > threshold
        p = tl.exp(tl.where(hard, (a * c + b) * c + d, c) * scale - lse[:, None])
        e = coef[:, None] * p * tl.where(hard, 2.0 * a * c + b, 1.0)
    else:
        e = coef[:, None] * tl.exp(c * scale - lse[:, None])
    keep = row_ok[:, None] & col_ok[None, :] & (cols[None, :] != label[:, None])
    return tl.where(keep, e, 0.0)


@triton.jit
def row_grad(e, arg, local, col_ok, W_INV, k, SUBCENTERS: tl.constexpr):
    """The share of sub-center k (rows ``local``) of a gradient tile e = dL/dc:
    e where k is the arg-max, divided by ||w|| (so that e . W and e^T . x_hat
    are the gradients w.r.t. x_hat and w_hat / ||w||)."""
    inv = tl.load(W_INV + local, mask=col_ok, other=0.0)
    if SUBCENTERS == 1:
        return e * inv[None, :]
    else:
        return tl.where(arg == k, e, 0.0) * inv[None, :]
