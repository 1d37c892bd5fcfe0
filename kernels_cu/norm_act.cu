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
// Launch: 1-D, any grid (grid-stride loop over the n = rows * c elements).
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

template <typename T, typename P, bool RELU>
__global__ void batchnorm_eval(const T* __restrict__ x, const P* __restrict__ mean, const P* __restrict__ var,
                               const P* __restrict__ w, const P* __restrict__ b, const T* __restrict__ r,
                               T* __restrict__ y, long long n, int c, double eps) {
  using namespace sparsevox_norm;
  typedef typename AccOf<T>::type A;
  const long long step = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step) {
    const int ch = (int)(i % c);
    A v = (to_acc(x[i]) - (A)to_acc(mean[ch])) * inv_sqrt((A)to_acc(var[ch]) + (A)eps);
    if (w) v *= (A)to_acc(w[ch]);
    if (b) v += (A)to_acc(b[ch]);
    if (r) v += to_acc(r[i]);
    if (RELU) v = v < (A)0 ? (A)0 : v;
    store(y + i, v);
  }
}
