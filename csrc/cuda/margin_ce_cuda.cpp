// The class-blocked sweep on CUDA tensors: each block's GEMM on cuBLAS through
// ATen (bf16/fp16 operands, fp32 output), the rest in the epilogue kernels of
// epilogue.cu. Everything runs on the current stream; nothing synchronizes.
// Compiled only where torch has CUDA (setup.py defines MK_WITH_CUDA).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../blocks.h"
#include "../margin_ce.h"
#include "epilogue.cuh"

namespace margin_kernels::cuda {
namespace {

using at::Tensor;

int mk_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return MK_FLOAT32;
    case at::kBFloat16: return MK_BFLOAT16;
    case at::kHalf: return MK_FLOAT16;
    default: TORCH_CHECK(false, "margin_kernels CUDA: unsupported dtype ", t);
  }
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "margin_kernels CUDA: ", what, " failed: ", cudaGetErrorString(err));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

const float* hard_ptr(const c10::optional<Tensor>& hard) {
  return hard.has_value() ? hard->data_ptr<float>() : nullptr;
}

// logits (fp32) = x_op @ w_blk^T with fp32 accumulation whatever the operands.
void logits_into(Tensor& out, const Tensor& x_op, const Tensor& w_blk) {
  if (w_blk.scalar_type() == at::kFloat) {
    at::mm_out(out, x_op, w_blk.t());
  } else {
    at::mm_out(out, x_op, w_blk.t(), at::kFloat);
  }
}

}  // namespace

Tensor row_inv_norms(const Tensor& weight, double eps) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const Tensor w = weight.contiguous();
  Tensor inv = at::empty({w.size(0)}, w.options().dtype(at::kFloat));
  check(mk_row_inv_norms(w.data_ptr(), mk_type(w.scalar_type()), w.size(0), w.size(1), w.stride(0),
                         static_cast<float>(eps), inv.data_ptr<float>(), stream()),
        "row_inv_norms");
  return inv;
}

Tensor lse_forward(const Tensor& x_hat, const Tensor& weight, const Tensor& w_inv, const Tensor& labels_local,
                   const Tensor& target_logit, double scale, int64_t block_classes,
                   const c10::optional<Tensor>& class_index, const c10::optional<Tensor>& hard,
                   int64_t subcenters) {
  const c10::cuda::CUDAGuard guard(x_hat.device());
  const int64_t S = subcenters;
  const int64_t B = x_hat.size(0);
  const int64_t C = shard_rows(weight, class_index) / S;
  const int64_t K = std::min(std::max<int64_t>(block_classes, 1), std::max<int64_t>(C, 1));
  Tensor row_max = at::full({B}, -std::numeric_limits<float>::infinity(), x_hat.options());
  Tensor row_sum = at::zeros({B}, x_hat.options());
  if (B == 0 || C == 0) return row_max.add_(row_sum.log_());
  const Tensor x_op = x_hat.to(weight.scalar_type()).contiguous();
  Tensor buffer = at::empty({B, K * S}, x_hat.options());
  for (int64_t c0 = 0; c0 < C; c0 += K) {
    const int64_t k = std::min(K, C - c0);
    Tensor z = scratch_view(buffer, B, k * S);
    logits_into(z, x_op, class_block(weight, class_index, c0 * S, k * S));
    check(mk_forward_epilogue(z.data_ptr<float>(), B, k, S, k * S, w_inv.data_ptr<float>() + c0 * S,
                              static_cast<float>(scale), labels_local.data_ptr<int64_t>(), c0,
                              target_logit.data_ptr<float>(), hard_ptr(hard), row_max.data_ptr<float>(),
                              row_sum.data_ptr<float>(), stream()),
          "forward_epilogue");
  }
  return row_max.add_(row_sum.log_());
}

std::tuple<Tensor, Tensor> lse_backward(const Tensor& x_hat, const Tensor& weight, const Tensor& w_inv,
                                        const Tensor& labels_local, const Tensor& lse, const Tensor& grad_rows,
                                        double scale, int64_t block_classes,
                                        const c10::optional<Tensor>& class_index,
                                        const c10::optional<Tensor>& hard, int64_t subcenters,
                                        bool weight_grad, const c10::optional<Tensor>& target_rows,
                                        const c10::optional<Tensor>& target_dw) {
  const c10::cuda::CUDAGuard guard(x_hat.device());
  const int64_t S = subcenters;
  const int64_t B = x_hat.size(0), D = weight.size(1);
  const int64_t rows = shard_rows(weight, class_index), C = rows / S;
  const int64_t K = std::min(std::max<int64_t>(block_classes, 1), std::max<int64_t>(C, 1));
  const at::ScalarType wt = weight.scalar_type();
  Tensor dx_hat = at::zeros({B, D}, x_hat.options());
  Tensor dw = at::empty({weight_grad ? rows : 0, D}, weight.options());
  if (B == 0 || C == 0) return {dx_hat, dw.zero_()};
  const Tensor x_op = x_hat.to(wt).contiguous();
  Tensor logits_buf = at::empty({B, K * S}, x_hat.options());
  // dz in the dtype the next two GEMMs take: in place over the logits for fp32
  // (a thread writes only the columns of the class it read).
  Tensor dz_buf = wt == at::kFloat ? logits_buf : at::empty({B, K * S}, weight.options());
  Tensor g_buf = weight_grad ? at::empty({K * S, D}, x_hat.options()) : Tensor();  // d/d(w_hat) of a block, fp32
  for (int64_t c0 = 0; c0 < C; c0 += K) {
    const int64_t k = std::min(K, C - c0);
    const int64_t r0w = c0 * S, nw = k * S;  // the block's weight rows
    const Tensor w_blk = class_block(weight, class_index, r0w, nw);
    Tensor logits = scratch_view(logits_buf, B, nw);
    Tensor dz = scratch_view(dz_buf, B, nw);
    logits_into(logits, x_op, w_blk);
    check(mk_backward_epilogue(logits.data_ptr<float>(), B, k, S, nw, w_inv.data_ptr<float>() + r0w,
                               static_cast<float>(scale), labels_local.data_ptr<int64_t>(), c0, hard_ptr(hard),
                               lse.data_ptr<float>(), grad_rows.data_ptr<float>(), dz.data_ptr(), mk_type(wt), nw,
                               stream()),
          "backward_epilogue");
    if (wt == at::kFloat) {
      dx_hat.addmm_(dz, w_blk);
    } else {
      dx_hat.add_(at::mm(dz, w_blk, at::kFloat));
    }
    if (!weight_grad) continue;  // a frozen weight: no dW GEMM, no dW memory
    Tensor g = scratch_view(g_buf, nw, D);
    if (wt == at::kFloat) {
      at::mm_out(g, dz.t(), x_op);
    } else {
      at::mm_out(g, dz.t(), x_op, at::kFloat);
    }
    // (the target share is tangent: the projection keeps it, and it is rounded once with the rest)
    add_target_rows(g, r0w, nw, target_rows, target_dw);
    Tensor dw_blk = dw.narrow(0, r0w, nw);
    check(mk_project_rows(g.data_ptr<float>(), w_blk.data_ptr(), mk_type(wt), nw, D, w_blk.stride(0),
                          w_inv.data_ptr<float>() + r0w, dw_blk.data_ptr(), mk_type(wt), stream()),
          "project_rows");
  }
  return {dx_hat, dw};
}

}  // namespace margin_kernels::cuda
