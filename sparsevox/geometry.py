"""Kernel geometry: argument normalisation, kernel offsets and packed coordinate keys.

Conventions (DESIGN.md): per axis an odd kernel size ``k`` has offsets ``(i - (k-1)//2) * d``, an even
one ``i * d``; the offset index is lexicographic over (x, y, z) with z fastest.

Coordinates are packed into one unsigned 64-bit key so that sorting keys sorts voxels by
(batch, x, y, z): 10 bits of batch, then 18 bits per spatial axis (offset by 2^17).
"""
from __future__ import annotations

import numpy as np

COORD_BITS = 18
COORD_MIN = -(1 << (COORD_BITS - 1))  # -131072
COORD_MAX = (1 << (COORD_BITS - 1)) - 1  # 131071
BATCH_BITS = 10
BATCH_MAX = (1 << BATCH_BITS) - 1  # 1023


_TRIPLES: dict = {}  # (type, value, minimum) -> the normalised tuple of a valid value seen before


def triple(value, name: str, minimum: int = 1) -> tuple[int, int, int]:
    """Normalise an int or a 3-sequence of ints to a tuple, checking each is ``>= minimum``."""
    # Layers pass the same few values on every call (each map build normalises six): remember them.
    # (the elements' types too: (True, 1, 1) == (1, 1, 1) and hashes alike, but only one is valid)
    key = (value.__class__, value, minimum, tuple(map(type, value)) if value.__class__ is tuple else None)
    try:
        hit = _TRIPLES.get(key)
    except TypeError:  # unhashable (a list): normalised every time
        hit = key = None
    if hit is not None:
        return hit
    vals = _triple(value, name, minimum)
    if key is not None and len(_TRIPLES) < 1024:
        _TRIPLES[key] = vals
    return vals


def _is_int(v) -> bool:
    """An integer value: Python or NumPy ints, and 0-d integer arrays (a torch/NumPy scalar tensor); not bool."""
    if isinstance(v, bool):
        return False
    if isinstance(v, (int, np.integer)):
        return True
    dtype = getattr(v, "dtype", None)
    return getattr(v, "ndim", None) == 0 and dtype is not None and "int" in str(dtype)


def voxel_size3(voxel_size) -> np.ndarray:
    """A float or 3 floats, each positive and finite, as float64 ``[3]``; else ``ValueError``."""
    try:
        if isinstance(voxel_size, (str, bytes)):
            raise TypeError
        size = np.broadcast_to(np.asarray(voxel_size, dtype=np.float64), (3,))
    except (ValueError, TypeError):
        raise ValueError(f"voxel_size must be a float or 3 floats, got {voxel_size!r}") from None
    if not np.all(size > 0) or not np.all(np.isfinite(size)):
        raise ValueError(f"voxel_size must be positive and finite, got {voxel_size!r}")
    return size


def positive_int(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int, checked to be an integer (not a float that would be truncated, not a bool) and
    ``>= minimum``; else ``ValueError`` naming ``name``."""
    if not _is_int(value) or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _triple(value, name: str, minimum: int) -> tuple[int, int, int]:
    if _is_int(value):
        vals = (int(value),) * 3
    else:
        # each value an integer itself: int() would truncate 3.7 and read "333" as three 3s
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 3 \
                or not all(_is_int(v) for v in value):
            raise ValueError(f"{name} must be an int or a 3-tuple of ints, got {value!r}")
        vals = tuple(int(v) for v in value)
    if any(v < minimum for v in vals):
        raise ValueError(f"{name} must be >= {minimum} on every axis, got {value!r}")
    return vals


def kernel_offsets(kernel_size, dilation=1) -> np.ndarray:
    """Offsets ``[K, 3]`` int32 of a kernel, in offset-index order (z fastest)."""
    ks = triple(kernel_size, "kernel_size")
    ds = triple(dilation, "dilation")
    axes = []
    for k, d in zip(ks, ds):
        start = -((k - 1) // 2) if k % 2 == 1 else 0
        axes.append((np.arange(k) + start) * d)
    grid = np.meshgrid(*axes, indexing="ij")
    return np.stack([g.reshape(-1) for g in grid], axis=1).astype(np.int32)


def pack_keys(coords, xp=np):
    """Pack ``[N, 4]`` (batch, x, y, z) int coordinates into uint64 keys that sort like the rows.

    The caller guarantees the ranges (``check_coord_range``)."""
    c = coords.astype(xp.int64)
    key = c[:, 0].astype(xp.uint64)
    for axis in (1, 2, 3):
        key = (key << xp.uint64(COORD_BITS)) | (c[:, axis] - COORD_MIN).astype(xp.uint64)
    return key


def unpack_keys(keys, xp=np):
    """Inverse of :func:`pack_keys`: ``[N]`` uint64 → ``[N, 4]`` int32."""
    mask = xp.uint64((1 << COORD_BITS) - 1)
    out = xp.empty((keys.shape[0], 4), dtype=xp.int32)
    k = keys
    for axis in (3, 2, 1):
        out[:, axis] = ((k & mask).astype(xp.int64) + COORD_MIN).astype(xp.int32)
        k = k >> xp.uint64(COORD_BITS)
    out[:, 0] = k.astype(xp.int32)
    return out


def in_range_mask(coords, xp=np):
    """Rows whose batch and spatial coordinates can be packed."""
    c = coords
    ok = (c[:, 0] >= 0) & (c[:, 0] <= BATCH_MAX)
    for axis in (1, 2, 3):
        ok &= (c[:, axis] >= COORD_MIN) & (c[:, axis] <= COORD_MAX)
    return ok


def check_coord_range(coords, xp=np, what: str = "coords") -> None:
    """Raise ``ValueError`` when any coordinate is outside the packable range."""
    if coords.shape[0] == 0:
        return
    lo = coords.min(axis=0)
    hi = coords.max(axis=0)
    lo = [int(v) for v in (lo.get() if hasattr(lo, "get") else lo)]
    hi = [int(v) for v in (hi.get() if hasattr(hi, "get") else hi)]
    if lo[0] < 0 or hi[0] > BATCH_MAX:
        raise ValueError(
            f"{what}: batch index must be in [0, {BATCH_MAX}], got range [{lo[0]}, {hi[0]}]")
    for axis, name in ((1, "x"), (2, "y"), (3, "z")):
        if lo[axis] < COORD_MIN or hi[axis] > COORD_MAX:
            raise ValueError(
                f"{what}: {name} must be in [{COORD_MIN}, {COORD_MAX}], "
                f"got range [{lo[axis]}, {hi[axis]}]")
