"""The C++ backend (csrc/): ATen GEMMs on class blocks plus fused epilogues, in
C++ on the CPU and in CUDA kernels (csrc/cuda/) on GPUs where the extension was
built with CUDA."""
from __future__ import annotations

import torch
from torch import Tensor

try:
    from .. import _C
except ImportError as exc:  # the extension was not built
    _C = None
    _IMPORT_ERROR = str(exc)

from ..margins import NORM_EPS

FLOAT_BYTES = 4


def unavailable_reason() -> str | None:
    if _C is None:
        return f"margin_kernels._C is not built ({_IMPORT_ERROR}); run pip install --no-build-isolation -e ."
    return None


def runs_on_cuda() -> bool:
    """Whether this build of _C has the CUDA kernels."""
    return bool(_C.with_cuda)


def _check_device(t: Tensor) -> None:
    if t.device.type == "cpu" or (t.device.type == "cuda" and _C.with_cuda):
        return
    raise RuntimeError(
        f"backend='cpp' got a tensor on {t.device}, but this build of margin_kernels._C has "
        f"{'CUDA' if _C.with_cuda else 'no CUDA'} kernels (they are built only where torch has CUDA and nvcc "
        "is found). Use backend='triton' or 'reference' there."
    )


def block_classes(batch: int, dim: int, copies_rows: bool, workspace_bytes: int, subcenters: int = 1) -> int:
    """Classes per block so that the block's scratch fits the budget.

    Per weight row (``subcenters`` per class): a logits column of B floats,
    plus a float32 copy of the row and its gradient row when blocks are copied
    (weights not float32, or gathered through a class index).
    """
    per_class = subcenters * FLOAT_BYTES * (batch + (2 * dim if copies_rows else 0))
    return max(1, workspace_bytes // max(per_class, 1))


def _copies_rows(weight: Tensor, class_index: Tensor | None) -> bool:
    return class_index is not None or weight.dtype != torch.float32


def block_rows(num_classes: int, workspace_bytes: int) -> int:
    """Rows per chunk of the row-chunked sweep: a chunk holds rows x C logits
    (C counting weight rows: K per class with sub-centers)."""
    return max(1, workspace_bytes // (FLOAT_BYTES * max(num_classes, 1)))


def row_inv_norms(weight: Tensor, *, class_index: Tensor | None = None) -> Tensor:
    _check_device(weight)
    inv = _C.row_inv_norms(weight.contiguous(), NORM_EPS)
    return inv if class_index is None else inv.index_select(0, class_index)


def lse_forward(x_hat, weight, w_inv, labels_local, target_logit, *, scale, options, class_index=None, hard=None,
                subcenters=1):
    _check_device(x_hat)
    # A gathered block is copied to float32 whatever the weight dtype: budget for it.
    k = block_classes(x_hat.shape[0], x_hat.shape[1], _copies_rows(weight, class_index), options.workspace_bytes,
                      subcenters)
    return _C.lse_forward(x_hat, weight, w_inv, labels_local, target_logit, float(scale), k, class_index, hard,
                          subcenters)


def lse_backward(x_hat, weight, w_inv, labels_local, lse, grad_rows, *, scale, options, class_index=None, hard=None,
                 subcenters=1, weight_grad=True, target_rows=None, target_dw=None):
    _check_device(x_hat)
    k = block_classes(x_hat.shape[0], x_hat.shape[1], _copies_rows(weight, class_index), options.workspace_bytes,
                      subcenters)
    dx, dw = _C.lse_backward(x_hat, weight, w_inv, labels_local, lse, grad_rows.float().contiguous(), float(scale), k,
                             class_index, hard, subcenters, weight_grad, target_rows,
                             None if target_dw is None else target_dw.float().contiguous())
    return dx, dw if weight_grad else None


# The shortcut re-reads and re-writes all of dW once per row chunk; below this
# many rows per chunk the class-blocked path's fourth GEMM is cheaper (measured
# on 2 cores, B=512 D=256: shortcut 178 vs 242 ms at C=50k, 387 vs 487 at 100k,
# but 880 vs 841 at 200k and 8.7 vs 4.2 s at 1M, with 64 MiB of workspace).
MIN_SINGLE_PASS_ROWS = 128


def has_single_pass(weight: Tensor) -> bool:
    """The row-chunked shortcut runs on float32 CPU weights."""
    return weight.dtype == torch.float32 and weight.device.type == "cpu"


def prefers_single_pass(weight: Tensor, batch: int, options) -> bool:
    """Whether the row-chunked shortcut beats the class-blocked path here."""
    return has_single_pass(weight) and block_rows(weight.shape[0], options.workspace_bytes) >= min(batch, MIN_SINGLE_PASS_ROWS)


def single_pass(x_hat, weight, w_inv, labels_local, target_logit, grad_rows, *, scale, options,
                           hard=None, subcenters=1):
    r = block_rows(weight.shape[0], options.workspace_bytes)
    return _C.single_pass(x_hat, weight, w_inv, labels_local, target_logit, grad_rows.float().contiguous(),
                                     float(scale), r, hard, subcenters)
