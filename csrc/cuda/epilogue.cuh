// Launchers of the CUDA epilogue kernels. Raw pointers, sizes and a stream:
// this header and the .cu files include only CUDA's own headers, so they
// compile with plain `nvcc -c` on machines whose torch has no CUDA.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element types of the weight / gradient tensors.
enum mk_dtype { MK_FLOAT32 = 0, MK_BFLOAT16 = 1, MK_FLOAT16 = 2 };

// inv[r] = 1 / max(||x_r||, eps) over rows of a [rows, dim] matrix (row stride
// `ld`), NaN for a row with a NaN.
cudaError_t mk_row_inv_norms(const void* x, int dtype, int64_t rows, int64_t dim, int64_t ld,
                             float eps, float* inv, cudaStream_t stream);

// `hard` (may be NULL): the hard-negative rule, [4, B] fp32 (thresholds, then
// a, b, d): a non-target cosine c > hard[i] counts as m(c) = (a c + b) c + d.

// `subs` (>= 1): each of the block's K classes is `subs` consecutive logits
// columns (sub-centers), inv has one entry per column, and a class's cosine is
// the max over its columns of logits * inv (its gradient goes to the arg-max
// column, the first of ties).

// One class block of the forward: logits [B, K subs] (fp32, row stride ld) -> z
// = scale * cos (hard negatives modulated) with class labels_local[i] - col0
// replaced by target[i]; updates the running row max / sum-exp in place.
cudaError_t mk_forward_epilogue(const float* logits, int64_t B, int64_t K, int64_t subs, int64_t ld,
                                const float* inv, float scale, const int64_t* labels_local,
                                int64_t col0, const float* target, const float* hard,
                                float* row_max, float* row_sum, cudaStream_t stream);

// One class block of the backward: dz = g s softmax (times the modulation's
// derivative at hard negatives) and inv[col] at each class's arg-max column, 0
// at its other columns and at the target class (its share is added by the
// caller), written as `out_dtype` into dz [B, K subs] (row stride ld_out; may
// alias logits when out_dtype is float32).
cudaError_t mk_backward_epilogue(const float* logits, int64_t B, int64_t K, int64_t subs, int64_t ld,
                                 const float* inv, float scale, const int64_t* labels_local,
                                 int64_t col0, const float* hard, const float* lse,
                                 const float* grad, void* dz, int out_dtype, int64_t ld_out,
                                 cudaStream_t stream);

// dW_j = G_j - w_j inv_j^2 (w_j . G_j) for rows of G (fp32 [K, dim]), written
// as out_dtype into out (may alias G when float32): d/dw from d/d(w_hat).
cudaError_t mk_project_rows(const float* G, const void* w, int w_dtype, int64_t rows, int64_t dim,
                            int64_t ld_w, const float* inv, void* out, int out_dtype,
                            cudaStream_t stream);

#ifdef __cplusplus
}
#endif
