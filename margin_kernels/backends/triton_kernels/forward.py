"""The forward pass: per row, the logsumexp of the margin logits over every
class, as partial (max, sum-exp) pairs per class split that the host combines.
The B x C logits exist one register tile at a time."""
from __future__ import annotations

import triton
import triton.language as tl

from .autotune import autotune_args
from .tiles import class_cosines, hard_rule, split_tiles, tile_columns, tile_rows

# Class splits per row tile, so that few row tiles still fill the GPU.
FORWARD_PROGRAMS = 1024


def forward_splits(b: int, c: int, workspace_bytes: int) -> int:
    """Class splits per row tile in the forward: enough programs to fill the GPU,
    at most one per class tile, and B x splits partials within the workspace."""
    min_block_m, min_block_n = 64, 64
    splits = max(1, min(triton.cdiv(FORWARD_PROGRAMS, triton.cdiv(b, min_block_m)), triton.cdiv(c, min_block_n)))
    return max(1, min(splits, workspace_bytes // max(8 * b, 1)))


def forward_grid(b: int, splits: int, meta: dict) -> tuple[int, int]:
    """(row tiles, class splits): row tiles on axis 0, splits (at most
    FORWARD_PROGRAMS) on axis 1."""
    return triton.cdiv(b, meta["BLOCK_M"]), splits


@triton.autotune(**autotune_args("fwd", subcenters=True))
@triton.jit
def lse_forward_kernel(
    X, W, W_INV, LABELS, CLASS_INDEX, HARD, TARGET, PART_MAX, PART_SUM,
    B, C, D, stride_x, stride_w, scale, B_BUCKET, C_BUCKET,
    HAS_INDEX: tl.constexpr, HAS_HARD: tl.constexpr, SUBCENTERS: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (row tile, class split): running max / sum-exp of its class tiles
    (HAS_HARD: hard negatives modulated; SUBCENTERS: each
    class's cosine the max over its sub-centers), written as one partial per
    (split, row); the host combines splits."""
    pid_s = tl.program_id(1)
    rows, row_ok, safe_rows = tile_rows(tl.program_id(0), B, BLOCK_M)
    label = tl.load(LABELS + rows, mask=row_ok, other=-1)
    target = tl.load(TARGET + rows, mask=row_ok, other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    first, end = split_tiles(pid_s, tl.num_programs(1), C, BLOCK_N)
    for t in range(first, end):
        cols, col_ok = tile_columns(t, C, BLOCK_N)
        c, _ = class_cosines(X, W, W_INV, CLASS_INDEX, safe_rows, cols, col_ok, C, D, stride_x, stride_w,
                              BLOCK_M, BLOCK_N, BLOCK_K, HAS_INDEX, SUBCENTERS, UPCAST, IEEE)
        if HAS_HARD:
            threshold, a, b, d = hard_rule(rows, row_ok, HARD, B)
            c = tl.where(c > threshold, (a * c + b) * c + d, c)
        z = tl.where(cols[None, :] == label[:, None], target[:, None], c * scale)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_i = m_new
    part = pid_s.to(tl.int64) * B + rows
    tl.store(PART_MAX + part, m_i, mask=row_ok)
    tl.store(PART_SUM + part, l_i, mask=row_ok)
