"""Dense grids to and from sparse voxels: ``to_dense`` (scatter) and ``from_dense`` (gather).

A dense tensor is ``[B, C, X, Y, Z]`` (PyTorch's ``conv3d`` layout); voxel ``(b, x, y, z)`` is the
column ``dense[b, :, x, y, z]``. Values move as raw bits (16-bit floats as uint16), so every feature
dtype takes the same path on the CPU and the GPU. The core functions' adjoints are each other:
``to_dense_backward`` is a gather, ``from_dense_backward`` a scatter into zeros.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from . import geometry
from ._arrays import array_module, from_core, on_caller_stream, to_core
from .segments import FLOAT_DTYPES, check_feats
from .voxels import Voxels


def _bits(a, xp):
    """``a`` viewed as unsigned integers of its item size (a move of bits, whatever the float type)."""
    return a.view({2: xp.uint16, 4: xp.uint32, 8: xp.uint64}[a.dtype.itemsize])


def _shape3(spatial_shape) -> tuple[int, int, int]:
    try:  # integers themselves: int() would truncate 8.5
        ok = len(spatial_shape) == 3 and all(geometry._is_int(v) and v >= 1 for v in spatial_shape)
    except TypeError:
        ok = False
    if not ok or isinstance(spatial_shape, str):
        raise ValueError(f"spatial_shape must be 3 ints >= 1 (X, Y, Z), got {spatial_shape!r}")
    return tuple(int(v) for v in spatial_shape)


def _sites(coords, spatial_shape, batch_size: int):
    """``(batch int64 [N], flat site int64 [N])`` of core coords; ``ValueError`` for coords outside
    ``[0, shape)`` or batch indices outside ``[0, batch_size)``."""
    xp = array_module(coords)
    shp = _shape3(spatial_shape)
    c = coords.astype(xp.int64)
    if c.shape[0]:
        lo, hi = c.min(axis=0).tolist(), c.max(axis=0).tolist()
        if lo[0] < 0 or hi[0] >= batch_size:
            raise ValueError(f"batch indices must be in [0, {batch_size - 1}] (batch_size {batch_size}), "
                             f"got range [{lo[0]}, {hi[0]}]")
        for a, name in enumerate("xyz"):
            if lo[a + 1] < 0 or hi[a + 1] >= shp[a]:
                raise ValueError(f"{name} coordinates must be in [0, {shp[a] - 1}] for spatial_shape {shp}, "
                                 f"got range [{lo[a + 1]}, {hi[a + 1]}]")
    return c[:, 0], (c[:, 1] * shp[1] + c[:, 2]) * shp[2] + c[:, 3]


def to_dense_forward(feats, coords, spatial_shape, batch_size: int):
    """Scatter feats ``[N, C]`` (float16/bfloat16/float32/float64, NumPy or CuPy) at core coords
    ``[N, 4]`` into zeros ``[batch_size, C, X, Y, Z]`` of feats' dtype."""
    check_feats(feats, "feats", int(coords.shape[0]))
    xp = array_module(feats)
    x, y, z = _shape3(spatial_shape)
    b, site = _sites(coords, (x, y, z), batch_size)
    if int(xp.unique(b.astype(xp.int64) * (x * y * z) + site).size) != int(coords.shape[0]):
        # a scatter by assignment keeps one of the repeated rows (which one is undefined on the GPU):
        # refuse rather than drop values (also guards from_dense's gradient, which scatters the same way)
        raise ValueError("coords: a site (b, x, y, z) occurs more than once; to_dense and the gradient of "
                         "from_dense need unique sites (as Voxels have)")
    c = int(feats.shape[1])
    out = xp.zeros(batch_size * c * x * y * z, dtype=_bits(feats, xp).dtype)
    if feats.shape[0] and c:
        out[_flat(b, site, c, x * y * z, xp)] = _bits(xp.ascontiguousarray(feats), xp)
    return out.view(feats.dtype).reshape(batch_size, c, x, y, z)


def _flat(b, site, c: int, v: int, xp):
    """int64 ``[N, C]``: the flat index of ``dense[b, ch, site]`` in a C-contiguous ``[B, C, V]`` array
    (1-D gathers and scatters: the one form of advanced indexing every array library runs alike)."""
    return (b[:, None] * c + xp.arange(c, dtype=xp.int64)[None, :]) * v + site[:, None]


def to_dense_backward(grad_dense, coords):
    """``grad_feats [N, C]``: ``grad_dense[b, :, x, y, z]`` at each voxel (a gather)."""
    return from_dense_forward(grad_dense, coords)


def from_dense_forward(dense, coords):
    """``feats [N, C]``: ``dense[b, :, x, y, z]`` for each core coordinate row ``(b, x, y, z)``."""
    xp = array_module(dense)
    if dense.ndim != 5:
        raise ValueError(f"dense must have shape [B, C, X, Y, Z], got {tuple(dense.shape)}")
    if dense.dtype.name not in FLOAT_DTYPES:
        raise ValueError(f"dense dtype must be one of {FLOAT_DTYPES}, got {dense.dtype.name}")
    bsz, c = int(dense.shape[0]), int(dense.shape[1])
    b, site = _sites(coords, dense.shape[2:], bsz)
    flat = _bits(xp.ascontiguousarray(dense), xp).reshape(-1)
    v = int(np.prod(dense.shape[2:]))
    return xp.ascontiguousarray(flat[_flat(b, site, c, v, xp)]).view(dense.dtype).reshape(int(coords.shape[0]), c)


def from_dense_backward(grad_feats, coords, dense_shape):
    """``grad_dense`` of shape ``dense_shape`` ``[B, C, X, Y, Z]``: grad_feats scattered into zeros."""
    if len(dense_shape) != 5:
        raise ValueError(f"dense_shape must be [B, C, X, Y, Z], got {tuple(dense_shape)}")
    check_feats(grad_feats, "grad_feats", int(coords.shape[0]))
    if int(grad_feats.shape[1]) != int(dense_shape[1]):
        raise ValueError(f"grad_feats must have {dense_shape[1]} channels, got {grad_feats.shape[1]}")
    return to_dense_forward(grad_feats, coords, dense_shape[2:], int(dense_shape[0]))


def active_sites(dense, mask=None):
    """int32 ``[N, 4]`` coords ``(b, x, y, z)`` (core array, sorted) of the sites of ``dense``
    ``[B, C, X, Y, Z]`` that are nonzero in any channel (-0.0 counts as zero, NaN as nonzero), or of
    ``mask`` ``[B, X, Y, Z]`` (bool) when given."""
    xp = array_module(dense)
    bsz, _, x, y, z = (int(v) for v in dense.shape)
    if mask is None:
        bits = _bits(xp.ascontiguousarray(dense), xp)
        magnitude = bits.dtype.type((1 << (8 * bits.dtype.itemsize - 1)) - 1)
        active = ((bits & magnitude) != 0).any(axis=1)
    else:
        if tuple(mask.shape) != (bsz, x, y, z):
            raise ValueError(f"mask must have shape {(bsz, x, y, z)} ([B, X, Y, Z] of dense), got {tuple(mask.shape)}")
        active = mask.astype(bool)
    return xp.stack(xp.nonzero(active), axis=1).astype(xp.int32)


def to_dense(voxels, spatial_shape, batch_size: int | None = None):
    """The dense tensor ``[B, C, X, Y, Z]`` of ``voxels`` (inactive sites 0), in the caller's library.

    Args:
        voxels: :class:`~sparsevox.Voxels` whose x, y, z lie in ``[0, spatial_shape)`` (else ``ValueError``;
            shift the coordinates first when they do not).
        spatial_shape: ``(X, Y, Z)``, each >= 1.
        batch_size: B (default: the largest batch index + 1).
    Gradient: the dense gradient read back at the voxels.
    """
    if not isinstance(voxels, Voxels):
        raise ValueError(f"voxels must be a sparsevox.Voxels, got {type(voxels).__name__}")
    shp = _shape3(spatial_shape)
    from .pooling import _adapter
    fn = _adapter(voxels.origin.lib, "to_dense", voxels.feats)
    if fn is not None:
        return fn(voxels, shp, batch_size)
    bsz = voxels.batch_size if batch_size is None else int(batch_size)
    c, _ = voxels.core_coords()
    feats, origin = to_core(voxels.feats)  # the feats' origin: it remembers a dtype computed in another
    with on_caller_stream(origin):
        out = to_dense_forward(feats, c, shp, bsz)
    return from_core(out, origin)


def check_dense_shape(shape) -> None:
    """Raise ``ValueError`` unless ``shape`` is ``[B, C, X, Y, Z]`` with B and X, Y, Z in the coordinate range."""
    if len(shape) != 5:
        raise ValueError(f"dense must have shape [B, C, X, Y, Z], got {tuple(shape)}")
    bsz, _, x, y, z = (int(v) for v in shape)
    if bsz > geometry.BATCH_MAX + 1 or max(x, y, z) > geometry.COORD_MAX + 1:
        raise ValueError(f"dense: at most {geometry.BATCH_MAX + 1} batch items and {geometry.COORD_MAX + 1} "
                         f"sites per axis, got shape {tuple(shape)}")


def from_dense(dense, mask=None) -> Voxels:
    """Sparse ``Voxels`` of a dense tensor ``[B, C, X, Y, Z]`` (any library): the sites nonzero in any
    channel, or those of ``mask`` ``[B, X, Y, Z]``; coords ``(b, x, y, z)`` sorted, feats ``[N, C]``
    in dense's dtype. Gradient: scattered back into the dense shape."""
    d, origin = to_core(dense)
    check_dense_shape(d.shape)
    from .pooling import _adapter
    fn = _adapter(origin.lib, "from_dense", dense)
    if fn is not None:
        return fn(dense, mask)
    with on_caller_stream(origin):
        m = None if mask is None else to_core(mask)[0]
        coords = active_sites(d, m)
        feats = from_dense_forward(d, coords)
    c_origin = dataclasses.replace(origin, dtype=None)  # coords stay int32 (origin.dtype is the feats')
    return Voxels.from_core_coords(coords, from_core(feats, origin), c_origin)
