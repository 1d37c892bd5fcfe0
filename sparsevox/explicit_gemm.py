"""EXPLICIT_GEMM: gather → one GEMM per kernel offset → scatter-add, written once for NumPy and CuPy.

Within one offset every input row and every output row occurs at most once (the map is a partial
bijection per offset), so ``out[rows] += ...`` with fancy indexing is exact, no atomics needed.
Products run in the compute dtype (float32 for float16/bfloat16 on the CPU; on the GPU cuBLAS
multiplies float16/bfloat16 with float32 accumulation) and are summed in a float32 (float64) buffer.
"""
from __future__ import annotations

from ._arrays import array_module

PARAMS = [{}]  # nothing to tune


def _dtypes(a, xp):
    """(compute dtype of the GEMMs, accumulation dtype)."""
    if a.dtype == xp.float64:
        return xp.float64, xp.float64
    if xp.__name__ == "numpy" or a.dtype == xp.float32:
        return xp.float32, xp.float32
    return a.dtype, xp.float32  # half/bfloat16 GEMM on the GPU, float32 sum


def _segments(kmap):
    o = kmap.offsets_host
    for k in range(len(o) - 1):
        s, e = int(o[k]), int(o[k + 1])
        if e > s:
            yield k, kmap.in_maps[s:e], kmap.out_maps[s:e]


def forward(feats, weight, kmap):
    """``out[num_out, C_out] = sum_k scatter(gather(feats, in_k) @ weight[k], out_k)``."""
    xp = array_module(feats)
    cdt, adt = _dtypes(feats, xp)
    x, w = feats.astype(cdt, copy=False), weight.astype(cdt, copy=False)
    out = xp.zeros((kmap.num_out, weight.shape[2]), dtype=adt)
    for k, i, o in _segments(kmap):
        out[o] += (x[i] @ w[k]).astype(adt, copy=False)
    return out.astype(feats.dtype, copy=False)


def dgrad(grad_out, weight, kmap):
    """Gradient of the features: ``grad_in[in_k] += grad_out[out_k] @ weight[k]^T``."""
    xp = array_module(grad_out)
    cdt, adt = _dtypes(grad_out, xp)
    g, w = grad_out.astype(cdt, copy=False), weight.astype(cdt, copy=False)
    gin = xp.zeros((kmap.num_in, weight.shape[1]), dtype=adt)
    for k, i, o in _segments(kmap):
        gin[i] += (g[o] @ w[k].T).astype(adt, copy=False)
    return gin.astype(grad_out.dtype, copy=False)


def wgrad(feats, grad_out, kmap, num_offsets: int):
    """Gradient of the weight: ``grad_w[k] = feats[in_k]^T @ grad_out[out_k]``."""
    xp = array_module(feats)
    cdt, adt = _dtypes(feats, xp)
    x, g = feats.astype(cdt, copy=False), grad_out.astype(cdt, copy=False)
    gw = xp.zeros((num_offsets, feats.shape[1], grad_out.shape[1]), dtype=adt)
    for k, i, o in _segments(kmap):
        if xp.__name__ == "numpy" or cdt in (xp.float32, xp.float64):
            gw[k] = x[i].T @ g[o]
        else:  # long reduction over pairs: accumulate in float32 (cuBLAS does, the cast is exact)
            gw[k] = x[i].astype(adt).T @ g[o].astype(adt)
    return gw.astype(feats.dtype, copy=False)


# Depthwise: weight [K, C]; out[o] += feats[i] * w[k] per offset.

def depthwise_forward(feats, weight, kmap):
    xp = array_module(feats)
    adt = xp.float64 if feats.dtype == xp.float64 else xp.float32
    x, w = feats.astype(adt, copy=False), weight.astype(adt, copy=False)
    out = xp.zeros((kmap.num_out, feats.shape[1]), dtype=adt)
    for k, i, o in _segments(kmap):
        out[o] += x[i] * w[k]
    return out.astype(feats.dtype, copy=False)


def depthwise_dgrad(grad_out, weight, kmap):
    xp = array_module(grad_out)
    adt = xp.float64 if grad_out.dtype == xp.float64 else xp.float32
    g, w = grad_out.astype(adt, copy=False), weight.astype(adt, copy=False)
    gin = xp.zeros((kmap.num_in, grad_out.shape[1]), dtype=adt)
    for k, i, o in _segments(kmap):
        gin[i] += g[o] * w[k]
    return gin.astype(grad_out.dtype, copy=False)


def depthwise_wgrad(feats, grad_out, kmap, num_offsets: int):
    xp = array_module(feats)
    adt = xp.float64 if feats.dtype == xp.float64 else xp.float32
    x, g = feats.astype(adt, copy=False), grad_out.astype(adt, copy=False)
    gw = xp.zeros((num_offsets, feats.shape[1]), dtype=adt)
    for k, i, o in _segments(kmap):
        gw[k] = (x[i] * g[o]).sum(axis=0)
    return gw.astype(feats.dtype, copy=False)
