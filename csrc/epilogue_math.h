// The per-element math of the loss's epilogues, compiled for the host (the CPU
// epilogue, and `_C.epilogue_math` that the tests call) and for the device (the
// CUDA epilogue kernels): one copy, so the CPU tests exercise what the CUDA
// kernels compute. The .cu and .cpp files keep only the thread mapping, the
// vectorization and the reductions.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MK_HOST_DEVICE inline
#endif

namespace margin_kernels::math {

// A row's hard-negative rule (docs/DESIGN.md §1): a non-target cosine c above
// `threshold` counts as m(c) = (a c + b) c + d, with derivative 2 a c + b; no
// rule is threshold = +inf (never hard).
struct HardRule {
  float threshold, a, b, d;
  MK_HOST_DEVICE bool hard(float c) const { return c > threshold; }
  MK_HOST_DEVICE float value(float c) const { return (a * c + b) * c + d; }
  MK_HOST_DEVICE float derivative(float c) const { return 2.0f * a * c + b; }
  // The cosine as the softmax sees it, and the factor its gradient takes.
  MK_HOST_DEVICE float modulated(float c) const { return hard(c) ? value(c) : c; }
  MK_HOST_DEVICE float factor(float c) const { return hard(c) ? derivative(c) : 1.0f; }
};

// Row i's rule from `hard` [4, B] (thresholds, a, b, d; may be null: no rule).
MK_HOST_DEVICE HardRule hard_rule(const float* hard, int64_t i, int64_t B) {
  if (hard == nullptr) return {__builtin_huge_valf(), 0.0f, 1.0f, 0.0f};
  return {hard[i], hard[B + i], hard[2 * B + i], hard[3 * B + i]};
}

// Class j's cosine over its `subs` columns of a logits row (logit * 1/||w||):
// their max, with `*arg` the arg-max column's offset (the first of ties).
MK_HOST_DEVICE float class_cosine(const float* row, int64_t j, int64_t subs, const float* inv, int64_t* arg) {
  const int64_t c0 = j * subs;
  float best = row[c0] * inv[c0];
  int64_t at = 0;
  for (int64_t k = 1; k < subs; ++k) {
    const float v = row[c0 + k] * inv[c0 + k];
    if (v > best) {
      best = v;
      at = k;
    }
  }
  *arg = at;
  return best;
}

// d loss / d c of a non-target cosine c for upstream coef = g s and the row's
// logsumexp: coef * exp(s m(c) - lse) * m'(c); `exp_fn` is the caller's exp
// (the device's fast one, or the host's vectorized one).
template <typename Exp>
MK_HOST_DEVICE float softmax_grad(float c, float scale, float lse, float coef, const HardRule& rule, Exp exp_fn) {
  return coef * exp_fn(scale * rule.modulated(c) - lse) * rule.factor(c);
}

}  // namespace margin_kernels::math
