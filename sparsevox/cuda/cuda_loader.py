"""The one loader of CUDA sources in ``kernels_cu/``: CuPy ``RawModule``s, compiled lazily, per device.

The text compiled is the generated ``#define``s, then every header of ``kernels_cu/common/`` inlined
(in name order), then the ``.cu`` file, so CuPy's cache key (the source text) covers the headers.
``#include "common/..."`` lines in the ``.cu`` are dropped because the headers are already inlined.
Templates are instantiated through ``name_expressions``; nothing compiles at import.
"""
from __future__ import annotations

import functools
import re
from importlib import resources

_INCLUDE = re.compile(r'^\s*#include\s+"common/[^"]+"\s*$', re.M)


def _kernels_dir():
    return resources.files("sparsevox.kernels_cu")


@functools.lru_cache(maxsize=None)
def source(name: str, defines: tuple = ()) -> str:
    """The full text compiled for ``kernels_cu/<name>.cu`` with ``defines`` ((name, value) pairs)."""
    root = _kernels_dir()
    headers = sorted((p for p in root.joinpath("common").iterdir() if p.name.endswith(".cuh")),
                     key=lambda p: p.name)
    parts = [f"#define {k} {v}" for k, v in defines]
    parts += [f"// ---- common/{h.name}\n" + h.read_text() for h in headers]
    parts.append(f"// ---- {name}.cu\n" + _INCLUDE.sub("", root.joinpath(f"{name}.cu").read_text()))
    return "\n".join(parts)


@functools.lru_cache(maxsize=None)
def _module(name: str, name_expressions: tuple, defines: tuple, options: tuple, device_id: int):
    import cupy
    with cupy.cuda.Device(device_id):
        mod = cupy.RawModule(code=source(name, defines), options=("--std=c++17",) + options,
                             name_expressions=name_expressions or None)
        mod.compile()
    return mod


def get_function(name: str, kernel: str, name_expressions=(), defines=(), options=()):
    """The kernel ``kernel`` (a template instantiation listed in ``name_expressions`` or a plain
    ``extern "C"`` name) of ``kernels_cu/<name>.cu`` on the current device."""
    import cupy
    dev = cupy.cuda.Device().id
    mod = _module(name, tuple(name_expressions), tuple(defines), tuple(options), dev)
    return mod.get_function(kernel)


class DriverKernel:
    """A kernel called as a CuPy ``RawKernel`` is (``grid, block, args, shared_mem=0``; grid and block
    tuples of one to three ints) but
    launched through the CUDA driver with one parameter layout (:class:`sparsevox.cuda.driver.Args`) made
    at its first call: CuPy's call costs 5-15 µs of host time per launch, and a fresh scan's slot tables,
    sorts and first layer launches make dozens. Every call must pass arguments of the same kinds (a CuPy
    array, an address as a Python int, or one NumPy scalar type) in each position. ``stream``: a raw
    ``cudaStream_t`` (default: CuPy's current stream); the current device must be the kernel's."""
    __slots__ = ("fn", "dev", "packed")

    def __init__(self, fn, dev: int):
        self.fn, self.dev, self.packed = fn, dev, None

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        import cupy
        g = int(grid[0]) if len(grid) == 1 else tuple(grid)
        b = int(block[0]) if len(block) == 1 else tuple(block)
        packed = self.packed
        if packed is None:
            from . import driver
            with cupy.cuda.Device(self.dev):  # RawKernel.kernel loads the function for the current device
                packed = self.packed = driver.Args(int(self.fn.kernel.ptr), tuple(args))
        if stream is None:
            stream = cupy.cuda.get_current_stream().ptr
        packed.launch(g, b, stream, tuple(args), int(shared_mem))


_DRIVER_KERNELS: dict = {}


def driver_kernel(name: str, kernel: str, name_expressions=()) -> DriverKernel:
    """:func:`get_function`'s kernel on the current device as a :class:`DriverKernel` (one per kernel and
    device)."""
    import cupy
    dev = cupy.cuda.runtime.getDevice()
    key = (name, kernel, dev)
    k = _DRIVER_KERNELS.get(key)
    if k is None:
        k = _DRIVER_KERNELS[key] = DriverKernel(get_function(name, kernel, name_expressions), dev)
    return k


def as_driver_kernel(fn, dev: int) -> DriverKernel:
    """The :class:`DriverKernel` of a CuPy ``RawKernel`` on device ``dev`` (one per kernel and device; it
    keeps ``fn``, so the ``id`` in its key is never reused)."""
    key = (id(fn), dev)
    k = _DRIVER_KERNELS.get(key)
    if k is None:
        k = _DRIVER_KERNELS[key] = DriverKernel(fn, dev)
    return k
