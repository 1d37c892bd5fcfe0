"""From voxels back to points: trilinear ``devoxelize`` (the inverse direction of ``Voxels.from_points``).

Conventions, the same as :meth:`sparsevox.Voxels.from_points`: the origin of world space is the corner
of voxel 0, voxel ``i`` covers ``[i * voxel_size, (i + 1) * voxel_size)`` per axis (a point's voxel is
``floor(xyz / voxel_size)``), and its feature sits at the centre ``(i + 0.5) * voxel_size``.

A point interpolates the 8 voxel centres around it: with ``u = xyz / voxel_size - 0.5``,
``i0 = floor(u)``, ``t = u - i0``, corner ``i0 + d`` (``d`` in ``{0, 1}^3``) has weight
``prod_a (t_a if d_a else 1 - t_a)``. Absent voxels (and corners of weight 0) are dropped and the rest
renormalised to sum 1; a point with none gets zeros. A point at a voxel's centre takes that voxel's
feature exactly. Corner ``j`` of the 8 is ``d = (j >> 2, (j >> 1) & 1, j & 1)`` (z fastest).

The interpolation is a weighted segment sum (8 entries per point); its backward, the sum over the
transposed segments (the points reading each voxel), so the GPU needs no atomics.
"""
from __future__ import annotations

import numpy as np

from . import geometry
from ._arrays import array_module, from_core, on_caller_stream, to_core
from .pooling import _adapter, lookup_rows
from .segments import Segments, check_feats, segment_sum
from .voxels import Voxels

_CORNERS = np.array([[j >> 2, (j >> 1) & 1, j & 1] for j in range(8)], dtype=np.int64)


def devoxelize_weights(voxels: Voxels, points, voxel_size, batch=None):
    """``(idx int32 [P, 8], w float64 [P, 8])`` (core arrays on the voxels' device): the rows of the 8
    voxels around each point (-1 where absent or of weight 0) and their renormalised trilinear weights
    (0 where idx is -1; rows summing to 1, or all 0 for a point with no voxel around it).

    Args:
        voxels: the :class:`~sparsevox.Voxels` to read.
        points: float ``[P, 3]`` (or ``[P, 3 + F]``; only x, y, z are read), world units.
        voxel_size: float or 3 floats > 0, as in ``Voxels.from_points``.
        batch: optional int ``[P]`` batch index of each point (default all 0).
    """
    size = geometry.voxel_size3(voxel_size)
    p, porigin = to_core(points)
    c, vorigin = voxels.core_coords()
    if porigin.on_gpu != vorigin.on_gpu:
        raise ValueError("points must be on the same device as voxels")
    xp = array_module(c)
    if p.ndim != 2 or p.shape[1] < 3:
        raise ValueError(f"points must have shape [P, 3], got {tuple(p.shape)}")
    n = int(p.shape[0])
    xyz = xp.asarray(p[:, :3]).astype(xp.float64)
    if not bool(xp.isfinite(xyz).all()):
        raise ValueError("points: x, y, z must be finite (found NaN or inf)")
    b = xp.zeros(n, dtype=xp.int64)
    if batch is not None:
        bb = xp.asarray(to_core(batch)[0])
        if bb.ndim != 1 or int(bb.shape[0]) != n or bb.dtype.kind not in "iu":
            raise ValueError(f"batch must be an integer array of shape [{n}], got {bb.dtype} {tuple(bb.shape)}")
        b = bb.astype(xp.int64)
        if n and (int(b.min()) < 0 or int(b.max()) > geometry.BATCH_MAX):
            raise ValueError(f"batch indices must be in [0, {geometry.BATCH_MAX}], "
                             f"got range [{int(b.min())}, {int(b.max())}]")
    u = xyz / xp.asarray(size) - 0.5
    i0 = xp.floor(u)
    t = u - i0
    i0 = i0.astype(xp.int64)
    corners = xp.asarray(_CORNERS)  # [8, 3]
    w = xp.prod(xp.where(corners[None, :, :] == 1, t[:, None, :], 1.0 - t[:, None, :]), axis=2)  # [P, 8]
    cc = xp.empty((n, 8, 4), dtype=xp.int64)
    cc[:, :, 0] = b[:, None]
    cc[:, :, 1:] = i0[:, None, :] + corners[None, :, :]
    rows = lookup_rows(voxels, cc.reshape(-1, 4)).reshape(n, 8)
    w = xp.where((rows >= 0) & (w > 0), w, 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = xp.where(total > 0, w / xp.where(total > 0, total, 1.0), 0.0)
    idx = xp.where(w > 0, rows, -1).astype(xp.int32)
    return idx, w


def _segments(idx, w, num_voxels: int) -> Segments:
    xp = array_module(idx)
    p = int(idx.shape[0])
    if tuple(idx.shape) != (p, 8) or tuple(w.shape) != (p, 8):
        raise ValueError(f"idx and w must have shape [P, 8], got {tuple(idx.shape)} and {tuple(w.shape)}")
    return Segments(xp.arange(0, 8 * p + 1, 8, dtype=xp.int32), idx.reshape(-1), num_voxels,
                    w.reshape(-1), np.arange(0, 8 * p + 1, 8), 8)


def devoxelize_forward(feats, idx, w):
    """``out [P, C]`` (feats' dtype): ``out[p] = sum_j w[p, j] * feats[idx[p, j]]`` over ``idx >= 0``.

    feats ``[N, C]`` float16/bfloat16/float32/float64 (NumPy or CuPy); ``idx`` int32 ``[P, 8]`` and
    ``w`` float ``[P, 8]`` from :func:`devoxelize_weights`. Accumulates in float32 (float64 for float64)."""
    check_feats(feats, "feats")
    return segment_sum(feats, _segments(idx, w, int(feats.shape[0])))


def devoxelize_backward(grad_out, idx, w, num_voxels: int):
    """``grad_feats [num_voxels, C]``: ``sum over (p, j) with idx[p, j] == i of w[p, j] * grad_out[p]``."""
    check_feats(grad_out, "grad_out", int(idx.shape[0]))
    return segment_sum(grad_out, _segments(idx, w, int(num_voxels)).transpose())


def devoxelize(voxels, points, voxel_size, batch=None):
    """Features at points, trilinearly interpolated between voxel centres: ``[P, C]``, feats' dtype, in
    the caller's library (see the module docstring for the exact rule).

    Args:
        voxels: :class:`~sparsevox.Voxels` with feats ``[N, C]``, coordinates ``floor(xyz / voxel_size)``
            as ``Voxels.from_points`` makes them.
        points: float ``[P, 3]`` in world units.
        voxel_size: float or 3 floats > 0 (the one the voxels were made with).
        batch: optional int ``[P]`` batch index of each point (default all 0), as in ``from_points``.

    Example:
        >>> v = sv.Voxels.from_points(pts, 0.05)
        >>> f = sv.devoxelize(v, pts[:, :3], 0.05)   # [P, C]: each point's voxel feature, blended
    """
    if not isinstance(voxels, Voxels):
        raise ValueError(f"voxels must be a sparsevox.Voxels, got {type(voxels).__name__}")
    fn = _adapter(voxels.origin.lib, "devoxelize", voxels.feats)
    if fn is not None:
        return fn(voxels, points, voxel_size, batch)
    feats, origin = to_core(voxels.feats)
    with on_caller_stream(origin):
        idx, w = devoxelize_weights(voxels, points, voxel_size, batch)
        out = devoxelize_forward(feats, idx, w)
    return from_core(out, origin)
