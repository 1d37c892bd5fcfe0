// Segment reductions for pooling, unpooling, global pooling and devoxelisation (sparsevox/pooling.py).
//
// A segment list is CSR: destination row r reduces the source rows idx[ptr[r] .. ptr[r+1]) (entries
// with idx < 0 are skipped). Every kernel gives one thread one (row, channel) and writes every output
// element exactly once: no atomics, no zero-fill. Threads of a warp take consecutive channels of one
// row, so the source row reads are coalesced.
//
//   segment_sum:        out[r, c] = sum_j  w[j] * src[idx[j], c]              (w = 1 when use_w == 0)
//   segment_max:        out[r, c] = max_j  src[idx[j], c],  arg[r, c] = the winner's row
//                       (arg_in given: arg_in[idx[j], c], the winner of an earlier pass); the first
//                       entry in segment order wins ties, the first NaN wins over numbers;
//                       an empty segment gives out = 0, arg = -1
//   segment_routed_sum: out[r, c] = sum_j  (arg[idx[j], c] == r) * src[idx[j], c]
//                       (the max's backward: the gradient goes back to the row that won)
//
// Template parameters (instantiated by name_expressions):
//   TI, TO : __half, __nv_bfloat16, float, double (input and output element types; they differ only in
//            the two passes of a long-segment reduction, where the partials are the accumulator type)
// Accumulation is float32 (float64 when the input is double). Launch: block (bx, by), bx consecutive
// channels of by rows; grid (ceil(rows / by), ceil(C / bx)) (rows on x: up to 2^31 - 1 blocks).
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace sparsevox_pool {

template <typename T> struct AccOf { typedef float type; };
template <> struct AccOf<double> { typedef double type; };

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }

template <typename TO, typename A> struct Store;
template <typename TO> struct Store<TO, float> {
    static __device__ __forceinline__ TO get(float v) { return from_acc<TO>(v); }
};
template <> struct Store<double, double> {
    static __device__ __forceinline__ double get(double v) { return v; }
};

// The (row, channel) of this thread, or false when it has none.
__device__ __forceinline__ bool my_element(int rows, int C, long long& r, int& c) {
    r = (long long)blockIdx.x * blockDim.y + threadIdx.y;
    c = blockIdx.y * blockDim.x + threadIdx.x;
    return r < rows && c < C;
}

}  // namespace sparsevox_pool

template <typename TI, typename TO>
__global__ void segment_sum(const TI* __restrict__ src, const int* __restrict__ ptr, const int* __restrict__ idx,
                            const typename sparsevox_pool::AccOf<TI>::type* __restrict__ w, int use_w,
                            TO* __restrict__ out, int rows, int C) {
    using namespace sparsevox_pool;
    typedef typename AccOf<TI>::type A;
    long long r;
    int c;
    if (!my_element(rows, C, r, c)) return;
    A acc = A(0);
    const int end = ptr[r + 1];
    for (int j = ptr[r]; j < end; ++j) {
        const int s = idx[j];
        if (s < 0) continue;
        const A v = to_acc(src[(size_t)s * C + c]);
        acc += use_w ? w[j] * v : v;
    }
    out[(size_t)r * C + c] = Store<TO, A>::get(acc);
}

template <typename TI, typename TO>
__global__ void segment_max(const TI* __restrict__ src, const int* __restrict__ ptr, const int* __restrict__ idx,
                            const int* __restrict__ arg_in, int use_arg_in,
                            TO* __restrict__ out, int* __restrict__ arg, int rows, int C) {
    using namespace sparsevox_pool;
    typedef typename AccOf<TI>::type A;
    long long r;
    int c;
    if (!my_element(rows, C, r, c)) return;
    A best = A(0);
    int who = -1;
    bool seen = false;
    const int end = ptr[r + 1];
    for (int j = ptr[r]; j < end; ++j) {
        const int s = idx[j];
        if (s < 0) continue;
        const size_t at = (size_t)s * C + c;
        const A v = to_acc(src[at]);
        // first entry; a larger value; or the first NaN (NaN compares false, so later ones never replace it)
        if (!seen || v > best || (v != v && best == best)) {
            best = v;
            who = use_arg_in ? arg_in[at] : s;
            seen = true;
        }
    }
    const size_t o = (size_t)r * C + c;
    out[o] = Store<TO, A>::get(seen ? best : A(0));
    arg[o] = who;
}

template <typename T>
__global__ void segment_routed_sum(const T* __restrict__ src, const int* __restrict__ arg,
                                   const int* __restrict__ ptr, const int* __restrict__ idx,
                                   T* __restrict__ out, int rows, int C) {
    using namespace sparsevox_pool;
    typedef typename AccOf<T>::type A;
    long long r;
    int c;
    if (!my_element(rows, C, r, c)) return;
    A acc = A(0);
    const int end = ptr[r + 1];
    for (int j = ptr[r]; j < end; ++j) {
        const int s = idx[j];
        if (s < 0) continue;
        const size_t at = (size_t)s * C + c;
        if (arg[at] == r) acc += to_acc(src[at]);
    }
    out[(size_t)r * C + c] = Store<T, A>::get(acc);
}
