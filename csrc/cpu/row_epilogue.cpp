// Plain loops that GCC turns into AVX-512 / AVX2 / SSE code through
// target_clones, so the extension runs at vector speed on any x86-64 host
// without depending on ATen's internal SLEEF symbols. Needs -fno-trapping-math
// (setup.py): without it GCC 12 will not if-convert the clamp in exp_f32 and
// leaves the exp loops scalar (std::fmin/fmax keep them scalar too).
#include "row_epilogue.h"

#include <cmath>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define MK_VECTOR_CLONES \
  __attribute__((target_clones("arch=sapphirerapids", "avx512f", "avx2", "default")))
#else
#define MK_VECTOR_CLONES
#endif

namespace margin_kernels::cpu {
namespace {

// exp(x) for float32 to ~2 ulp: x = n ln2 + r with |r| <= ln2 / 2, e^r by its
// degree-7 Taylor polynomial (error < 1e-8 relative), 2^n built in the exponent
// bits. Inputs are clamped to [-87, 88]: below -87 the result is exp(-87) ~
// 1.6e-38 rather than a denormal or 0, which no sum or gradient here can see.
inline float exp_f32(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693145751953125f;
  const float kLn2Lo = 1.428606765330187045e-06f;
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = (xc * kLog2e + kRound) - kRound;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * __builtin_bit_cast(float, bits);
}

}  // namespace

MK_VECTOR_CLONES
float scale_columns_max(float* z, const float* inv, int64_t n, float scale) {
  float m = -3.402823466e+38f;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    z[j] = scale * z[j] * inv[j];
    m = z[j] > m ? z[j] : m;
  }
  return m;
}

MK_VECTOR_CLONES
float scale_columns_max_hard(float* z, const float* inv, int64_t n, float scale, HardRule rule) {
  float m = -3.402823466e+38f;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    const float c = z[j] * inv[j];
    z[j] = scale * rule.modulated(c);
    m = z[j] > m ? z[j] : m;
  }
  return m;
}

MK_VECTOR_CLONES
float row_max(const float* z, int64_t n) {
  float m = z[0];
#pragma omp simd reduction(max : m)
  for (int64_t j = 1; j < n; ++j) m = z[j] > m ? z[j] : m;
  return m;
}

MK_VECTOR_CLONES
float row_sum_exp(const float* z, int64_t n, float shift) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += exp_f32(z[j] - shift);
  return acc;
}

MK_VECTOR_CLONES
float exp_in_place_sum(float* z, int64_t n, float shift) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) {
    z[j] = exp_f32(z[j] - shift);
    acc += z[j];
  }
  return acc;
}

MK_VECTOR_CLONES
void scale_columns(float* z, const float* inv, int64_t n, float coef) {
  for (int64_t j = 0; j < n; ++j) z[j] = coef * z[j] * inv[j];
}

MK_VECTOR_CLONES
void softmax_grad_from_logits(float* l, const float* inv, int64_t n, float scale,
                              float shift, float coef) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) l[j] = coef * exp_f32(scale * l[j] * inv[j] - shift) * inv[j];
}

MK_VECTOR_CLONES
void softmax_grad_from_logits_hard(float* l, const float* inv, int64_t n, float scale,
                                   float shift, float coef, HardRule rule) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float c = l[j] * inv[j];
    l[j] = coef * exp_f32(scale * rule.modulated(c) - shift) * rule.factor(c) * inv[j];
  }
}

namespace {

// Fixed sub-center counts unroll the inner loop, so that the class loop
// vectorizes (strided loads of a constant stride).
template <int kSubs>
inline void collapse_fixed(const float* row, const float* inv, int64_t n, float* out, int32_t* arg) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    float best = row[j * kSubs] * inv[j * kSubs];
    int32_t at = 0;
    for (int k = 1; k < kSubs; ++k) {
      const float v = row[j * kSubs + k] * inv[j * kSubs + k];
      at = v > best ? k : at;
      best = v > best ? v : best;
    }
    out[j] = best;
    arg[j] = at;
  }
}

template <int kSubs>
inline void expand_fixed(const float* g, const float* inv, int64_t n, const int32_t* arg, float* row) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    for (int k = 0; k < kSubs; ++k) row[j * kSubs + k] = k == arg[j] ? g[j] * inv[j * kSubs + k] : 0.0f;
  }
}

}  // namespace

MK_VECTOR_CLONES
void collapse_subcenters(const float* row, const float* inv, int64_t n, int64_t subs, float* out, int32_t* arg) {
  switch (subs) {
    case 2: return collapse_fixed<2>(row, inv, n, out, arg);
    case 3: return collapse_fixed<3>(row, inv, n, out, arg);
    case 4: return collapse_fixed<4>(row, inv, n, out, arg);
    default: break;
  }
  for (int64_t j = 0; j < n; ++j) {
    const float* c = row + j * subs;
    const float* w = inv + j * subs;
    float best = c[0] * w[0];
    int32_t at = 0;
    for (int64_t k = 1; k < subs; ++k) {
      const float v = c[k] * w[k];
      if (v > best) {
        best = v;
        at = static_cast<int32_t>(k);
      }
    }
    out[j] = best;
    arg[j] = at;
  }
}

MK_VECTOR_CLONES
void expand_subcenters(const float* g, const float* inv, int64_t n, int64_t subs, const int32_t* arg, float* row) {
  switch (subs) {
    case 2: return expand_fixed<2>(g, inv, n, arg, row);
    case 3: return expand_fixed<3>(g, inv, n, arg, row);
    case 4: return expand_fixed<4>(g, inv, n, arg, row);
    default: break;
  }
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t k = 0; k < subs; ++k) row[j * subs + k] = k == arg[j] ? g[j] * inv[j * subs + k] : 0.0f;
  }
}

MK_VECTOR_CLONES
void hard_factors(const float* z, const float* inv, int64_t n, HardRule rule, float* out) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float c = z[j] * inv[j];
    out[j] = rule.factor(c);
  }
}

MK_VECTOR_CLONES
void multiply(float* z, const float* f, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) z[j] *= f[j];
}

MK_VECTOR_CLONES
void sub_scaled(float* y, const float* x, float a, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] -= a * x[j];
}

MK_VECTOR_CLONES
float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += a[j] * b[j];
  return acc;
}

}  // namespace margin_kernels::cpu
