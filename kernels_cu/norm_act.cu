// Inference BatchNorm with the activation and residual add that follow it in a network, in one pass
// (sparsevox/cuda/norm_act.py; the torch BatchNorm module's evaluation path, issue 19):
//
//   y[i, c] = act((x[i, c] - mean[c]) * rsqrt(var[c] + eps) * w[c] + b[c] + r[i, c])
//
// w, b, r may be null (no affine part, no residual); act is ReLU when RELU, else the identity. The
// running statistics are read on every call (nothing derived from them is cached, so writes to them
// through .data are seen). Arithmetic in float32 (float64 for double features), one rounding to T at the
// store: the residual is added before that rounding, where torch rounds the BatchNorm output first.
// ReLU keeps NaN (as torch.relu). Template parameters (instantiated by name_expressions):
//   T: features x, r, y: __half, __nv_bfloat16, float, double
//   P: statistics and affine parameters: float or T
//   V: channels per thread-vector: 16 / sizeof(T) (16-byte loads and stores; c % V == 0 and x, r, y
//      16-byte aligned) or 1
// Launch: block (bx, by), grid (gx, gy), any sizes: thread (tx, ty) takes channel vectors
// j = blockIdx.y * bx + tx (stepping gridDim.y * bx) and for each the rows blockIdx.x * by + ty (stepping
// gridDim.x * by), so a thread reads its channels' statistics and takes their rsqrt once, not per element
// (the one-element-per-thread form, with a 64-bit modulo per element and 2-byte accesses, took 1.37 ms per
// SemanticKITTI float16 step where torch's BatchNorm + ReLU took 0.90; db9c14c step profile).
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace sparsevox_norm {

template <typename T> struct AccOf { typedef float type; };
template <> struct AccOf<double> { typedef double type; };

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }

__device__ __forceinline__ float inv_sqrt(float v) { return rsqrtf(v); }
__device__ __forceinline__ double inv_sqrt(double v) { return rsqrt(v); }

}  // namespace sparsevox_norm

template <typename T, typename P, bool RELU, int V>
__global__ void batchnorm_eval(const T* __restrict__ x, const P* __restrict__ mean, const P* __restrict__ var,
                               const P* __restrict__ w, const P* __restrict__ b, const T* __restrict__ r,
                               T* __restrict__ y, long long rows, int c, double eps) {
  using namespace sparsevox_norm;
  typedef typename AccOf<T>::type A;
  struct alignas(sizeof(T) * V) Vec { T v[V]; };
  const int cv = c / V;
  for (int j = blockIdx.y * blockDim.x + threadIdx.x; j < cv; j += gridDim.y * blockDim.x) {
    A mu[V], inv[V], sc[V], sh[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const int ch = j * V + k;
      mu[k] = (A)to_acc(mean[ch]);
      inv[k] = inv_sqrt((A)to_acc(var[ch]) + (A)eps);
      sc[k] = w ? (A)to_acc(w[ch]) : (A)1;
      sh[k] = b ? (A)to_acc(b[ch]) : (A)0;
    }
    for (long long row = (long long)blockIdx.x * blockDim.y + threadIdx.y; row < rows;
         row += (long long)gridDim.x * blockDim.y) {
      const long long off = row * c + (long long)j * V;
      const Vec xv = *reinterpret_cast<const Vec*>(x + off);
      Vec rv;
      if (r) rv = *reinterpret_cast<const Vec*>(r + off);
      Vec yv;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        // the operations and their order of the per-element form (same results): scale, then add
        A v = (to_acc(xv.v[k]) - mu[k]) * inv[k];
        if (w) v *= sc[k];
        if (b) v += sh[k];
        if (r) v += to_acc(rv.v[k]);
        if (RELU) v = v < (A)0 ? (A)0 : v;
        store(yv.v + k, v);
      }
      *reinterpret_cast<Vec*>(y + off) = yv;
    }
  }
}
