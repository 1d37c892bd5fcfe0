"""Registers IMPLICIT_GEMM (conv): fused gather-GEMM-scatter CUDA kernels, GPU only.

Search space (the reference guide's names): forward and dgrad over ``fwd_block_size`` (rows per CTA)
x ``gemm_block_size`` (output channels per CTA), x ``mask_split`` in {1, 2} for kernels of 16+ offsets
(also 3 for float32/float64 from 128 channels); wgrad over ``gemm_block_size`` (square weight tile) x
``split_k_factor`` (CTAs per multiprocessor the pairs are split into). At most 16 forward/dgrad and 8
wgrad combinations.
"""
from . import implicit_gemm as ig
from ..tuning.registry import Algorithm, gpu_unavailable, register

_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _params(direction, problem):
    if direction == "fwd":
        return ig.fwd_params(problem.dtype, problem.c_out, problem.num_offsets)
    if direction == "dgrad":
        return ig.fwd_params(problem.dtype, problem.c_in, problem.num_offsets)
    if direction == "wgrad":
        return ig.wgrad_params(problem.dtype, problem.c_in, problem.c_out)
    raise ValueError(f"direction must be 'fwd', 'dgrad' or 'wgrad', got {direction!r}")


def _available(problem):
    why = gpu_unavailable(problem, "implicit_gemm")
    if why:
        return False, why
    from ..cuda.gpu_info import compute_capability
    if problem.dtype not in _DTYPES:
        return False, f"implicit_gemm supports {_DTYPES}, not {problem.dtype}"
    import cupy
    if compute_capability(cupy.cuda.Device().id) < (8, 0):
        return False, "implicit_gemm needs compute capability 8.0 or newer (mma.sync, cp.async)"
    return True, ""


register("conv", Algorithm("implicit_gemm", ig.forward, ig.dgrad, ig.wgrad, _params, _available, ig.prepare))
