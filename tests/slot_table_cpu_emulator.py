"""Run the real ``kernels_cu/slot_table.cu`` on the CPU, so its index arithmetic is tested without a GPU.

The source is compiled as C++20 with :mod:`depthwise_cpu_emulator`'s prelude (one OS thread per CUDA
thread, blocks one after another, a barrier for ``__syncthreads``, dynamic shared memory as one buffer
per block) plus ``__ldg`` and ``atomicOr``. Each kernel instantiation that
:mod:`sparsevox.algorithms.implicit_gemm` launches gets an ``extern "C"`` entry point taking the launch
geometry. :func:`kernel` returns a callable with the ``DriverKernel`` call form (``grid, block, args,
shared_mem``) on NumPy arrays. Slow (one thread per CUDA thread): keep inputs small.
"""
from __future__ import annotations

import ctypes
import functools
import re
from pathlib import Path

import numpy as np
from depthwise_cpu_emulator import PRELUDE, compile_library

from sparsevox.algorithms import implicit_gemm as ig

ROOT = Path(__file__).resolve().parents[1]

_EXTRA = r"""
template <class T> inline T __ldg(const T* p) { return *p; }
inline unsigned atomicOr(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_or(v); }
"""

# kernel -> C parameter list (the order of the kernel's arguments)
_PARAMS = {
    "slot_keys": "const int* nbr, int rows, int k_count, const int* bit_of, KEY* keys",
    "gather_slots": "const int* nbr, const int* order, int rows, int k_count, int* out",
    "tile_masks": "const int* nbr, int rows, int k_count, int k0, int k1, int bm, int words, unsigned* masks",
    "csr_slots": "const int* offsets, int k_count, const int* partner, int rows, int* out",
    "wgrad_chunks": "const int* offsets, int k_count, int chunk, int* out",
}
_GEOM = "unsigned gx, unsigned bx, size_t smem"


def symbol(expr: str) -> str:
    return "emu_" + re.sub(r"\W+", "_", expr).strip("_")


def _entry(expr: str) -> str:
    kernel, targs = re.fullmatch(r"(\w+)<(.*)>", expr).groups()
    params = _PARAMS[kernel]
    if kernel == "slot_keys":
        params = params.replace("KEY", targs.split(",")[0].strip())
    names = ", ".join(p.split()[-1].lstrip("*") for p in params.split(","))
    return (f'extern "C" void {symbol(expr)}({_GEOM}, {params}) {{ emu_launch(dim3{{gx, 1, 1}}, dim3{{bx, 1, 1}}, '
            f'smem, [=] {{ {kernel}<{targs}>({names}); }}); }}')


def _source() -> str:
    body = (ROOT / "kernels_cu" / "slot_table.cu").read_text()
    body = body.replace("extern __shared__ unsigned s_bits[];", "unsigned* s_bits = (unsigned*)g_smem.data();")
    return "\n".join([PRELUDE, _EXTRA, body, *(_entry(e) for e in ig._SLOT_NAMES)])


@functools.lru_cache(maxsize=None)
def library():
    """The compiled emulator (cached in the temp folder by source hash)."""
    return compile_library(_source(), "slot_table")


def _c_arg(a):
    if isinstance(a, np.ndarray):
        assert a.flags.c_contiguous, "kernel arguments must be contiguous"
        return ctypes.c_void_p(a.ctypes.data)
    if isinstance(a, (np.int32, int)):
        return ctypes.c_int(int(a))
    raise TypeError(f"unsupported kernel argument {type(a)}")


def kernel(expr: str):
    """``fn(grid, block, args, shared_mem=0)`` running the instantiation ``expr`` on NumPy arrays."""
    fn = getattr(library(), symbol(expr))

    def call(grid, block, args, shared_mem=0, stream=None):
        fn(ctypes.c_uint(int(grid[0])), ctypes.c_uint(int(block[0])), ctypes.c_size_t(int(shared_mem)),
           *(_c_arg(a) for a in args))
    return call
