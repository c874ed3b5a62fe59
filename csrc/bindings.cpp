// Python bindings of margin_kernels._C. Argument checks live in Python
// (margin_kernels/functional.py); these entry points only assert the layout
// they rely on.
#include <torch/extension.h>

#include "margin_ce.h"

namespace {

void check_layout(const at::Tensor& x_hat, const at::Tensor& weight,
                  const at::Tensor& labels_local) {
  TORCH_CHECK(x_hat.scalar_type() == at::kFloat && x_hat.is_contiguous() && x_hat.dim() == 2,
              "x_hat must be a contiguous float32 matrix");
  TORCH_CHECK(weight.is_contiguous() && weight.dim() == 2 && weight.size(1) == x_hat.size(1),
              "weight must be a contiguous [C, D] matrix");
  TORCH_CHECK(labels_local.scalar_type() == at::kLong && labels_local.size(0) == x_hat.size(0),
              "labels_local must be int64 [B]");
  TORCH_CHECK(x_hat.device() == weight.device(), "x_hat and weight must be on one device");
#ifndef MK_WITH_CUDA
  TORCH_CHECK(x_hat.device().is_cpu(),
              "the cpp backend was built without CUDA kernels; tensors must be on the CPU");
#endif
}

#ifdef MK_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

at::Tensor row_inv_norms(const at::Tensor& weight, double eps) {
#ifdef MK_WITH_CUDA
  if (weight.is_cuda()) return margin_kernels::cuda::row_inv_norms(weight, eps);
#endif
  return margin_kernels::row_inv_norms(weight, eps);
}

at::Tensor lse_forward(const at::Tensor& x_hat, const at::Tensor& weight,
                       const at::Tensor& w_inv, const at::Tensor& labels_local,
                       const at::Tensor& target_logit, double scale, int64_t block_classes,
                       const c10::optional<at::Tensor>& class_index) {
  check_layout(x_hat, weight, labels_local);
#ifdef MK_WITH_CUDA
  if (x_hat.is_cuda())
    return margin_kernels::cuda::lse_forward(x_hat, weight, w_inv, labels_local, target_logit, scale,
                                             block_classes, class_index);
#endif
  return margin_kernels::lse_forward(x_hat, weight, w_inv, labels_local, target_logit,
                                     scale, block_classes, class_index);
}

std::tuple<at::Tensor, at::Tensor> lse_backward(
    const at::Tensor& x_hat, const at::Tensor& weight, const at::Tensor& w_inv,
    const at::Tensor& labels_local, const at::Tensor& target_logit,
    const at::Tensor& target_slope, const at::Tensor& lse, const at::Tensor& grad_rows,
    double scale, int64_t block_classes, const c10::optional<at::Tensor>& class_index) {
  check_layout(x_hat, weight, labels_local);
#ifdef MK_WITH_CUDA
  if (x_hat.is_cuda())
    return margin_kernels::cuda::lse_backward(x_hat, weight, w_inv, labels_local, target_logit,
                                              target_slope, lse, grad_rows, scale, block_classes,
                                              class_index);
#endif
  return margin_kernels::lse_backward(x_hat, weight, w_inv, labels_local, target_logit,
                                      target_slope, lse, grad_rows, scale, block_classes,
                                      class_index);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward_backward(
    const at::Tensor& x_hat, const at::Tensor& weight, const at::Tensor& w_inv,
    const at::Tensor& labels_local, const at::Tensor& target_logit,
    const at::Tensor& target_slope, const at::Tensor& grad_rows, double scale,
    int64_t block_rows) {
  check_layout(x_hat, weight, labels_local);
  TORCH_CHECK(x_hat.device().is_cpu(), "fused_forward_backward runs on the CPU only");
  return margin_kernels::fused_forward_backward(x_hat, weight, w_inv, labels_local,
                                                target_logit, target_slope, grad_rows,
                                                scale, block_rows);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "margin_kernels C++ kernels (kernel contract of DESIGN.md section 2)";
  m.attr("with_cuda") = kWithCuda;
  m.def("row_inv_norms", &row_inv_norms, "1/max(||w_j||, eps) per row");
  m.def("lse_forward", &lse_forward, "class-blocked forward: per-row logsumexp",
        py::arg("x_hat"), py::arg("weight"), py::arg("w_inv"), py::arg("labels_local"),
        py::arg("target_logit"), py::arg("scale"), py::arg("block_classes"),
        py::arg("class_index") = py::none());
  m.def("lse_backward", &lse_backward, "class-blocked backward: (dx_hat, dW)",
        py::arg("x_hat"), py::arg("weight"), py::arg("w_inv"), py::arg("labels_local"),
        py::arg("target_logit"), py::arg("target_slope"), py::arg("lse"), py::arg("grad_rows"),
        py::arg("scale"), py::arg("block_classes"), py::arg("class_index") = py::none());
  m.def("fused_forward_backward", &fused_forward_backward,
        "row-chunked single-shard sweep: (lse, dx_hat, dW) in three GEMMs");
}
