// Kernel maps on the GPU (sparsevox/gpu_kernel_map.py): a hash table of the input voxels, one query
// per (offset k, output row m), and a stable compaction that yields the canonical CSR order
// (by k, then by output row) without sorting.
//
//   kmap_insert          coords [N, 4] -> hash table (value = row); flags duplicates / bad rows
//   kmap_query           cand[k, m] = input row paired with output row m by offset k, or -1;
//                        counts[k, b] = hits of output block b (one entry per BLOCK rows)
//                        non-transposed: in = s * out + off_k; transposed: out = s * in + off_k,
//                        i.e. in = (out - off_k) / s when every axis divides exactly
//   kmap_scan            one block: exclusive scan of counts in place, offsets[K + 1], and the
//                        host-bound info row (offsets, then the two status words)
//   kmap_compact         writes the pairs of cand in (k, m) order at the scanned positions
//   kmap_candidate_keys  packed keys of floor(c / s) (strided outputs) or s * c + off_k (generated)
//   kmap_unique_*        head flags, count and unpacking of a sorted key array (unique outputs)
//
// Index arithmetic is 64-bit where a product can exceed 2^31 (K * M, s * c + off); the host checks
// that K * M and the pair count fit int32 (KernelMap stores int32 maps and offsets).
// Every kernel is a template on its block size BLOCK (a multiple of 32, at most 1024).
#include "common/hash.cuh"

namespace svx_kmap {

using svx_hash::EMPTY_KEY;

// Offset along one axis of kernel position i (DESIGN.md): odd size k -> (i - (k-1)/2) * d, even -> i * d.
__device__ __forceinline__ long long axis_offset(int i, int k, int d) {
    return (long long)((k & 1) ? i - (k - 1) / 2 : i) * d;
}

__device__ __forceinline__ void offset_of(int k, int kx, int ky, int kz, int dx, int dy, int dz,
                                          long long* o) {
    const int l = k % kz;
    const int j = (k / kz) % ky;
    const int i = k / (ky * kz);
    o[0] = axis_offset(i, kx, dx);
    o[1] = axis_offset(j, ky, dy);
    o[2] = axis_offset(l, kz, dz);
}

__device__ __forceinline__ long long floor_div(long long a, long long s) {
    return a >= 0 ? a / s : -((-a + s - 1) / s);
}

// Inclusive prefix sum of v over the block. `warp_sums` is shared scratch of BLOCK / 32 ints; on
// return warp_sums[BLOCK / 32 - 1] holds the block total. The caller syncs before reusing it.
template <int BLOCK>
__device__ __forceinline__ int block_inclusive_scan(int v, int* warp_sums) {
    static_assert(BLOCK % 32 == 0 && BLOCK <= 1024, "BLOCK must be a multiple of 32, at most 1024");
    constexpr int WARPS = BLOCK / 32;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int t = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += t;
    }
    if (lane == 31) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
        int w = lane < WARPS ? warp_sums[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int t = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += t;
        }
        if (lane < WARPS) warp_sums[lane] = w;
    }
    __syncthreads();
    if (warp > 0) v += warp_sums[warp - 1];
    return v;
}

// Status words: atomicMin keeps the smallest offending index, so the report is deterministic.
__device__ __forceinline__ void flag_min(unsigned long long* word, long long index) {
    atomicMin(word, (unsigned long long)index);
}

}  // namespace svx_kmap

// coords [n, 4] int32 (batch, x, y, z) -> table. status = table + 2 * (mask + 1) + 2:
//   status[0] = smallest row whose key was already present (a duplicate voxel), EMPTY if none
//   status[1] = smallest row outside the packable range, EMPTY if none (not inserted)
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) kmap_insert(const int* __restrict__ coords, int n,
                                                     unsigned long long* __restrict__ table,
                                                     unsigned long long mask) {
    using namespace svx_hash;
    const long long row = (long long)blockIdx.x * BLOCK + threadIdx.x;
    if (row >= n) return;
    unsigned long long* status = table + 2 * (mask + 1) + 2;
    const int* c = coords + 4 * row;
    const long long b = c[0], x = c[1], y = c[2], z = c[3];
    if (!in_range(b, x, y, z)) {
        svx_kmap::flag_min(status + 1, row);
        return;
    }
    if (!insert(table, mask, pack_key(b, x, y, z), (int)row)) svx_kmap::flag_min(status, row);
}

// Grid: K * nbm blocks (nbm = ceil(m / BLOCK)); block g handles offset k = g / nbm and output
// rows [(g % nbm) * BLOCK, ... + BLOCK).
//   qcoords [m, 4] int32 output sites;  cand [K, m] int32;  counts [K, nbm] int32
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) kmap_query(
        const int* __restrict__ qcoords, int m, int nbm, int transposed, int sx, int sy, int sz, int kx,
        int ky, int kz, int dx, int dy, int dz, const unsigned long long* __restrict__ table,
        unsigned long long mask, int* __restrict__ cand, int* __restrict__ counts) {
    using namespace svx_hash;
    const int k = blockIdx.x / nbm;
    const int bm = blockIdx.x % nbm;
    const int row = bm * BLOCK + threadIdx.x;
    int found = -1;
    if (row < m) {
        long long o[3];
        svx_kmap::offset_of(k, kx, ky, kz, dx, dy, dz, o);
        const int* c = qcoords + 4 * (long long)row;
        const long long s[3] = {sx, sy, sz};
        long long q[3];
        bool ok = true;
#pragma unroll
        for (int a = 0; a < 3; ++a) {
            if (transposed) {  // out = s * in + off  <=>  in = (out - off) / s, exactly
                const long long d = (long long)c[a + 1] - o[a];
                ok = ok && (d % s[a] == 0);
                q[a] = d / s[a];
            } else {
                q[a] = s[a] * (long long)c[a + 1] + o[a];
            }
        }
        const long long b = c[0];
        if (ok && in_range(b, q[0], q[1], q[2])) found = lookup(table, mask, pack_key(b, q[0], q[1], q[2]));
        cand[(long long)k * m + row] = found;
    }
    const int hits = __syncthreads_count(found >= 0);
    if (threadIdx.x == 0) counts[blockIdx.x] = hits;
}

// One block. counts [total = K * nbm] -> exclusive prefix sums in place; offsets [K + 1] int32;
// info [K + 3] int64 = offsets, then status[0], status[1] (EMPTY reads as -1), copied to the host
// in one transfer.
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) kmap_scan(int* __restrict__ counts, int total, int nbm, int K,
                                                   int* __restrict__ offsets, long long* __restrict__ info,
                                                   const unsigned long long* __restrict__ status) {
    __shared__ int warp_sums[BLOCK / 32];
    long long carry = 0;  // same value in every thread
    for (int base = 0; base < total; base += BLOCK) {
        const int idx = base + threadIdx.x;
        const int v = idx < total ? counts[idx] : 0;
        const int incl = svx_kmap::block_inclusive_scan<BLOCK>(v, warp_sums);
        const long long excl = carry + incl - v;
        if (idx < total) {
            counts[idx] = (int)excl;
            if (idx % nbm == 0) {
                offsets[idx / nbm] = (int)excl;
                info[idx / nbm] = excl;
            }
        }
        carry += warp_sums[BLOCK / 32 - 1];
        __syncthreads();  // warp_sums is rewritten by the next chunk
    }
    if (threadIdx.x == 0) {
        offsets[K] = (int)carry;
        info[K] = carry;
        info[K + 1] = (long long)status[0];
        info[K + 2] = (long long)status[1];
    }
}

// Same grid as kmap_query. Pair j of block (k, bm) lands at base[k * nbm + bm] + (hits before it in
// the block), so pairs keep increasing output row within each k: the canonical order.
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) kmap_compact(const int* __restrict__ cand, int m, int nbm,
                                                      const int* __restrict__ base,
                                                      int* __restrict__ in_maps, int* __restrict__ out_maps) {
    __shared__ int warp_sums[BLOCK / 32];
    const int k = blockIdx.x / nbm;
    const int bm = blockIdx.x % nbm;
    const int row = bm * BLOCK + threadIdx.x;
    const int v = row < m ? cand[(long long)k * m + row] : -1;
    const int hit = v >= 0 ? 1 : 0;
    const int incl = svx_kmap::block_inclusive_scan<BLOCK>(hit, warp_sums);
    if (hit) {
        const int pos = base[blockIdx.x] + incl - 1;
        in_maps[pos] = v;
        out_maps[pos] = row;
    }
}

// keys [count] where count = n (mode 0) or K * n (mode 1); entry t is offset k = t / n of row t % n.
//   mode 0 (strided outputs):    key of (b, floor(x / sx), floor(y / sy), floor(z / sz))
//   mode 1 (generated outputs):  key of (b, sx * x + ox_k, ...); out of range -> status[1] = min t
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) kmap_candidate_keys(
        const int* __restrict__ coords, int n, int count, int mode, int sx, int sy, int sz, int kx, int ky,
        int kz, int dx, int dy, int dz, unsigned long long* __restrict__ keys,
        unsigned long long* __restrict__ status) {
    using namespace svx_hash;
    const long long t = (long long)blockIdx.x * BLOCK + threadIdx.x;
    if (t >= count) return;
    const int k = (int)(t / n);
    const int* c = coords + 4 * (t % n);
    const long long s[3] = {sx, sy, sz};
    long long q[3];
    if (mode == 0) {
#pragma unroll
        for (int a = 0; a < 3; ++a) q[a] = svx_kmap::floor_div(c[a + 1], s[a]);
    } else {
        long long o[3];
        svx_kmap::offset_of(k, kx, ky, kz, dx, dy, dz, o);
#pragma unroll
        for (int a = 0; a < 3; ++a) q[a] = s[a] * (long long)c[a + 1] + o[a];
    }
    const long long b = c[0];
    if (!in_range(b, q[0], q[1], q[2])) {
        svx_kmap::flag_min(status + 1, t);
        keys[t] = 0;
        return;
    }
    keys[t] = pack_key(b, q[0], q[1], q[2]);
}

// heads[i] = 1 where sorted keys[i] starts a run of equal keys.
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) kmap_unique_heads(const unsigned long long* __restrict__ keys,
                                                           int count, int* __restrict__ heads) {
    const long long i = (long long)blockIdx.x * BLOCK + threadIdx.x;
    if (i >= count) return;
    heads[i] = (i == 0 || keys[i] != keys[i - 1]) ? 1 : 0;
}

// info[0] = number of unique keys (last inclusive prefix), info[1] = status[1] (-1: all in range).
template <int BLOCK>
__global__ void kmap_unique_info(const int* __restrict__ pos, int count,
                                 const unsigned long long* __restrict__ status, long long* __restrict__ info) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        info[0] = count > 0 ? pos[count - 1] : 0;
        info[1] = (long long)status[1];
    }
}

// out [unique, 4] int32: row pos[i] - 1 is the unpacked key of each run head i.
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) kmap_unique_unpack(const unsigned long long* __restrict__ keys,
                                                            const int* __restrict__ heads,
                                                            const int* __restrict__ pos, int count,
                                                            int* __restrict__ out) {
    const long long i = (long long)blockIdx.x * BLOCK + threadIdx.x;
    if (i >= count || !heads[i]) return;
    svx_hash::unpack_key(keys[i], out + 4 * (long long)(pos[i] - 1));
}
