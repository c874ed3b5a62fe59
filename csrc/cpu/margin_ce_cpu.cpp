// Class-blocked (contract) and row-chunked (single-shard shortcut) sweeps on the
// CPU: each block's GEMM goes through ATen (MKL / oneDNN), the epilogue runs the
// vectorized row loops of row_epilogue.cpp, parallel over rows.
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "../blocks.h"
#include "../margin_ce.h"
#include "row_epilogue.h"

namespace margin_kernels {
namespace {

using at::Tensor;

// class_block in float32 (the CPU GEMMs' operand type): a copy only when the
// block is gathered or not float32.
Tensor float_block(const Tensor& weight, const c10::optional<Tensor>& class_index,
                   int64_t start, int64_t n) {
  Tensor block = class_block(weight, class_index, start, n);
  return block.scalar_type() == at::kFloat ? block : block.to(at::kFloat);
}

// The hard-negative rule per row (the `hard` [4, B] tensor: thresholds, then
// the coefficients a, b, d of m(c) = (a c + b) c + d); off when the call has none.
struct HardRows {
  const float* rows = nullptr;
  int64_t B = 0;
  explicit HardRows(const c10::optional<Tensor>& hard) {
    if (hard.has_value()) {
      rows = hard->data_ptr<float>();
      B = hard->size(1);
    }
  }
  bool on() const { return rows != nullptr; }
  cpu::HardRule operator[](int64_t i) const { return math::hard_rule(rows, i, B); }
};

struct ZRow {
  int64_t target_col;  // inside this block, or -1
  float max;           // the row's max, exactly
};

// Logits row i -> z = s * cos (hard negatives modulated) with the target column
// replaced by `target`.
ZRow logits_to_z(float* row, const float* inv, int64_t n, float scale,
                 int64_t label, int64_t col0, float target, const HardRows& hard, int64_t i) {
  float mx = hard.on() ? cpu::scale_columns_max_hard(row, inv, n, scale, hard[i])
                       : cpu::scale_columns_max(row, inv, n, scale);
  const int64_t t = label - col0;
  if (label < 0 || t < 0 || t >= n) return {-1, mx};
  const float replaced = row[t];
  row[t] = target;
  // The exact max, also where the margin lowered the column that held it: a
  // row whose target dominates then has exp(0) = 1 exactly in its sum, so a
  // one-class (or fully confident) row has loss and gradient exactly 0.
  if (target >= mx) {
    mx = target;
  } else if (replaced >= mx) {
    mx = cpu::row_max(row, n);
  }
  return {t, mx};
}

// dW_j <- G_j - w_j * inv_j^2 * (w_j . G_j): the projection that takes
// d/d(w_hat) to d/dw, for G = d/d(w_hat) already scaled by inv_j.
void project_rows(const Tensor& grad, const Tensor& w, const float* inv) {
  const int64_t n = grad.size(0), d = grad.size(1);
  float* g = grad.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t j = r0; j < r1; ++j) {
      const float a = inv[j] * inv[j] * cpu::dot(wp + j * d, g + j * d, d);
      cpu::sub_scaled(g + j * d, wp + j * d, a, d);
    }
  });
}

// A row of a block's logits seen as class columns. Without sub-centers it is
// the row itself, and the epilogue scales column j by inv[j]; with them each
// class's sub-center columns are collapsed into a per-thread compact row of
// class cosines (already scaled, so the epilogue scales by ones), and the
// gradient is expanded back into the row for the GEMMs.
class ClassColumns {
 public:
  ClassColumns(int64_t subs, int64_t block)
      : subs_(subs), ones_(subs > 1 ? block : 0, 1.0f), compact_(ones_.size()), arg_(ones_.size()) {}

  // The class row to run the epilogue on (n classes of `row`, whose weight
  // rows have 1/||w|| `inv`), and the inv it applies.
  std::pair<float*, const float*> collapse(float* row, const float* inv, int64_t n) {
    if (subs_ == 1) return {row, inv};
    cpu::collapse_subcenters(row, inv, n, subs_, compact_.data(), arg_.data());
    return {compact_.data(), ones_.data()};
  }

  // The class row's gradient (d/dc) back into `row`, to each class's arg-max.
  void expand(float* row, const float* inv, int64_t n) const {
    if (subs_ > 1) cpu::expand_subcenters(compact_.data(), inv, n, subs_, arg_.data(), row);
  }

 private:
  int64_t subs_;
  std::vector<float> ones_, compact_;
  std::vector<int32_t> arg_;
};

// out <- a @ b into existing storage. at::mm_out with a transposed operand
// computes into a temporary of out's size and copies it (measured: +64 MiB at
// 83 x 200k); addmm_ with beta = 0 writes in place and never reads out.
void gemm_into(Tensor& out, const Tensor& a, const Tensor& b) { out.addmm_(a, b, /*beta=*/0, /*alpha=*/1); }

int64_t grain_for(int64_t cols) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(cols, 1)); }

}  // namespace

Tensor row_inv_norms(const Tensor& weight, double eps) {
  const Tensor w = weight.contiguous();
  const int64_t n = w.size(0), d = w.size(1);
  Tensor out = at::empty({n}, w.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "row_inv_norms", [&] {
    const scalar_t* p = w.data_ptr<scalar_t>();
    at::parallel_for(0, n, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t j = r0; j < r1; ++j) {
        float acc = 0.0f;
        for (int64_t k = 0; k < d; ++k) {
          const float v = static_cast<float>(p[j * d + k]);
          acc += v * v;
        }
        // NaN stays NaN (a NaN row), Inf gives 0: the callers' NaN check reads these.
        const float norm = std::sqrt(acc);
        o[j] = 1.0f / (norm < static_cast<float>(eps) ? static_cast<float>(eps) : norm);
      }
    });
  });
  return out;
}

Tensor lse_forward(const Tensor& x_hat, const Tensor& weight, const Tensor& w_inv,
                   const Tensor& labels_local, const Tensor& target_logit,
                   double scale, int64_t block_classes,
                   const c10::optional<Tensor>& class_index, const c10::optional<Tensor>& hard,
                   int64_t subcenters) {
  const int64_t S = subcenters;
  const int64_t B = x_hat.size(0), C = shard_rows(weight, class_index) / S;
  const int64_t K = std::min(std::max<int64_t>(block_classes, 1), C);
  Tensor row_max = at::full({B}, -std::numeric_limits<float>::infinity(), x_hat.options());
  Tensor row_sum = at::zeros({B}, x_hat.options());
  if (B == 0) return row_max;
  if (C == 0) return row_max;
  Tensor buffer = at::empty({B, K * S}, x_hat.options());
  float* m = row_max.data_ptr<float>();
  float* l = row_sum.data_ptr<float>();
  const float* inv = w_inv.data_ptr<float>();
  const int64_t* lab = labels_local.data_ptr<int64_t>();
  const float* tgt = target_logit.data_ptr<float>();
  const float s = static_cast<float>(scale);
  const HardRows hard_rows(hard);

  for (int64_t c0 = 0; c0 < C; c0 += K) {
    const int64_t k = std::min(K, C - c0);
    Tensor z = scratch_view(buffer, B, k * S);
    gemm_into(z, x_hat, float_block(weight, class_index, c0 * S, k * S).t());
    float* zp = z.data_ptr<float>();
    at::parallel_for(0, B, grain_for(k * S), [&](int64_t r0, int64_t r1) {
      ClassColumns columns(S, k);
      for (int64_t i = r0; i < r1; ++i) {
        auto [z, col_inv] = columns.collapse(zp + i * k * S, inv + c0 * S, k);
        const ZRow zr = logits_to_z(z, col_inv, k, s, lab[i], c0, tgt[i], hard_rows, i);
        const float new_max = std::max(m[i], zr.max);
        l[i] = l[i] * std::exp(m[i] - new_max) + cpu::row_sum_exp(z, k, new_max);
        m[i] = new_max;
      }
    });
  }
  return row_max.add_(row_sum.log_());
}

std::tuple<Tensor, Tensor> lse_backward(
    const Tensor& x_hat, const Tensor& weight, const Tensor& w_inv,
    const Tensor& labels_local, const Tensor& lse, const Tensor& grad_rows,
    double scale, int64_t block_classes,
    const c10::optional<Tensor>& class_index, const c10::optional<Tensor>& hard, int64_t subcenters,
    bool weight_grad, const c10::optional<Tensor>& target_rows, const c10::optional<Tensor>& target_dw) {
  const int64_t S = subcenters;
  const int64_t B = x_hat.size(0), rows = shard_rows(weight, class_index), C = rows / S, D = weight.size(1);
  const int64_t K = std::min(std::max<int64_t>(block_classes, 1), std::max<int64_t>(C, 1));
  Tensor dx_hat = at::zeros({B, D}, x_hat.options());
  Tensor dw = at::empty({weight_grad ? rows : 0, D}, weight.options());
  if (B == 0 || C == 0) return {dx_hat, dw.zero_()};
  const bool float_weight = weight.scalar_type() == at::kFloat;
  Tensor buffer = at::empty({B, K * S}, x_hat.options());
  Tensor dw_buffer = float_weight || !weight_grad ? Tensor() : at::empty({K * S, D}, x_hat.options());
  const float* inv = w_inv.data_ptr<float>();
  const int64_t* lab = labels_local.data_ptr<int64_t>();
  const float* lse_p = lse.data_ptr<float>();
  const float* g = grad_rows.data_ptr<float>();
  const float s = static_cast<float>(scale);
  const HardRows hard_rows(hard);

  for (int64_t c0 = 0; c0 < C; c0 += K) {
    const int64_t k = std::min(K, C - c0);
    const int64_t r0w = c0 * S, nw = k * S;  // the block's weight rows
    const Tensor w_blk = float_block(weight, class_index, r0w, nw);
    Tensor e = scratch_view(buffer, B, nw);
    gemm_into(e, x_hat, w_blk.t());
    float* ep = e.data_ptr<float>();
    at::parallel_for(0, B, grain_for(nw), [&](int64_t r0, int64_t r1) {
      ClassColumns columns(S, k);
      for (int64_t i = r0; i < r1; ++i) {
        float* row = ep + i * nw;
        const float coef = g[i] * s;
        if (coef == 0.0f) {  // ignored rows contribute exactly nothing
          std::fill(row, row + nw, 0.0f);
          continue;
        }
        auto [z, col_inv] = columns.collapse(row, inv + r0w, k);
        if (hard_rows.on()) {
          cpu::softmax_grad_from_logits_hard(z, col_inv, k, s, lse_p[i], coef, hard_rows[i]);
        } else {
          cpu::softmax_grad_from_logits(z, col_inv, k, s, lse_p[i], coef);
        }
        // The target column's gradient is added outside the kernels (docs/DESIGN.md §1).
        const int64_t t = lab[i] - c0;
        if (lab[i] >= 0 && t >= 0 && t < k) z[t] = 0.0f;
        columns.expand(row, inv + r0w, k);
      }
    });
    dx_hat.addmm_(e, w_blk);
    if (!weight_grad) continue;  // a frozen weight: no dW GEMM, no dW memory
    Tensor dw_blk = float_weight ? dw.narrow(0, r0w, nw) : scratch_view(dw_buffer, nw, D);
    // (w_blk is a float32 copy for gathered or low-precision blocks, a view otherwise)
    gemm_into(dw_blk, e.t(), x_hat);
    project_rows(dw_blk, w_blk, inv + r0w);
    add_target_rows(dw_blk, r0w, nw, target_rows, target_dw);  // (already tangent: after the projection)
    if (!float_weight) dw.narrow(0, r0w, nw).copy_(dw_blk);
  }
  return {dx_hat, dw};
}

std::tuple<Tensor, Tensor, Tensor> single_pass(
    const Tensor& x_hat, const Tensor& weight, const Tensor& w_inv,
    const Tensor& labels_local, const Tensor& target_logit, const Tensor& grad_rows,
    double scale, int64_t block_rows, const c10::optional<Tensor>& hard, int64_t subcenters) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat,
              "single_pass takes float32 weights");
  const int64_t S = subcenters;
  const int64_t B = x_hat.size(0), rows = weight.size(0), C = rows / S, D = weight.size(1);
  const int64_t R = std::min(std::max<int64_t>(block_rows, 1), std::max<int64_t>(B, 1));
  Tensor lse = at::empty({B}, x_hat.options());
  Tensor dx_hat = at::empty({B, D}, x_hat.options());
  Tensor dw = at::zeros({rows, D}, weight.options());
  if (B == 0) return {lse, dx_hat, dw};
  Tensor buffer = at::empty({R, rows}, x_hat.options());
  const float* inv = w_inv.data_ptr<float>();
  const int64_t* lab = labels_local.data_ptr<int64_t>();
  const float* tgt = target_logit.data_ptr<float>();
  const float* g = grad_rows.data_ptr<float>();
  const HardRows hard_rows(hard);
  float* lse_p = lse.data_ptr<float>();
  const float s = static_cast<float>(scale);

  for (int64_t r0 = 0; r0 < B; r0 += R) {
    const int64_t r = std::min(R, B - r0);
    const Tensor x_blk = x_hat.narrow(0, r0, r);
    Tensor e = scratch_view(buffer, r, rows);
    gemm_into(e, x_blk, weight.t());
    float* ep = e.data_ptr<float>();
    at::parallel_for(0, r, 1, [&](int64_t a, int64_t b) {
      ClassColumns columns(S, C);
      std::vector<float> factor(hard_rows.on() ? C : 0);  // m'(c) of the hard negatives' modulation
      for (int64_t ii = a; ii < b; ++ii) {
        const int64_t i = r0 + ii;
        float* row = ep + ii * rows;
        auto [z, col_inv] = columns.collapse(row, inv, C);
        if (hard_rows.on()) cpu::hard_factors(z, col_inv, C, hard_rows[i], factor.data());
        const ZRow zr = logits_to_z(z, col_inv, C, s, lab[i], 0, tgt[i], hard_rows, i);
        const float sum = cpu::exp_in_place_sum(z, C, zr.max);  // z <- exp(z - max)
        lse_p[i] = zr.max + std::log(sum);
        const float coef = g[i] * s;
        if (coef == 0.0f) {
          std::fill(row, row + rows, 0.0f);
          continue;
        }
        cpu::scale_columns(z, col_inv, C, coef / sum);  // z <- coef * p * inv (ones with sub-centers)
        if (hard_rows.on()) cpu::multiply(z, factor.data(), C);
        if (zr.target_col >= 0) z[zr.target_col] = 0.0f;  // added outside (docs/DESIGN.md §1)
        columns.expand(row, inv, C);
      }
    });
    Tensor dx_blk = dx_hat.narrow(0, r0, r);
    gemm_into(dx_blk, e, weight);
    dw.addmm_(e.t(), x_blk);
  }
  project_rows(dw, weight, inv);
  return {lse, dx_hat, dw};
}

}  // namespace margin_kernels
