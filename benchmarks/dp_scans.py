"""Scans for the data-parallel checks (``benchmarks/ddp.py``, ``benchmarks/jax_sharded.py``): one small
procedural LiDAR crop per rank/device, and their union as one multi-batch sparse tensor.

Everything here is NumPy, so every rank (or the single-process reference) builds the same inputs.
"""
from __future__ import annotations

import numpy as np

import sparsevox as sv
from sparsevox.synthetic import lidar_like_points

C_IN = 2  # features: mean intensity, mean z (metres)
GROUND_Z = -1.5  # target: 1 where a voxel's mean z is above this (an "object" voxel), else 0


def scan(seed: int, crop: float = 8.0, voxel: float = 0.1, n_points: int = 180_000):
    """One scan ``lidar_like_points(seed)`` cropped to ``|x|, |y| < crop`` metres, voxelised at ``voxel``.

    Returns ``(coords int32 [N, 4] (batch column 0), feats float64 [N, 2], target float64 [N])``,
    rows sorted by (x, y, z).
    """
    if crop <= 0 or voxel <= 0:
        raise ValueError(f"crop and voxel must be > 0 metres, got crop={crop}, voxel={voxel}")
    p = lidar_like_points(seed=seed, n_points=n_points).astype(np.float64)
    p = p[(np.abs(p[:, 0]) < crop) & (np.abs(p[:, 1]) < crop)]
    if len(p) == 0:
        raise ValueError(f"crop={crop} leaves no points of scan {seed} (its nearest ground ring is ~3.7 m "
                         "from the sensor); use crop >= 4")
    v = sv.Voxels.from_points(p[:, :3], voxel, features=np.stack([p[:, 3], p[:, 2]], 1))
    coords = np.asarray(v.coords, dtype=np.int32)
    feats = np.asarray(v.feats, dtype=np.float64)
    return coords, feats, (feats[:, 1] > GROUND_Z).astype(np.float64)


def union(scans):
    """Concatenate ``[(coords, feats, target), ...]`` into one tensor whose batch column is the scan index.

    Returns ``(coords int32 [sum N, 4], feats [sum N, 2], target [sum N], batch int64 [sum N])``.
    """
    coords = np.concatenate([np.concatenate([np.full((len(c), 1), b, np.int32), c[:, 1:]], 1)
                             for b, (c, _, _) in enumerate(scans)])
    feats = np.concatenate([f for _, f, _ in scans])
    target = np.concatenate([t for _, _, t in scans])
    batch = np.concatenate([np.full(len(c), b, np.int64) for b, (c, _, _) in enumerate(scans)])
    return coords, feats, target, batch


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """``||a - b|| / ||b||`` in float64 (absolute when ``b`` is zero)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    den = float(np.linalg.norm(b))
    num = float(np.linalg.norm(a - b))
    return num / den if den > 0 else num


TOL = {"float64": 1e-10, "float32": 1e-5}
