"""The one ctypes binding of ``libsparsevox_cutlass.so`` (CUTLASS_IMPLICIT_GEMM, built ahead of time).

The library is looked for at ``$SPARSEVOX_CUTLASS_LIB`` or ``sparsevox/_lib/libsparsevox_cutlass.so``
(where ``python -m sparsevox build-cutlass`` puts it), opened once, checked for its ABI version, and its
entry points get ``argtypes``/``restype``. Every call passes the caller's current CuPy stream and
device, so the GEMMs are ordered with the surrounding CuPy work.

Entry points (see ``kernels_cu/cutlass/sparse_gemm.cu``), all accumulating into a float32 output
the caller allocated (zeroed for forward/dgrad):

    forward: out[out_k]  += a[in_k]  @ b[k]          a = feats, b = weight, d = out [N_out, C_out]
    dgrad:   gin[in_k]   += a[out_k] @ b[k]^T        a = grad_out, b = weight, d = grad_in [N_in, C_in]
    wgrad:   gw[k]        = a[in_k]^T @ b[out_k]     a = feats, b = grad_out, d = grad_w [K, C_in, C_out]
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

from . import prebuilt


ABI_VERSION = 1
LIB_NAME = "libsparsevox_cutlass.so"
ENV_VAR = "SPARSEVOX_CUTLASS_LIB"
BUILD_HINT = "build it with `python -m sparsevox build-cutlass` (needs nvcc; no GPU needed)"
DTYPE_CODES = {"float16": 0, "bfloat16": 1, "float32": 2}  # float32 runs as TF32
DIRECTIONS = ("forward", "dgrad", "wgrad")

_ENTRY_ARGTYPES = [
    ctypes.c_int, ctypes.c_int, ctypes.c_int,  # dtype code, mma_tile, split_k_slices
    ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t,  # a, b, d (device pointers)
    ctypes.c_int, ctypes.c_int,  # c_in, c_out
    ctypes.c_size_t, ctypes.c_size_t,  # in_maps, out_maps (device int32)
    ctypes.POINTER(ctypes.c_int64), ctypes.c_int,  # offsets (host int64 [K + 1]), K
    ctypes.c_int, ctypes.c_size_t,  # device id, cudaStream_t
]


def library_path() -> Path:
    return prebuilt.library_path(ENV_VAR, LIB_NAME)


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    path = library_path()
    signatures = {"sparsevox_cutlass_last_error": (ctypes.c_char_p, []),
                  **{f"sparsevox_cutlass_{d}": (ctypes.c_int, _ENTRY_ARGTYPES) for d in DIRECTIONS}}
    return prebuilt.open_library(path, "CUTLASS library", "sparsevox_cutlass_abi_version", ABI_VERSION, BUILD_HINT,
                                 signatures)


def available() -> tuple[bool, str]:
    """``(True, "")`` when the library is built and loads, else ``(False, reason with the build command)``."""
    lib, reason = _load()
    return lib is not None, reason


def reset() -> None:
    """Forget the loaded library (tests; after rebuilding or changing ``SPARSEVOX_CUTLASS_LIB``)."""
    _load.cache_clear()


def last_error() -> str:
    lib, _ = _load()
    return lib.sparsevox_cutlass_last_error().decode(errors="replace") if lib is not None else ""


def call(direction: str, dtype: str, mma_tile: int, split_k_slices: int, a, b, d, c_in: int, c_out: int,
         kmap) -> None:
    """Run one direction over every offset of ``kmap``; arrays are C-contiguous CuPy arrays.

    ``a``/``b`` are in ``dtype`` with channel counts ``c_in``/``c_out`` (multiples of 8, 4 for float32),
    ``d`` is float32. Raises ``RuntimeError`` with the library's message on failure.
    """
    import cupy
    lib, reason = _load()
    if lib is None:
        raise RuntimeError(reason)
    offsets = np.ascontiguousarray(kmap.offsets_host, dtype=np.int64)
    in_maps = cupy.ascontiguousarray(kmap.in_maps, dtype=cupy.int32)
    out_maps = cupy.ascontiguousarray(kmap.out_maps, dtype=cupy.int32)
    fn = getattr(lib, f"sparsevox_cutlass_{direction}")
    status = fn(DTYPE_CODES[dtype], int(mma_tile), int(split_k_slices), a.data.ptr, b.data.ptr, d.data.ptr,
                int(c_in), int(c_out), in_maps.data.ptr, out_maps.data.ptr,
                offsets.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)), len(offsets) - 1,
                int(d.device.id), cupy.cuda.get_current_stream().ptr)
    if status != 0:
        raise RuntimeError(f"CUTLASS {direction} failed (status {status}): {last_error()}")
