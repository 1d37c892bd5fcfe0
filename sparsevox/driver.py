"""Kernel launches through the CUDA driver with arguments packed in ctypes storage.

CuPy's RawKernel call costs 5-15 µs of host time (measured on the H100 host): it converts every argument
to a fresh C box, looks the stream up and checks the context on each call. A launch whose argument
types are known in advance packs them once (:class:`Args`); a call writes the new values into the
same boxes and hands the same parameter array to ``cuLaunchKernel``, which copies the values before it
returns.
"""
from __future__ import annotations

import ctypes
import threading

import numpy as np

# Each argument's C type, as CuPy passes it (cupy/cuda/function.pyx ``_pointer``: a Python int goes as
# an int64, a float as a double, a NumPy scalar by its own type). Addresses (Python ints, and the holes)
# are void* boxes: the same 8 bytes as CuPy's int64.
CTYPES = {float: ctypes.c_double, np.int8: ctypes.c_int8, np.uint8: ctypes.c_uint8, np.int16: ctypes.c_int16,
          np.uint16: ctypes.c_uint16, np.int32: ctypes.c_int32, np.uint32: ctypes.c_uint32,
          np.int64: ctypes.c_int64, np.uint64: ctypes.c_uint64, np.float32: ctypes.c_float,
          np.float64: ctypes.c_double, np.bool_: ctypes.c_bool}


def box(value):
    """A ctypes object holding one kernel argument with CuPy's layout for it."""
    if value is None or type(value) is int:
        return ctypes.c_void_p(value)
    ct = CTYPES.get(type(value))
    if ct is None:
        raise TypeError(f"driver launch argument of unsupported type {type(value).__name__}: {value!r}")
    return ct(value.item() if isinstance(value, np.generic) else value)


_driver = None  # cupy_backends' driver module, imported on the first launch


def launch(func: int, grid: int, block: int, smem: int, stream: int, params_addr: int) -> None:
    """``cuLaunchKernel`` of CUfunction ``func`` (1-D grid and block) with the parameter array at
    ``params_addr`` on ``stream``."""
    global _driver
    driver = _driver
    if driver is None:
        from cupy_backends.cuda.api import driver
        _driver = driver
    if not driver.ctxGetCurrent():
        # A thread that has not called the CUDA runtime yet has no current context (CuPy establishes one
        # before each launch): a runtime call makes the current device's primary context current.
        import cupy
        cupy.cuda.runtime.memGetInfo()
    driver.launchKernel(func, grid, 1, 1, block, 1, 1, smem, stream, params_addr, 0)


ARRAY, ADDRESS = "array", "address"  # argument kinds besides the NumPy scalar types


class Args:
    """Boxes for the arguments of one kernel called from one place, whose argument kinds do not change
    between calls: a device array (passed as its address), a raw address (a Python int), or a NumPy
    scalar type. :meth:`launch` writes a call's values and launches; a lock keeps two threads from
    writing each other's values between the write and the launch."""
    __slots__ = ("func", "kinds", "boxes", "params", "params_addr", "lock")

    def __init__(self, func: int, args: tuple):
        self.func = func
        self.kinds = tuple(kind(a) for a in args)
        self.boxes = [ctypes.c_void_p() if k in (ARRAY, ADDRESS) else CTYPES[k]() for k in self.kinds]
        self.params = (ctypes.c_void_p * len(args))(*(ctypes.addressof(b) for b in self.boxes))
        self.params_addr = ctypes.addressof(self.params)
        self.lock = threading.Lock()

    def launch(self, grid: int, block: int, stream: int, args: tuple) -> None:
        with self.lock:
            for b, k, a in zip(self.boxes, self.kinds, args):
                b.value = a.data.ptr if k is ARRAY else a
            launch(self.func, max(1, grid), max(1, block), 0, stream, self.params_addr)


def kind(a):
    """:data:`ARRAY` (a CuPy array), :data:`ADDRESS` (a Python int) or the NumPy scalar type of ``a``."""
    t = type(a)
    if t is int:
        return ADDRESS
    if t in CTYPES:
        return t
    if t.__name__ == "ndarray" and t.__module__.startswith("cupy"):
        return ARRAY
    raise TypeError(f"driver launch argument of unsupported type {t.__name__}: {a!r}")
