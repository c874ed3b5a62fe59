"""The atomic backward: one kernel that recomputes each (row tile, class
tile) of logits once, forms dL/dc, and adds both products into dx and dW
through relaxed fp32 atomics. The only backward that takes sub-centers."""
from __future__ import annotations

import triton
import triton.language as tl

from .autotune import autotune_args
from .tiles import (class_cosines, grad_dw, grad_dx, grad_tile, offsets, operand_scale, row_grad, subcenter_rows,
                    tile_columns, tile_rows)

# CUDA's limit on grid axes 1 and 2 (axis 0 takes up to 2**31 - 1).
MAX_GRID_YZ = 65_535


def atomic_grid(b: int, c: int, meta: dict) -> tuple[int, int]:
    """The atomic backward's grid: (row tiles x G, class tiles / G). Programs
    run in launch order (axis 0 fastest) and ``atomic_tile`` maps them so
    that every row tile of a class tile comes before the next class tile:
    programs resident together add into distinct dx row tiles (class tiles
    fastest would pile every resident program's dx atomics onto one B_M x D
    slice). G consecutive class tiles share an axis-1 step, so that axis 1
    stays within CUDA's 65535 at any C."""
    tiles = triton.cdiv(c, meta["BLOCK_N"])
    group = triton.cdiv(tiles, MAX_GRID_YZ)
    return triton.cdiv(b, meta["BLOCK_M"]) * group, triton.cdiv(tiles, group)


@triton.jit
def atomic_tile(B, BLOCK_M: tl.constexpr):
    """(row tile, class tile) of this program of the atomic backward, whose
    grid is ``atomic_grid``'s: row tiles move fastest in launch order, so that
    programs running together add into distinct dx row tiles."""
    row_tiles = tl.cdiv(B, BLOCK_M)
    pid0 = tl.program_id(0)
    group = tl.num_programs(0) // row_tiles
    return pid0 % row_tiles, tl.program_id(1) * group + pid0 // row_tiles


# DW is this launch's own scratch; DX gathers every class chunk's share, so
# tuning trials must leave it as they found it.
@triton.autotune(**autotune_args("bwd", subcenters=True), reset_to_zero=["DW"], restore_value=["DX"])
@triton.jit
def lse_backward_kernel(
    X, W, W_INV, LABELS, CLASS_INDEX, HARD, LSE, GRAD, DX, DW,
    B, C, D, stride_x, stride_w, scale, B_BUCKET, C_BUCKET,
    HAS_INDEX: tl.constexpr, HAS_HARD: tl.constexpr, SUBCENTERS: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, SCALE: tl.constexpr, WITH_DW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (row tile, class tile) (``atomic_tile``): recompute the cosines, form e = dL/dc
    (``grad_tile``), then for each sub-center (one without them) add its
    share (``row_grad``) e_k . W_k into dx and (WITH_DW) e_k^T . x_hat into
    its dW rows (both fp32, through atomics, D chunk by chunk)."""
    pid_m, pid_n = atomic_tile(B, BLOCK_M)
    if pid_n < tl.cdiv(C, BLOCK_N):  # (the last group of class tiles may be partial)
        rows, row_ok, safe_rows = tile_rows(pid_m, B, BLOCK_M)
        cols, col_ok = tile_columns(pid_n, C, BLOCK_N)
        c, arg = class_cosines(X, W, W_INV, CLASS_INDEX, safe_rows, cols, col_ok, C, D, stride_x, stride_w,
                                BLOCK_M, BLOCK_N, BLOCK_K, HAS_INDEX, SUBCENTERS, UPCAST, IEEE)
        e = grad_tile(c, rows, row_ok, cols, col_ok, LABELS, LSE, GRAD, HARD, B, scale, HAS_HARD)
        for k in tl.static_range(SUBCENTERS):
            local, w_rows = subcenter_rows(cols, C, CLASS_INDEX, k, SUBCENTERS, HAS_INDEX)
            e_k = row_grad(e, arg, local, col_ok, W_INV, k, SUBCENTERS)
            scale_rows = operand_scale(e_k, 1, SCALE)
            scale_cols = operand_scale(e_k, 0, SCALE)
            for k0 in range(0, D, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < D
                w_blk = tl.load(W + offsets(w_rows, stride_w, ks), mask=k_ok[None, :], other=0.0)
                dx = grad_dx(e_k, scale_rows, w_blk, UPCAST, IEEE, SCALE)
                # gradient sums need no memory ordering: relaxed, not the default acq_rel
                tl.atomic_add(DX + offsets(rows, D, ks), dx, mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
                if WITH_DW:
                    x_blk = tl.load(X + offsets(safe_rows, stride_x, ks), mask=k_ok[None, :], other=0.0)
                    dw = grad_dw(e_k, scale_cols, x_blk, UPCAST, IEEE, SCALE)
                    tl.atomic_add(DW + offsets(local, D, ks), dw, mask=col_ok[:, None] & k_ok[None, :],
                                  sem="relaxed")
