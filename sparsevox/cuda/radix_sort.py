"""A stable argsort of unsigned integer keys on the device that the host does not wait for.

``cupy.argsort`` is Thrust's stable sort, which synchronises the device before it returns: on a fresh scan's
first inference step that is ~300 µs of host time for each of the ~13 slot tables
(``benchmarks/results/*host_phases*``). This one (``kernels_cu/radix_sort.cu``) is three launches per
eight key bits and only queues work; the caller says how many low bits of the keys matter.
"""
from __future__ import annotations

import numpy as np

BLOCK = 256
ITEMS = 8
TILE = BLOCK * ITEMS
SCAN_BLOCK = 1024
_DIGIT_BITS = 8
_RADIX = 1 << _DIGIT_BITS
_KEY_TYPES = {np.dtype(np.uint32): "unsigned int", np.dtype(np.uint64): "unsigned long long"}


def _names(ctype: str) -> tuple[str, str, str]:
    return (f"radix_histogram<{ctype}, {BLOCK}, {ITEMS}>", f"radix_scan<{SCAN_BLOCK}>",
            f"radix_scatter<{ctype}, {BLOCK}, {ITEMS}>")


_ALL_NAMES = tuple(dict.fromkeys(n for c in _KEY_TYPES.values() for n in _names(c)))


def passes(bits: int) -> int:
    """How many eight-bit passes sort keys of ``bits`` significant bits."""
    return -(-bits // _DIGIT_BITS)


def argsort(keys, bits: int | None = None):
    """int32 ``[n]``: the stable argsort of the low ``bits`` bits of ``keys`` (CuPy ``uint32`` or ``uint64``
    ``[n]``; higher bits are ignored), queued on the current stream with no host synchronisation.
    ``bits``: ``0`` .. the key width (default: all of it); ``0`` gives ``arange(n)``. ``keys`` is not
    changed."""
    dtype = np.dtype(keys.dtype)
    if dtype not in _KEY_TYPES or keys.ndim != 1:
        raise ValueError(f"keys must be a 1-D uint32 or uint64 array, got {keys.ndim}-D {dtype}")
    width = 8 * dtype.itemsize
    bits = width if bits is None else int(bits)
    if not 0 <= bits <= width:
        raise ValueError(f"bits must be in [0, {width}] for {dtype} keys, got {bits}")
    n = int(keys.shape[0])
    if n >= 2 ** 31:
        raise ValueError(f"keys has {n} elements; the argsort returns int32 positions (at most 2^31 - 1)")
    import cupy
    if bits == 0 or n <= 1:
        return cupy.arange(n, dtype=cupy.int32)
    keys = cupy.ascontiguousarray(keys)  # the kernels read keys[i] at unit stride (no copy when contiguous)
    from .cuda_loader import driver_kernel
    hist_name, scan_name, scatter_name = _names(_KEY_TYPES[dtype])
    hist_k, scan_k, scatter_k = (driver_kernel("radix_sort", k, _ALL_NAMES)
                                 for k in (hist_name, scan_name, scatter_name))
    blocks = -(-n // TILE)
    hist = cupy.empty(_RADIX * blocks, dtype=cupy.uint32)
    count = passes(bits)
    keys_a, keys_b = keys, (cupy.empty_like(keys) if count > 1 else None)
    vals_a, vals_b = None, cupy.empty(n, dtype=cupy.int32)
    for p in range(count):
        shift = np.int32(p * _DIGIT_BITS)
        mask = np.uint32((1 << min(_DIGIT_BITS, bits - p * _DIGIT_BITS)) - 1)
        last = p == count - 1
        hist_k((blocks,), (BLOCK,), (keys_a, np.int32(n), shift, mask, hist))
        scan_k((1,), (SCAN_BLOCK,), (hist, np.int32(hist.size)))
        # the optional pointers as addresses (0: none), so every call passes the same argument kinds
        keys_out = 0 if last else keys_b.data.ptr
        vals_in = 0 if vals_a is None else vals_a.data.ptr
        scatter_k((blocks,), (BLOCK,), (keys_a, vals_in, np.int32(n), shift, mask, hist, keys_out, vals_b))
        if not last:
            # the first pass read the caller's keys; later passes ping-pong between two buffers of ours
            keys_a, keys_b = keys_b, (cupy.empty_like(keys) if keys_a is keys else keys_a)
            vals_a, vals_b = vals_b, (cupy.empty(n, dtype=cupy.int32) if vals_a is None else vals_a)
    return vals_b
