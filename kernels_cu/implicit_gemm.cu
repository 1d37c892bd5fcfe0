// IMPLICIT_GEMM: fused gather-GEMM-scatter sparse convolution kernels.
//
// igemm_fwd  (forward, and dgrad on the reverse map with W transposed per offset):
//   Y[row_of_slot[i], n] = sum_k sum_c X[nbr[k][i], c] * W[k][c][n], nbr[k][i] = -1 when absent.
//   Slots are the output rows in a chosen order (sorted by neighbour bitmask, so that the rows of a
//   tile share offsets); nbr is stored in slot order so its reads stay coalesced. row_of_slot null:
//   slot i is row i (unsorted rows, no order array to make per fresh map).
//   Output-stationary: one CTA owns BM rows x BN output channels, loops over the offsets its tile has
//   (tile_mask, one bit per offset) and over C_in in steps of BK, and writes each output once. A mask
//   split runs it once per part of the offsets (slots sorted by that part's bitmask), the later passes
//   with `accumulate` adding into the output instead of overwriting it.
// igemm_wgrad:
//   dW[k][m][n] += sum_{p in chunk} X[in_maps[p], m] * dY[out_maps[p], n]; a chunk is a range of
//   pairs of one offset (split-K over pairs), partial sums added atomically into an accumulator-typed dW.
//
// Template parameters: T storage dtype (__half, __nv_bfloat16: tensor cores, float32 accumulation;
// float, double: exact SIMT FMA in T's precision), BM x BN CTA tile, BK reduction step, WM x WN warp
// tile, STAGES shared-memory pipeline depth (cp.async), VEC 16-byte loads (both channel counts are
// multiples of 16 / sizeof(T) and the pointers 16-byte aligned), TC tensor cores (half types: one MMA;
// float: 3xTF32, float32-accurate, see split_tf32; not double).
// Shared memory is dynamic (the launcher passes STAGES * tile bytes and raises the 48 KB limit where
// needed). Shared-memory rows are padded by 16 bytes so ldmatrix / column reads hit distinct banks.
#include "common/mma.cuh"

namespace svx_igemm {
using namespace svx;

template <typename T> struct Pad { static constexpr int value = 16 / sizeof(T); };
template <typename T> struct IsF32 { static constexpr bool value = false; };
template <> struct IsF32<float> { static constexpr bool value = true; };

// Which elements of a ROWS x COLS shared-memory tile thread tid loads in load_rows: visit j is element
// i = j * NTH + tid (while i < TOTAL), row i / CPR, columns (i % CPR) * E .. + E - 1, with E = 16 / sizeof(T)
// for 16-byte vector loads, else 1. The rows are fixed per thread, so their global row numbers can be
// fetched ahead of time (igemm_fwd's neighbour-index prefetch). Warp-visit j of warp w covers the 32 / CPR
// consecutive rows from (j * NTH + 32 w) / CPR, lane l row (j * NTH + 32 w) / CPR + l / CPR; so one int per
// lane holds the rows of all the warp's visits when LANES = VISITS * 32 / CPR <= 32 (SHUFFLE): lane
// j * 32 / CPR + s holds row s of warp-visit j, and a thread reads its row from lane_of(j, lane).
template <typename T, int ROWS, int COLS, int NTH, bool VEC>
struct TileWalk {
    static constexpr int E = VEC ? 16 / int(sizeof(T)) : 1;
    static constexpr int CPR = COLS / E;
    static constexpr int TOTAL = ROWS * CPR;
    static constexpr int VISITS = (TOTAL + NTH - 1) / NTH;
    static constexpr int RPW = 32 / CPR;  // rows per warp-visit
    static constexpr int LANES = VISITS * RPW;
    // Every warp runs the same visits (warp-uniform loop exit) and the rows fit one int per lane.
    static constexpr bool SHUFFLE = CPR <= 32 && 32 % CPR == 0 && NTH % 32 == 0 && TOTAL % 32 == 0 && LANES <= 32;
    __device__ static __forceinline__ int lane_row(int lane, int warp) {  // tile row whose index lane holds
        return ((lane / RPW) * NTH + warp * 32) / CPR + lane % RPW;
    }
    __device__ static __forceinline__ int lane_of(int j, int lane) { return j * RPW + lane / CPR; }
};

// Load ROWS x COLS elements into shared memory s[ROWS][COLS + pad]: row r comes from global row
// row_of(j, r) (or zeros where that is < 0; j: the thread's visit number, see TileWalk), columns
// col0 .. col0 + COLS - 1 (zeros at and past col_lim).
template <typename T, int ROWS, int COLS, int NTH, bool VEC, typename RowFn>
__device__ __forceinline__ void load_rows(T* s, const T* __restrict__ g, int ld, int col0, int col_lim,
                                          RowFn row_of, int tid) {
    using Walk = TileWalk<T, ROWS, COLS, NTH, VEC>;
    constexpr int LDS = COLS + Pad<T>::value;
    constexpr int E = Walk::E, CPR = Walk::CPR, TOTAL = Walk::TOTAL;
    if constexpr (VEC) {
#pragma unroll
        for (int j = 0; j < Walk::VISITS; ++j) {
            const int i = j * NTH + tid;
            if (TOTAL % NTH != 0 && i >= TOTAL) break;
            const int r = i / CPR, c = (i % CPR) * E;
            const long long gr = row_of(j, r);
            const int col = col0 + c;
            const bool ok = gr >= 0 && col < col_lim;  // col_lim is a multiple of E here
            const T* src = ok ? g + gr * ld + col : g;
            cp_async16(s + r * LDS + c, src, ok ? 16 : 0);
        }
    } else {
        int j = 0;
        for (int i = tid; i < TOTAL; i += NTH, ++j) {
            const int r = i / COLS, c = i % COLS;
            const long long gr = row_of(j, r);
            const int col = col0 + c;
            s[r * LDS + c] = (gr >= 0 && col < col_lim) ? g[gr * ld + col] : zero_of<T>();
        }
    }
}

// One BK step of the warp tile. A is [BM][BK+pad] (AK = false) or k-major [BK][BM+pad] (AK = true);
// B is [BK][BN+pad]. acc holds WM*WN/32 values per thread (layout: see acc_pos).
template <typename T, typename AccT, int BM, int BN, int BK, int WM, int WN, bool AK, bool TC>
__device__ __forceinline__ void mma_step(const T* As, const T* Bs, AccT* acc, int wm, int wn, int lane) {
    constexpr int P = Pad<T>::value;
    constexpr int LDA = AK ? BM + P : BK + P;
    constexpr int LDB = BN + P;
    if constexpr (TC && IsF32<T>::value) {
        // 3xTF32: each float operand split into TF32 big + small parts (split_tf32), three m16n8k8 MMAs
        // per fragment pair, the small products first. Fragments are read element by element (ldmatrix
        // moves 16-bit halves). With rows padded by 4 words, A's row-major lanes (row g, column t) fall in
        // distinct banks; B's and the k-major A's (bank 4t + g) conflict 2-way (an 8-word pad would not).
        // The products of one stage go to a zeroed partial sum, added to acc with a rounded float32 add:
        // an MMA's accumulation truncates toward zero, and chained over a whole reduction (3 MMAs per
        // product) that bias grew to 2.6e-5 relative error (H200, d6651cb, C=130 dgrad; float32 1e-5).
        constexpr int MT = WM / 16, NT = WN / 8;
        static_assert(WM % 16 == 0 && WN % 8 == 0 && BK % 8 == 0, "3xTF32 tiles: m16n8k8 fragments");
        const int g = lane >> 2, t = lane & 3;
        float part[MT * NT * 4];
#pragma unroll
        for (int i = 0; i < MT * NT * 4; ++i) part[i] = 0.f;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 8) {
            unsigned ab[MT][4], as[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const int m = wm + mt * 16 + g;
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    const int mr = m + (q & 1) * 8, kc = kk + t + (q >> 1) * 4;
                    split_tf32(AK ? As[kc * LDA + mr] : As[mr * LDA + kc], ab[mt][q], as[mt][q]);
                }
            }
            unsigned bb[NT][2], bs[NT][2];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int q = 0; q < 2; ++q) split_tf32(Bs[(kk + t + q * 4) * LDB + wn + nt * 8 + g], bb[nt][q], bs[nt][q]);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    float(&d)[4] = *reinterpret_cast<float(*)[4]>(part + (mt * NT + nt) * 4);
                    mma1688_tf32(d, as[mt], bb[nt][0], bb[nt][1]);
                    mma1688_tf32(d, ab[mt], bs[nt][0], bs[nt][1]);
                    mma1688_tf32(d, ab[mt], bb[nt][0], bb[nt][1]);
                }
        }
#pragma unroll
        for (int i = 0; i < MT * NT * 4; ++i) acc[i] += part[i];
    } else if constexpr (TC) {
        constexpr int MT = WM / 16, NT = WN / 8;
        static_assert(NT % 2 == 0, "WN must be a multiple of 16");
        const int j = lane >> 3, r = lane & 7;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            unsigned a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const int m0 = wm + mt * 16;
                if constexpr (!AK) {
                    ldmatrix_x4(a[mt], As + (m0 + (lane & 15)) * LDA + kk + (lane >> 4) * 8);
                } else {
                    ldmatrix_x4_trans(a[mt], As + (kk + r + (j >> 1) * 8) * LDA + m0 + (j & 1) * 8);
                }
            }
            unsigned b[NT][2];
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                unsigned t[4];
                ldmatrix_x4_trans(t, Bs + (kk + r + (j & 1) * 8) * LDB + wn + np * 16 + (j >> 1) * 8);
                b[2 * np][0] = t[0];
                b[2 * np][1] = t[1];
                b[2 * np + 1][0] = t[2];
                b[2 * np + 1][1] = t[3];
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
                    mma16816<T>(*reinterpret_cast<float(*)[4]>(acc + (mt * NT + nt) * 4), a[mt], b[nt][0],
                                b[nt][1]);
        }
    } else {
        constexpr int TM = WM / 4, TN = WN / 8;
        const int lr = lane >> 3, lc = lane & 7;
#pragma unroll 4
        for (int kk = 0; kk < BK; ++kk) {
            AccT a[TM], b[TN];
#pragma unroll
            for (int i = 0; i < TM; ++i) {
                const int m = wm + lr + 4 * i;
                a[i] = to_acc(AK ? As[kk * LDA + m] : As[m * LDA + kk]);
            }
#pragma unroll
            for (int jn = 0; jn < TN; ++jn) b[jn] = to_acc(Bs[kk * LDB + wn + lc + 8 * jn]);
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int jn = 0; jn < TN; ++jn) acc[i * TN + jn] = fma(a[i], b[jn], acc[i * TN + jn]);
        }
    }
}

// Tile-local (row, col) of accumulator idx. TC: (mt, nt, r) fragments of m16n8; SIMT: 4 x 8 lanes.
template <int WM, int WN, bool TC>
__device__ __forceinline__ void acc_pos(int idx, int lane, int& row, int& col) {
    if constexpr (TC) {
        constexpr int NT = WN / 8;
        const int f = idx >> 2, r = idx & 3, mt = f / NT, nt = f % NT;
        row = mt * 16 + (lane >> 2) + (r >> 1) * 8;
        col = nt * 8 + (lane & 3) * 2 + (r & 1);
    } else {
        constexpr int TN = WN / 8;
        const int i = idx / TN, jn = idx % TN;
        row = (lane >> 3) + 4 * i;
        col = (lane & 7) + 8 * jn;
    }
}

// Smallest active offset >= from in a tile's bitmask, or a large number when none is left.
__device__ __forceinline__ int next_k(const unsigned* __restrict__ tm, int words, int from) {
    int w = from >> 5;
    if (w >= words) return 1 << 30;
    unsigned bits = tm[w] & (~0u << (from & 31));
    while (true) {
        if (bits) return (w << 5) + __ffs(bits) - 1;
        if (++w >= words) return 1 << 30;
        bits = tm[w];
    }
}

// The store's epilogue (igemm_fwd's ep_* arguments; all null / 0 in every launch but a fused one): what a
// network applies right after a convolution in inference, in the same pass instead of another launch over
// the output (issue 19):  v = act((v - mean[c]) * rsqrt(var[c] + eps) * w[c] + b[c] + r[row, c]).
// mean null: no BatchNorm (w, b null: no affine part); r null: no residual; act: ReLU when relu (NaN kept, as
// torch.relu), else the identity. Arithmetic in the accumulator type, one rounding at the store (the unfused
// path rounds the convolution's output to T before the BatchNorm reads it).
__device__ __forceinline__ float inv_sqrt(float v) { return rsqrtf(v); }
__device__ __forceinline__ double inv_sqrt(double v) { return rsqrt(v); }  // float64 features: float64 math

template <typename T, typename AccT>
__device__ __forceinline__ AccT epilogue(AccT v, int col, size_t at, const float* __restrict__ mean,
                                         const float* __restrict__ var, const float* __restrict__ w,
                                         const float* __restrict__ b, const T* __restrict__ res, double eps, int relu) {
    if (mean) {
        v = (v - AccT(__ldg(mean + col))) * inv_sqrt(AccT(__ldg(var + col)) + AccT(eps));
        if (w) v *= AccT(__ldg(w + col));
        if (b) v += AccT(__ldg(b + col));
    }
    if (res) v += to_acc(res[at]);
    if (relu && v < AccT(0)) v = AccT(0);
    return v;
}

template <typename T, int BM, int BN, int BK, int WM, int WN, int STAGES, bool VEC, bool TC>
__global__ void __launch_bounds__((BM / WM) * (BN / WN) * 32)
igemm_fwd(const T* __restrict__ X, const T* __restrict__ W, const int* __restrict__ nbr,
          const unsigned* __restrict__ tile_mask, const int* __restrict__ row_of_slot, T* __restrict__ Y,
          int n_rows, int c_in, int c_out, int mask_words, int k_cap, int accumulate,
          const float* __restrict__ ep_mean, const float* __restrict__ ep_var, const float* __restrict__ ep_w,
          const float* __restrict__ ep_b, const T* __restrict__ ep_res, double ep_eps, int ep_relu) {
    using AccT = typename AccOf<T>::type;
    constexpr int NTH = (BM / WM) * (BN / WN) * 32;
    constexpr int P = Pad<T>::value;
    constexpr int A_SZ = BM * (BK + P), B_SZ = BK * (BN + P);
    constexpr int ACC_N = WM * WN / 32;
    static_assert(STAGES >= 2, "at least double buffering");
    // Dynamic shared memory: STAGES * (A_SZ + B_SZ) tiles of T, then (when k_cap > 0, i.e. K offsets fit)
    // s_nbr[k_cap][BM] neighbour rows of this tile per active offset and s_k[k_cap] the active offsets.
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* smem = reinterpret_cast<T*>(smem_raw);
    int* s_nbr = reinterpret_cast<int*>(smem_raw + STAGES * (A_SZ + B_SZ) * sizeof(T));
    int* s_k = s_nbr + k_cap * BM;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = (warp / (BN / WN)) * WM, wn = (warp % (BN / WN)) * WN;
    const int ncol = (c_out + BN - 1) / BN;
    const int row_tile = blockIdx.x / ncol, col_tile = blockIdx.x % ncol;  // column tiles adjacent: A reuse in L2
    const int row0 = row_tile * BM, n0 = col_tile * BN;
    const unsigned* tm = tile_mask + (size_t)row_tile * mask_words;

    int n_active = 0;
    for (int w = 0; w < mask_words; ++w) n_active += __popc(tm[w]);
    const int csteps = (c_in + BK - 1) / BK;
    const int total = n_active * csteps;
    const bool staged = k_cap > 0;

    if (staged) {
        // One round of independent loads for every (active offset, row) of the tile instead of a dependent
        // global read (index, then row) in every pipeline stage.
        if (tid == 0) {
            int a = 0;
            for (int w = 0; w < mask_words; ++w)
                for (unsigned bits = tm[w]; bits; bits &= bits - 1) s_k[a++] = (w << 5) + __ffs(bits) - 1;
        }
        __syncthreads();
        for (int i = tid; i < n_active * BM; i += NTH) {
            const int a = i / BM, r = i % BM, row = row0 + r;
            s_nbr[i] = row < n_rows ? __ldg(nbr + (size_t)s_k[a] * n_rows + row) : -1;
        }
        __syncthreads();
    }

    int la = 0, lc = 0;  // loader position: active offset index, first input channel
    int lk = staged ? (n_active ? s_k[0] : 0) : next_k(tm, mask_words, 0);
    // Not staged: the neighbour indices nbr[lk][row] of the A rows this warp loads are read one offset
    // ahead, into one register per lane (TileWalk::SHUFFLE layout; -1 past n_rows), right after the last
    // stage of the previous offset has issued its gathers; the loader takes them with a shuffle. The
    // dependent index read then overlaps a stage of MMAs instead of delaying the next stage's gathers.
    // Tile shapes whose rows do not fit one int per lane (none in the launcher's tables; some sweep
    // variants) read each index right before its gather.
    using AWalk = TileWalk<T, BM, BK, NTH, VEC>;
    int a_idx = -1;
    auto fetch_idx = [&](int k) {
        if constexpr (AWalk::SHUFFLE) {
            const int row = row0 + AWalk::lane_row(lane, warp);
            a_idx = lane < AWalk::LANES && row < n_rows ? __ldg(nbr + (size_t)k * n_rows + row) : -1;
        }
    };
    if (!staged && total > 0) fetch_idx(lk);
    auto load = [&](int stage) {
        T* As = smem + stage * (A_SZ + B_SZ);
        T* Bs = As + A_SZ;
        const int* nb = nbr + (size_t)lk * n_rows;
        const int* snb = s_nbr + la * BM;
        load_rows<T, BM, BK, NTH, VEC>(
            As, X, c_in, lc, c_in,
            [&](int j, int r) -> long long {
                if (staged) return (long long)snb[r];
                if constexpr (AWalk::SHUFFLE) {
                    return (long long)__shfl_sync(0xffffffffu, a_idx, AWalk::lane_of(j, lane));
                } else {
                    const int row = row0 + r;
                    return row < n_rows ? (long long)__ldg(nb + row) : -1LL;
                }
            },
            tid);
        const int kc = lc, kk = lk;
        load_rows<T, BK, BN, NTH, VEC>(
            Bs, W, c_out, n0, c_out,
            [&](int, int r) -> long long { return kc + r < c_in ? (long long)kk * c_in + kc + r : -1LL; }, tid);
        lc += BK;
        if (lc >= c_in) {  // next offset; the stages of one offset (C_in > BK) share its indices
            lc = 0;
            ++la;
            lk = staged ? (la < n_active ? s_k[la] : 0) : next_k(tm, mask_words, lk + 1);
            if (!staged && la < n_active) fetch_idx(lk);
        }
    };

    AccT acc[ACC_N];
#pragma unroll
    for (int i = 0; i < ACC_N; ++i) acc[i] = AccT(0);

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < total) load(s);
        cp_async_commit();
    }
    int ca = -1, cc = csteps - 1;  // compute position: active offset index, step within C_in
    bool warp_has = true;          // does any row of this warp's slice have offset ca?
    for (int it = 0; it < total; ++it) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const int nxt = it + STAGES - 1;
        if (nxt < total) load(nxt % STAGES);
        cp_async_commit();
        if (++cc == csteps) {
            cc = 0;
            ++ca;
            if (staged) {  // rows sorted by mask: a warp's slice often lacks offsets its tile has
                bool has = false;
#pragma unroll
                for (int r = lane; r < WM; r += 32) has |= s_nbr[ca * BM + wm + r] >= 0;
                warp_has = __any_sync(0xffffffffu, has);
            }
        }
        if (warp_has) {
            const T* As = smem + (it % STAGES) * (A_SZ + B_SZ);
            mma_step<T, AccT, BM, BN, BK, WM, WN, false, TC>(As, As + A_SZ, acc, wm, wn, lane);
        }
    }
    cp_async_wait<0>();

    // Epilogue: every element of the tile is written exactly once (zeros where no pair contributes);
    // with `accumulate` (the later passes of a mask split) it is added to what an earlier pass wrote; then
    // the fused BatchNorm / residual / ReLU when asked (see epilogue; only a split's last pass is asked).
    const bool ep = ep_mean != nullptr || ep_res != nullptr || ep_relu != 0;
    if constexpr (TC) {
        const bool pairs = (c_out % 2 == 0);
#pragma unroll
        for (int i = 0; i < ACC_N; i += 2) {  // acc[i], acc[i + 1]: columns col, col + 1 of one row
            int r, c;
            acc_pos<WM, WN, TC>(i, lane, r, c);
            const int slot = row0 + wm + r, col = n0 + wn + c;
            if (slot >= n_rows) continue;
            const size_t at = (size_t)(row_of_slot ? __ldg(row_of_slot + slot) : slot) * c_out + col;
            T* dst = Y + at;
            if (pairs && col + 1 < c_out) {
                if (accumulate) {
                    acc[i] += to_acc(dst[0]);
                    acc[i + 1] += to_acc(dst[1]);
                }
                if (ep) {
                    acc[i] = epilogue(acc[i], col, at, ep_mean, ep_var, ep_w, ep_b, ep_res, ep_eps, ep_relu);
                    acc[i + 1] = epilogue(acc[i + 1], col + 1, at + 1, ep_mean, ep_var, ep_w, ep_b, ep_res, ep_eps, ep_relu);
                }
                store_acc2(dst, acc[i], acc[i + 1]);
            } else {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    if (col + h >= c_out) continue;
                    AccT v = accumulate ? acc[i + h] + to_acc(dst[h]) : acc[i + h];
                    if (ep) v = epilogue(v, col + h, at + h, ep_mean, ep_var, ep_w, ep_b, ep_res, ep_eps, ep_relu);
                    store_acc(dst + h, v);
                }
            }
        }
    } else {
#pragma unroll
        for (int i = 0; i < ACC_N; ++i) {
            int r, c;
            acc_pos<WM, WN, TC>(i, lane, r, c);
            const int slot = row0 + wm + r, col = n0 + wn + c;
            if (slot < n_rows && col < c_out) {
                const size_t at = (size_t)(row_of_slot ? __ldg(row_of_slot + slot) : slot) * c_out + col;
                AccT v = accumulate ? acc[i] + to_acc(Y[at]) : acc[i];
                if (ep) v = epilogue(v, col, at, ep_mean, ep_var, ep_w, ep_b, ep_res, ep_eps, ep_relu);
                store_acc(Y + at, v);
            }
        }
    }
}

template <typename T, int BM, int BN, int BK, int WM, int WN, int STAGES, bool VEC, bool TC>
__global__ void __launch_bounds__((BM / WM) * (BN / WN) * 32)
igemm_wgrad(const T* __restrict__ X, const T* __restrict__ dY, const int* __restrict__ in_maps,
            const int* __restrict__ out_maps, const int* __restrict__ chunks,  // [n_chunks][3]: k, lo, hi
            typename AccOf<T>::type* __restrict__ dW, int c_in, int c_out) {
    using AccT = typename AccOf<T>::type;
    constexpr int NTH = (BM / WM) * (BN / WN) * 32;
    constexpr int P = Pad<T>::value;
    constexpr int A_SZ = BK * (BM + P), B_SZ = BK * (BN + P);
    constexpr int ACC_N = WM * WN / 32;
    extern __shared__ __align__(16) unsigned char smem_raw[];  // STAGES * (A_SZ + B_SZ) * sizeof(T) bytes
    T* smem = reinterpret_cast<T*>(smem_raw);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = (warp / (BN / WN)) * WM, wn = (warp % (BN / WN)) * WN;
    const int ntn = (c_out + BN - 1) / BN, ntm = (c_in + BM - 1) / BM;
    const int tile = blockIdx.x % (ntm * ntn), chunk = blockIdx.x / (ntm * ntn);
    const int m0 = (tile / ntn) * BM, n0 = (tile % ntn) * BN;
    const int k = chunks[3 * chunk], lo = chunks[3 * chunk + 1], hi = chunks[3 * chunk + 2];
    const int total = (hi - lo + BK - 1) / BK;

    auto load = [&](int stage, int step) {
        T* As = smem + stage * (A_SZ + B_SZ);
        T* Bs = As + A_SZ;
        const int p0 = lo + step * BK;
        load_rows<T, BK, BM, NTH, VEC>(
            As, X, c_in, m0, c_in,
            [&](int, int r) -> long long { return p0 + r < hi ? (long long)__ldg(in_maps + p0 + r) : -1LL; }, tid);
        load_rows<T, BK, BN, NTH, VEC>(
            Bs, dY, c_out, n0, c_out,
            [&](int, int r) -> long long { return p0 + r < hi ? (long long)__ldg(out_maps + p0 + r) : -1LL; }, tid);
    };

    AccT acc[ACC_N];
#pragma unroll
    for (int i = 0; i < ACC_N; ++i) acc[i] = AccT(0);
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < total) load(s, s);
        cp_async_commit();
    }
    for (int it = 0; it < total; ++it) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const int nxt = it + STAGES - 1;
        if (nxt < total) load(nxt % STAGES, nxt);
        cp_async_commit();
        const T* As = smem + (it % STAGES) * (A_SZ + B_SZ);
        mma_step<T, AccT, BM, BN, BK, WM, WN, true, TC>(As, As + A_SZ, acc, wm, wn, lane);
    }
    cp_async_wait<0>();
    if (total == 0) return;
#pragma unroll
    for (int i = 0; i < ACC_N; ++i) {
        int r, c;
        acc_pos<WM, WN, TC>(i, lane, r, c);
        const int m = m0 + wm + r, n = n0 + wn + c;
        if (m < c_in && n < c_out) atomicAdd(dW + ((size_t)k * c_in + m) * c_out + n, acc[i]);
    }
}

}  // namespace svx_igemm
