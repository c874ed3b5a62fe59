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
from dataclasses import dataclass, replace

import torch
from torch import Tensor

try:
    import triton

    from . import triton_kernels as K
except ImportError as exc:  # triton missing or broken
    triton = None
    _IMPORT_ERROR = str(exc)

from ..margins import NORM_EPS

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


def _index_arg(weight: Tensor, class_index: Tensor | None) -> Tensor:
    return class_index if class_index is not None else weight  # unused pointer when HAS_INDEX is False


@dataclass(frozen=True)
class Launch:
    """One call's arguments to the tiled kernels, built once: the operands
    every kernel reads first (X, W, W_INV, LABELS, CLASS_INDEX, HARD), the
    size arguments, and the variant flags, of which each kernel takes the ones
    in its autotune key (``K.VARIANT_KEYS``)."""

    x: Tensor  # x_hat as the tensor-core operand (fp32 kept when upcasting)
    weight: Tensor
    w_inv: Tensor
    labels: Tensor
    class_index: Tensor | None
    hard: Tensor | None
    classes: int
    scale: float
    subcenters: int
    ieee: bool  # float32 inputs: full-precision fp32 dots (the 1e-5 contract) unless options.tf32

    @classmethod
    def build(cls, x_hat: Tensor, weight: Tensor, w_inv: Tensor, labels: Tensor, *, scale: float, options,
              class_index: Tensor | None, hard: Tensor | None, subcenters: int) -> "Launch":
        x = x_hat if _upcast(weight) else x_hat.to(weight.dtype).contiguous()
        rows = weight.shape[0] if class_index is None else class_index.shape[0]
        return cls(x, weight, w_inv, labels, class_index, hard, rows // subcenters, float(scale), subcenters,
                   weight.dtype == torch.float32 and not options.tf32)

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def dim(self) -> int:
        return self.x.shape[1]

    def operands(self) -> tuple:
        """X, W, W_INV, LABELS, CLASS_INDEX, HARD (an unused pointer stands in
        for an absent index or rule: its flag is off)."""
        hard = self.hard if self.hard is not None else self.x
        return self.x, self.weight, self.w_inv, self.labels, _index_arg(self.weight, self.class_index), hard

    def sizes(self) -> tuple:
        """B, C, D, stride_x, stride_w, scale, and the bucketed B and C of the autotune key."""
        b, c = self.batch, self.classes
        return (b, c, self.dim, self.x.stride(0), self.weight.stride(0), self.scale, K.autotune_bucket(b),
                K.autotune_bucket(c))

    def flags(self, kind: str, **more) -> dict:
        """The variant flags kernel ``kind`` takes; fp16 gradient operands are
        scaled per row / column to stay below fp16's max (SCALE)."""
        every = dict(HAS_INDEX=self.class_index is not None, HAS_HARD=self.hard is not None,
                     SUBCENTERS=self.subcenters, UPCAST=_upcast(self.weight), IEEE=self.ieee,
                     SCALE=self.weight.dtype == torch.float16, **more)
        return {k: every[k] for k in K.VARIANT_KEYS[kind]}

    def classes_between(self, c0: int, c1: int) -> "Launch":
        """Classes [c0, c1) as a problem of their own: views of W (or of the
        index) and w_inv, labels shifted so that only their own targets match."""
        if (c0, c1) == (0, self.classes):
            return self
        r0, r1 = c0 * self.subcenters, c1 * self.subcenters
        indexed = self.class_index is not None
        return replace(self, weight=self.weight if indexed else self.weight[r0:r1],
                       class_index=self.class_index[r0:r1] if indexed else None, w_inv=self.w_inv[r0:r1],
                       labels=self.labels - c0 if c0 else self.labels, classes=c1 - c0)


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
    c, d = weight.shape[0] if class_index is None else class_index.shape[0], weight.shape[1]
    out = torch.empty(c, dtype=torch.float32, device=weight.device)
    if c == 0:
        return out
    with device_guard(weight.device):
        K.row_inv_norm_kernel[K.norm_grid(c)](
            weight, _index_arg(weight, class_index), out, c, d, weight.stride(0), NORM_EPS,
            HAS_INDEX=class_index is not None, BLOCK_R=64, BLOCK_K=64,
        )
    return out


def lse_forward(x_hat, weight, w_inv, labels_local, target_logit, *, scale, options, class_index=None, hard=None,
                subcenters=1):
    """Per-row logsumexp over the (indexed) classes; scratch is B x splits floats."""
    _check(x_hat, weight)
    if x_hat.shape[0] == 0:
        return torch.empty(0, dtype=torch.float32, device=x_hat.device)
    p = Launch.build(x_hat, weight, w_inv, labels_local, scale=scale, options=options, class_index=class_index,
                     hard=hard, subcenters=subcenters)
    b = p.batch
    splits = K.forward_splits(b, p.classes, options.workspace_bytes)
    part_max = torch.empty(splits, b, dtype=torch.float32, device=x_hat.device)
    part_sum = torch.empty_like(part_max)
    with device_guard(x_hat.device):
        K.lse_forward_kernel[lambda meta: K.forward_grid(b, splits, meta)](
            *p.operands(), target_logit, part_max, part_sum, *p.sizes(), **p.flags("fwd"))
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
    dx kernel; its cost: ``triton_kernels.split_backward``)."""
    _check(x_hat, weight)
    S = subcenters
    strategy, deterministic = backward_strategy(options, S)
    p = Launch.build(x_hat, weight, w_inv, labels_local, scale=scale, options=options, class_index=class_index,
                     hard=hard, subcenters=S)
    b, c, d = p.batch, p.classes, p.dim
    dx = torch.zeros(b, d, dtype=torch.float32, device=x_hat.device)
    dw = torch.empty(c * S, d, dtype=weight.dtype, device=weight.device) if weight_grad else None
    if c == 0 or b == 0:
        return dx, dw.zero_() if weight_grad else None
    g = grad_rows.float().contiguous()
    with device_guard(x_hat.device):
        if strategy == "split":
            K.lse_backward_dx_kernel[lambda meta: K.dx_grid(b, c, d, meta, deterministic)](
                *p.operands(), lse, g, dx, *p.sizes(), **p.flags("bwd_dx"))
        elif not weight_grad:  # a frozen weight: dx only, no dW products, no dW memory
            K.lse_backward_kernel[lambda meta: K.atomic_grid(b, c, meta)](
                *p.operands(), lse, g, dx, dx.new_empty(1), *p.sizes(), **p.flags("bwd", WITH_DW=False))
        if not weight_grad:
            return dx, None
        step = chunk_classes(c, d * S, weight.dtype, options.workspace_bytes)
        scratch = None if weight.dtype == torch.float32 else torch.empty(
            min(step, c) * S, d, dtype=torch.float32, device=weight.device)
        for c0 in range(0, c, step):
            c1 = min(c0 + step, c)
            part = p.classes_between(c0, c1)
            r0, r1 = c0 * S, c1 * S  # its rows
            acc = dw[r0:r1] if scratch is None else scratch[: r1 - r0]
            if strategy == "atomic":
                acc.zero_()
                K.lse_backward_kernel[lambda meta: K.atomic_grid(b, c1 - c0, meta)](
                    *part.operands(), lse, g, dx, acc, *part.sizes(), **part.flags("bwd", WITH_DW=True))
            else:
                K.lse_backward_dw_kernel[lambda meta: K.dw_grid(c1 - c0, d, meta)](
                    *part.operands(), lse, g, acc, *part.sizes(), **part.flags("bwd_dw"))
            add_target_rows(acc, r0, r1 - r0, target_rows, target_dw)  # (tangent: the projection keeps it)
            # dW = acc projected off w; in place for fp32, cast into dW otherwise
            K.project_rows_kernel[K.project_grid(r1 - r0)](
                acc, part.weight, part.w_inv, _index_arg(part.weight, part.class_index), dw[r0:r1], r1 - r0, d,
                weight.stride(0), HAS_INDEX=part.class_index is not None, BLOCK_D=triton.next_power_of_2(d),
            )
    return dx, dw
