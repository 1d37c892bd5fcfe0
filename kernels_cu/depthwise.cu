// Depthwise sparse convolution, IMPLICIT algorithm (sparsevox/algorithms/depthwise_implicit.py).
//
//   forward: out[o, c]  = sum_k x[nbr[k][o], c] * w[k, c]        (nbr[k][o] = input row or -1)
//   dgrad:   gin[i, c]  = sum_k g[rev[k][i], c] * w[k, c]        (rev[k][i] = output row or -1)
//   wgrad:   dw[k, c]   = sum_{pairs j of offset k} x[in_j, c] * g[out_j, c]
//
// forward and dgrad are one gather kernel: each thread owns one destination row and ILP channel
// vectors of VEC elements, loops over the row's neighbours, accumulates in registers (float32,
// float64 for double) and writes each element once — no atomics, no zero-fill of the output. The
// neighbours come from a dense table [K, rows] (depthwise_gather) or from a per-row list of the
// present ones (depthwise_gather_list); the autotuner picks.
// wgrad: each block reduces a chunk of one offset's pairs in registers, then across its rows in
// shared memory, then issues one atomicAdd per (block, c) into a float32 (float64) buffer.
//
// Template parameters (instantiated by name_expressions, never copied):
//   T   : __half, __nv_bfloat16, float, double
//   VEC : elements per vector load; VEC * sizeof(T) <= 16 and C % VEC == 0 (the host picks the
//         widest that divides C and the pointers' alignment; VEC = 1 is the scalar path for odd C)
//   ILP : channel vectors per thread in the gather kernel (more loads in flight per thread)
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace sparsevox_dw {

template <typename T> struct AccOf { typedef float type; };
template <> struct AccOf<double> { typedef double type; };

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T> __device__ __forceinline__ T from_acc(typename AccOf<T>::type v);
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

// VEC elements moved as one aligned 2/4/8/16-byte access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* __restrict__ p) {
    return *reinterpret_cast<const Pack<T, VEC>*>(p);
}

// Streaming store (evict-first): outputs are written once and never re-read by this kernel, so keep
// L2 for the input rows that neighbouring outputs share.
template <int BYTES> struct StoreAs;
template <> struct StoreAs<16> { typedef int4 type; };
template <> struct StoreAs<8> { typedef int2 type; };
template <> struct StoreAs<4> { typedef int type; };
template <> struct StoreAs<2> { typedef short type; };

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& v) {
    typedef typename StoreAs<sizeof(T) * VEC>::type S;
    __stcs(reinterpret_cast<S*>(p), *reinterpret_cast<const S*>(&v));
}

// Neighbours processed per step of the gather loop: their indices are read first, then their rows,
// so UNROLL independent row loads are in flight per channel vector.
constexpr int UNROLL = 4;

// acc[j] += src[idx[u], vector cv_j] * weight[kk[u], vector cv_j] for the UNROLL neighbours of one
// step (idx < 0: absent). All row loads are issued before the first multiply.
template <typename T, int VEC, int ILP>
__device__ __forceinline__ void accumulate(const int (&idx)[UNROLL], const int (&kk)[UNROLL],
        const T* __restrict__ src, const T* __restrict__ weight, int C, int nvec, int g, int groups,
        typename AccOf<T>::type (&acc)[ILP][VEC]) {
    Pack<T, VEC> xs[UNROLL][ILP];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
#pragma unroll
        for (int j = 0; j < ILP; ++j) {
            const int cv = g + j * groups;
            if (idx[u] >= 0 && cv < nvec) xs[u][j] = load_pack<T, VEC>(src + (size_t)idx[u] * C + (size_t)cv * VEC);
        }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        if (idx[u] < 0) continue;
#pragma unroll
        for (int j = 0; j < ILP; ++j) {
            const int cv = g + j * groups;
            if (cv >= nvec) continue;
            const Pack<T, VEC> w = load_pack<T, VEC>(weight + (size_t)kk[u] * C + (size_t)cv * VEC);
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[j][v] += to_acc(xs[u][j].v[v]) * to_acc(w.v[v]);
        }
    }
}

template <typename T, int VEC, int ILP>
__device__ __forceinline__ void write_row(T* __restrict__ dst, int row, int C, int nvec, int g, int groups,
                                          const typename AccOf<T>::type (&acc)[ILP][VEC]) {
#pragma unroll
    for (int j = 0; j < ILP; ++j) {
        const int cv = g + j * groups;
        if (cv >= nvec) continue;
        Pack<T, VEC> o;
#pragma unroll
        for (int v = 0; v < VEC; ++v) o.v[v] = from_acc<T>(acc[j][v]);
        store_pack<T, VEC>(dst + (size_t)row * C + (size_t)cv * VEC, o);
    }
}

}  // namespace sparsevox_dw

// Both gather kernels: one thread per (row, group of ILP channel vectors); groups = ceil(C / VEC / ILP)
// threads per row, whose vectors are g, g + groups, ... so neighbouring threads read neighbouring
// 16-byte pieces of a row. Accumulation in registers, each destination element written once.
#define SPARSEVOX_DW_THREAD_SETUP                                                   \
    using namespace sparsevox_dw;                                                   \
    typedef typename AccOf<T>::type A;                                              \
    const int nvec = C / VEC;                                                       \
    const int groups = (nvec + ILP - 1) / ILP;                                      \
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;         \
    if (tid >= (long long)rows * groups) return;                                    \
    const int row = (int)(tid / groups);                                            \
    const int g = (int)(tid - (long long)row * groups);                             \
    A acc[ILP][VEC];                                                                \
    _Pragma("unroll") for (int j = 0; j < ILP; ++j)                                 \
        _Pragma("unroll") for (int v = 0; v < VEC; ++v) acc[j][v] = A(0);

// Dense table: dst[r, c] = sum_k src[table[k * rows + r], c] * weight[k, c]   (entry -1: absent)
//   src [n_src, C] T row-major;  weight [K, C] T;  table [K, rows] int32;  dst [rows, C] T
// Loops over all K offsets (UNROLL table entries, then their rows, per step).
template <typename T, int VEC, int ILP>
__global__ void __launch_bounds__(512) depthwise_gather(
        const T* __restrict__ src, const T* __restrict__ weight, const int* __restrict__ table,
        T* __restrict__ dst, int rows, int K, int C) {
    SPARSEVOX_DW_THREAD_SETUP
    const int* __restrict__ trow = table + row;
    for (int k0 = 0; k0 < K; k0 += UNROLL) {
        int idx[UNROLL], kk[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            kk[u] = k0 + u;
            idx[u] = (k0 + u < K) ? trow[(size_t)(k0 + u) * rows] : -1;
        }
        accumulate<T, VEC, ILP>(idx, kk, src, weight, C, nvec, g, groups, acc);
    }
    write_row<T, VEC, ILP>(dst, row, C, nvec, g, groups, acc);
}

// Per-row list (the present neighbours only): dst[r, c] = sum_{j in [ptr[r], ptr[r+1])}
//   src[nb[j].x, c] * weight[nb[j].y, c];   ptr [rows + 1] int32;  nb [L] int2 (source row, offset k)
// Reads 8 bytes per present neighbour instead of 4 * K per row, and the dependent-load chain per row is
// ptr -> nb -> rows (one step covers up to UNROLL neighbours) instead of K / UNROLL table steps.
template <typename T, int VEC, int ILP>
__global__ void __launch_bounds__(512) depthwise_gather_list(
        const T* __restrict__ src, const T* __restrict__ weight, const int* __restrict__ ptr,
        const int2* __restrict__ nb, T* __restrict__ dst, int rows, int C) {
    SPARSEVOX_DW_THREAD_SETUP
    const int beg = ptr[row], end = ptr[row + 1];
    for (int j0 = beg; j0 < end; j0 += UNROLL) {
        int idx[UNROLL], kk[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            int2 e;
            e.x = -1;
            e.y = 0;
            if (j0 + u < end) e = nb[j0 + u];
            idx[u] = e.x;
            kk[u] = e.y;
        }
        accumulate<T, VEC, ILP>(idx, kk, src, weight, C, nvec, g, groups, acc);
    }
    write_row<T, VEC, ILP>(dst, row, C, nvec, g, groups, acc);
}
#undef SPARSEVOX_DW_THREAD_SETUP

// dw[k, c] += sum over pairs j in [offsets[k] + blockIdx.x * chunk, ... + chunk) of x[in_j, c] * g[out_j, c]
//   x [n_in, C] T;  g [n_out, C] T;  in_maps/out_maps [L] int32;  offsets [K + 1] int32;
//   dw [K, C] AccOf<T> (float32 / float64), zeroed by the caller.
// grid (chunks, K, channel blocks); block (bx channel vectors, by pair lanes); dynamic shared memory
// by * VEC * bx accumulators. One atomicAdd per (block, c), not per pair.
template <typename T, int VEC>
__global__ void depthwise_wgrad(
        const T* __restrict__ x, const T* __restrict__ g, const int* __restrict__ in_maps,
        const int* __restrict__ out_maps, const int* __restrict__ offsets,
        typename sparsevox_dw::AccOf<T>::type* __restrict__ dw, int C, int chunk) {
    using namespace sparsevox_dw;
    typedef typename AccOf<T>::type A;
    extern __shared__ unsigned char smem_raw[];
    A* red = reinterpret_cast<A*>(smem_raw);  // [by][VEC][bx]: v-major so lanes hit distinct banks

    const int k = blockIdx.y;
    const int begin = offsets[k] + blockIdx.x * chunk;
    const int end = min(offsets[k + 1], begin + chunk);
    if (begin >= end) return;  // uniform over the block: no thread reaches the barrier below

    const int nvec = C / VEC;
    const int bx = blockDim.x, by = blockDim.y;
    const int cv = blockIdx.z * bx + threadIdx.x;
    A acc[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] = A(0);
    if (cv < nvec) {
#pragma unroll 4
        for (int j = begin + threadIdx.y; j < end; j += by) {
            const Pack<T, VEC> xv = load_pack<T, VEC>(x + (size_t)in_maps[j] * C + (size_t)cv * VEC);
            const Pack<T, VEC> gv = load_pack<T, VEC>(g + (size_t)out_maps[j] * C + (size_t)cv * VEC);
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[v] += to_acc(xv.v[v]) * to_acc(gv.v[v]);
        }
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v) red[(threadIdx.y * VEC + v) * bx + threadIdx.x] = acc[v];
    __syncthreads();
    // Every thread of the block sums some of the bx * VEC columns over the by lanes.
    for (int p = threadIdx.y * bx + threadIdx.x; p < bx * VEC; p += bx * by) {
        const int v = p / bx, tx = p - v * bx;
        const int c_vec = blockIdx.z * bx + tx;
        if (c_vec >= nvec) continue;
        A s = A(0);
        for (int y = 0; y < by; ++y) s += red[(y * VEC + v) * bx + tx];
        atomicAdd(dw + (size_t)k * C + (size_t)c_vec * VEC + v, s);
    }
}

// dst[i] = (T) src[i]: the float32 wgrad accumulator rounded to the half-precision result (one launch,
// independent of the array library's support for bfloat16).
template <typename T>
__global__ void depthwise_cast(const float* __restrict__ src, T* __restrict__ dst, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = sparsevox_dw::from_acc<T>(src[i]);
}

// table[k * rows + to[j]] = from[j] for every pair j (k found by binary search in offsets).
// Forward table: from = in_maps, to = out_maps, rows = num_out; reverse: the other way round.
// The caller fills table with -1 first. Within one offset each row occurs at most once, so the
// writes never collide.
extern "C" __global__ void depthwise_build_table(
        const int* __restrict__ from, const int* __restrict__ to, const int* __restrict__ offsets,
        int K, int L, int rows, int* __restrict__ table) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= L) return;
    int lo = 0, hi = K;  // find the k with offsets[k] <= j < offsets[k + 1] (empty offsets skipped)
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (offsets[mid] <= j) lo = mid; else hi = mid - 1;
    }
    table[(size_t)lo * rows + to[j]] = from[j];
}

// The per-row list of present neighbours, from the table: nb[ptr[r] + n] = (table[k][r], k) for the
// n-th present k of row r, k ascending. ptr [rows + 1] is the exclusive prefix sum of the per-row
// counts (computed by the caller). One thread per row; no device-to-host copy is needed because the
// list length is the map's pair count, known on the host.
extern "C" __global__ void depthwise_build_list(
        const int* __restrict__ table, int K, int rows, const int* __restrict__ ptr, int2* __restrict__ nb) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    int n = ptr[r];
    for (int k = 0; k < K; ++k) {
        const int s = table[(size_t)k * rows + r];
        if (s >= 0) {
            int2 e;
            e.x = s;
            e.y = k;
            nb[n++] = e;
        }
    }
}
