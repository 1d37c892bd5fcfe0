// A stable LSD radix argsort of unsigned keys (sparsevox/cuda/radix_sort.py), eight bits per pass,
// three launches per pass and no host synchronisation. It replaces cupy.argsort (Thrust's stable sort,
// which waits for the device before it returns: ~300 us of host time per slot table of a fresh map).
//
// The digit of a key in a pass is (key >> shift) & mask: the last pass's mask drops the bits above those
// the caller sorts by.
//
//   radix_histogram  hist[d * blocks + b] = how many keys of block b have digit d
//   radix_scan       hist := its exclusive prefix sum (digit-major, so entry (d, b) is where block b's
//                    keys of digit d start in the pass's output)
//   radix_scatter    each key (with its value) to hist[d, b] + its rank among block b's keys of digit d
//
// A block covers TILE = BLOCK * ITEMS consecutive keys in ITEMS rounds of BLOCK; within a round a warp
// ranks equal digits with __match_any_sync, and the warps' counts are scanned per digit in shared
// memory. Ranks follow key order inside a block and blocks follow block order, so each pass is stable.
// Template parameters (name_expressions): KEY (unsigned int or unsigned long long), BLOCK, ITEMS.

constexpr int RADIX = 256;

template <typename KEY, int BLOCK, int ITEMS>
__global__ void __launch_bounds__(BLOCK) radix_histogram(const KEY* __restrict__ keys, int n, int shift,
                                                         unsigned mask, unsigned* __restrict__ hist) {
    __shared__ unsigned s_count[RADIX];
    for (int d = threadIdx.x; d < RADIX; d += BLOCK) s_count[d] = 0u;
    __syncthreads();
    const long long base = (long long)blockIdx.x * BLOCK * ITEMS;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
        const long long i = base + (long long)it * BLOCK + threadIdx.x;
        if (i < n) atomicAdd(s_count + (int)((keys[i] >> shift) & mask), 1u);
    }
    __syncthreads();
    for (int d = threadIdx.x; d < RADIX; d += BLOCK) hist[(long long)d * gridDim.x + blockIdx.x] = s_count[d];
}

// One block: thread t sums its contiguous chunk, the block scans the chunk sums, then each chunk is
// rewritten as exclusive prefixes. m = RADIX * blocks of the pass (at most a few hundred thousand).
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) radix_scan(unsigned* __restrict__ hist, int m) {
    __shared__ unsigned s_sum[BLOCK];
    const int chunk = (m + BLOCK - 1) / BLOCK;
    const long long lo = (long long)threadIdx.x * chunk;
    const long long hi = min(lo + chunk, (long long)m);
    unsigned sum = 0u;
    for (long long i = lo; i < hi; ++i) sum += hist[i];
    s_sum[threadIdx.x] = sum;
    __syncthreads();
    for (int step = 1; step < BLOCK; step <<= 1) {  // Hillis-Steele inclusive scan of the chunk sums
        const unsigned add = threadIdx.x >= step ? s_sum[threadIdx.x - step] : 0u;
        __syncthreads();
        s_sum[threadIdx.x] += add;
        __syncthreads();
    }
    unsigned run = s_sum[threadIdx.x] - sum;
    for (long long i = lo; i < hi; ++i) {
        const unsigned c = hist[i];
        hist[i] = run;
        run += c;
    }
}

// vals_in null: the values are the keys' positions (the first pass of an argsort). keys_out null: the
// keys are not written (the last pass, where only the order is wanted).
template <typename KEY, int BLOCK, int ITEMS>
__global__ void __launch_bounds__(BLOCK) radix_scatter(const KEY* __restrict__ keys_in,
                                                       const int* __restrict__ vals_in, int n, int shift, unsigned mask,
                                                       const unsigned* __restrict__ start,
                                                       KEY* __restrict__ keys_out, int* __restrict__ vals_out) {
    constexpr int WARPS = BLOCK / 32;
    __shared__ unsigned s_next[RADIX];          // where this block's next key of each digit goes
    __shared__ unsigned s_warp[WARPS][RADIX];   // per round: a warp's count, then its first position
    for (int d = threadIdx.x; d < RADIX; d += BLOCK) s_next[d] = start[(long long)d * gridDim.x + blockIdx.x];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned below = (1u << lane) - 1u;
    const long long base = (long long)blockIdx.x * BLOCK * ITEMS;
    for (int it = 0; it < ITEMS; ++it) {
        for (int j = threadIdx.x; j < WARPS * RADIX; j += BLOCK) (&s_warp[0][0])[j] = 0u;
        __syncthreads();
        const long long i = base + (long long)it * BLOCK + threadIdx.x;
        const bool valid = i < n;
        const KEY key = valid ? keys_in[i] : (KEY)0;
        const int d = valid ? (int)((key >> shift) & mask) : RADIX;  // the tail matches only itself
        const unsigned peers = __match_any_sync(0xffffffffu, d);
        const unsigned rank = __popc(peers & below);
        if (valid && rank == 0u) s_warp[warp][d] = __popc(peers);
        __syncthreads();
        for (int dd = threadIdx.x; dd < RADIX; dd += BLOCK) {
            unsigned run = s_next[dd];
#pragma unroll
            for (int w = 0; w < WARPS; ++w) {
                const unsigned c = s_warp[w][dd];
                s_warp[w][dd] = run;
                run += c;
            }
            s_next[dd] = run;
        }
        __syncthreads();
        if (valid) {
            const unsigned pos = s_warp[warp][d] + rank;
            if (keys_out != nullptr) keys_out[pos] = key;
            vals_out[pos] = vals_in != nullptr ? vals_in[i] : (int)i;
        }
        __syncthreads();  // s_warp is cleared next round
    }
}
