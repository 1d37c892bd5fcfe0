// The IMPLICIT_GEMM slot tables of a kernel map (sparsevox/algorithms/implicit_gemm.py: slot_table, tile_masks),
// made on the device in three kernels and a radix sort (radix_sort.cu) instead of a chain of CuPy array
// expressions (~20 launches and temporaries of K x rows int64 on the host path of a fresh map's first layer).
//
//   slot_keys     keys[r] = OR over offsets k with bit_of[k] >= 0 of (nbr[k, r] >= 0) << bit_of[k]
//                 (the row's neighbour bitmask, rarest offsets most significant; the host picks the bits)
//   gather_slots  out[k, s] = nbr[k, order[s]] (the table in slot order; order = the stable argsort of
//                 keys, int32, which is also the caller's row_of_slot)
//   csr_slots     the table of a map whose rows have one pair each, in CSR order (no sort)
//   tile_masks    masks[t, w] bit j = some slot of tile t (bm slots) has a neighbour at offset 32 w + j,
//                 for offsets in [k0, k1) only
//   wgrad_chunks  the weight gradient's (k, lo, hi) pair ranges, from the map's offsets
//
// nbr is [K, rows] int32 (-1 = no neighbour), row-major. Template parameters (name_expressions):
// KEY (unsigned int or unsigned long long: 32 or 64 key bits), BLOCK (threads per block).

template <typename KEY, int BLOCK>
__global__ void __launch_bounds__(BLOCK) slot_keys(const int* __restrict__ nbr, int rows, int k_count,
                                                   const int* __restrict__ bit_of, KEY* __restrict__ keys) {
    const long long r = (long long)blockIdx.x * BLOCK + threadIdx.x;
    if (r >= rows) return;
    KEY key = 0;
    for (int k = 0; k < k_count; ++k) {
        const int b = __ldg(bit_of + k);  // the same word for every thread: a broadcast
        if (b >= 0 && nbr[(long long)k * rows + r] >= 0) key |= (KEY)1 << b;
    }
    keys[r] = key;
}

template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) gather_slots(const int* __restrict__ nbr, const int* __restrict__ order,
                                                      int rows, int k_count, int* __restrict__ out) {
    const long long s = (long long)blockIdx.x * BLOCK + threadIdx.x;
    if (s >= rows) return;
    const long long r = order[s];
    for (int k = 0; k < k_count; ++k) out[(long long)k * rows + s] = nbr[(long long)k * rows + r];
}

// One block per tile; thread j looks at offsets j, j + BLOCK, ... over the tile's slots (contiguous
// in each offset's row of the table), then the block's bits go out as `words` uint32.
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) tile_masks(const int* __restrict__ nbr, int rows, int k_count, int k0,
                                                    int k1, int bm, int words, unsigned* __restrict__ masks) {
    extern __shared__ unsigned s_bits[];
    const long long tile = blockIdx.x;
    for (int w = threadIdx.x; w < words; w += BLOCK) s_bits[w] = 0u;
    __syncthreads();
    const long long s0 = tile * bm;
    const int n = (int)min((long long)bm, (long long)rows - s0);
    for (int k = k0 + threadIdx.x; k < k1; k += BLOCK) {
        const int* row = nbr + (long long)k * rows + s0;
        bool any = false;
        for (int i = 0; i < n && !any; ++i) any = row[i] >= 0;
        if (any) atomicOr(s_bits + (k >> 5), 1u << (k & 31));
    }
    __syncthreads();
    for (int w = threadIdx.x; w < words; w += BLOCK) masks[tile * words + w] = s_bits[w];
}

// The reverse slot table of a map whose input rows have exactly one pair each (a k2 s2 strided map):
// slot s is pair s of the CSR (input row in_maps[s], the caller's row_of_slot), and its only neighbour
// is out_maps[s] at the offset k with offsets[k] <= s < offsets[k + 1]: out[k', s] = that or -1.
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) csr_slots(const int* __restrict__ offsets, int k_count,
                                                   const int* __restrict__ partner, int rows, int* __restrict__ out) {
    const long long s = (long long)blockIdx.x * BLOCK + threadIdx.x;
    if (s >= rows) return;
    int k = 0;
    while (k + 1 < k_count && offsets[k + 1] <= s) ++k;
    const int p = partner[s];
    for (int j = 0; j < k_count; ++j) out[(long long)j * rows + s] = j == k ? p : -1;
}

// The weight gradient's chunk table (implicit_gemm.py: wgrad_chunks): rows (k, lo, hi), each offset's pair
// range [offsets[k], offsets[k + 1]) cut into pieces of at most `chunk` pairs, in offset order (an offset
// without pairs has none). Made here so a fresh map's first weight gradient needs no host computation and
// no upload. One block: thread k sums the piece counts of the offsets before it (K is at most a few
// hundred, a few thousand reads once per map), then writes its own pieces.
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) wgrad_chunks(const int* __restrict__ offsets, int k_count, int chunk,
                                                      int* __restrict__ out) {
    for (int k = threadIdx.x; k < k_count; k += BLOCK) {
        long long row = 0;
        for (int j = 0; j < k; ++j) row += (offsets[j + 1] - offsets[j] + (long long)chunk - 1) / chunk;
        const long long end = offsets[k + 1];
        for (long long lo = offsets[k]; lo < end; lo += chunk, ++row) {
            out[row * 3] = k;
            out[row * 3 + 1] = (int)lo;
            out[row * 3 + 2] = (int)min(lo + chunk, end);
        }
    }
}
