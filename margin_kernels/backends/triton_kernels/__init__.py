"""Triton kernels of the margin loss, one file per pass:

- ``forward``: the fused forward (GEMM tile + margin + online logsumexp per
  class split);
- ``atomic_backward``: one kernel with fp32 atomics for dx and dW (recomputed
  tile -> dL/dc -> both products), the only one with sub-centers;
- ``split_backward``: a dW kernel without atomics and a dx kernel with one
  atomic add per class split, which recompute the logits once each;
- ``rows``: the row-norm and projection kernels;

built from ``tiles`` (the shared device functions), tuned by ``autotune``.

Every kernel reads class rows through an optional ``class_index`` so that a
sampled subset of W is used without copying it. With SUBCENTERS = K each class
is K consecutive rows (of W or of the index) and its cosine the max over them.
Under ``TRITON_INTERPRET=1`` (CPU tests) bf16 operands are upcast to fp32
before ``tl.dot`` (the interpreter's bf16 dot is wrong; its fp16 dot is right,
so fp16 runs as on a GPU) and a single configuration is used. Class tiles sit on
grid axis 0 (up to 2^31 - 1 programs), never on axes 1 and 2 (65,535).

The tiled kernels share their leading arguments (X, W, W_INV, LABELS,
CLASS_INDEX, HARD), their size arguments (B, C, D, stride_x, stride_w, scale,
B_BUCKET, C_BUCKET) and their variant flags: ``Launch`` in the backend builds
them once per call.
"""
from .atomic_backward import MAX_GRID_YZ, atomic_grid, lse_backward_kernel
from .autotune import INTERPRET, VARIANT_KEYS, autotune_bucket
from .forward import FORWARD_PROGRAMS, forward_grid, forward_splits, lse_forward_kernel
from .rows import norm_grid, project_grid, project_rows_kernel, row_inv_norm_kernel
from .split_backward import dw_grid, dx_grid, lse_backward_dw_kernel, lse_backward_dx_kernel

__all__ = [
    "INTERPRET", "VARIANT_KEYS", "autotune_bucket", "FORWARD_PROGRAMS", "MAX_GRID_YZ",
    "lse_forward_kernel", "lse_backward_kernel", "lse_backward_dw_kernel", "lse_backward_dx_kernel",
    "row_inv_norm_kernel", "project_rows_kernel",
    "forward_splits", "forward_grid", "atomic_grid", "dw_grid", "dx_grid", "norm_grid", "project_grid",
]
