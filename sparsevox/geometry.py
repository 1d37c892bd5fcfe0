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
    key = (value.__class__, value, minimum)
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


def _triple(value, name: str, minimum: int) -> tuple[int, int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        vals = (int(value),) * 3
    else:
        try:
            vals = tuple(int(v) for v in value)
        except TypeError:
            raise ValueError(f"{name} must be an int or a 3-tuple of ints, got {value!r}") from None
        if len(vals) != 3:
            raise ValueError(f"{name} must be an int or a 3-tuple of ints, got {value!r}")
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
