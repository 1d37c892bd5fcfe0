"""Benchmark scenes: voxel geometries of a synthetic LiDAR scan and of two real scans.

| name | source | voxel |
|---|---|---|
| ``lidar_synth`` | :func:`sparsevox.synthetic.lidar_like_points` (seed 0, its default 180k points): 150,578 voxels | 5 cm |
| ``semantickitti`` | ``semantickitti_000000.bin`` (float32 x y z remission), 91,767 voxels | 5 cm |
| ``scannet`` | ``scannet_scene0000_00.bin`` (float32 x y z r g b) | 2 cm |

Real scans are read from ``.gpudata/pointclouds/`` at the repository root (the lead copies them there
for GPU runs, where ``../shared`` does not travel), else from ``../shared/data/pointclouds/`` beside
the repository; a scene whose file is in neither place is skipped with a logged reason.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .provenance import REPO

log = logging.getLogger("sparsevox.benchmarks")

SEARCH_DIRS = (REPO / ".gpudata" / "pointclouds", REPO.parent / "shared" / "data" / "pointclouds")

# name -> (file or None for synthetic, float32 columns, voxel size in metres)
SCENES = {
    "semantickitti": ("semantickitti_000000.bin", 4, 0.05),
    "lidar_synth": (None, 4, 0.05),
    "scannet": ("scannet_scene0000_00.bin", 6, 0.02),
}


@dataclass
class Scene:
    """One voxel geometry.

    Attributes:
        name: scene name (a key of :data:`SCENES`).
        voxel_size: metres.
        coords: int32 ``[N, 4]`` NumPy, columns ``(batch, x, y, z)``, unique, sorted by key.
        source: where the points came from (file path or generator call).
    """
    name: str
    voxel_size: float
    coords: np.ndarray
    source: str

    @property
    def n_voxels(self) -> int:
        return int(self.coords.shape[0])

    @property
    def label(self) -> str:
        return f"{self.name} ({self.n_voxels:,} voxels, {self.voxel_size * 100:g} cm)"


def find_file(filename: str) -> Path | None:
    for d in SEARCH_DIRS:
        p = d / filename
        if p.is_file():
            return p
    return None


def points_of(name: str) -> tuple[np.ndarray, str] | None:
    """``(float32 [P, cols] points, source)`` of a scene, or None when its file is absent."""
    if name not in SCENES:
        raise ValueError(f"scene must be one of {sorted(SCENES)}, got {name!r}")
    filename, cols, _ = SCENES[name]
    if filename is None:
        from sparsevox.synthetic import lidar_like_points
        return np.asarray(lidar_like_points(seed=0), dtype=np.float32), "sparsevox.synthetic.lidar_like_points(seed=0)"
    path = find_file(filename)
    if path is None:
        log.warning("scene %s skipped: %s not found in %s", name, filename, [str(d) for d in SEARCH_DIRS])
        return None
    pts = np.fromfile(path, dtype=np.float32)
    if pts.size % cols:
        raise ValueError(f"{path}: {pts.size} float32 values is not a multiple of {cols} columns")
    return pts.reshape(-1, cols), str(path)


def voxelise(points: np.ndarray, voxel_size: float) -> np.ndarray:
    """Unique voxel coords int32 ``[N, 4]`` of ``points[:, :3]`` through ``sparsevox.Voxels.from_points``."""
    from sparsevox import Voxels
    v = Voxels.from_points(np.ascontiguousarray(points[:, :3]), voxel_size)
    return np.ascontiguousarray(np.asarray(v.coords, dtype=np.int32))


def crop(coords: np.ndarray, max_voxels: int) -> np.ndarray:
    """Keep the ``max_voxels`` voxels nearest the median voxel (L-inf), so neighbourhoods stay intact."""
    if max_voxels <= 0 or coords.shape[0] <= max_voxels:
        return coords
    centre = np.median(coords[:, 1:], axis=0)
    d = np.abs(coords[:, 1:] - centre).max(axis=1)
    keep = np.sort(np.argpartition(d, max_voxels - 1)[:max_voxels])
    return np.ascontiguousarray(coords[keep])


def load_scenes(names=None, max_voxels: int = 0) -> list[Scene]:
    """Load the named scenes (default: all, in :data:`SCENES` order), skipping absent files.

    Args:
        names: iterable of scene names, or None for all.
        max_voxels: when > 0, crop each scene to at most this many voxels (CPU dry runs).
    """
    out = []
    for name in (names or list(SCENES)):
        got = points_of(name)
        if got is None:
            continue
        pts, source = got
        size = SCENES[name][2]
        coords = crop(voxelise(pts, size), max_voxels)
        out.append(Scene(name, size, coords, source))
    return out


def neighbours_per_voxel(coords: np.ndarray) -> float:
    """Mean number of active voxels in each voxel's 3x3x3 neighbourhood (itself included): SubM k3 pairs / N."""
    from sparsevox import Voxels, kernel_map
    km = kernel_map(Voxels(coords, None, check=False), 3)
    return km.num_pairs / max(coords.shape[0], 1)
