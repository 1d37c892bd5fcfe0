"""CUTLASS_IMPLICIT_GEMM (conv), registered here: CUTLASS gather/scatter GEMMs from ``libsparsevox_cutlass.so``.

One CUTLASS 2.x ``GemmUniversal`` launch per kernel offset, on the caller's CuPy stream:
forward gathers input rows and scatters output rows, dgrad the same with the map reversed and
``W[k]^T``, wgrad gathers both operands along the pair dimension (serial split-K). float16/bfloat16
inputs multiply on tensor cores with float32 accumulation into a float32 buffer, cast to the input
dtype once at the end; float32 inputs run as TF32, only when the user allowed TF32.

Channel counts that are not multiples of the GEMM alignment (8 elements; 4 for TF32) are zero-padded
here (a copy of the features and the weight), so every layer can run.

Parameters searched: ``mma_tile`` 0-3 (CTA tiles 128x128, 128x64, 64x128, 64x64, K-step 32) and
``split_k_slices`` 1, 2, 4, 8, pruned per direction to at most 8 combinations (see :func:`_params`).
"""
from __future__ import annotations

from ..cuda import cutlass_lib
from ..tuning.registry import Algorithm, register

TILE_SHAPES = {0: (128, 128), 1: (128, 64), 2: (64, 128), 3: (64, 64)}  # mma_tile -> CTA (M, N)
SPLIT_K = (1, 2, 4, 8)
_ALIGN = {"float16": 8, "bfloat16": 8, "float32": 4}


def _pad_to(n: int, dtype: str) -> int:
    a = _ALIGN[dtype]
    return -(-n // a) * a


def _dtype(x) -> str:
    name = x.dtype.name
    if name not in _ALIGN:
        raise ValueError(f"CUTLASS_IMPLICIT_GEMM takes float16, bfloat16 or float32 (TF32), got {name}")
    return name


def _padded(x, shape):
    """``x`` zero-padded to ``shape`` (trailing dims) and C-contiguous; ``x`` itself when it already is."""
    import cupy
    if tuple(x.shape) == tuple(shape):
        return cupy.ascontiguousarray(x)
    y = cupy.zeros(shape, dtype=x.dtype)
    y[tuple(slice(0, n) for n in x.shape)] = x
    return y


def _check_tuning(mma_tile, split_k_slices):
    if mma_tile not in TILE_SHAPES:
        raise ValueError(f"mma_tile must be one of {sorted(TILE_SHAPES)}, got {mma_tile!r}")
    if split_k_slices not in SPLIT_K:
        raise ValueError(f"split_k_slices must be one of {SPLIT_K}, got {split_k_slices!r}")


def forward(feats, weight, kmap, mma_tile: int = 0, split_k_slices: int = 1):
    """``out [N_out, C_out] = sum_k scatter(feats[in_k] @ weight[k], out_k)`` in the input dtype."""
    import cupy
    _check_tuning(mma_tile, split_k_slices)
    dt = _dtype(feats)
    k, c_in, c_out = weight.shape
    ci, co = _pad_to(c_in, dt), _pad_to(c_out, dt)
    out = cupy.zeros((kmap.num_out, co), dtype=cupy.float32)
    if kmap.num_pairs:
        cutlass_lib.call("forward", dt, mma_tile, split_k_slices, _padded(feats, (feats.shape[0], ci)),
                         _padded(weight, (k, ci, co)), out, ci, co, kmap)
    return out[:, :c_out].astype(feats.dtype, order="C")


def dgrad(grad_out, weight, kmap, mma_tile: int = 0, split_k_slices: int = 1):
    """``grad_feats [N_in, C_in] = sum_k scatter(grad_out[out_k] @ weight[k]^T, in_k)``."""
    import cupy
    _check_tuning(mma_tile, split_k_slices)
    dt = _dtype(grad_out)
    k, c_in, c_out = weight.shape
    ci, co = _pad_to(c_in, dt), _pad_to(c_out, dt)
    grad_in = cupy.zeros((kmap.num_in, ci), dtype=cupy.float32)
    if kmap.num_pairs:
        cutlass_lib.call("dgrad", dt, mma_tile, split_k_slices, _padded(grad_out, (grad_out.shape[0], co)),
                         _padded(weight, (k, ci, co)), grad_in, ci, co, kmap)
    return grad_in[:, :c_in].astype(grad_out.dtype, order="C")


def wgrad(feats, grad_out, kmap, num_offsets: int, mma_tile: int = 0, split_k_slices: int = 1, out_dtype=None):
    """``grad_weight [K, C_in, C_out]``, ``grad_weight[k] = feats[in_k]^T @ grad_out[out_k]``, in ``out_dtype``
    (default: the features' dtype; float32 hands over the float32 accumulator unrounded)."""
    import cupy
    _check_tuning(mma_tile, split_k_slices)
    dt = _dtype(feats)
    c_in, c_out = feats.shape[1], grad_out.shape[1]
    ci, co = _pad_to(c_in, dt), _pad_to(c_out, dt)
    gw = cupy.zeros((num_offsets, ci, co), dtype=cupy.float32)  # offsets without pairs stay zero
    if kmap.num_pairs:
        cutlass_lib.call("wgrad", dt, mma_tile, split_k_slices, _padded(feats, (feats.shape[0], ci)),
                         _padded(grad_out, (grad_out.shape[0], co)), gw, ci, co, kmap)
    return gw[:, :c_in, :c_out].astype(out_dtype or feats.dtype, order="C", copy=(ci, co) != (c_in, c_out))


def _params(direction, problem):
    """At most 8 ``{mma_tile, split_k_slices}`` combinations worth timing for this problem.

    forward/dgrad: M is the pair count of an offset (large), so every tile is a candidate; split-K
    (over C_in resp. C_out) only pays when that reduction is long, so 2 slices join from 128 channels.
    wgrad: M x N is the small C_in x C_out weight, K the long pair list: split-K is what fills the GPU,
    and tiles much larger than the weight are dropped.
    """
    dt = problem.dtype if problem.dtype in _ALIGN else "float16"
    c_in, c_out = _pad_to(problem.c_in, dt), _pad_to(problem.c_out, dt)
    if direction in ("fwd", "dgrad"):
        reduction = c_in if direction == "fwd" else c_out
        splits = (1, 2) if reduction >= 128 else (1,)
        return [{"mma_tile": t, "split_k_slices": s} for s in splits for t in TILE_SHAPES]
    tiles = [t for t, (m, n) in TILE_SHAPES.items() if m <= max(c_in, 64) and n <= max(c_out, 64)]
    splits = SPLIT_K if len(tiles) <= 2 else (4, 8)
    return [{"mma_tile": t, "split_k_slices": s} for t in tiles for s in splits]


def _available(problem):
    if problem.op != "conv":
        return False, "CUTLASS_IMPLICIT_GEMM implements sparse convolution only"
    if problem.device != "gpu":
        return False, "CUTLASS_IMPLICIT_GEMM runs on CUDA GPUs only"
    if problem.dtype == "float32" and not problem.tf32:
        return False, ("float32 runs on CUTLASS only as TF32, which is off: enable it with "
                       "sparsevox.allow_tf32(True) or SPARSEVOX_ALLOW_TF32=1 (float32 is never cast to float16)")
    if problem.dtype not in _ALIGN:
        return False, f"{problem.dtype} is not supported (float16, bfloat16, or float32 as TF32)"
    ok, reason = cutlass_lib.available()
    if not ok:
        return False, reason
    try:
        import cupy

        from ..cuda.gpu_info import compute_capability
        cc = compute_capability(cupy.cuda.Device().id)
    except Exception as e:  # no usable device: say so rather than fail the search
        return False, f"no usable CUDA device ({type(e).__name__}: {e})"
    if cc < (8, 0):
        return False, f"CUTLASS_IMPLICIT_GEMM needs compute capability 8.0 or newer, this GPU has {cc[0]}.{cc[1]}"
    return True, ""


def _scratch(direction, problem, params) -> int:
    """Device bytes beyond inputs and output: the float32 result buffer (zeroed, accumulated over the
    offsets, then cast into the output), and zero-padded copies of operands whose channel counts are
    not multiples of the alignment."""
    dt = problem.dtype
    ci, co = _pad_to(problem.c_in, dt), _pad_to(problem.c_out, dt)
    size = 2 if dt in ("float16", "bfloat16") else 4
    rows_a = {"fwd": problem.n_in, "dgrad": problem.n_out, "wgrad": problem.n_in}[direction]
    result = {"fwd": problem.n_out * co, "dgrad": problem.n_in * ci, "wgrad": problem.num_offsets * ci * co}[direction]
    padded = 0
    if ci != problem.c_in or co != problem.c_out:
        c_a = co if direction == "dgrad" else ci
        padded = size * (rows_a * c_a + (problem.n_out * co if direction == "wgrad" else problem.num_offsets * ci * co))
    return 4 * result + padded


register("conv", Algorithm("cutlass_implicit_gemm", forward, dgrad, wgrad, _params, _available, scratch=_scratch))
