// Kernel maps on the GPU (sparsevox/cuda/gpu_kernel_map.py): a hash table of the input voxels, one kernel
// that queries every (offset k, output row m) into a dense table, and one that compacts its hits in the
// canonical CSR order (by k, then by output row) with a single-pass scan, without sorting.
//
//   kmap_insert          coords [N, 4] -> hash table (value = row); flags duplicates / bad rows
//   kmap_probe           cand[k, m] = input row paired with output row m by offset k, or -1; for a
//                        submanifold map of odd kernel sizes (symmetric = 1) only the offsets before
//                        the centre probe, and scatter their mirror pairs (see there)
//   kmap_compact         one block per tile (k, BLOCK * ITEMS output rows), tiles taken in canonical
//                        order by an atomic ticket: the tile's hit count is published at once (its tile
//                        word and its offset's total), the base of its pairs is the totals of the
//                        earlier offsets plus a decoupled look-back over the earlier tiles of its own
//                        offset, and the pairs land at base + rank (rank in (k, row) order) in
//                        upper-bound buffers; offsets[K + 1] and the info row (offsets, then the two
//                        insert status words, stored into pinned host memory) come out of the same kernel
//   kmap_candidate_keys  packed keys of floor(c / s) (strided outputs) or s * c + off_k (generated)
//   kmap_unique_*        head flags, count and unpacking of a sorted key array (unique outputs)
//
// Probe and compaction were one kernel whose tiles of offsets after the centre spin-waited for the
// mirror scatters and whose warps waited at barriers behind warp 0's look-back: 52-54 µs for
// SemanticKITTI, where a probe of every offset alone takes about spconv's 13 µs.
// The scan state (ticket, tile words, offset totals) sits after the status words in the table's
// allocation, so the table's one memset (all ones) also resets it, and kmap_insert sets a symmetric
// map's mirrored rows of cand to -1; with a prebuilt table (Voxels validation) the state follows
// offsets in the map's own allocation, reset by one memset together with those rows (symmetric SubM),
// or has an allocation of its own (sparsevox/cuda/gpu_kernel_map.py).
// Index arithmetic is 64-bit where a product can exceed 2^31 (K * M, s * c + off); the host checks
// that K * M fits int32 (so do the pair count and every prefix; KernelMap stores int32 maps and offsets).
// Every kernel is a template on its block size BLOCK (a multiple of 32, at most 1024); kmap_probe and
// kmap_compact also on ITEMS, the output rows per thread of a tile.
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

// Status words: atomicMin keeps the smallest offending index, so the report is deterministic.
__device__ __forceinline__ void flag_min(unsigned long long* word, long long index) {
    atomicMin(word, (unsigned long long)index);
}

// --- single-pass scan state (decoupled look-back, Merrill & Garland 2016) ---------------------------
// One 64-bit word per tile: flag in bits 63..62, value in the low bits, so one atomic store publishes
// both. The all-ones word left by the table's memset (flag 3) means "not ready".
constexpr unsigned long long TILE_AGGREGATE = 1;  // value = the tile's own hit count
constexpr unsigned long long TILE_PREFIX = 2;     // value = hits of every tile up to this one, inclusive
constexpr unsigned long long TILE_NOT_READY = 3;
constexpr unsigned long long TILE_VALUE_MASK = (1ull << 62) - 1;

__device__ __forceinline__ void publish(unsigned long long* tiles, int t, unsigned long long flag, int value) {
    atomicExch(tiles + t, (flag << 62) | (unsigned long long)(unsigned)value);
}

// Exclusive prefix of tile t > first within the run of tiles [first, ...) (one offset's tiles), by the
// 32 lanes of one warp. Each round reads the words of the 32 tiles before `top` (lane i: tile top - i;
// volatile loads bypass L1 and are re-read while spinning) and finds the nearest one carrying an
// inclusive prefix; it waits only until every tile from top down to that one (down to the window's end
// if there is none) is published, never on tiles beyond it, then adds those values and stops at the
// prefix or moves to the next window. Tile `first` always publishes a prefix (and tiles before it read
// as prefix 0), so the walk ends. Values fit int: the host checks K * m <= 2^31 - 1. No fence is needed:
// a tile word carries its value itself, and the pairs, cand, offsets and info are read only by later
// kernels or the host.
__device__ __forceinline__ int look_back(const unsigned long long* tiles, int t, int first, int lane) {
    int excl = 0;
    for (int top = t - 1;; top -= 32) {
        const int idx = top - lane;
        unsigned long long w;
        unsigned prefixes;
        int stop;
        while (true) {
            w = idx >= first ? *reinterpret_cast<const volatile unsigned long long*>(tiles + idx)
                             : TILE_PREFIX << 62;  // before the run: prefix 0
            const unsigned waiting = __ballot_sync(0xffffffffu, (w >> 62) == TILE_NOT_READY);
            prefixes = __ballot_sync(0xffffffffu, (w >> 62) == TILE_PREFIX);
            stop = prefixes ? __ffs(prefixes) - 1 : 31;  // lane of the nearest tile with a prefix
            const unsigned needed = stop == 31 ? 0xffffffffu : (2u << stop) - 1u;  // lanes 0..stop
            if ((waiting & needed) == 0u) break;
#ifdef SVX_KMAP_SPIN_STUCK  // the CPU emulator: blocks run in ticket order, so a wait can never be needed
            SVX_KMAP_SPIN_STUCK();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
            __nanosleep(32);
#endif
        }
        int v = lane <= stop ? (int)(w & TILE_VALUE_MASK) : 0;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        excl += v;
        if (prefixes) return excl;
    }
}

// Per-offset totals: every tile of offset k adds TOTAL_TILE + its hit count to totals[k] (all ones on
// entry, i.e. -1), so totals[k] + 1 = (tiles counted << TOTAL_SHIFT) | hits so far. Hits of one offset
// are at most m < 2^31, tiles at most nbm <= 2^23.
constexpr int TOTAL_SHIFT = 40;
constexpr unsigned long long TOTAL_TILE = 1ull << TOTAL_SHIFT;
constexpr unsigned long long TOTAL_VALUE_MASK = TOTAL_TILE - 1;

// Hits of every offset before k (the base of offset k's pairs), by the 32 lanes of one warp: lane i
// reads totals[i], totals[i + 32], ... and waits until all nbm tiles of that offset have counted
// themselves. Those tiles have earlier tickets and count themselves right after reading their rows of
// cand, before any wait of their own, so the wait ends (see kmap_compact).
__device__ __forceinline__ int offset_base(const unsigned long long* totals, int k, int nbm, int lane) {
    int sum = 0;
    for (int j = lane; j < k; j += 32) {
        unsigned long long w;
        while (true) {
            w = *reinterpret_cast<const volatile unsigned long long*>(totals + j) + 1ull;
            if ((long long)(w >> TOTAL_SHIFT) == nbm) break;
#ifdef SVX_KMAP_SPIN_STUCK
            SVX_KMAP_SPIN_STUCK();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
            __nanosleep(32);
#endif
        }
        sum += (int)(w & TOTAL_VALUE_MASK);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    return sum;
}

// Slots read per probe step: the aligned window of WINDOW slots (WINDOW * 16 bytes: one 32-byte sector
// for 2) holding the probe position, loaded at once; the probe goes on from the next window only when
// no slot from its position to the window's end holds the key or is free. Most lookups miss (a LiDAR
// voxel has few of its 26 neighbours), and a miss walks to the next free slot. SemanticKITTI, table
// load 0.175 (sparsevox/cuda/gpu_kernel_map.py _capacity): the slowest lane of a warp takes 3.6 dependent
// steps on average one slot at a time, 2.1 with windows of 2, 1.2 with 4 (simulated); the build's
// device time was 49.4, 49.5 and 55.8 µs (H200: windows of 4 load twice the sectors).
#ifndef SVX_HASH_WINDOW
#define SVX_HASH_WINDOW 2
#endif
constexpr int WINDOW = SVX_HASH_WINDOW;
static_assert(WINDOW >= 1 && (WINDOW & (WINDOW - 1)) == 0, "WINDOW must be a power of two");

// found[i] = row of keys[i] in the table, or -1 where !valid[i]. The first window of
// every item is loaded before any is examined (ITEMS * WINDOW independent loads in flight per thread);
// the few keys not settled by it continue along their probe chain, window by window.
template <int ITEMS>
__device__ __forceinline__ void lookup_items(const unsigned long long* __restrict__ table,
                                             unsigned long long mask, const unsigned long long (&keys)[ITEMS],
                                             const bool (&valid)[ITEMS], int (&found)[ITEMS]) {
    using namespace svx_hash;
    ulonglong2 e[ITEMS][WINDOW];
    unsigned long long pos[ITEMS];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        pos[i] = mix(keys[i]) & mask;
        const unsigned long long* w = table + 2 * (pos[i] & ~(unsigned long long)(WINDOW - 1));
#pragma unroll
        for (int j = 0; j < WINDOW; ++j) {
            e[i][j].x = EMPTY_KEY;
            e[i][j].y = 0;
            if (valid[i] && keys[i] != EMPTY_KEY)  // key and value in one 16-byte load (the table base is
                                                   // 256-byte aligned by CuPy's pool)
                e[i][j] = *reinterpret_cast<const ulonglong2*>(w + 2 * j);
        }
    }
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        const unsigned long long key = keys[i];
        found[i] = -1;
        if (!valid[i]) continue;
        if (key == EMPTY_KEY) {  // the all-ones key has a slot of its own
            found[i] = all_ones_row(table, mask);
            continue;
        }
        unsigned long long s = pos[i];
        bool open = true;
        while (true) {
            const int first = (int)(s & (WINDOW - 1));
#pragma unroll
            for (int j = 0; j < WINDOW; ++j) {
                if (open && j >= first) {
                    if (e[i][j].x == key) {
                        found[i] = (int)e[i][j].y;
                        open = false;
                    } else if (e[i][j].x == EMPTY_KEY) {
                        open = false;
                    }
                }
            }
            if (!open) break;
            s = ((s | (WINDOW - 1)) + 1) & mask;  // the next window (capacity is a multiple of WINDOW)
            const unsigned long long* w = table + 2 * s;
#pragma unroll
            for (int j = 0; j < WINDOW; ++j) e[i][j] = *reinterpret_cast<const ulonglong2*>(w + 2 * j);
        }
    }
}

}  // namespace svx_kmap

// coords [n, 4] int32 (batch, x, y, z) -> table. status = table + 2 * (mask + 1) + 2:
//   status[0] = smallest row whose key was already present (a duplicate voxel), EMPTY if none
//   status[1] = smallest row outside the packable range, EMPTY if none (not inserted)
// clear [clear_rows, n] int32 (clear_rows may be 0): set to -1, row by row (a symmetric SubM map's
// mirrored rows of cand, which kmap_probe, launched after this kernel, scatters into; one memset
// fewer for the host).
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) kmap_insert(const int* __restrict__ coords, int n,
                                                     unsigned long long* __restrict__ table,
                                                     unsigned long long mask, int* __restrict__ clear,
                                                     int clear_rows) {
    using namespace svx_hash;
    const long long row = (long long)blockIdx.x * BLOCK + threadIdx.x;
    if (row >= n) return;
    for (int j = 0; j < clear_rows; ++j) clear[(long long)j * n + row] = -1;
    unsigned long long* status = table + 2 * (mask + 1) + 2;
    const int* c = coords + 4 * row;
    const long long b = c[0], x = c[1], y = c[2], z = c[3];
    if (!in_range(b, x, y, z)) {
        svx_kmap::flag_min(status + 1, row);
        return;
    }
    if (!insert(table, mask, pack_key(b, x, y, z), (int)row)) svx_kmap::flag_min(status, row);
}

// The map's pairs come from two kernels over tiles of (offset k, BLOCK * ITEMS output rows; a tile never
// straddles two offsets), nbm = ceil(m / (BLOCK * ITEMS)) tiles per offset. Striped layout: item i of
// thread x is row row0 + i * BLOCK + x, so the reads and writes of a warp are contiguous, and
// (item, warp, lane) order is row order.
//
// kmap_probe: cand[k, m] = the input row paired with output row m by offset k, or -1 (the dense table).
// Grid: Kp * nbm blocks, block b = tile (b / nbm, b % nbm), Kp = K, or kc + 1 for a symmetric map.
//   qcoords [m, 4] int32 output sites;  cand [K, m] int32
// Non-transposed: in = s * out + off_k; transposed: out = s * in + off_k, i.e. in = (out - off_k) / s
// where every axis divides exactly.
// symmetric = 1 (the host sets it only for a submanifold map: out = in = qcoords, stride 1, not
// transposed, every kernel-size axis odd): offsets are symmetric, off_{K-1-k} = -off_k, and the centre
// kc = K / 2 is 0, so pair (k, out m, in j) exists iff pair (K-1-k, out j, in m) does. So only the
// offsets k < kc probe, and scatter cand[K-1-k, j] = m for every hit j of row m; the centre tiles write
// cand[kc, m] = m; cand's rows kc+1..K-1 must be all ones (-1) on entry (kmap_insert or the host's
// memset). 13 probes per row instead of 27 for k3, and the same map.
template <int BLOCK, int ITEMS>
__global__ void __launch_bounds__(BLOCK) kmap_probe(
        const int* __restrict__ qcoords, int m, int nbm, int K, int transposed, int symmetric, int sx, int sy,
        int sz, int kx, int ky, int kz, int dx, int dy, int dz, const unsigned long long* __restrict__ table,
        unsigned long long mask, int* __restrict__ cand) {
    using namespace svx_hash;
    const int k = blockIdx.x / nbm;
    const long long row0 = (long long)(blockIdx.x % nbm) * (BLOCK * ITEMS) + threadIdx.x;  // item 0
    int* cand_k = cand + (long long)k * m;
    if (symmetric && k == K / 2) {
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
            const long long row = row0 + (long long)i * BLOCK;
            if (row < m) cand_k[row] = (int)row;
        }
        return;
    }
    long long o[3];
    svx_kmap::offset_of(k, kx, ky, kz, dx, dy, dz, o);
    const long long s[3] = {sx, sy, sz};
    unsigned long long keys[ITEMS];
    bool valid[ITEMS];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        const long long row = row0 + (long long)i * BLOCK;
        keys[i] = 0;
        valid[i] = false;
        if (row < m) {
            const int* c = qcoords + 4 * row;
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
            if (ok && in_range(b, q[0], q[1], q[2])) {
                keys[i] = pack_key(b, q[0], q[1], q[2]);
                valid[i] = true;
            }
        }
    }
    int found[ITEMS];
    svx_kmap::lookup_items<ITEMS>(table, mask, keys, valid, found);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        const long long row = row0 + (long long)i * BLOCK;
        if (row < m) cand_k[row] = found[i];
    }
    if (symmetric) {  // pair (K-1-k, out found, in row)
        int* mirror = cand + (long long)(K - 1 - k) * m;
#pragma unroll
        for (int i = 0; i < ITEMS; ++i)
            if (found[i] >= 0) mirror[found[i]] = (int)(row0 + (long long)i * BLOCK);
    }
}

// kmap_compact: the hits of cand in canonical (k, row) order, compacted with a single-pass scan.
// Grid: T = K * nbm blocks, one per tile; tile t comes from an atomic ticket (not from blockIdx), so
// tiles start in canonical order.
//   state   [1 + T + K] uint64, all ones on entry (a memset): state[0] the ticket counter, state[1 + t]
//           the tile word of tile t (see svx_kmap::TILE_*), then totals[K] (see svx_kmap::offset_base)
//   cand    [K, m] int32 (kmap_probe);  status  the two insert status words (table + 2 * (mask + 1) + 2)
//   in_buf, out_buf [K * m] int32: pairs at their final positions; only the first offsets[K] are written
//   offsets [K + 1] int32;  info [K + 3] int64 = offsets, then status[0], status[1] (EMPTY reads as -1),
//           in pinned host memory (mapped: the host reads it once an event after this kernel is done)
// The base of a tile's pairs: every tile counts its hits into its offset's total and publishes them in
// its tile word at once; it then looks back over the earlier tiles of its own offset only (an offset's
// first tile publishes an inclusive prefix at once) and adds the totals of the earlier offsets (each
// complete once all its tiles have counted). Every wait is on tiles with earlier tickets, which are
// running or done and wait only on earlier tiles themselves: no deadlock whatever the hardware's block
// scheduling.
template <int BLOCK, int ITEMS>
__global__ void __launch_bounds__(BLOCK) kmap_compact(
        int m, int nbm, int K, const int* __restrict__ cand, const unsigned long long* __restrict__ status,
        unsigned long long* state, int* __restrict__ in_buf, int* __restrict__ out_buf,
        int* __restrict__ offsets, long long* __restrict__ info) {
    static_assert(BLOCK % 32 == 0 && BLOCK <= 1024, "BLOCK must be a multiple of 32, at most 1024");
    static_assert(ITEMS >= 1, "ITEMS must be positive");
    constexpr int WARPS = BLOCK / 32;
    constexpr int GROUPS = ITEMS * WARPS;          // (item, warp) groups of 32 rows, in row order
    constexpr int PER_LANE = (GROUPS + 31) / 32;   // groups per lane in warp 0's scan of the counts
    __shared__ int s_group[GROUPS];  // hits of each group, then their exclusive prefix within the tile
    __shared__ int s_tile;
    __shared__ int s_excl;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    // The counter starts all ones; the first ticket wraps to 0.
    if (threadIdx.x == 0) s_tile = (int)(atomicAdd(state, 1ull) + 1ull);
    __syncthreads();
    const int t = s_tile;
    const int k = t / nbm;
    const int bm = t % nbm;
    const long long row0 = (long long)bm * (BLOCK * ITEMS) + threadIdx.x;  // this thread's item 0
    unsigned long long* tiles = state + 1;
    unsigned long long* totals = tiles + (long long)K * nbm;

    // 1. This tile's hits, counted per (item, warp) group.
    const int* cand_k = cand + (long long)k * m;
    int found[ITEMS];
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        const long long row = row0 + (long long)i * BLOCK;
        found[i] = row < m ? cand_k[row] : -1;
    }
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        const unsigned hits = __ballot_sync(0xffffffffu, found[i] >= 0);
        if (lane == 0) s_group[i * WARPS + warp] = __popc(hits);
    }
    __syncthreads();

    // 2. Warp 0: scan the group counts (-> the tile's aggregate), publish the aggregate at once (tile
    //    word and offset total), look back over the offset's earlier tiles and publish the inclusive
    //    prefix within the offset, add the totals of the earlier offsets: the tile's base.
    int aggregate = 0;
    if (warp == 0) {
        int v[PER_LANE];
        int sum = 0;
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) {
            const int g = lane * PER_LANE + j;
            v[j] = g < GROUPS ? s_group[g] : 0;
            sum += v[j];
        }
        int incl = sum;
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
            const int u = __shfl_up_sync(0xffffffffu, incl, d);
            if (lane >= d) incl += u;
        }
        aggregate = __shfl_sync(0xffffffffu, incl, 31);
        if (lane == 0) {
            svx_kmap::publish(tiles, t, bm == 0 ? svx_kmap::TILE_PREFIX : svx_kmap::TILE_AGGREGATE, aggregate);
            atomicAdd(totals + k, svx_kmap::TOTAL_TILE + (unsigned long long)aggregate);
        }
        int run = incl - sum;  // exclusive prefix of this lane's first group
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) {
            const int g = lane * PER_LANE + j;
            if (g < GROUPS) s_group[g] = run;
            run += v[j];
        }
        int excl = 0;  // hits of the earlier tiles of offset k
        if (bm > 0) {
            excl = svx_kmap::look_back(tiles, t, t - bm, lane);
#ifdef SVX_KMAP_PREFIX_EVERY  // tests only: most tiles keep just their aggregate (longer look-backs)
            if (t % SVX_KMAP_PREFIX_EVERY == 0)
#endif
            if (lane == 0) svx_kmap::publish(tiles, t, svx_kmap::TILE_PREFIX, excl + aggregate);
        }
        const int base = svx_kmap::offset_base(totals, k, nbm, lane);
        if (lane == 0) s_excl = base + excl;
    }
    __syncthreads();

    // 3. The pairs, in row order: item i of a lane goes after the hits of every earlier (item, warp)
    //    group of the tile and of the earlier lanes of its own group.
    const int excl = s_excl;
    const unsigned lanes_below = (1u << lane) - 1u;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
        const unsigned hits = __ballot_sync(0xffffffffu, found[i] >= 0);
        if (found[i] >= 0) {
            const int pos = excl + s_group[i * WARPS + warp] + __popc(hits & lanes_below);
            in_buf[pos] = found[i];
            out_buf[pos] = (int)(row0 + (long long)i * BLOCK);
        }
    }
    if (threadIdx.x == 0) {
        if (bm == 0) {
            offsets[k] = excl;
            info[k] = excl;
        }
        if (t == K * nbm - 1) {
            offsets[K] = excl + aggregate;
            info[K] = excl + aggregate;
            info[K + 1] = (long long)status[0];
            info[K + 2] = (long long)status[1];
        }
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
