// Kernel interface of docs/DESIGN.md §4 for one class shard, plus the single-shard
// row-chunked shortcut. All per-row vectors are float32; x_hat is float32 and
// already normalized; W is the raw (unnormalized) class matrix of the shard.
#pragma once

#include <torch/extension.h>

#include <tuple>

// The interface, declared once for the CPU (namespace margin_kernels) and, in
// builds with CUDA, for CUDA tensors (margin_kernels::cuda, in csrc/cuda/).
#define MK_DECLARE_KERNEL_INTERFACE                                                          \
  /* 1 / max(||w_j||, eps) per row of `weight`, accumulated in float32. */                  \
  at::Tensor row_inv_norms(const at::Tensor& weight, double eps);                            \
                                                                                             \
  /* `class_index` (optional, int64 [K]): the shard's classes are the rows                   \
     weight[class_index]; per-class inputs (w_inv) and outputs (dW) then have K              \
     rows, and labels_local count positions in the index.                                    \
     `hard` (optional, float32 [4, B]: thresholds, then a, b, d): the hard-negative           \
     rule, a non-target cosine c > threshold[i] counts as (a[i] c + b[i]) c + d[i].          \
     `subcenters` (S >= 1): each class is S consecutive rows of `weight` (or of the          \
     index), its cosine the max over them; w_inv and dW count rows (S per class),            \
     labels_local and block_classes count classes, and a class's gradient goes to its       \
     arg-max row (the first of ties).                                                        \
     Sweeps class blocks of `block_classes` and returns the shard's logsumexp per            \
     row. Column `labels_local[i]` (when >= 0) takes `target_logit[i]` instead of            \
     s * cos. Never holds more than B x block_classes logits. */                             \
  at::Tensor lse_forward(const at::Tensor& x_hat, const at::Tensor& weight,                  \
                         const at::Tensor& w_inv, const at::Tensor& labels_local,            \
                         const at::Tensor& target_logit, double scale, int64_t block_classes, \
                         const c10::optional<at::Tensor>& class_index,                       \
                         const c10::optional<at::Tensor>& hard, int64_t subcenters);         \
                                                                                             \
  /* Recomputes each class block and returns (dx_hat float32 [B, D], dW [C, D] in            \
     weight's dtype), for row weights `grad_rows` and the global `lse`, without the          \
     target columns' share of dx (added by the caller, docs/DESIGN.md §1). Their share       \
     of dW, when given (`target_rows` int64 [B]: the shard row, -1 for none;                 \
     `target_dw` float32 [B, D]), is added to the block's float32 dW before it is            \
     rounded to the weight's dtype. Without `weight_grad` (a weight that needs no            \
     gradient) dW is [0, D] and its GEMM is skipped. */                                      \
  std::tuple<at::Tensor, at::Tensor> lse_backward(                                           \
      const at::Tensor& x_hat, const at::Tensor& weight, const at::Tensor& w_inv,            \
      const at::Tensor& labels_local, const at::Tensor& lse, const at::Tensor& grad_rows,    \
      double scale, int64_t block_classes, const c10::optional<at::Tensor>& class_index,     \
      const c10::optional<at::Tensor>& hard, int64_t subcenters, bool weight_grad,           \
      const c10::optional<at::Tensor>& target_rows, const c10::optional<at::Tensor>& target_dw);

namespace margin_kernels {

MK_DECLARE_KERNEL_INTERFACE

// Single-shard shortcut (CPU only): sweeps chunks of `block_rows` rows over all
// classes and returns (lse, dx_hat, dW) for row weights `grad_rows` in one pass
// of three GEMMs, without the target columns' share. float32 weights only;
// `hard` and `subcenters` as in lse_forward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> single_pass(
    const at::Tensor& x_hat, const at::Tensor& weight, const at::Tensor& w_inv,
    const at::Tensor& labels_local, const at::Tensor& target_logit,
    const at::Tensor& grad_rows, double scale, int64_t block_rows,
    const c10::optional<at::Tensor>& hard, int64_t subcenters);

#ifdef MK_WITH_CUDA
// cuBLAS blocks through ATen plus the epilogue kernels of csrc/cuda/epilogue.cu.
namespace cuda {
MK_DECLARE_KERNEL_INTERFACE
}  // namespace cuda
#endif

}  // namespace margin_kernels

#undef MK_DECLARE_KERNEL_INTERFACE
