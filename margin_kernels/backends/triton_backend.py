"""The Triton backend: the kernel contract of DESIGN.md §2 on CUDA tensors (and on
CPU tensors under ``TRITON_INTERPRET=1``, which is how CI tests it).

Each function takes an optional ``class_index`` (int64 [K]): the kernels then read
the rows W[class_index] in place and every per-class output (w_inv, dW) has K
rows; ``labels_local`` then counts positions in the index. PartialFC's sampled
negatives use it.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton

    from . import triton_kernels as K
except ImportError as exc:  # triton missing or broken
    triton = None
    _IMPORT_ERROR = str(exc)

from ..reference import NORM_EPS

# float32 inputs: full-precision fp32 dots by default (the 1e-5 contract); set
# MARGIN_KERNELS_TF32=1 to trade ~3e-4 relative error for tensor-core speed.
ALLOW_TF32 = os.environ.get("MARGIN_KERNELS_TF32", "0") == "1"
# Class splits per row tile in the forward (and the split backward's dx), so that
# few row tiles still fill the GPU.
FORWARD_PROGRAMS = 1024
# How the backward accumulates: "atomic" (one kernel, fp32 atomics into dx and dW)
# or "split" (a dW kernel without atomics and a dx kernel, each recomputing the
# logits). Which wins is a matter of atomic throughput against 2 B D C more FLOPs.
BACKWARDS = ("atomic", "split")
BACKWARD = os.environ.get("MARGIN_KERNELS_TRITON_BACKWARD", "atomic")


def unavailable_reason() -> str | None:
    if triton is None:
        return f"triton is not importable ({_IMPORT_ERROR})"
    if not torch.cuda.is_available() and not K.INTERPRET:
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)"
    return None


def _check(*tensors: Tensor) -> None:
    for t in tensors:
        if t.device.type != "cuda" and not K.INTERPRET:
            raise RuntimeError(f"backend='triton' needs CUDA tensors, got one on {t.device}")


def _flags(weight: Tensor, class_index: Tensor | None) -> dict:
    return dict(
        HAS_INDEX=class_index is not None,
        UPCAST=K.INTERPRET,
        IEEE=weight.dtype == torch.float32 and not ALLOW_TF32,
    )


def _operand(x_hat: Tensor, weight: Tensor) -> Tensor:
    """x_hat in the dtype of the tensor-core operands (fp32 kept when interpreting)."""
    return x_hat if K.INTERPRET else x_hat.to(weight.dtype).contiguous()


def _num_classes(weight: Tensor, class_index: Tensor | None) -> int:
    return weight.shape[0] if class_index is None else class_index.shape[0]


def _index_arg(weight: Tensor, class_index: Tensor | None) -> Tensor:
    return class_index if class_index is not None else weight  # unused pointer when HAS_INDEX is False


def row_inv_norms(weight: Tensor, class_index: Tensor | None = None) -> Tensor:
    _check(weight)
    c, d = _num_classes(weight, class_index), weight.shape[1]
    out = torch.empty(c, dtype=torch.float32, device=weight.device)
    if c == 0:
        return out
    block_r = 64
    K.row_inv_norm_kernel[(triton.cdiv(c, block_r),)](
        weight, _index_arg(weight, class_index), out, c, d, weight.stride(0), NORM_EPS,
        HAS_INDEX=class_index is not None, BLOCK_R=block_r, BLOCK_K=64,
    )
    return out


def lse_forward(x_hat, weight, w_inv, labels_local, target_logit, s, workspace_bytes, class_index=None):
    """Per-row logsumexp over the (indexed) classes; scratch is B x splits floats."""
    _check(x_hat, weight)
    b, d = x_hat.shape
    c = _num_classes(weight, class_index)
    if b == 0:
        return torch.empty(0, dtype=torch.float32, device=x_hat.device)
    min_block_m, min_block_n = 64, 64
    row_tiles = triton.cdiv(b, min_block_m)
    splits = max(1, min(triton.cdiv(FORWARD_PROGRAMS, row_tiles), triton.cdiv(c, min_block_n)))
    splits = max(1, min(splits, workspace_bytes // max(8 * b, 1)))
    part_max = torch.empty(splits, b, dtype=torch.float32, device=x_hat.device)
    part_sum = torch.empty_like(part_max)
    grid = lambda meta: (triton.cdiv(b, meta["BLOCK_M"]), splits)  # noqa: E731
    K.lse_forward_kernel[grid](
        _operand(x_hat, weight), weight, w_inv, labels_local, target_logit, _index_arg(weight, class_index),
        part_max, part_sum, b, c, d, x_hat.shape[1], weight.stride(0), float(s), **_flags(weight, class_index),
    )
    # Splits that got no class tile hold (-inf, 0): log(0) = -inf drops out.
    return torch.logsumexp(part_max + part_sum.log(), dim=0)


def lse_backward(x_hat, weight, w_inv, labels_local, target_logit, target_slope, s, lse, grad_rows,
                 workspace_bytes, class_index=None):
    """(dx_hat fp32 [B, D], dW [C or K, D] in weight's dtype), by the strategy in
    ``BACKWARD`` (env MARGIN_KERNELS_TRITON_BACKWARD)."""
    if BACKWARD not in BACKWARDS:
        raise ValueError(f"MARGIN_KERNELS_TRITON_BACKWARD must be one of {BACKWARDS}, got {BACKWARD!r}")
    _check(x_hat, weight)
    b, d = x_hat.shape
    c = _num_classes(weight, class_index)
    dx = torch.zeros(b, d, dtype=torch.float32, device=x_hat.device)
    acc = (torch.zeros if BACKWARD == "atomic" else torch.empty)(c, d, dtype=torch.float32, device=x_hat.device)
    if b > 0 and c > 0:
        args = (_operand(x_hat, weight), weight, w_inv, labels_local, target_logit, target_slope, lse,
                grad_rows.float().contiguous(), _index_arg(weight, class_index))
        sizes = (b, c, d, x_hat.shape[1], weight.stride(0), float(s))
        flags = _flags(weight, class_index)
        if BACKWARD == "atomic":
            grid = lambda meta: (triton.cdiv(b, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_N"]))  # noqa: E731
            K.lse_backward_kernel[grid](*args, dx, acc, *sizes, **flags)
        else:
            grid_dw = lambda meta: (triton.cdiv(c, meta["BLOCK_N"]), triton.cdiv(d, meta["BLOCK_D"]))  # noqa: E731
            K.lse_backward_dw_kernel[grid_dw](*args, acc, *sizes, **flags)
            K.lse_backward_dx_kernel[_dx_grid(b, c, d)](*args, dx, *sizes, **flags)
    elif BACKWARD == "split":
        acc.zero_()
    # fp32 weights: project in place; others: one cast at the end (the fp32
    # accumulator is then extra C x D x 4 bytes).
    dw = acc if weight.dtype == torch.float32 else torch.empty(c, d, dtype=weight.dtype, device=weight.device)
    if c > 0:
        K.project_rows_kernel[(c,)](
            acc, weight, w_inv, _index_arg(weight, class_index), dw, c, d, weight.stride(0),
            HAS_INDEX=class_index is not None, BLOCK_D=triton.next_power_of_2(d),
        )
    return dx, dw


def _dx_grid(b: int, c: int, d: int):
    """(row tiles, class splits, D chunks) of the split backward's dx kernel:
    enough class splits to fill the GPU, each an fp32 atomic add of its partial."""

    def grid(meta):
        tiles = triton.cdiv(b, meta["BLOCK_M"]) * triton.cdiv(d, meta["BLOCK_D"])
        splits = max(1, min(triton.cdiv(FORWARD_PROGRAMS, tiles), triton.cdiv(c, meta["BLOCK_N"])))
        return triton.cdiv(b, meta["BLOCK_M"]), splits, triton.cdiv(d, meta["BLOCK_D"])

    return grid
