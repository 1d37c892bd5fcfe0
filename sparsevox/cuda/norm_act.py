"""Inference BatchNorm fused with the ReLU and residual add after it (``kernels_cu/norm_act.cu``): one
launch through the CUDA driver where torch's evaluation BatchNorm, the add and the ReLU are three (issue
19: a float16 inference step is host-bound, and ``nn.BatchNorm1d``'s Python plus its launches cost ~80 µs
per call on the H200 host, 4 ms of a 27 ms SemanticKITTI step at 7b3ec93).

Framework-neutral: everything arrives as device addresses; the torch module decides when it applies
(:class:`sparsevox.adapters.torch.BatchNorm`).
"""
from __future__ import annotations

import numpy as np

from .cuda_loader import driver_kernel

FEATURE_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double"}
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
_BLOCK = 256
_MAX_GRID_X, _MAX_GRID_Y = 1 << 16, 65535  # the kernel's grid-stride loops cover the rest


def _names():
    out = []
    for name, t in FEATURE_TYPES.items():
        for p in dict.fromkeys(("float", t)):
            for v in (1, 16 // _ITEMSIZE[name]):
                out += [f"batchnorm_eval<{t}, {p}, {r}, {v}>" for r in ("false", "true")]
    return tuple(out)


def launch_shape(rows: int, channels: int, feature_dtype: str, *addresses: int):
    """``(V, grid, block)`` of a launch: ``V`` channels per thread-vector (16 bytes when the channel count
    and every feature address allow, else 1), a block of ``V``-channel columns by rows (``bx * by`` about
    256 threads, ``bx`` at most the row's vector count), a grid covering the rows and vector columns up to
    the grid-stride limits."""
    v = 16 // _ITEMSIZE[feature_dtype]
    if channels % v or any(a % 16 for a in addresses):
        v = 1
    cv = channels // v
    bx = min(cv, _BLOCK)
    by = max(1, _BLOCK // bx)
    grid = (max(1, min(-(-rows // by), _MAX_GRID_X)), min(-(-cv // bx), _MAX_GRID_Y))
    return v, grid, (bx, by)


_NAMES = _names()


def param_type_ok(feature_dtype: str, param_dtype: str) -> bool:
    """Whether the kernel takes statistics/affine parameters of ``param_dtype`` with ``feature_dtype``
    features (float32, or the features' own dtype)."""
    return feature_dtype in FEATURE_TYPES and param_dtype in ("float32", feature_dtype)


def batchnorm_eval(x: int, mean: int, var: int, weight: int, bias: int, residual: int, out: int, rows: int,
                   channels: int, eps: float, feature_dtype: str, param_dtype: str, relu: bool, stream: int) -> None:
    """Queue ``out = act((x - mean) * rsqrt(var + eps) * weight + bias + residual)`` on ``stream``.

    Addresses: ``x``, ``residual`` (0: none) and ``out`` are C-contiguous ``[rows, channels]`` arrays of
    ``feature_dtype`` (``out`` may be ``x``); ``mean``, ``var``, ``weight`` and ``bias`` (0: none) are
    ``[channels]`` of ``param_dtype`` (see :func:`param_type_ok`). ``relu``: apply ReLU. ``stream`` is
    on the current device, the arrays' device. Raises ``ValueError`` for an unsupported dtype pair or a channel count
    outside ``[1, 2**31)``."""
    if not param_type_ok(feature_dtype, param_dtype):
        raise ValueError(f"batchnorm_eval: feature dtype must be one of {sorted(FEATURE_TYPES)} and the parameter "
                         f"dtype float32 or the feature dtype, got {feature_dtype} / {param_dtype}")
    if not 1 <= channels < 2 ** 31:
        raise ValueError(f"batchnorm_eval: channels must be in [1, 2**31), got {channels}")
    if rows == 0:
        return
    v, grid, block = launch_shape(rows, channels, feature_dtype, x, out, *((residual,) if residual else ()))
    name = (f"batchnorm_eval<{FEATURE_TYPES[feature_dtype]}, {FEATURE_TYPES[param_dtype]}, "
            f"{'true' if relu else 'false'}, {v}>")
    driver_kernel("norm_act", name, _NAMES)(grid, block, (x, mean, var, weight, bias, residual, out, np.int64(rows),
                                                          np.int32(channels), np.float64(eps)), 0, stream)
