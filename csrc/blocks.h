// Block helpers shared by the CPU and CUDA sweeps.
#pragma once

#include <torch/extension.h>

namespace margin_kernels {

// Rows of the shard: C, or K with a class index (S per class with sub-centers).
inline int64_t shard_rows(const at::Tensor& weight, const c10::optional<at::Tensor>& class_index) {
  return class_index.has_value() ? class_index->size(0) : weight.size(0);
}

// The shard's rows [start, start + n): a view of `weight`, or a copy of
// the rows weight[class_index[start:start+n]] (one block only) with an index.
inline at::Tensor class_block(const at::Tensor& weight, const c10::optional<at::Tensor>& class_index,
                              int64_t start, int64_t n) {
  return class_index.has_value() ? weight.index_select(0, class_index->narrow(0, start, n))
                                 : weight.narrow(0, start, n);
}

// A contiguous [rows, cols] view on the front of a reusable buffer.
inline at::Tensor scratch_view(const at::Tensor& buffer, int64_t rows, int64_t cols) {
  return buffer.view({-1}).narrow(0, 0, rows * cols).view({rows, cols});
}

// Adds the target columns' share of dW (row i's `target_dw[i]` to shard row
// `target_rows[i]`, -1 for none) that falls in the block of weight rows
// [start, start + n) into the block's float32 gradient `g` [n, D], so that a
// low-precision dW is rounded once. Device-agnostic and free of host syncs:
// rows outside the block add zeros.
inline void add_target_rows(at::Tensor& g, int64_t start, int64_t n, const c10::optional<at::Tensor>& target_rows,
                            const c10::optional<at::Tensor>& target_dw) {
  if (!target_rows.has_value() || target_rows->numel() == 0) return;
  const at::Tensor local = *target_rows - start;
  const at::Tensor inside = local.ge(0).logical_and(local.lt(n)).unsqueeze(1).to(at::kFloat);
  g.index_add_(0, local.clamp(0, n - 1), target_dw->mul(inside));
}

}  // namespace margin_kernels
