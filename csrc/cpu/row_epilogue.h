// Row-wise epilogue loops over one logits row, on raw float pointers. They hold
// no torch types so that the compiler vectorizes them for each ISA clone.
#pragma once

#include <cstdint>

#include "../epilogue_math.h"

namespace margin_kernels::cpu {

// z_j <- scale * z_j * inv_j, in place; returns max_j z_j (n >= 1).
float scale_columns_max(float* z, const float* inv, int64_t n, float scale);

// A row's hard-negative rule: the math shared with the CUDA epilogue.
using HardRule = math::HardRule;

// Hard negatives modulated: z_j <- scale * m(c_j), c_j = z_j * inv_j, where
// c_j is hard, scale * c_j elsewhere; returns max_j z_j (n >= 1).
float scale_columns_max_hard(float* z, const float* inv, int64_t n, float scale, HardRule rule);

// max_j z_j (n >= 1).
float row_max(const float* z, int64_t n);

// sum_j exp(z_j - shift).
float row_sum_exp(const float* z, int64_t n, float shift);

// z_j <- exp(z_j - shift), in place; returns the sum.
float exp_in_place_sum(float* z, int64_t n, float shift);

// z_j <- coef * z_j * inv_j, in place.
void scale_columns(float* z, const float* inv, int64_t n, float coef);

// l_j <- coef * exp(scale * l_j * inv_j - shift) * inv_j, in place: from raw
// logits straight to d(loss)/d(cos_j) (before the target column's correction),
// with 1/||w_j|| folded in for the weight GEMMs.
void softmax_grad_from_logits(float* l, const float* inv, int64_t n, float scale,
                              float shift, float coef);

// softmax_grad_from_logits through the hard-negative modulation: the logit is
// scale * m(c_j) and the gradient is multiplied by m'(c_j) where c_j is hard.
void softmax_grad_from_logits_hard(float* l, const float* inv, int64_t n, float scale,
                                   float shift, float coef, HardRule rule);

// Sub-center ArcFace over a row of n * subs raw logits (class j's sub-centers
// at j * subs ... j * subs + subs - 1): out[j] <- max_k row[j subs + k] *
// inv[j subs + k], the n class cosines, with arg[j] the arg-max k (the first of
// ties).
void collapse_subcenters(const float* row, const float* inv, int64_t n, int64_t subs, float* out, int32_t* arg);

// The way back: row[j subs + k] <- g[j] * inv[j subs + k] at k = arg[j], 0 at
// the other k: a class's gradient to its arg-max row, scaled by its 1/||w||.
void expand_subcenters(const float* g, const float* inv, int64_t n, int64_t subs, const int32_t* arg, float* row);

// The hard-negative rule's gradient factor per column, c_j = z_j * inv_j:
// m'(c_j) where c_j is hard, 1 elsewhere.
void hard_factors(const float* z, const float* inv, int64_t n, HardRule rule, float* out);

// z_j <- z_j * f_j, in place.
void multiply(float* z, const float* f, int64_t n);

// y <- y - a * x (length n); and the dot product of two rows.
void sub_scaled(float* y, const float* x, float a, int64_t n);
float dot(const float* a, const float* b, int64_t n);

}  // namespace margin_kernels::cpu
