"""Triton kernels of the margin loss: a fused forward (GEMM tile + margin + online
logsumexp per class split); two fused backwards, one kernel with fp32 atomics for
dx and dW (recomputed tile -> dz -> both products) or a split into a dW kernel
(no atomics) and a dx kernel (one atomic add per class split), which recompute
the logits once each; and the small row-norm / projection kernels.

Every kernel reads class rows through an optional ``class_index`` so that a
sampled subset of W is used without copying it. With SUBCENTERS = K each class
is K consecutive rows (of W or of the index) and its cosine the max over them
(the forward and the atomic backward; the split backward has none). Under
``TRITON_INTERPRET=1`` (CPU tests) bf16 operands are upcast to fp32 before ``tl.dot`` (the
interpreter's bf16 dot is wrong; its fp16 dot is right, so fp16 runs as on a
GPU) and a single configuration is used.

Offsets into the [C, D] and [B, D] buffers are int64 (``_offsets``): C·D passes
2^31 at C > 4,194,304 for D = 512, and an int32 offset would wrap onto another
valid row. Class tiles sit on grid axis 0 (up to 2^31 - 1 programs), never on
axes 1 and 2 (65,535).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tuned once per (power-of-two B, power-of-two C, D): a new batch size (the last
# batch, evaluation) must not retune, each trial of the atomic backward zeroing a
# [C, D] buffer. B_BUCKET and C_BUCKET are arguments for the key only.
AUTOTUNE_KEY = ["B_BUCKET", "C_BUCKET", "D"]
# 2^14: gradient tiles are scaled below it before an fp16 cast (fp16 max 65,504)
FP16_MAX_OPERAND = tl.constexpr(16384.0)


def autotune_bucket(n: int) -> int:
    """The power of two at or above n (1 for n <= 1): the autotune key's B and C."""
    return 1 << max(int(n) - 1, 0).bit_length()


def _configs(kind: str, interpret: bool = INTERPRET, subcenters: bool = False) -> list[triton.Config]:
    """Autotune candidates per kernel kind: fwd, bwd (atomic), bwd_dw and bwd_dx
    (the split backward, whose tiles also carry a D chunk, BLOCK_D).
    ``subcenters``: the forward's and the atomic backward's candidates for
    SUBCENTERS > 1."""
    if interpret:  # the interpreter pays per block op: few, large tiles (BLOCK_D < 72: D chunks get tested)
        meta = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}
        if kind in ("bwd_dw", "bwd_dx"):
            meta["BLOCK_D"] = 64
        return [triton.Config(meta, num_warps=4, num_stages=1)]
    shapes = {
        "fwd": [(128, 128, 64, 0, 8, 3), (128, 256, 64, 0, 8, 3), (64, 128, 64, 0, 4, 4), (128, 64, 64, 0, 4, 4),
                (64, 64, 64, 0, 4, 3)],
        # two accumulators per D chunk: smaller tiles (a 128 x 128 x 32 tile needs 255 registers and
        # spills with the hard-negative rule's three coefficients on sm_90: benchmarks/triton_aot.py)
        "bwd": [(64, 128, 64, 0, 8, 3), (128, 64, 64, 0, 8, 3), (64, 64, 64, 0, 4, 3)],
        # a [BLOCK_N, BLOCK_D] (dW) or [BLOCK_M, BLOCK_D] (dx) accumulator lives across the whole loop;
        # a BLOCK_D below D recomputes the logits once per D chunk. (512-wide D chunks, and a 128 x 64 dW
        # tile with a 256-wide chunk, spill on sm_90 with hard negatives in bf16 / fp16:
        # benchmarks/triton_aot.py.)
        "bwd_dw": [(64, 64, 64, 256, 8, 3), (64, 128, 64, 128, 8, 3), (128, 64, 64, 128, 8, 2),
                   (64, 64, 32, 256, 8, 3)],
        "bwd_dx": [(64, 64, 64, 256, 8, 3), (128, 64, 64, 128, 8, 3), (64, 128, 64, 256, 8, 2),
                   (64, 64, 32, 256, 8, 3)],
    }[kind]
    if subcenters:
        # The running max and arg-max (and in the backward the gradient tile)
        # live across the K GEMM tiles: tiles small enough for the registers
        # (the ones above spill on sm_90 with K = 3; benchmarks/triton_aot.py).
        shapes = {"fwd": [(64, 128, 64, 0, 8, 3), (128, 64, 64, 0, 8, 3), (64, 64, 64, 0, 4, 3)],
                  "bwd": [(64, 64, 64, 0, 8, 3), (64, 64, 32, 0, 8, 3)]}[kind]
    configs = []
    for m, n, k, d, w, st in shapes:
        meta = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}
        if d:
            meta["BLOCK_D"] = d
        configs.append(triton.Config(meta, num_warps=w, num_stages=st))
    return configs


def _with_subcenter_configs(kind: str, interpret: bool = INTERPRET) -> dict:
    """autotune() arguments of a kernel that takes SUBCENTERS: both candidate
    lists, pruned to the one the launch needs, and SUBCENTERS in the key."""
    plain = _configs(kind, interpret)
    if interpret:
        return dict(configs=plain, key=AUTOTUNE_KEY + ["SUBCENTERS"])
    sub = _configs(kind, interpret, subcenters=True)

    def prune(configs, named_args, **kwargs):
        wanted = sub if kwargs.get("SUBCENTERS", 1) > 1 else plain
        return [c for c in configs if any(c is w for w in wanted)]

    return dict(configs=plain + sub, key=AUTOTUNE_KEY + ["SUBCENTERS"], prune_configs_by={"early_config_prune": prune})


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a . b accumulated in fp32; full-precision fp32 products when IEEE."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _offsets(rows, stride, ks):
    """int64 offsets of the elements (rows[i], ks[k]) of a matrix whose rows are
    ``stride`` apart: the row index is widened before the multiply."""
    return rows.to(tl.int64)[:, None] * stride + ks[None, :]


@triton.jit
def _fp16_scale(e, AXIS: tl.constexpr):
    """A power-of-two scale per row (AXIS=1) or per column (AXIS=0) of e that
    brings its largest |value| to at most 2^14, so that the cast to an fp16
    operand cannot overflow: e = g s p / ||w|| passes fp16's 65,504 under a
    loss scale (GradScaler's g = 2^16 times s = 64) or a small-norm class row,
    and one such entry must not turn the tile into inf. Powers of two: scaling
    and unscaling are exact."""
    amax = tl.max(tl.abs(e), axis=AXIS)
    return tl.exp2(-tl.ceil(tl.log2(tl.maximum(amax / FP16_MAX_OPERAND, 1.0))))


@triton.jit
def _grad_operands(e, blk, UPCAST: tl.constexpr):
    """The fp32 gradient tile e and a loaded block as operands of one dtype: the
    block's (tensor cores), or fp32 when upcasting."""
    if UPCAST:
        return e, blk.to(tl.float32)
    else:
        return e.to(blk.dtype), blk


@triton.jit
def _grad_dx(e, w_blk, UPCAST: tl.constexpr, IEEE: tl.constexpr, SCALE: tl.constexpr):
    """e . W_blk in fp32; with SCALE (fp16 operands) e's rows are scaled first."""
    if SCALE:
        scale = _fp16_scale(e, 1)
        a, b = _grad_operands(e * scale[:, None], w_blk, UPCAST)
        return _dot(a, b, IEEE) / scale[:, None]
    else:
        a, b = _grad_operands(e, w_blk, UPCAST)
        return _dot(a, b, IEEE)


@triton.jit
def _grad_dw(e, x_blk, UPCAST: tl.constexpr, IEEE: tl.constexpr, SCALE: tl.constexpr):
    """e^T . x_blk in fp32; with SCALE (fp16 operands) e's columns are scaled first."""
    if SCALE:
        scale = _fp16_scale(e, 0)
        a, b = _grad_operands(e * scale[None, :], x_blk, UPCAST)
        return _dot(tl.trans(a), b, IEEE) / scale[:, None]
    else:
        a, b = _grad_operands(e, x_blk, UPCAST)
        return _dot(tl.trans(a), b, IEEE)


@triton.jit
def _logits_tile(X, W, rows, w_rows, D, stride_x, stride_w,
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
        a = tl.load(X + _offsets(rows, stride_x, ks), mask=k_ok, other=0.0)
        b = tl.load(W + _offsets(w_rows, stride_w, ks), mask=k_ok, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        else:
            a = a.to(b.dtype)
        acc += _dot(a, tl.trans(b), IEEE)
    return acc


@triton.jit
def _tile_rows(pid_m, B, BLOCK_M: tl.constexpr):
    """Rows of row tile pid_m, their validity, and the rows loads read (clamped
    to the last row so that loads need no row mask)."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    return rows, rows < B, tl.minimum(rows, B - 1)


@triton.jit
def _split_tiles(pid_s, n_splits, C, BLOCK_N: tl.constexpr):
    """[first, end) of the class tiles that class split pid_s sweeps."""
    tiles = tl.cdiv(C, BLOCK_N)
    per_split = tl.cdiv(tiles, n_splits)
    return pid_s * per_split, tl.minimum((pid_s + 1) * per_split, tiles)


@triton.jit
def _tile_columns(pid_n, C, BLOCK_N: tl.constexpr):
    """Classes of class tile pid_n and their validity."""
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return cols, cols < C


@triton.jit
def _subcenter_rows(cols, C, CLASS_INDEX, k, SUBCENTERS: tl.constexpr, HAS_INDEX: tl.constexpr):
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
def _class_cosines(X, W, W_INV, CLASS_INDEX, safe_rows, cols, col_ok, C, D, stride_x, stride_w,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_INDEX: tl.constexpr,
                   SUBCENTERS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """A tile's cosines: the max over each class's SUBCENTERS rows of
    logits / ||w||, and the arg-max sub-center (the first of ties; 0 without
    sub-centers). One GEMM tile per sub-center, never a B x C x K tensor."""
    best = tl.full((BLOCK_M, BLOCK_N), float("-inf"), dtype=tl.float32)
    arg = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in tl.static_range(SUBCENTERS):
        local, w_rows = _subcenter_rows(cols, C, CLASS_INDEX, k, SUBCENTERS, HAS_INDEX)
        acc = _logits_tile(X, W, safe_rows, w_rows, D, stride_x, stride_w, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE)
        c = acc * tl.load(W_INV + local, mask=col_ok, other=0.0)[None, :]
        if k == 0:
            best = c
        else:
            arg = tl.where(c > best, k, arg)
            best = tl.maximum(best, c)
    return best, arg


@triton.jit
def _hard_rule(rows, row_ok, HARD, B):
    """A row's hard-negative rule from HARD [4, B]: (threshold, a, b, d) of
    m(c) = (a c + b) c + d above the threshold; a masked row is never hard."""
    threshold = tl.load(HARD + rows, mask=row_ok, other=float("inf"))
    a = tl.load(HARD + B + rows, mask=row_ok, other=0.0)
    b = tl.load(HARD + 2 * B + rows, mask=row_ok, other=1.0)
    d = tl.load(HARD + 3 * B + rows, mask=row_ok, other=0.0)
    return threshold[:, None], a[:, None], b[:, None], d[:, None]


@triton.jit
def _grad_tile(c, rows, row_ok, cols, col_ok, LABELS, LSE, GRAD, HARD, B, scale, HAS_HARD: tl.constexpr):
    """From a tile's cosines: d loss / d c = g s p (times m'(c) = 2 a c + b at
    hard negatives); zero at the target columns (their share is added outside the
    kernels) and outside the valid rows and columns."""
    label = tl.load(LABELS + rows, mask=row_ok, other=-1)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    coef = tl.load(GRAD + rows, mask=row_ok, other=0.0) * scale
    if HAS_HARD:
        threshold, a, b, d = _hard_rule(rows, row_ok, HARD, B)
        hard = c > threshold
        p = tl.exp(tl.where(hard, (a * c + b) * c + d, c) * scale - lse[:, None])
        e = coef[:, None] * p * tl.where(hard, 2.0 * a * c + b, 1.0)
    else:
        e = coef[:, None] * tl.exp(c * scale - lse[:, None])
    keep = row_ok[:, None] & col_ok[None, :] & (cols[None, :] != label[:, None])
    return tl.where(keep, e, 0.0)


@triton.jit
def _row_grad(e, arg, local, col_ok, W_INV, k, SUBCENTERS: tl.constexpr):
    """The share of sub-center k (rows ``local``) of a gradient tile e = dL/dc:
    e where k is the arg-max, divided by ||w|| (so that e . W and e^T . x_hat
    are the gradients w.r.t. x_hat and w_hat / ||w||)."""
    inv = tl.load(W_INV + local, mask=col_ok, other=0.0)
    if SUBCENTERS == 1:
        return e * inv[None, :]
    else:
        return tl.where(arg == k, e, 0.0) * inv[None, :]


@triton.autotune(**_with_subcenter_configs("fwd"))
@triton.jit
def lse_forward_kernel(
    X, W, W_INV, LABELS, TARGET, CLASS_INDEX, HARD, PART_MAX, PART_SUM,
    B, C, D, stride_x, stride_w, scale, B_BUCKET, C_BUCKET,
    HAS_INDEX: tl.constexpr, HAS_HARD: tl.constexpr, SUBCENTERS: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (row tile, class split): running max / sum-exp of its class tiles
    (HAS_HARD: hard negatives modulated; SUBCENTERS: each
    class's cosine the max over its sub-centers), written as one partial per
    (split, row); the host combines splits."""
    pid_s = tl.program_id(1)
    rows, row_ok, safe_rows = _tile_rows(tl.program_id(0), B, BLOCK_M)
    label = tl.load(LABELS + rows, mask=row_ok, other=-1)
    target = tl.load(TARGET + rows, mask=row_ok, other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    first, end = _split_tiles(pid_s, tl.num_programs(1), C, BLOCK_N)
    for t in range(first, end):
        cols, col_ok = _tile_columns(t, C, BLOCK_N)
        c, _ = _class_cosines(X, W, W_INV, CLASS_INDEX, safe_rows, cols, col_ok, C, D, stride_x, stride_w,
                              BLOCK_M, BLOCK_N, BLOCK_K, HAS_INDEX, SUBCENTERS, UPCAST, IEEE)
        if HAS_HARD:
            threshold, a, b, d = _hard_rule(rows, row_ok, HARD, B)
            c = tl.where(c > threshold, (a * c + b) * c + d, c)
        z = tl.where(cols[None, :] == label[:, None], target[:, None], c * scale)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
    part = pid_s.to(tl.int64) * B + rows
    tl.store(PART_MAX + part, m_i, mask=row_ok)
    tl.store(PART_SUM + part, l_i, mask=row_ok)


# DW is this launch's own scratch; DX gathers every class chunk's share, so
# tuning trials must leave it as they found it.
@triton.autotune(**_with_subcenter_configs("bwd"), reset_to_zero=["DW"], restore_value=["DX"])
@triton.jit
def lse_backward_kernel(
    X, W, W_INV, LABELS, LSE, GRAD, CLASS_INDEX, HARD, DX, DW,
    B, C, D, stride_x, stride_w, scale, B_BUCKET, C_BUCKET,
    HAS_INDEX: tl.constexpr, HAS_HARD: tl.constexpr, SUBCENTERS: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, SCALE: tl.constexpr, WITH_DW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (class tile, row tile): recompute the cosines, form e = dL/dc
    (``_grad_tile``), then for each sub-center (one without them) add its
    share (``_row_grad``) e_k . W_k into dx and (WITH_DW) e_k^T . x_hat into
    its dW rows (both fp32, through atomics, D chunk by chunk)."""
    rows, row_ok, safe_rows = _tile_rows(tl.program_id(1), B, BLOCK_M)
    cols, col_ok = _tile_columns(tl.program_id(0), C, BLOCK_N)
    c, arg = _class_cosines(X, W, W_INV, CLASS_INDEX, safe_rows, cols, col_ok, C, D, stride_x, stride_w,
                            BLOCK_M, BLOCK_N, BLOCK_K, HAS_INDEX, SUBCENTERS, UPCAST, IEEE)
    e = _grad_tile(c, rows, row_ok, cols, col_ok, LABELS, LSE, GRAD, HARD, B, scale, HAS_HARD)
    for k in tl.static_range(SUBCENTERS):
        local, w_rows = _subcenter_rows(cols, C, CLASS_INDEX, k, SUBCENTERS, HAS_INDEX)
        e_k = _row_grad(e, arg, local, col_ok, W_INV, k, SUBCENTERS)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            w_blk = tl.load(W + _offsets(w_rows, stride_w, ks), mask=k_ok[None, :], other=0.0)
            dx = _grad_dx(e_k, w_blk, UPCAST, IEEE, SCALE)
            # gradient sums need no memory ordering: relaxed, not the default acq_rel
            tl.atomic_add(DX + _offsets(rows, D, ks), dx, mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
            if WITH_DW:
                x_blk = tl.load(X + _offsets(safe_rows, stride_x, ks), mask=k_ok[None, :], other=0.0)
                dw = _grad_dw(e_k, x_blk, UPCAST, IEEE, SCALE)
                tl.atomic_add(DW + _offsets(local, D, ks), dw, mask=col_ok[:, None] & k_ok[None, :], sem="relaxed")


@triton.autotune(configs=_configs("bwd_dw"), key=AUTOTUNE_KEY)
@triton.jit
def lse_backward_dw_kernel(
    X, W, W_INV, LABELS, LSE, GRAD, CLASS_INDEX, HARD, DW,
    B, C, D, stride_x, stride_w, scale, B_BUCKET, C_BUCKET,
    HAS_INDEX: tl.constexpr, HAS_HARD: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Split backward, dW half. Program (class tile, D chunk): sweep every row
    tile, recompute the logits, and accumulate e^T . x_hat for its D chunk in
    registers; one plain store at the end (no atomics: it owns those rows of dW).
    Without sub-centers (they would need one accumulator each)."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols, col_ok = _tile_columns(pid_n, C, BLOCK_N)
    local, w_rows = _subcenter_rows(cols, C, CLASS_INDEX, 0, 1, HAS_INDEX)
    inv = tl.load(W_INV + local, mask=col_ok, other=0.0)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    dw = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for pid_m in range(0, tl.cdiv(B, BLOCK_M)):
        rows, row_ok, safe_rows = _tile_rows(pid_m, B, BLOCK_M)
        acc = _logits_tile(X, W, safe_rows, w_rows, D, stride_x, stride_w, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE)
        c = acc * inv[None, :]
        e = _grad_tile(c, rows, row_ok, cols, col_ok, LABELS, LSE, GRAD, HARD, B, scale, HAS_HARD) * inv[None, :]
        x_blk = tl.load(X + _offsets(safe_rows, stride_x, ds), mask=d_ok[None, :], other=0.0)
        dw += _grad_dw(e, x_blk, UPCAST, IEEE, SCALE)
    tl.store(DW + _offsets(cols, D, ds), dw, mask=col_ok[:, None] & d_ok[None, :])


@triton.autotune(configs=_configs("bwd_dx"), key=AUTOTUNE_KEY, reset_to_zero=["DX"])
@triton.jit
def lse_backward_dx_kernel(
    X, W, W_INV, LABELS, LSE, GRAD, CLASS_INDEX, HARD, DX,
    B, C, D, stride_x, stride_w, scale, B_BUCKET, C_BUCKET,
    HAS_INDEX: tl.constexpr, HAS_HARD: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Split backward, dx half. Program (row tile, class split, D chunk): sweep
    the split's class tiles, recompute the logits, accumulate e . W for its D
    chunk in registers; one fp32 atomic add per split at the end (splits x B x D
    in all, against (C / BLOCK_N) x B x D for the atomic backward). Without
    sub-centers, as the dW half."""
    rows, row_ok, safe_rows = _tile_rows(tl.program_id(0), B, BLOCK_M)
    ds = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    dx = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    first, end = _split_tiles(tl.program_id(1), tl.num_programs(1), C, BLOCK_N)
    for t in range(first, end):
        cols, col_ok = _tile_columns(t, C, BLOCK_N)
        local, w_rows = _subcenter_rows(cols, C, CLASS_INDEX, 0, 1, HAS_INDEX)
        inv = tl.load(W_INV + local, mask=col_ok, other=0.0)
        acc = _logits_tile(X, W, safe_rows, w_rows, D, stride_x, stride_w, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE)
        c = acc * inv[None, :]
        e = _grad_tile(c, rows, row_ok, cols, col_ok, LABELS, LSE, GRAD, HARD, B, scale, HAS_HARD) * inv[None, :]
        w_blk = tl.load(W + _offsets(w_rows, stride_w, ds), mask=d_ok[None, :], other=0.0)
        dx += _grad_dx(e, w_blk, UPCAST, IEEE, SCALE)
    tl.atomic_add(DX + _offsets(rows, D, ds), dx, mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")


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
        v = tl.load(W + _offsets(w_rows, stride_w, ks), mask=ok[:, None] & (ks < D)[None, :], other=0.0)
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
