// CUDA epilogue kernels of the class-blocked margin loss. One thread block per
// row for the row reductions (warp shuffles, then shared memory: no atomics);
// plain grid-stride elementwise kernels elsewhere.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include "../epilogue_math.h"
#include "epilogue.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Reduce over the block; every thread gets the result.
template <bool kMax>
__device__ float block_reduce(float v, float* scratch) {
  v = kMax ? warp_max(v) : warp_sum(v);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = kMax ? -INFINITY : 0.0f;
  if (threadIdx.x < 32) {
    r = threadIdx.x < kWarps ? scratch[threadIdx.x] : r;
    r = kMax ? warp_max(r) : warp_sum(r);
    if (threadIdx.x == 0) scratch[0] = r;
  }
  __syncthreads();
  r = scratch[0];
  __syncthreads();  // scratch is reused by the next reduction
  return r;
}

using margin_kernels::math::HardRule;

__device__ __forceinline__ float z_at(const float* row, int64_t j, int64_t subs, const float* inv, float scale,
                                      int64_t t, float target, const HardRule& rule) {
  int64_t arg;
  return j == t ? target : scale * rule.modulated(margin_kernels::math::class_cosine(row, j, subs, inv, &arg));
}

template <typename T>
__global__ void row_inv_norms_kernel(const T* __restrict__ x, int64_t dim, int64_t ld, float eps,
                                     float* __restrict__ inv) {
  __shared__ float scratch[kWarps];
  const T* row = x + blockIdx.x * ld;
  float acc = 0.0f;
  for (int64_t k = threadIdx.x; k < dim; k += kThreads) {
    const float v = to_float(row[k]);
    acc += v * v;
  }
  // Not fmaxf, which drops a NaN: a NaN norm must reach the callers' NaN check.
  const float norm = sqrtf(block_reduce<false>(acc, scratch));
  const float r = 1.0f / (norm < eps ? eps : norm);
  if (threadIdx.x == 0) inv[blockIdx.x] = r;
}

__global__ void forward_epilogue_kernel(const float* __restrict__ logits, int64_t B, int64_t K, int64_t subs,
                                        int64_t ld,
                                        const float* __restrict__ inv, float scale,
                                        const int64_t* __restrict__ labels, int64_t col0,
                                        const float* __restrict__ target, const float* __restrict__ hard,
                                        float* __restrict__ row_max, float* __restrict__ row_sum) {
  __shared__ float scratch[kWarps];
  const int64_t i = blockIdx.x;
  const float* row = logits + i * ld;
  const int64_t t = labels[i] >= 0 ? labels[i] - col0 : -1;
  const float tgt = target[i];
  const HardRule hr = margin_kernels::math::hard_rule(hard, i, B);
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < K; j += kThreads) m = fmaxf(m, z_at(row, j, subs, inv, scale, t, tgt, hr));
  const float old_max = row_max[i];
  const float new_max = fmaxf(old_max, block_reduce<true>(m, scratch));
  float s = 0.0f;
  for (int64_t j = threadIdx.x; j < K; j += kThreads) s += __expf(z_at(row, j, subs, inv, scale, t, tgt, hr) - new_max);
  s = block_reduce<false>(s, scratch);
  if (threadIdx.x == 0) {
    row_sum[i] = row_sum[i] * __expf(old_max - new_max) + s;
    row_max[i] = new_max;
  }
}

template <typename T>
__global__ void backward_epilogue_kernel(const float* logits,  // may alias dz
                                         int64_t B, int64_t K, int64_t subs, int64_t ld,
                                         const float* __restrict__ inv, float scale,
                                         const int64_t* __restrict__ labels, int64_t col0,
                                         const float* __restrict__ hard, const float* __restrict__ lse,
                                         const float* __restrict__ grad, T* dz, int64_t ld_out) {
  // One thread per (row, class): it reads the class's columns before writing them.
  const int64_t n = B * K;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t i = e / K, j = e % K;
    const float coef = grad[i] * scale;
    const bool is_target = labels[i] >= 0 && labels[i] - col0 == j;
    const HardRule hr = margin_kernels::math::hard_rule(hard, i, B);
    int64_t arg;
    const float c = margin_kernels::math::class_cosine(logits + i * ld, j, subs, inv, &arg);
    const float d = coef == 0.0f || is_target
                        ? 0.0f
                        : margin_kernels::math::softmax_grad(c, scale, lse[i], coef, hr, [](float v) { return __expf(v); });
    for (int64_t k = 0; k < subs; ++k) {
      const int64_t col = j * subs + k;
      dz[i * ld_out + col] = from_float<T>(k == arg ? d * inv[col] : 0.0f);
    }
  }
}

template <typename TW, typename TO>
__global__ void project_rows_kernel(const float* G, const TW* __restrict__ w, int64_t dim, int64_t ld_w,
                                    const float* __restrict__ inv, TO* out) {
  __shared__ float scratch[kWarps];
  const int64_t j = blockIdx.x;
  const float* g = G + j * dim;
  const TW* wr = w + j * ld_w;
  float acc = 0.0f;
  for (int64_t k = threadIdx.x; k < dim; k += kThreads) acc += to_float(wr[k]) * g[k];
  const float a = inv[j] * inv[j] * block_reduce<false>(acc, scratch);
  for (int64_t k = threadIdx.x; k < dim; k += kThreads) out[j * dim + k] = from_float<TO>(g[k] - a * to_float(wr[k]));
}

int elementwise_blocks(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return (int)(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

template <typename TW>
cudaError_t project_as(const float* G, const TW* w, int64_t rows, int64_t dim, int64_t ld_w, const float* inv,
                       void* out, int out_dtype, cudaStream_t stream) {
  switch (out_dtype) {
    case MK_FLOAT32: project_rows_kernel<TW, float><<<rows, kThreads, 0, stream>>>(G, w, dim, ld_w, inv, (float*)out); break;
    case MK_BFLOAT16: project_rows_kernel<TW, __nv_bfloat16><<<rows, kThreads, 0, stream>>>(G, w, dim, ld_w, inv, (__nv_bfloat16*)out); break;
    case MK_FLOAT16: project_rows_kernel<TW, __half><<<rows, kThreads, 0, stream>>>(G, w, dim, ld_w, inv, (__half*)out); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t mk_row_inv_norms(const void* x, int dtype, int64_t rows, int64_t dim, int64_t ld,
                                        float eps, float* inv, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (dtype) {
    case MK_FLOAT32: row_inv_norms_kernel<<<rows, kThreads, 0, stream>>>((const float*)x, dim, ld, eps, inv); break;
    case MK_BFLOAT16: row_inv_norms_kernel<<<rows, kThreads, 0, stream>>>((const __nv_bfloat16*)x, dim, ld, eps, inv); break;
    case MK_FLOAT16: row_inv_norms_kernel<<<rows, kThreads, 0, stream>>>((const __half*)x, dim, ld, eps, inv); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

extern "C" cudaError_t mk_forward_epilogue(const float* logits, int64_t B, int64_t K, int64_t subs, int64_t ld,
                                           const float* inv,
                                           float scale, const int64_t* labels_local, int64_t col0, const float* target,
                                           const float* hard, float* row_max, float* row_sum, cudaStream_t stream) {
  if (B == 0 || K == 0) return cudaSuccess;
  forward_epilogue_kernel<<<B, kThreads, 0, stream>>>(logits, B, K, subs, ld, inv, scale, labels_local, col0, target, hard,
                                                      row_max, row_sum);
  return cudaGetLastError();
}

extern "C" cudaError_t mk_backward_epilogue(const float* logits, int64_t B, int64_t K, int64_t subs, int64_t ld,
                                            const float* inv,
                                            float scale, const int64_t* labels_local, int64_t col0,
                                            const float* hard, const float* lse, const float* grad, void* dz,
                                            int out_dtype, int64_t ld_out, cudaStream_t stream) {
  if (B == 0 || K == 0) return cudaSuccess;
  const int blocks = elementwise_blocks(B * K);
  switch (out_dtype) {
    case MK_FLOAT32:
      backward_epilogue_kernel<<<blocks, kThreads, 0, stream>>>(logits, B, K, subs, ld, inv, scale, labels_local, col0,
                                                                hard, lse, grad, (float*)dz, ld_out);
      break;
    case MK_BFLOAT16:
      backward_epilogue_kernel<<<blocks, kThreads, 0, stream>>>(logits, B, K, subs, ld, inv, scale, labels_local, col0,
                                                                hard, lse, grad, (__nv_bfloat16*)dz, ld_out);
      break;
    case MK_FLOAT16:
      backward_epilogue_kernel<<<blocks, kThreads, 0, stream>>>(logits, B, K, subs, ld, inv, scale, labels_local, col0,
                                                                hard, lse, grad, (__half*)dz, ld_out);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

extern "C" cudaError_t mk_project_rows(const float* G, const void* w, int w_dtype, int64_t rows, int64_t dim,
                                       int64_t ld_w, const float* inv, void* out, int out_dtype, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (w_dtype) {
    case MK_FLOAT32: return project_as(G, (const float*)w, rows, dim, ld_w, inv, out, out_dtype, stream);
    case MK_BFLOAT16: return project_as(G, (const __nv_bfloat16*)w, rows, dim, ld_w, inv, out, out_dtype, stream);
    case MK_FLOAT16: return project_as(G, (const __half*)w, rows, dim, ld_w, inv, out, out_dtype, stream);
    default: return cudaErrorInvalidValue;
  }
}
