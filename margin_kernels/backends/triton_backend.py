"""The Triton backend: the kernel interface of docs/DESIGN.md §4 on CUDA tensors
(and on CPU tensors under ``TRITON_INTERPRET=1``, which is how CI tests it).

Each function takes an optional ``class_index`` (int64 [K]): the kernels then read
the rows W[class_index] in place and every per-class output (w_inv, dW) has K
rows; ``labels_local`` then counts positions in the index. PartialFC's sampled
negatives use it.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch import Tensor

try:
    import triton

    from . import triton_kernels as K
except ImportError as exc:  # triton missing or broken
    triton = None
    _IMPORT_ERROR = str(exc)

from ..margins import NORM_EPS

# Class splits per row tile in the forward (and the split backward's dx), so that
# few row tiles still fill the GPU.
FORWARD_PROGRAMS = 1024


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


def device_guard(device: torch.device):
    """Launch on ``device``: Triton launches on the current CUDA device, which
    need not be the tensors' (a PartialFC shard on cuda:1 without set_device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _upcast(weight: Tensor) -> bool:
    """bf16 operands upcast to fp32: only under the interpreter, whose bf16 dot is wrong."""
    return K.INTERPRET and weight.dtype == torch.bfloat16


def _flags(weight: Tensor, class_index: Tensor | None, hard: Tensor | None, options) -> dict:
    # float32 inputs: full-precision fp32 dots (the 1e-5 contract) unless options.tf32
    return dict(
        HAS_INDEX=class_index is not None,
        HAS_HARD=hard is not None,
        UPCAST=_upcast(weight),
        IEEE=weight.dtype == torch.float32 and not options.tf32,
    )


def _grad_flags(weight: Tensor, class_index: Tensor | None, hard: Tensor | None, options) -> dict:
    # fp16 gradient operands are scaled per row / column to stay below fp16's max
    return dict(_flags(weight, class_index, hard, options), SCALE=weight.dtype == torch.float16)


def _sizes(b: int, c: int, d: int, stride_x: int, stride_w: int, s: float) -> tuple:
    """The kernels' size arguments, with the bucketed B and C of the autotune key."""
    return b, c, d, stride_x, stride_w, float(s), K.autotune_bucket(b), K.autotune_bucket(c)


def _operand(x_hat: Tensor, weight: Tensor) -> Tensor:
    """x_hat in the dtype of the tensor-core operands (fp32 kept when upcasting)."""
    return x_hat if _upcast(weight) else x_hat.to(weight.dtype).contiguous()


def _num_rows(weight: Tensor, class_index: Tensor | None) -> int:
    return weight.shape[0] if class_index is None else class_index.shape[0]


def _index_arg(weight: Tensor, class_index: Tensor | None) -> Tensor:
    return class_index if class_index is not None else weight  # unused pointer when HAS_INDEX is False


def _hard_arg(x_hat: Tensor, hard: Tensor | None) -> Tensor:
    return hard if hard is not None else x_hat  # unused pointer when HAS_HARD is False


# ---------------------------------------------------------------- launch grids
# CUDA allows 2^31 - 1 programs on grid axis 0 and 65,535 on axes 1 and 2: the
# axes that grow with C (class tiles, class rows) are always axis 0.

def norm_grid(c: int, block_r: int = 64) -> tuple[int]:
    return (triton.cdiv(c, block_r),)


def project_grid(c: int) -> tuple[int]:
    return (c,)


def forward_splits(b: int, c: int, workspace_bytes: int) -> int:
    """Class splits per row tile in the forward: enough programs to fill the GPU,
    at most one per class tile, and B x splits partials within the workspace."""
    min_block_m, min_block_n = 64, 64
    splits = max(1, min(triton.cdiv(FORWARD_PROGRAMS, triton.cdiv(b, min_block_m)), triton.cdiv(c, min_block_n)))
    return max(1, min(splits, workspace_bytes // max(8 * b, 1)))


def forward_grid(b: int, splits: int, meta: dict) -> tuple[int, int]:
    return triton.cdiv(b, meta["BLOCK_M"]), splits


# CUDA's limit on grid axes 1 and 2 (axis 0 takes up to 2**31 - 1).
MAX_GRID_YZ = 65_535


def atomic_grid(b: int, c: int, meta: dict) -> tuple[int, int]:
    """The atomic backward's grid: (row tiles x G, class tiles / G). Programs
    run in launch order (axis 0 fastest) and ``_atomic_tile`` maps them so
    that every row tile of a class tile comes before the next class tile:
    programs resident together add into distinct dx row tiles (class tiles
    fastest would pile every resident program's dx atomics onto one B_M x D
    slice). G consecutive class tiles share an axis-1 step, so that axis 1
    stays within CUDA's 65535 at any C."""
    tiles = triton.cdiv(c, meta["BLOCK_N"])
    group = triton.cdiv(tiles, MAX_GRID_YZ)
    return triton.cdiv(b, meta["BLOCK_M"]) * group, triton.cdiv(tiles, group)


def dw_grid(c: int, d: int, meta: dict) -> tuple[int, int]:
    return triton.cdiv(c, meta["BLOCK_N"]), triton.cdiv(d, meta["BLOCK_D"])


def dx_grid(b: int, c: int, d: int, meta: dict, deterministic: bool = False) -> tuple[int, int, int]:
    """(row tiles, class splits, D chunks) of the split backward's dx kernel:
    enough class splits to fill the GPU, each an fp32 atomic add of its partial;
    one split when ``deterministic`` (each dx entry then gets one add onto 0)."""
    tiles = triton.cdiv(b, meta["BLOCK_M"]) * triton.cdiv(d, meta["BLOCK_D"])
    splits = max(1, min(triton.cdiv(FORWARD_PROGRAMS, tiles), triton.cdiv(c, meta["BLOCK_N"])))
    return triton.cdiv(b, meta["BLOCK_M"]), 1 if deterministic else splits, triton.cdiv(d, meta["BLOCK_D"])


NON_DETERMINISTIC = ("backend='triton' with sub-centers adds dx and dW through float atomics, whose sum depends "
                     "on scheduling, and has no deterministic implementation; torch.use_deterministic_algorithms("
                     "True) is set. Use backend='cpp' (deterministic), or turn the setting off")


def backward_strategy(options, subcenters: int) -> tuple[str, bool]:
    """(the backward to run, whether it must be deterministic). Under
    ``torch.use_deterministic_algorithms(True)``: the split backward with one
    class split for dx (no sum whose order depends on scheduling), and
    sub-centers, which only the atomic backward takes, raise as PyTorch's own
    non-deterministic operations do (or warn, with ``warn_only=True``)."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    if subcenters > 1:
        if deterministic:
            if not torch.is_deterministic_algorithms_warn_only_enabled():
                raise RuntimeError(NON_DETERMINISTIC)
            warnings.warn(NON_DETERMINISTIC)
        return "atomic", False
    return ("split", True) if deterministic else (options.triton_backward, False)


# ---------------------------------------------------------------- the contract

def row_inv_norms(weight: Tensor, *, class_index: Tensor | None = None) -> Tensor:
    _check(weight)
    c, d = _num_rows(weight, class_index), weight.shape[1]
    out = torch.empty(c, dtype=torch.float32, device=weight.device)
    if c == 0:
        return out
    with device_guard(weight.device):
        K.row_inv_norm_kernel[norm_grid(c)](
            weight, _index_arg(weight, class_index), out, c, d, weight.stride(0), NORM_EPS,
            HAS_INDEX=class_index is not None, BLOCK_R=64, BLOCK_K=64,
        )
    return out


def lse_forward(x_hat, weight, w_inv, labels_local, target_logit, *, scale, options, class_index=None, hard=None,
                subcenters=1):
    """Per-row logsumexp over the (indexed) classes; scratch is B x splits floats."""
    _check(x_hat, weight)
    b, d = x_hat.shape
    c = _num_rows(weight, class_index) // subcenters
    if b == 0:
        return torch.empty(0, dtype=torch.float32, device=x_hat.device)
    splits = forward_splits(b, c, options.workspace_bytes)
    part_max = torch.empty(splits, b, dtype=torch.float32, device=x_hat.device)
    part_sum = torch.empty_like(part_max)
    with device_guard(x_hat.device):
        K.lse_forward_kernel[lambda meta: forward_grid(b, splits, meta)](
            _operand(x_hat, weight), weight, w_inv, labels_local, target_logit, _index_arg(weight, class_index),
            _hard_arg(x_hat, hard), part_max, part_sum, *_sizes(b, c, d, x_hat.shape[1], weight.stride(0), scale),
            **_flags(weight, class_index, hard, options), SUBCENTERS=subcenters,
        )
    # Splits that got no class tile hold (-inf, 0): log(0) = -inf drops out.
    return torch.logsumexp(part_max + part_sum.log(), dim=0)


def has_single_pass(weight: Tensor) -> bool:
    """No single-pass shortcut here: its recompute-free sweep re-reads dW once per
    row chunk, which on a GPU loses to the class-tiled kernels."""
    return False


def chunk_classes(c: int, d: int, weight_dtype: torch.dtype, workspace_bytes: int) -> int:
    """Classes per backward launch. fp32 weights accumulate straight into dW (one
    launch); bf16/fp16 weights accumulate in an fp32 scratch of at most
    ``workspace_bytes`` (at least one 256-class tile row), projected and cast
    into dW chunk by chunk, so no fp32 copy of the whole [C, D] exists."""
    if weight_dtype == torch.float32:
        return max(c, 1)
    return max(256, workspace_bytes // (4 * max(d, 1)))


def add_target_rows(acc: Tensor, start: int, n: int, target_rows: Tensor | None, target_dw: Tensor | None) -> None:
    """Add the target columns' dW share of the rows [start, start + n) into
    the fp32 accumulator ``acc`` (before it is projected and rounded); rows
    outside add zeros, so there is no host sync."""
    if target_rows is None or target_rows.numel() == 0:
        return
    local = target_rows - start
    inside = ((local >= 0) & (local < n)).float()[:, None]
    acc.index_add_(0, local.clamp(0, n - 1), target_dw.float() * inside)


def lse_backward(x_hat, weight, w_inv, labels_local, lse, grad_rows, *, scale, options, class_index=None, hard=None,
                 subcenters=1, weight_grad=True, target_rows=None, target_dw=None):
    """(dx_hat fp32 [B, D], dW in weight's dtype with a row per row the shard
    reads (C, the index's length, times the sub-centers), or None without
    ``weight_grad``; ``target_dw`` added to rows ``target_rows`` in fp32), by
    ``options.triton_backward`` (``backward_strategy``): "atomic" (one kernel,
    fp32 atomics into dx and dW) or "split" (a dW kernel without atomics and a
    dx kernel).

    The cost of each: the atomic backward recomputes the logits once and forms
    both gradients, 6 B D C FLOPs. The split kernels each recompute the logits
    once per D chunk of BLOCK_D (the accumulator of a whole 512-wide row spills
    on sm_90), (4 ceil(D / BLOCK_D) + 4) B D C in all: at D = 512, 6 B D C more
    than the atomic one with 256-wide chunks, 14 B D C more with 128-wide ones.
    Which wins is a matter of atomic throughput against those FLOPs."""
    _check(x_hat, weight)
    S = subcenters
    strategy, deterministic = backward_strategy(options, S)
    b, d = x_hat.shape
    c = _num_rows(weight, class_index) // S
    dx = torch.zeros(b, d, dtype=torch.float32, device=x_hat.device)
    dw = torch.empty(c * S, d, dtype=weight.dtype, device=weight.device) if weight_grad else None
    if c == 0 or b == 0:
        return dx, dw.zero_() if weight_grad else None
    x_op, g = _operand(x_hat, weight), grad_rows.float().contiguous()
    flags = _grad_flags(weight, class_index, hard, options)
    hard_arg = _hard_arg(x_hat, hard)
    step = chunk_classes(c, d * S, weight.dtype, options.workspace_bytes)
    scratch = None if weight.dtype == torch.float32 or not weight_grad else torch.empty(
        min(step, c) * S, d, dtype=torch.float32, device=weight.device)
    with device_guard(x_hat.device):
        if not weight_grad:  # a frozen weight: dx only, no dW products, no dW memory
            if strategy == "atomic":
                sizes = _sizes(b, c, d, x_hat.shape[1], weight.stride(0), scale)
                K.lse_backward_kernel[lambda meta: atomic_grid(b, c, meta)](
                    x_op, weight, w_inv, labels_local, lse, g, _index_arg(weight, class_index), hard_arg, dx,
                    dx.new_empty(1), *sizes, **flags, SUBCENTERS=S, WITH_DW=False)
                return dx, None
        if strategy == "split":
            sizes = _sizes(b, c, d, x_hat.shape[1], weight.stride(0), scale)
            K.lse_backward_dx_kernel[lambda meta: dx_grid(b, c, d, meta, deterministic)](
                x_op, weight, w_inv, labels_local, lse, g, _index_arg(weight, class_index), hard_arg, dx, *sizes,
                **flags,
            )
            if not weight_grad:
                return dx, None
        for c0 in range(0, c, step):
            c1 = min(c0 + step, c)
            # The chunk as a problem of its own: views of W (or of the index)
            # and w_inv, labels shifted so that only its own targets match.
            r0, r1 = c0 * S, c1 * S  # its rows
            w_part = weight if class_index is not None else weight[r0:r1]
            index_part = None if class_index is None else class_index[r0:r1]
            inv_part = w_inv[r0:r1]
            labels_part = labels_local - c0 if c0 else labels_local
            acc = dw[r0:r1] if scratch is None else scratch[: r1 - r0]
            args = (x_op, w_part, inv_part, labels_part, lse, g, _index_arg(w_part, index_part), hard_arg)
            sizes = _sizes(b, c1 - c0, d, x_hat.shape[1], weight.stride(0), scale)
            if strategy == "atomic":
                acc.zero_()
                K.lse_backward_kernel[lambda meta: atomic_grid(b, c1 - c0, meta)](*args, dx, acc, *sizes, **flags,
                                                                                   SUBCENTERS=S, WITH_DW=True)
            else:
                K.lse_backward_dw_kernel[lambda meta: dw_grid(c1 - c0, d, meta)](*args, acc, *sizes, **flags)
            add_target_rows(acc, r0, r1 - r0, target_rows, target_dw)  # (tangent: the projection keeps it)
            # dW = acc projected off w; in place for fp32, cast into dW otherwise
            K.project_rows_kernel[project_grid(r1 - r0)](
                acc, w_part, inv_part, _index_arg(w_part, index_part), dw[r0:r1], r1 - r0, d, weight.stride(0),
                HAS_INDEX=class_index is not None, BLOCK_D=triton.next_power_of_2(d),
            )
    return dx, dw
