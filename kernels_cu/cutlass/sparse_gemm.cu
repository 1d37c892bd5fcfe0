// CUTLASS_IMPLICIT_GEMM: sparse convolution as one gather/scatter GEMM per kernel offset, built ahead of
// time into libsparsevox_cutlass.so (see sparsevox/cuda/cutlass_build.py) and called through ctypes
// (sparsevox/cuda/cutlass_lib.py).
//
// Pairs (CSR by offset k): rows in_maps[j] of the input feed rows out_maps[j] of the output for
// offsets[k] <= j < offsets[k+1]. Within one offset every input row and every output row occurs at most
// once, so a GEMM may read-modify-write its scattered output rows without atomics; offsets run one after
// another on the caller's stream and accumulate (beta = 1) into a float32 buffer the caller zeroed.
//
//   forward  out[out_k]  += feats[in_k]  @ W[k]      M = L_k, N = C_out, K = C_in  gather A rows, scatter D
//   dgrad    gin[in_k]   += gout[out_k]  @ W[k]^T    M = L_k, N = C_in,  K = C_out gather A rows, scatter D
//   wgrad    gW[k]        = feats[in_k]^T @ gout[out_k]  M = C_in, N = C_out, K = L_k
//            gather-gather along K: A = feats^T is column-major, B = gout is row-major, and CUTLASS 2.x
//            gathers the strided dimension of an operand, which for these layouts is K for both.
//
// Inputs are float16, bfloat16 (float32 accumulation) or float32 computed in TF32 (the caller opts in).
// Outputs are always float32; the Python side casts back to the input dtype once, at the end.
// Channel counts must be multiples of kAlignment (8 for 16-bit types, 4 for TF32); the Python side pads.
//
// One file, compiled several times:
//   -DSPARSEVOX_DTYPE=d -DSPARSEVOX_TILE=t   one instantiation unit: the three GEMMs of dtype d, tile t
//   (neither)                                 the dispatch unit: the extern "C" entry points
// so the build runs one nvcc per (dtype, tile) in parallel and no kernel is written twice.

#include <cuda_runtime.h>

#include <cstdint>

namespace sparsevox_cutlass {

// Bump when an entry point's signature or meaning changes; cutlass_lib.py refuses other versions.
constexpr int kAbiVersion = 1;

enum DType { kFloat16 = 0, kBFloat16 = 1, kTF32 = 2, kNumDTypes = 3 };
constexpr int kNumTiles = 4;

/// One call: every offset of one direction. Pointers are device pointers except ``offsets`` (host).
struct ConvArgs {
  const void* a;          // forward: feats [N_in, C_in]; dgrad: grad_out [N_out, C_out]; wgrad: feats
  const void* b;          // forward, dgrad: weight [K, C_in, C_out]; wgrad: grad_out [N_out, C_out]
  float* d;               // forward: out [N_out, C_out]; dgrad: grad_in [N_in, C_in]; wgrad: grad_w [K, C_in, C_out]
  int c_in, c_out;
  const int* in_maps;     // int32 [L]
  const int* out_maps;    // int32 [L]
  const int64_t* offsets; // host int64 [num_offsets + 1]
  int num_offsets;
  int split_k;            // serial split-K slices (1 = none)
  cudaStream_t stream;
};

using ConvFn = int (*)(ConvArgs const&);

template <int DT, int Tile> int forward(ConvArgs const& args);
template <int DT, int Tile> int dgrad(ConvArgs const& args);
template <int DT, int Tile> int wgrad(ConvArgs const& args);

/// Record the message returned by sparsevox_cutlass_last_error(); returns ``status`` for chaining.
int set_error(int status, const char* fmt, ...);

}  // namespace sparsevox_cutlass

#if defined(SPARSEVOX_DTYPE) && defined(SPARSEVOX_TILE)
// ============================== instantiation unit: the GEMMs of one dtype and tile ==================

#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm_universal.h"

namespace sparsevox_cutlass {

template <int DT> struct DTypeConfig;
template <> struct DTypeConfig<kFloat16> {
  using Element = cutlass::half_t;
  using Instruction = cutlass::gemm::GemmShape<16, 8, 16>;
  static constexpr int kAlignment = 8, kStages = 4;
};
template <> struct DTypeConfig<kBFloat16> {
  using Element = cutlass::bfloat16_t;
  using Instruction = cutlass::gemm::GemmShape<16, 8, 16>;
  static constexpr int kAlignment = 8, kStages = 4;
};
template <> struct DTypeConfig<kTF32> {  // float operands on tensor cores = TF32 (OpMultiplyAdd)
  using Element = float;
  using Instruction = cutlass::gemm::GemmShape<16, 8, 8>;
  static constexpr int kAlignment = 4, kStages = 3;  // 32 KB of shared memory per stage at 128x128x32
};

// mma_tile: CTA tile and warp tile (four warps each).
template <int Tile> struct TileConfig;
template <> struct TileConfig<0> {
  using Block = cutlass::gemm::GemmShape<128, 128, 32>;
  using Warp = cutlass::gemm::GemmShape<64, 64, 32>;
};
template <> struct TileConfig<1> {
  using Block = cutlass::gemm::GemmShape<128, 64, 32>;
  using Warp = cutlass::gemm::GemmShape<64, 32, 32>;
};
template <> struct TileConfig<2> {
  using Block = cutlass::gemm::GemmShape<64, 128, 32>;
  using Warp = cutlass::gemm::GemmShape<32, 64, 32>;
};
template <> struct TileConfig<3> {
  using Block = cutlass::gemm::GemmShape<64, 64, 32>;
  using Warp = cutlass::gemm::GemmShape<32, 32, 32>;
};

using RowMajor = cutlass::layout::RowMajor;
using ColumnMajor = cutlass::layout::ColumnMajor;

/// The one GEMM type; directions differ only in operand layouts and which operands are indexed.
template <int DT, int Tile, typename LayoutA, typename LayoutB, bool GatherA, bool GatherB, bool ScatterD>
using SparseGemm = cutlass::gemm::device::GemmUniversal<
    typename DTypeConfig<DT>::Element, LayoutA,
    typename DTypeConfig<DT>::Element, LayoutB,
    float, RowMajor,  // C and D: float32 row-major
    float,            // accumulator
    cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
    typename TileConfig<Tile>::Block, typename TileConfig<Tile>::Warp, typename DTypeConfig<DT>::Instruction,
    cutlass::epilogue::thread::LinearCombination<float, 128 / cutlass::sizeof_bits<float>::value, float, float>,
    cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>,
    DTypeConfig<DT>::kStages, DTypeConfig<DT>::kAlignment, DTypeConfig<DT>::kAlignment,
    cutlass::arch::OpMultiplyAdd, cutlass::ComplexTransform::kNone, cutlass::ComplexTransform::kNone,
    GatherA, GatherB, ScatterD>;

template <int DT, int Tile>
using ForwardGemm = SparseGemm<DT, Tile, RowMajor, RowMajor, true, false, true>;
template <int DT, int Tile>
using DgradGemm = SparseGemm<DT, Tile, RowMajor, ColumnMajor, true, false, true>;  // W[k]^T: column-major view
template <int DT, int Tile>
using WgradGemm = SparseGemm<DT, Tile, ColumnMajor, RowMajor, true, true, false>;  // feats^T: column-major view

inline const char* status_name(cutlass::Status s) { return cutlass::cutlassGetStatusString(s); }

/// Runs ``make_args(k)`` for every non-empty offset k with one workspace (serial split-K semaphores).
template <typename Gemm, typename MakeArgs>
int run_offsets(ConvArgs const& c, const char* direction, MakeArgs make_args) {
  int const align = Gemm::kAlignmentA;
  if (c.c_in % align || c.c_out % align) {
    return set_error(2, "%s: C_in=%d and C_out=%d must be multiples of %d for this dtype (pad them)",
                     direction, c.c_in, c.c_out, align);
  }
  // One workspace for all offsets: the last CTA of a split-K tile resets its semaphore, and
  // initialize() zeroes it again before each launch, so sequential launches can share it.
  size_t workspace_bytes = 0;
  for (int k = 0; k < c.num_offsets; ++k) {
    if (c.offsets[k + 1] > c.offsets[k]) {
      size_t bytes = Gemm::get_workspace_size(make_args(k));
      workspace_bytes = bytes > workspace_bytes ? bytes : workspace_bytes;
    }
  }
  void* workspace = nullptr;
  if (workspace_bytes) {
    cudaError_t e = cudaMallocAsync(&workspace, workspace_bytes, c.stream);
    if (e != cudaSuccess) {
      return set_error(3, "%s: cudaMallocAsync(%zu bytes) for the split-K workspace failed: %s", direction,
                       workspace_bytes, cudaGetErrorString(e));
    }
  }
  int status = 0;
  Gemm gemm;
  for (int k = 0; k < c.num_offsets && status == 0; ++k) {
    if (c.offsets[k + 1] <= c.offsets[k]) continue;
    typename Gemm::Arguments args = make_args(k);
    cutlass::Status s = gemm.can_implement(args);
    if (s != cutlass::Status::kSuccess) {
      status = set_error(4, "%s offset %d: can_implement: %s", direction, k, status_name(s));
      break;
    }
    s = gemm.initialize(args, workspace, c.stream);
    if (s == cutlass::Status::kSuccess) s = gemm.run(c.stream);
    cudaError_t e = cudaGetLastError();
    if (s != cutlass::Status::kSuccess || e != cudaSuccess) {
      status = set_error(5, "%s offset %d: %s (%s)", direction, k, status_name(s), cudaGetErrorString(e));
    }
  }
  if (workspace) cudaFreeAsync(workspace, c.stream);
  return status;
}

template <int DT, int Tile>
int forward(ConvArgs const& c) {
  using Gemm = ForwardGemm<DT, Tile>;
  using T = typename DTypeConfig<DT>::Element;
  return run_offsets<Gemm>(c, "forward", [&](int k) {
    int64_t begin = c.offsets[k];
    int rows = int(c.offsets[k + 1] - begin);
    T const* w = static_cast<T const*>(c.b) + int64_t(k) * c.c_in * c.c_out;
    return typename Gemm::Arguments(
        cutlass::gemm::GemmUniversalMode::kGemm, {rows, c.c_out, c.c_in}, c.split_k,
        {1.0f, 1.0f},                       // out = feats[in_k] @ W[k] + out
        c.a, w, c.d, c.d,
        0, 0, 0, 0,                         // batch strides (unused)
        c.c_in, c.c_out, c.c_out, c.c_out,  // lda, ldb, ldc, ldd
        c.in_maps + begin, nullptr, c.out_maps + begin);
  });
}

template <int DT, int Tile>
int dgrad(ConvArgs const& c) {
  using Gemm = DgradGemm<DT, Tile>;
  using T = typename DTypeConfig<DT>::Element;
  return run_offsets<Gemm>(c, "dgrad", [&](int k) {
    int64_t begin = c.offsets[k];
    int rows = int(c.offsets[k + 1] - begin);
    T const* w = static_cast<T const*>(c.b) + int64_t(k) * c.c_in * c.c_out;
    return typename Gemm::Arguments(
        cutlass::gemm::GemmUniversalMode::kGemm, {rows, c.c_in, c.c_out}, c.split_k,
        {1.0f, 1.0f},                       // grad_in = grad_out[out_k] @ W[k]^T + grad_in
        c.a, w, c.d, c.d,
        0, 0, 0, 0,
        c.c_out, c.c_out, c.c_in, c.c_in,  // W[k]^T [C_out, C_in] column-major has ld = C_out
        c.out_maps + begin, nullptr, c.in_maps + begin);
  });
}

template <int DT, int Tile>
int wgrad(ConvArgs const& c) {
  using Gemm = WgradGemm<DT, Tile>;
  return run_offsets<Gemm>(c, "wgrad", [&](int k) {
    int64_t begin = c.offsets[k];
    int pairs = int(c.offsets[k + 1] - begin);
    float* gw = c.d + int64_t(k) * c.c_in * c.c_out;
    return typename Gemm::Arguments(
        cutlass::gemm::GemmUniversalMode::kGemm, {c.c_in, c.c_out, pairs}, c.split_k,
        {1.0f, 0.0f},                      // grad_w[k] = feats[in_k]^T @ grad_out[out_k]
        c.a, c.b, gw, gw,
        0, 0, 0, 0,
        c.c_in, c.c_out, c.c_out, c.c_out,  // feats^T [C_in, L] column-major has ld = C_in
        c.in_maps + begin, c.out_maps + begin, nullptr);
  });
}

template int forward<SPARSEVOX_DTYPE, SPARSEVOX_TILE>(ConvArgs const&);
template int dgrad<SPARSEVOX_DTYPE, SPARSEVOX_TILE>(ConvArgs const&);
template int wgrad<SPARSEVOX_DTYPE, SPARSEVOX_TILE>(ConvArgs const&);

}  // namespace sparsevox_cutlass

#else
// ============================== dispatch unit: the extern "C" entry points ===========================

#include <cstdarg>
#include <cstdio>

namespace sparsevox_cutlass {

namespace {
thread_local char g_last_error[512] = "";

template <int DT, int... Tiles>
struct Table {
  static constexpr ConvFn kForward[kNumTiles] = {&forward<DT, Tiles>...};
  static constexpr ConvFn kDgrad[kNumTiles] = {&dgrad<DT, Tiles>...};
  static constexpr ConvFn kWgrad[kNumTiles] = {&wgrad<DT, Tiles>...};
};
template <int DT> using Tiles = Table<DT, 0, 1, 2, 3>;

ConvFn lookup(int direction, int dtype, int tile) {
#define SPARSEVOX_ROW(DT) \
  (direction == 0 ? Tiles<DT>::kForward[tile] : direction == 1 ? Tiles<DT>::kDgrad[tile] : Tiles<DT>::kWgrad[tile])
  switch (dtype) {
    case kFloat16: return SPARSEVOX_ROW(kFloat16);
    case kBFloat16: return SPARSEVOX_ROW(kBFloat16);
    default: return SPARSEVOX_ROW(kTF32);
  }
#undef SPARSEVOX_ROW
}

/// Validate, switch to the caller's device, run, switch back.
int call(int direction, int dtype, int tile, int split_k, uintptr_t a, uintptr_t b, uintptr_t d, int c_in,
         int c_out, uintptr_t in_maps, uintptr_t out_maps, const int64_t* offsets, int num_offsets, int device,
         uintptr_t stream) {
  static const char* const kNames[] = {"forward", "dgrad", "wgrad"};
  g_last_error[0] = '\0';
  if (dtype < 0 || dtype >= kNumDTypes) {
    return set_error(1, "dtype must be 0 (float16), 1 (bfloat16) or 2 (tf32), got %d", dtype);
  }
  if (tile < 0 || tile >= kNumTiles) return set_error(1, "mma_tile must be in [0, %d], got %d", kNumTiles - 1, tile);
  if (split_k < 1 || split_k > 64) return set_error(1, "split_k_slices must be in [1, 64], got %d", split_k);
  if (c_in <= 0 || c_out <= 0) return set_error(1, "C_in and C_out must be positive, got %d and %d", c_in, c_out);
  if (num_offsets < 0 || (num_offsets > 0 && offsets == nullptr)) return set_error(1, "bad offsets array");
  for (int k = 0; k < num_offsets; ++k) {
    if (offsets[k + 1] < offsets[k] || offsets[k + 1] - offsets[k] > INT32_MAX) {
      return set_error(1, "offsets must be non-decreasing with < 2^31 pairs per offset (offset %d)", k);
    }
  }
  int previous = -1;
  cudaError_t e = cudaGetDevice(&previous);
  if (e == cudaSuccess && previous != device) e = cudaSetDevice(device);
  if (e != cudaSuccess) return set_error(6, "cannot use CUDA device %d: %s", device, cudaGetErrorString(e));
  ConvArgs args{reinterpret_cast<const void*>(a), reinterpret_cast<const void*>(b), reinterpret_cast<float*>(d),
                c_in, c_out, reinterpret_cast<const int*>(in_maps), reinterpret_cast<const int*>(out_maps),
                offsets, num_offsets, split_k, reinterpret_cast<cudaStream_t>(stream)};
  int status = lookup(direction, dtype, tile)(args);
  if (status != 0 && g_last_error[0] == '\0') set_error(status, "%s failed", kNames[direction]);
  if (previous != device) cudaSetDevice(previous);
  return status;
}
}  // namespace

int set_error(int status, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_last_error, sizeof(g_last_error), fmt, ap);
  va_end(ap);
  return status;
}

}  // namespace sparsevox_cutlass

using sparsevox_cutlass::call;

// The library is built with -fvisibility=hidden: only these entry points are exported, so CUTLASS
// template instances cannot interpose with those of other libraries in the process (PyTorch's, say).
#define SPARSEVOX_API __attribute__((visibility("default")))

extern "C" {

/// ABI version of this library (cutlass_lib.py checks it before binding the entry points).
SPARSEVOX_API int sparsevox_cutlass_abi_version() { return sparsevox_cutlass::kAbiVersion; }

/// Message of the last failed call on this thread ("" after a success).
SPARSEVOX_API const char* sparsevox_cutlass_last_error() { return sparsevox_cutlass::g_last_error; }

// All three: dtype 0/1/2 (float16, bfloat16, float32 as TF32), mma_tile 0-3, split_k (serial split-K
// slices), a/b/d device pointers, C_in/C_out, in_maps/out_maps device int32 [L], offsets host int64
// [num_offsets + 1], the CUDA device id and the cudaStream_t. Return 0, or a status with the message in
// sparsevox_cutlass_last_error().

/// out[out_k] += feats[in_k] @ weight[k] for every offset k; out is float32 [N_out, C_out].
SPARSEVOX_API int sparsevox_cutlass_forward(
    int dtype, int mma_tile, int split_k, uintptr_t feats, uintptr_t weight, uintptr_t out, int c_in, int c_out,
    uintptr_t in_maps, uintptr_t out_maps, const int64_t* offsets, int num_offsets, int device, uintptr_t stream) {
  return call(0, dtype, mma_tile, split_k, feats, weight, out, c_in, c_out, in_maps, out_maps, offsets,
              num_offsets, device, stream);
}

/// grad_in[in_k] += grad_out[out_k] @ weight[k]^T; grad_in is float32 [N_in, C_in].
SPARSEVOX_API int sparsevox_cutlass_dgrad(
    int dtype, int mma_tile, int split_k, uintptr_t grad_out, uintptr_t weight, uintptr_t grad_in, int c_in,
    int c_out, uintptr_t in_maps, uintptr_t out_maps, const int64_t* offsets, int num_offsets, int device,
    uintptr_t stream) {
  return call(1, dtype, mma_tile, split_k, grad_out, weight, grad_in, c_in, c_out, in_maps, out_maps, offsets,
              num_offsets, device, stream);
}

/// grad_w[k] = feats[in_k]^T @ grad_out[out_k]; grad_w is float32 [K, C_in, C_out] (empty offsets untouched).
SPARSEVOX_API int sparsevox_cutlass_wgrad(
    int dtype, int mma_tile, int split_k, uintptr_t feats, uintptr_t grad_out, uintptr_t grad_w, int c_in,
    int c_out, uintptr_t in_maps, uintptr_t out_maps, const int64_t* offsets, int num_offsets, int device,
    uintptr_t stream) {
  return call(2, dtype, mma_tile, split_k, feats, grad_out, grad_w, c_in, c_out, in_maps, out_maps, offsets,
              num_offsets, device, stream);
}

}  // extern "C"

#endif
