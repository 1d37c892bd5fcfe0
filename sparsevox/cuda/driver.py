"""Kernel launches through the CUDA driver with arguments packed in ctypes storage.

CuPy's RawKernel call costs 5-15 µs of host time (measured on the H100 host): it converts every argument
to a fresh C box, looks the stream up and checks the context on each call. A launch whose argument
types are known in advance lays them out once (:class:`Args`: one parameter buffer, filled by one
``struct.pack_into`` per call; the prepared implicit-GEMM launches keep ctypes boxes, :func:`box`) and
hands it to ``cuLaunchKernel``, which copies the values before it returns. cuLaunchKernel itself costs
~4 µs of host time (H200 host, one-block kernel).
"""
from __future__ import annotations

import ctypes
import struct
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


def _dims(d) -> tuple[int, int, int]:
    """A launch dimension (an int, or a tuple of one to three ints) as ``(x, y, z)``, each at least 1."""
    if not isinstance(d, (tuple, list)):
        return max(1, int(d)), 1, 1
    x, y, z = (tuple(int(v) for v in d) + (1, 1))[:3]
    return max(1, x), max(1, y), max(1, z)


def launch(func: int, grid, block, smem: int, stream: int, params_addr: int, extra_addr: int = 0) -> None:
    """``cuLaunchKernel`` of CUfunction ``func`` with the parameter array at ``params_addr`` (or 0 and a
    packed parameter buffer described by the ``extra`` array at ``extra_addr``) on ``stream``. ``grid``,
    ``block``: an int (1-D) or a tuple of up to three ints."""
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
    if type(grid) is int and type(block) is int:  # the common 1-D case without the tuple work
        driver.launchKernel(func, max(1, grid), 1, 1, max(1, block), 1, 1, smem, stream, params_addr, extra_addr)
        return
    (gx, gy, gz), (bx, by, bz) = _dims(grid), _dims(block)
    driver.launchKernel(func, gx, gy, gz, bx, by, bz, smem, stream, params_addr, extra_addr)


ARRAY, ADDRESS = "array", "address"  # argument kinds besides the NumPy scalar types
# struct codes of every kind (the ctypes types' own), packed with native alignment ("@"): the layout
# cuLaunchKernel expects in a parameter buffer (each parameter at an offset aligned to its size, as in a
# C struct)
_CODES = {**{t: ct._type_ for t, ct in CTYPES.items()}, ARRAY: ctypes.c_void_p._type_,
          ADDRESS: ctypes.c_void_p._type_}
_PARAM_BUFFER_POINTER, _PARAM_BUFFER_SIZE, _PARAM_END = 1, 2, 0  # CU_LAUNCH_PARAM_* of cuda.h


class Args:
    """The parameter buffer of one kernel called from one place, whose argument kinds do not change
    between calls: a device array (passed as its address), a raw address (a Python int), or a NumPy
    scalar type. :meth:`launch` packs a call's values into the buffer with one ``struct.pack_into``
    (a ctypes box per argument cost ~0.1 µs each to fill) and launches it through cuLaunchKernel's
    ``extra`` (CU_LAUNCH_PARAM_BUFFER_POINTER); a lock keeps two threads from packing over each other
    between the pack and the launch (the driver copies the buffer before it returns)."""
    __slots__ = ("func", "kinds", "arrays", "fmt", "buf", "size", "extra", "extra_addr", "lock")

    def __init__(self, func: int, args: tuple):
        self.func = func
        self.kinds = tuple(kind(a) for a in args)
        self.arrays = tuple(i for i, k in enumerate(self.kinds) if k is ARRAY)
        self.fmt = struct.Struct("@" + "".join(_CODES[k] for k in self.kinds))
        self.buf = ctypes.create_string_buffer(max(8, self.fmt.size))
        self.size = ctypes.c_size_t(self.fmt.size)
        self.extra = (ctypes.c_void_p * 5)(_PARAM_BUFFER_POINTER, ctypes.addressof(self.buf), _PARAM_BUFFER_SIZE,
                                           ctypes.addressof(self.size), _PARAM_END)
        self.extra_addr = ctypes.addressof(self.extra)
        self.lock = threading.Lock()

    def values(self, args: tuple):
        """``args`` with each device array replaced by its address."""
        if self.arrays:
            args = list(args)
            for i in self.arrays:
                args[i] = args[i].data.ptr
        return args

    def pack(self, args: tuple) -> bytes:
        """The parameter buffer's bytes for ``args`` (what :meth:`launch` hands the driver)."""
        return self.fmt.pack(*self.values(args))

    def launch(self, grid, block, stream: int, args: tuple, smem: int = 0) -> None:
        """Launch with ``args`` (``grid``, ``block``: an int or a tuple of up to three ints)."""
        args = self.values(args)
        with self.lock:
            self.fmt.pack_into(self.buf, 0, *args)
            launch(self.func, grid, block, smem, stream, 0, self.extra_addr)


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
