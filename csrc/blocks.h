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

}  // namespace margin_kernels
