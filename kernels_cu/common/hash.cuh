// GPU open-addressing hash table on packed voxel keys (sparsevox/geometry.py `pack_keys` layout).
//
// Key: bits 63..54 batch (10 bits), then x, y, z with 18 bits each, every axis offset by 2^17 so
// that sorting keys sorts voxels by (batch, x, y, z). Value: the row index of the voxel.
//
// Table layout: one uint64 array of 2 * capacity + 4 words (+ the caller's extra words), filled with
// all-ones bytes before use (one cudaMemsetAsync 0xFF):
//   [2s], [2s+1]           slot s: key (EMPTY_KEY = free), value (row index, low 32 bits)
//   [2cap], [2cap+1]       the slot of the all-ones key itself: (flag, value), flag EMPTY = absent
//   [2cap+2], [2cap+3]     status words written by the insert kernel (see kernel_map.cu)
//   [2cap+4, ...)          optional words of the caller, reset by the same memset (kernel_map.cu:
//                          the ticket, tile words and offset totals of kmap_compact's scan)
// The all-ones key needs its own slot because it is a valid voxel: batch 1023 with
// x = y = z = 131071 packs to 0xFFFF'FFFF'FFFF'FFFF, the same bits as a free slot.
//
// Linear probing; capacity is a power of two >= 4 * N (sparsevox/cuda/gpu_kernel_map.py _capacity), so a
// probe always ends at a free slot.
#ifndef SPARSEVOX_HASH_CUH
#define SPARSEVOX_HASH_CUH

namespace svx_hash {

constexpr int COORD_BITS = 18;
constexpr long long COORD_MIN = -(1LL << (COORD_BITS - 1));      // -131072
constexpr long long COORD_MAX = (1LL << (COORD_BITS - 1)) - 1;   //  131071
constexpr long long BATCH_MAX = 1023;
constexpr unsigned long long EMPTY_KEY = ~0ull;

__host__ __device__ __forceinline__ bool coord_in_range(long long v) {
    return v >= COORD_MIN && v <= COORD_MAX;
}

__host__ __device__ __forceinline__ bool in_range(long long b, long long x, long long y, long long z) {
    return b >= 0 && b <= BATCH_MAX && coord_in_range(x) && coord_in_range(y) && coord_in_range(z);
}

// The caller guarantees in_range(b, x, y, z).
__host__ __device__ __forceinline__ unsigned long long pack_key(long long b, long long x, long long y,
                                                                long long z) {
    return ((unsigned long long)b << (3 * COORD_BITS)) |
           ((unsigned long long)(x - COORD_MIN) << (2 * COORD_BITS)) |
           ((unsigned long long)(y - COORD_MIN) << COORD_BITS) | (unsigned long long)(z - COORD_MIN);
}

// Inverse of pack_key: writes (batch, x, y, z).
__host__ __device__ __forceinline__ void unpack_key(unsigned long long key, int* out) {
    const unsigned long long mask = (1ull << COORD_BITS) - 1;
    out[3] = (int)((long long)(key & mask) + COORD_MIN);
    out[2] = (int)((long long)((key >> COORD_BITS) & mask) + COORD_MIN);
    out[1] = (int)((long long)((key >> (2 * COORD_BITS)) & mask) + COORD_MIN);
    out[0] = (int)(key >> (3 * COORD_BITS));
}

// splitmix64 finaliser: neighbouring voxels differ in the low bits of z only, so mix every bit.
__host__ __device__ __forceinline__ unsigned long long mix(unsigned long long k) {
    k ^= k >> 30;
    k *= 0xbf58476d1ce4e5b9ull;
    k ^= k >> 27;
    k *= 0x94d049bb133111ebull;
    k ^= k >> 31;
    return k;
}

// Insert (key, value). Returns true when inserted, false when the key was already present.
__device__ __forceinline__ bool insert(unsigned long long* table, unsigned long long mask,
                                       unsigned long long key, int value) {
    if (key == EMPTY_KEY) {
        unsigned long long* special = table + 2 * (mask + 1);
        if (atomicCAS(special, EMPTY_KEY, 0ull) != EMPTY_KEY) return false;
        special[1] = (unsigned long long)(unsigned)value;
        return true;
    }
    unsigned long long s = mix(key) & mask;
    while (true) {
        unsigned long long prev = atomicCAS(table + 2 * s, EMPTY_KEY, key);
        if (prev == EMPTY_KEY) {
            table[2 * s + 1] = (unsigned long long)(unsigned)value;
            return true;
        }
        if (prev == key) return false;
        s = (s + 1) & mask;
    }
}

// Row of the all-ones key (its own slot), or -1. Other keys are looked up by kernel_map.cu's
// lookup_items (the probe, window by window). Only valid in a kernel launched after the inserts finished.
__device__ __forceinline__ int all_ones_row(const unsigned long long* __restrict__ table, unsigned long long mask) {
    const unsigned long long* special = table + 2 * (mask + 1);
    return special[0] == EMPTY_KEY ? -1 : (int)special[1];
}

}  // namespace svx_hash

#endif  // SPARSEVOX_HASH_CUH
