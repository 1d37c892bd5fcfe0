"""EXPLICIT_GEMM: gather → one GEMM per kernel offset → scatter-add, written once for NumPy and CuPy.

Within one offset every input row and every output row occurs at most once (the map is a partial
bijection per offset), so ``out[rows] += ...`` with fancy indexing is exact, no atomics needed.

Precision (the compute dtype of the per-offset GEMMs, then summed in a float32 or float64 buffer):

- float64: float64 GEMMs (cuBLAS DGEMM on the GPU).
- float32: float32 GEMMs. On the GPU they use TF32 tensor cores only when the user opted in with
  :func:`sparsevox.allow_tf32` (or ``SPARSEVOX_ALLOW_TF32=1``). Mechanism: CuPy chooses the cuBLAS
  compute type of float32 GEMMs from a process-wide table (``cupy._core.set_compute_type``, first
  filled from the environment variable ``CUPY_TF32``). Every call here sets the float32 entry to
  ``COMPUTE_TYPE_TF32`` (``CUBLAS_COMPUTE_32F_FAST_TF32``) when TF32 is allowed and the features are
  float32, to ``COMPUTE_TYPE_DEFAULT`` (``CUBLAS_COMPUTE_32F``, full float32) otherwise, and restores
  the previous entry on return: ``CUPY_TF32=1`` does not leak TF32 into sparsevox, and sparsevox's
  choice does not leak out. The table is per process, not per thread: threads that run convolutions
  concurrently with different ``allow_tf32`` settings race on it.
- float16 / bfloat16: the 16-bit operands are cast to float32 (exactly) and multiplied in float32, so
  no partial result is rounded to 16 bits before the sum; the output is rounded once, at the end. On
  the GPU these float32 GEMMs run on TF32 tensor cores: TF32 keeps 10 mantissa bits and float32's
  exponent range, so every float16 and bfloat16 value is a TF32 value and the products are exact.
  (Rounding each offset's GEMM output to 16 bits, as an earlier version did, made this algorithm the
  least precise one, and un-scaled float16 gradients of ~1e-6 lost most of their digits; issue 17.)
"""
from __future__ import annotations

import contextlib

import numpy as np

from .._arrays import array_module
from ..config import allow_tf32
from ..tuning.registry import Algorithm, register

_SIXTEEN_BIT = ("float16", "bfloat16")


def _acc_dtype(a, xp):
    """The dtype every product and sum runs in: float64 for float64, float32 otherwise."""
    return xp.float64 if a.dtype == xp.float64 else xp.float32


@contextlib.contextmanager
def _gemm_mode(a, xp):
    """On CuPy: run on ``a``'s device; float32 GEMMs in TF32 iff ``a`` is 16-bit (exact, see above) or
    float32 with TF32 allowed."""
    if xp is np:
        yield
        return
    from cupy._core import _routines_linalg as linalg
    f32 = np.dtype(np.float32)
    tf32 = a.dtype.name in _SIXTEEN_BIT or (allow_tf32() and a.dtype == f32)
    want = linalg.COMPUTE_TYPE_TF32 if tf32 else linalg.COMPUTE_TYPE_DEFAULT
    with xp.cuda.Device(a.device.id):
        prev = linalg.get_compute_type(f32)
        if prev == want:
            yield
            return
        linalg.set_compute_type(f32, want)
        try:
            yield
        finally:
            linalg.set_compute_type(f32, prev)


def _segments(kmap):
    o = kmap.offsets_host
    for k in range(len(o) - 1):
        s, e = int(o[k]), int(o[k + 1])
        if e > s:
            yield k, kmap.in_maps[s:e], kmap.out_maps[s:e]


def forward(feats, weight, kmap):
    """``out[num_out, C_out] = sum_k scatter(gather(feats, in_k) @ weight[k], out_k)``."""
    xp = array_module(feats)
    adt = _acc_dtype(feats, xp)
    x, w = feats.astype(adt, copy=False), weight.astype(adt, copy=False)
    out = xp.zeros((kmap.num_out, weight.shape[2]), dtype=adt)
    with _gemm_mode(feats, xp):
        for k, i, o in _segments(kmap):
            out[o] += x[i] @ w[k]
    return out.astype(feats.dtype, copy=False)


def dgrad(grad_out, weight, kmap):
    """Gradient of the features: ``grad_in[in_k] += grad_out[out_k] @ weight[k]^T``."""
    xp = array_module(grad_out)
    adt = _acc_dtype(grad_out, xp)
    g, w = grad_out.astype(adt, copy=False), weight.astype(adt, copy=False)
    gin = xp.zeros((kmap.num_in, weight.shape[1]), dtype=adt)
    with _gemm_mode(grad_out, xp):
        for k, i, o in _segments(kmap):
            gin[i] += g[o] @ w[k].T
    return gin.astype(grad_out.dtype, copy=False)


def wgrad(feats, grad_out, kmap, num_offsets: int, out_dtype=None):
    """Gradient of the weight: ``grad_w[k] = feats[in_k]^T @ grad_out[out_k]``, in ``out_dtype`` (default:
    the features' dtype; ``"float32"`` for 16-bit features keeps the accumulator unrounded)."""
    xp = array_module(feats)
    adt = _acc_dtype(feats, xp)
    x, g = feats.astype(adt, copy=False), grad_out.astype(adt, copy=False)
    gw = xp.zeros((num_offsets, feats.shape[1], grad_out.shape[1]), dtype=adt)
    with _gemm_mode(feats, xp):
        for k, i, o in _segments(kmap):
            gw[k] = x[i].T @ g[o]
    return gw.astype(out_dtype or feats.dtype, copy=False)


# Depthwise: weight [K, C]; out[o] += feats[i] * w[k] per offset.

def depthwise_forward(feats, weight, kmap):
    xp = array_module(feats)
    adt = _acc_dtype(feats, xp)
    x, w = feats.astype(adt, copy=False), weight.astype(adt, copy=False)
    out = xp.zeros((kmap.num_out, feats.shape[1]), dtype=adt)
    for k, i, o in _segments(kmap):
        out[o] += x[i] * w[k]
    return out.astype(feats.dtype, copy=False)


def depthwise_dgrad(grad_out, weight, kmap):
    xp = array_module(grad_out)
    adt = _acc_dtype(grad_out, xp)
    g, w = grad_out.astype(adt, copy=False), weight.astype(adt, copy=False)
    gin = xp.zeros((kmap.num_in, grad_out.shape[1]), dtype=adt)
    for k, i, o in _segments(kmap):
        gin[i] += g[o] * w[k]
    return gin.astype(grad_out.dtype, copy=False)


def depthwise_wgrad(feats, grad_out, kmap, num_offsets: int, out_dtype=None):
    xp = array_module(feats)
    adt = _acc_dtype(feats, xp)
    x, g = feats.astype(adt, copy=False), grad_out.astype(adt, copy=False)
    gw = xp.zeros((num_offsets, feats.shape[1]), dtype=adt)
    for k, i, o in _segments(kmap):
        gw[k] = (x[i] * g[o]).sum(axis=0)
    return gw.astype(out_dtype or feats.dtype, copy=False)


# ---- registration: EXPLICIT_GEMM (conv) and EXPLICIT (depthwise), NumPy and CuPy alike ----------------
def _params(direction, problem):
    return [{}]


def _available(problem):
    return True, ""


register("conv", Algorithm("explicit_gemm", forward, dgrad, wgrad, _params, _available))
register("depthwise", Algorithm("explicit", depthwise_forward, depthwise_dgrad, depthwise_wgrad,
                                _params, _available))
