// Python bindings of margin_kernels._C. User-facing argument checks live in
// Python (margin_kernels/_checks.py); these entry points check every tensor
// they receive, so that no input from Python can crash the process.
#include <torch/extension.h>

#include <cmath>

#include "epilogue_math.h"
#include "margin_ce.h"

namespace {

// Every tensor an entry point receives is checked here (shape, dtype, device,
// contiguity), so that no call from Python can read out of bounds: the Python
// layer validates user input, these checks keep a wrong internal call (or a
// direct call of _C) an exception instead of a crash.
void check_layout(const at::Tensor& x_hat, const at::Tensor& weight,
                  const at::Tensor& labels_local) {
  TORCH_CHECK(x_hat.dim() == 2 && x_hat.scalar_type() == at::kFloat && x_hat.is_contiguous(),
              "x_hat must be a contiguous float32 [B, D] matrix");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == x_hat.size(1),
              "weight must be a contiguous [C, D] matrix with x_hat's D");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16 ||
                  weight.scalar_type() == at::kHalf,
              "weight must be float32, bfloat16 or float16");
  TORCH_CHECK(x_hat.device() == weight.device(), "x_hat and weight must be on one device");
#ifndef MK_WITH_CUDA
  TORCH_CHECK(x_hat.device().is_cpu(),
              "the cpp backend was built without CUDA kernels; tensors must be on the CPU");
#endif
  TORCH_CHECK(labels_local.dim() == 1 && labels_local.scalar_type() == at::kLong &&
                  labels_local.size(0) == x_hat.size(0) && labels_local.is_contiguous() &&
                  labels_local.device() == x_hat.device(),
              "labels_local must be a contiguous int64 [B] vector on x_hat's device");
}

// A per-row (n = B) or per-class (n = C or K) vector of `dtype` beside x_hat.
void check_vector(const char* name, const at::Tensor& t, int64_t n, at::ScalarType dtype,
                  const at::Tensor& x_hat) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must be a vector of ", n, " entries, got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous() && t.device() == x_hat.device(), name,
              " must be contiguous and on x_hat's device");
}

// Weight rows the sweep covers: C, or K with a class index (whose entries must
// be rows of W); whole classes of `subcenters` rows each.
int64_t checked_rows(const at::Tensor& weight, const c10::optional<at::Tensor>& class_index,
                     int64_t subcenters, const at::Tensor& x_hat) {
  TORCH_CHECK(subcenters >= 1, "subcenters must be >= 1, got ", subcenters);
  int64_t rows = weight.size(0);
  if (class_index.has_value()) {
    const at::Tensor& index = *class_index;
    check_vector("class_index", index, index.numel(), at::kLong, x_hat);
    if (index.numel() > 0) {
      auto [lo, hi] = at::aminmax(index);
      TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < weight.size(0),
                  "class_index entries must be rows of weight, in [0, ", weight.size(0), ")");
    }
    rows = index.numel();
  }
  TORCH_CHECK(rows % subcenters == 0, "the shard's ", rows, " weight rows are not whole classes of subcenters=",
              subcenters, " rows");
  return rows;
}

// The hard-negative rule, [4, B] float32 (thresholds, a, b, d) beside x_hat, when given.
void check_hard(const c10::optional<at::Tensor>& hard, const at::Tensor& x_hat) {
  if (!hard.has_value()) return;
  const at::Tensor& h = *hard;
  TORCH_CHECK(h.dim() == 2 && h.size(0) == 4 && h.size(1) == x_hat.size(0),
              "hard must be a [4, B] matrix (thresholds, a, b, d) with B = ", x_hat.size(0), ", got shape ",
              h.sizes());
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous() && h.device() == x_hat.device(),
              "hard must be contiguous float32 on x_hat's device");
}

// The target columns' share of dW, when given: int64 [B] shard rows (-1 for
// none) and float32 [B, D], both or neither.
void check_target_dw(const c10::optional<at::Tensor>& target_rows, const c10::optional<at::Tensor>& target_dw,
                     const at::Tensor& x_hat) {
  TORCH_CHECK(target_rows.has_value() == target_dw.has_value(), "target_rows and target_dw go together");
  if (!target_rows.has_value()) return;
  check_vector("target_rows", *target_rows, x_hat.size(0), at::kLong, x_hat);
  const at::Tensor& g = *target_dw;
  TORCH_CHECK(g.dim() == 2 && g.size(0) == x_hat.size(0) && g.size(1) == x_hat.size(1) &&
                  g.scalar_type() == at::kFloat && g.is_contiguous() && g.device() == x_hat.device(),
              "target_dw must be a contiguous float32 [B, D] matrix on x_hat's device, got shape ", g.sizes());
  // (entries outside [0, rows) add nothing: add_target_rows masks them, without a host sync)
}

void check_rows(const at::Tensor& x_hat, std::initializer_list<std::pair<const char*, const at::Tensor*>> vs) {
  for (const auto& [name, t] : vs) check_vector(name, *t, x_hat.size(0), at::kFloat, x_hat);
}

#ifdef MK_WITH_CUDA
constexpr bool kWithCuda = true;
#else
constexpr bool kWithCuda = false;
#endif

at::Tensor row_inv_norms(const at::Tensor& weight, double eps) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be a contiguous [C, D] matrix");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16 ||
                  weight.scalar_type() == at::kHalf,
              "weight must be float32, bfloat16 or float16");
  TORCH_CHECK(eps > 0, "eps must be > 0");
#ifndef MK_WITH_CUDA
  TORCH_CHECK(weight.device().is_cpu(),
              "the cpp backend was built without CUDA kernels; tensors must be on the CPU");
#endif
#ifdef MK_WITH_CUDA
  if (weight.is_cuda()) return margin_kernels::cuda::row_inv_norms(weight, eps);
#endif
  return margin_kernels::row_inv_norms(weight, eps);
}

at::Tensor lse_forward(const at::Tensor& x_hat, const at::Tensor& weight,
                       const at::Tensor& w_inv, const at::Tensor& labels_local,
                       const at::Tensor& target_logit, double scale, int64_t block_classes,
                       const c10::optional<at::Tensor>& class_index,
                       const c10::optional<at::Tensor>& hard, int64_t subcenters) {
  check_layout(x_hat, weight, labels_local);
  const int64_t rows = checked_rows(weight, class_index, subcenters, x_hat);
  check_vector("w_inv", w_inv, rows, at::kFloat, x_hat);
  check_rows(x_hat, {{"target_logit", &target_logit}});
  check_hard(hard, x_hat);
  TORCH_CHECK(block_classes >= 1, "block_classes must be >= 1, got ", block_classes);
#ifdef MK_WITH_CUDA
  if (x_hat.is_cuda())
    return margin_kernels::cuda::lse_forward(x_hat, weight, w_inv, labels_local, target_logit, scale,
                                             block_classes, class_index, hard, subcenters);
#endif
  return margin_kernels::lse_forward(x_hat, weight, w_inv, labels_local, target_logit,
                                     scale, block_classes, class_index, hard, subcenters);
}

std::tuple<at::Tensor, at::Tensor> lse_backward(
    const at::Tensor& x_hat, const at::Tensor& weight, const at::Tensor& w_inv,
    const at::Tensor& labels_local, const at::Tensor& lse, const at::Tensor& grad_rows,
    double scale, int64_t block_classes, const c10::optional<at::Tensor>& class_index,
    const c10::optional<at::Tensor>& hard, int64_t subcenters, bool weight_grad,
    const c10::optional<at::Tensor>& target_rows, const c10::optional<at::Tensor>& target_dw) {
  check_layout(x_hat, weight, labels_local);
  const int64_t rows = checked_rows(weight, class_index, subcenters, x_hat);
  check_vector("w_inv", w_inv, rows, at::kFloat, x_hat);
  check_rows(x_hat, {{"lse", &lse}, {"grad_rows", &grad_rows}});
  check_hard(hard, x_hat);
  check_target_dw(target_rows, target_dw, x_hat);
  TORCH_CHECK(block_classes >= 1, "block_classes must be >= 1, got ", block_classes);
#ifdef MK_WITH_CUDA
  if (x_hat.is_cuda())
    return margin_kernels::cuda::lse_backward(x_hat, weight, w_inv, labels_local, lse, grad_rows, scale,
                                              block_classes, class_index, hard, subcenters, weight_grad,
                                              target_rows, target_dw);
#endif
  return margin_kernels::lse_backward(x_hat, weight, w_inv, labels_local, lse, grad_rows, scale,
                                      block_classes, class_index, hard, subcenters, weight_grad, target_rows,
                                      target_dw);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> single_pass(
    const at::Tensor& x_hat, const at::Tensor& weight, const at::Tensor& w_inv,
    const at::Tensor& labels_local, const at::Tensor& target_logit,
    const at::Tensor& grad_rows, double scale, int64_t block_rows, const c10::optional<at::Tensor>& hard,
    int64_t subcenters) {
  check_layout(x_hat, weight, labels_local);
  TORCH_CHECK(x_hat.device().is_cpu(), "single_pass runs on the CPU only");
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "single_pass takes float32 weights only");
  const int64_t rows = checked_rows(weight, c10::nullopt, subcenters, x_hat);
  check_vector("w_inv", w_inv, rows, at::kFloat, x_hat);
  check_rows(x_hat, {{"target_logit", &target_logit}, {"grad_rows", &grad_rows}});
  check_hard(hard, x_hat);
  TORCH_CHECK(block_rows >= 1, "block_rows must be >= 1, got ", block_rows);
  return margin_kernels::single_pass(x_hat, weight, w_inv, labels_local, target_logit, grad_rows,
                                                scale, block_rows, hard, subcenters);
}

// The epilogues' per-element math (epilogue_math.h, the code the CUDA kernels
// compile) on the host, for the tests: logits [B, C*K] and inv [C*K] float32,
// `hard` [4, B] or none, lse and coef [B]. Returns, per row and class, the
// class cosine, its arg-max sub-center, the modulated logit s m(c) and
// d loss / d c = coef exp(s m(c) - lse) m'(c).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> epilogue_math(
    const at::Tensor& logits, const at::Tensor& inv, const c10::optional<at::Tensor>& hard, int64_t subcenters,
    double scale, const at::Tensor& lse, const at::Tensor& coef) {
  TORCH_CHECK(subcenters >= 1, "subcenters must be >= 1");
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous() &&
                  logits.device().is_cpu() && logits.size(1) % subcenters == 0,
              "logits must be a contiguous CPU float32 [B, C * subcenters] matrix");
  const int64_t B = logits.size(0), C = logits.size(1) / subcenters;
  for (const at::Tensor* t : {&inv, &lse, &coef}) {
    TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "inv, lse and coef must be contiguous CPU float32 vectors");
  }
  TORCH_CHECK(inv.size(0) == logits.size(1) && lse.size(0) == B && coef.size(0) == B,
              "inv must have a row per logits column, lse and coef one per logits row");
  check_hard(hard, logits);
  TORCH_CHECK(!hard.has_value() || hard->device().is_cpu(), "hard must be on the CPU");
  const float* h = hard.has_value() ? hard->data_ptr<float>() : nullptr;
  auto cos = at::empty({B, C}, logits.options()), z = at::empty({B, C}, logits.options());
  auto grad = at::empty({B, C}, logits.options());
  auto arg = at::empty({B, C}, logits.options().dtype(at::kLong));
  const float s = static_cast<float>(scale);
  for (int64_t i = 0; i < B; ++i) {
    const auto rule = margin_kernels::math::hard_rule(h, i, B);
    for (int64_t j = 0; j < C; ++j) {
      int64_t at_k;
      const float c = margin_kernels::math::class_cosine(logits.data_ptr<float>() + i * logits.size(1), j,
                                                         subcenters, inv.data_ptr<float>(), &at_k);
      cos[i][j] = c;
      arg[i][j] = at_k;
      z[i][j] = s * rule.modulated(c);
      grad[i][j] = margin_kernels::math::softmax_grad(c, s, lse.data_ptr<float>()[i], coef.data_ptr<float>()[i], rule,
                                                      [](float v) { return std::exp(v); });
    }
  }
  return {cos, arg, z, grad};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "margin_kernels C++ kernels (the kernel interface of docs/DESIGN.md section 4)";
  m.attr("with_cuda") = kWithCuda;
  m.def("row_inv_norms", &row_inv_norms, "1/max(||w_j||, eps) per row");
  m.def("lse_forward", &lse_forward, "class-blocked forward: per-row logsumexp",
        py::arg("x_hat"), py::arg("weight"), py::arg("w_inv"), py::arg("labels_local"),
        py::arg("target_logit"), py::arg("scale"), py::arg("block_classes"),
        py::arg("class_index") = py::none(), py::arg("hard") = py::none(), py::arg("subcenters") = 1);
  m.def("lse_backward", &lse_backward, "class-blocked backward: (dx_hat, dW)",
        py::arg("x_hat"), py::arg("weight"), py::arg("w_inv"), py::arg("labels_local"),
        py::arg("lse"), py::arg("grad_rows"), py::arg("scale"), py::arg("block_classes"),
        py::arg("class_index") = py::none(), py::arg("hard") = py::none(), py::arg("subcenters") = 1,
        py::arg("weight_grad") = true, py::arg("target_rows") = py::none(), py::arg("target_dw") = py::none());
  m.def("single_pass", &single_pass,
        "row-chunked single-shard sweep: (lse, dx_hat, dW) in three GEMMs",
        py::arg("x_hat"), py::arg("weight"), py::arg("w_inv"), py::arg("labels_local"),
        py::arg("target_logit"), py::arg("grad_rows"), py::arg("scale"), py::arg("block_rows"),
        py::arg("hard") = py::none(), py::arg("subcenters") = 1);
  m.def("epilogue_math", &epilogue_math,
        "the epilogues' per-element math on the host (the tests): (class cosine, arg-max, s m(c), dL/dc)",
        py::arg("logits"), py::arg("inv"), py::arg("hard"), py::arg("subcenters"), py::arg("scale"), py::arg("lse"),
        py::arg("coef"));
}
