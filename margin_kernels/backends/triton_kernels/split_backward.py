"""The split backward: a dW kernel that owns its class rows (no atomics) and
a dx kernel with one atomic add per class split, each recomputing the logits.
Deterministic with one class split for dx. Without sub-centers (they would
need one accumulator each).

The cost: each kernel recomputes the logits once per D chunk of BLOCK_D (the
accumulator of a whole 512-wide row spills on sm_90), (4 ceil(D / BLOCK_D) + 4)
B D C FLOPs in all against the atomic backward's 6 B D C: at D = 512, 6 B D C
more with 256-wide chunks, 14 B D C more with 128-wide ones. Which wins is a
matter of atomic throughput against those FLOPs."""
from __future__ import annotations

import triton
import triton.language as tl

from .autotune import autotune_args
from .forward import FORWARD_PROGRAMS
from .tiles import (grad_dw, grad_dx, grad_tile, logits_tile, offsets, operand_scale, split_tiles, subcenter_rows,
                    tile_columns, tile_rows)


def dw_grid(c: int, d: int, meta: dict) -> tuple[int, int]:
    """(class tiles, D chunks) of the dW kernel."""
    return triton.cdiv(c, meta["BLOCK_N"]), triton.cdiv(d, meta["BLOCK_D"])


def dx_grid(b: int, c: int, d: int, meta: dict, deterministic: bool = False) -> tuple[int, int, int]:
    """(row tiles, class splits, D chunks) of the dx kernel: enough class
    splits to fill the GPU, each an fp32 atomic add of its partial; one split
    when ``deterministic`` (each dx entry then gets one add onto 0)."""
    tiles = triton.cdiv(b, meta["BLOCK_M"]) * triton.cdiv(d, meta["BLOCK_D"])
    splits = max(1, min(triton.cdiv(FORWARD_PROGRAMS, tiles), triton.cdiv(c, meta["BLOCK_N"])))
    return triton.cdiv(b, meta["BLOCK_M"]), 1 if deterministic else splits, triton.cdiv(d, meta["BLOCK_D"])


@triton.autotune(**autotune_args("bwd_dw"))
@triton.jit
def lse_backward_dw_kernel(
    X, W, W_INV, LABELS, CLASS_INDEX, HARD, LSE, GRAD, DW,
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
    cols, col_ok = tile_columns(pid_n, C, BLOCK_N)
    local, w_rows = subcenter_rows(cols, C, CLASS_INDEX, 0, 1, HAS_INDEX)
    inv = tl.load(W_INV + local, mask=col_ok, other=0.0)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    dw = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for pid_m in range(0, tl.cdiv(B, BLOCK_M)):
        rows, row_ok, safe_rows = tile_rows(pid_m, B, BLOCK_M)
        acc = logits_tile(X, W, safe_rows, w_rows, D, stride_x, stride_w, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE)
        c = acc * inv[None, :]
        e = grad_tile(c, rows, row_ok, cols, col_ok, LABELS, LSE, GRAD, HARD, B, scale, HAS_HARD) * inv[None, :]
        x_blk = tl.load(X + offsets(safe_rows, stride_x, ds), mask=d_ok[None, :], other=0.0)
        dw += grad_dw(e, operand_scale(e, 0, SCALE), x_blk, UPCAST, IEEE, SCALE)
    tl.store(DW + offsets(cols, D, ds), dw, mask=col_ok[:, None] & d_ok[None, :])


@triton.autotune(**autotune_args("bwd_dx"), reset_to_zero=["DX"])
@triton.jit
def lse_backward_dx_kernel(
    X, W, W_INV, LABELS, CLASS_INDEX, HARD, LSE, GRAD, DX,
    B, C, D, stride_x, stride_w, scale, B_BUCKET, C_BUCKET,
    HAS_INDEX: tl.constexpr, HAS_HARD: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Split backward, dx half. Program (row tile, class split, D chunk): sweep
    the split's class tiles, recompute the logits, accumulate e . W for its D
    chunk in registers; one fp32 atomic add per split at the end (splits x B x D
    in all, against (C / BLOCK_N) x B x D for the atomic backward). Without
    sub-centers, as the dW half."""
    rows, row_ok, safe_rows = tile_rows(tl.program_id(0), B, BLOCK_M)
    ds = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    dx = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    first, end = split_tiles(tl.program_id(1), tl.num_programs(1), C, BLOCK_N)
    for t in range(first, end):
        cols, col_ok = tile_columns(t, C, BLOCK_N)
        local, w_rows = subcenter_rows(cols, C, CLASS_INDEX, 0, 1, HAS_INDEX)
        inv = tl.load(W_INV + local, mask=col_ok, other=0.0)
        acc = logits_tile(X, W, safe_rows, w_rows, D, stride_x, stride_w, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE)
        c = acc * inv[None, :]
        e = grad_tile(c, rows, row_ok, cols, col_ok, LABELS, LSE, GRAD, HARD, B, scale, HAS_HARD) * inv[None, :]
        w_blk = tl.load(W + offsets(w_rows, stride_w, ds), mask=d_ok[None, :], other=0.0)
        dx += grad_dx(e, operand_scale(e, 1, SCALE), w_blk, UPCAST, IEEE, SCALE)
    tl.atomic_add(DX + offsets(rows, D, ds), dx, mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
