"""A built-in, procedurally generated LiDAR-like scan (no dataset licence, ships with the package)."""
from __future__ import annotations

import numpy as np


def lidar_like_points(seed: int = 0, n_points: int = 180_000) -> np.ndarray:
    """A 64-beam spinning-LiDAR-like scan of a street: ``float32 [P, 4]`` (x, y, z, intensity), metres.

    Ground returns lie on rings whose spacing grows with range (as a real sensor's), plus building
    walls along the street, car-sized boxes and poles. At 5 cm it gives roughly 100k voxels with a
    few neighbours each, like a SemanticKITTI scan.
    """
    rng = np.random.default_rng(seed)
    height = 1.73  # sensor above ground
    n_ground = int(n_points * 0.55)
    n_wall = int(n_points * 0.25)
    n_car = int(n_points * 0.12)
    n_pole = n_points - n_ground - n_wall - n_car

    # Ground: beams at elevations -24.8..-2 degrees hit z = -height at r = height / tan(-elev).
    elev = np.deg2rad(rng.uniform(-24.8, -2.0, n_ground))
    beam = np.round((elev - elev.min()) / np.deg2rad(0.42))  # quantise to discrete rings
    elev = elev.min() + beam * np.deg2rad(0.42)
    r = np.minimum(height / np.tan(-elev), 45.0) + rng.normal(0, 0.02, n_ground)
    az = rng.uniform(-np.pi, np.pi, n_ground)
    ground = np.stack([r * np.cos(az), r * np.sin(az), -height + rng.normal(0, 0.02, n_ground)], 1)

    # Building walls on both sides of a street along x, seen more densely when near.
    side = rng.choice([-1.0, 1.0], n_wall)
    wx = rng.uniform(-35, 35, n_wall)
    walls = np.stack([wx, side * (9.0 + rng.normal(0, 0.03, n_wall)), rng.uniform(-height, 4.0, n_wall)], 1)

    # Cars: boxes 4.2 x 1.8 x 1.5 m parked along the kerbs; points on their surfaces.
    n_boxes = 24
    centres = np.stack([rng.uniform(-40, 40, n_boxes), rng.choice([-6.0, 6.0], n_boxes), np.zeros(n_boxes)], 1)
    which = rng.integers(0, n_boxes, n_car)
    u = rng.uniform(-0.5, 0.5, (n_car, 3))
    face = rng.integers(0, 3, n_car)
    u[np.arange(n_car), face] = np.sign(u[np.arange(n_car), face]) * 0.5
    cars = centres[which] + u * np.array([4.2, 1.8, 1.5]) + np.array([0, 0, -height + 0.75])

    # Poles and trunks: thin vertical cylinders.
    n_cyl = 40
    px = rng.uniform(-50, 50, n_cyl)
    py = rng.choice([-7.5, 7.5], n_cyl) + rng.normal(0, 0.3, n_cyl)
    which = rng.integers(0, n_cyl, n_pole)
    th = rng.uniform(0, 2 * np.pi, n_pole)
    poles = np.stack([px[which] + 0.15 * np.cos(th), py[which] + 0.15 * np.sin(th),
                      rng.uniform(-height, 4.0, n_pole)], 1)

    xyz = np.concatenate([ground, walls, cars, poles]).astype(np.float32)
    rng_ = np.linalg.norm(xyz[:, :2], axis=1)
    intensity = np.clip(rng.normal(0.4, 0.15, len(xyz)) * np.exp(-rng_ / 80), 0, 1).astype(np.float32)
    return np.concatenate([xyz, intensity[:, None]], 1)


def _plane(rng, origin, u, v, spacing, jitter):
    """Points on the parallelogram ``origin + a u + b v`` (a, b in [0, 1)) on a grid of ``spacing``
    metres, each moved by Gaussian ``jitter`` along all axes."""
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    na = max(int(np.linalg.norm(u) / spacing), 1)
    nb = max(int(np.linalg.norm(v) / spacing), 1)
    a, b = np.meshgrid((np.arange(na) + 0.5) / na, (np.arange(nb) + 0.5) / nb, indexing="ij")
    pts = np.asarray(origin, np.float64) + a.reshape(-1, 1) * u + b.reshape(-1, 1) * v
    return pts + rng.normal(0, jitter, pts.shape)


def _box(rng, lo, hi, spacing, jitter, bottom=False):
    """Points on the faces of an axis-aligned box (the bottom face only when ``bottom``)."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    dx, dy, dz = np.diag(hi - lo)
    faces = [(lo + dz, dx, dy), (lo, dx, dz), (lo + dy, dx, dz), (lo, dy, dz), (lo + dx, dy, dz)]
    if bottom:
        faces.append((lo, dx, dy))
    return np.concatenate([_plane(rng, o, a, b, spacing, jitter) for o, a, b in faces])


def indoor_like_points(seed: int = 0, room=(6.4, 5.0, 2.5), spacing: float = 0.0125,
                       jitter: float = 0.002) -> np.ndarray:
    """An indoor scan of a furnished room, as a dense RGB-D reconstruction sees it (ScanNet-like):
    ``float32 [P, 6]`` (x, y, z in metres, r, g, b in 0..255).

    Floor and four walls (no ceiling), tables with legs, chairs, shelves, a sofa and boxes, sampled on
    a grid of ``spacing`` metres with Gaussian ``jitter``; the room's corner is at 1 cm, so that at 2 cm
    its floor and walls lie mid-voxel. The default room gives about 0.86M points and 346k voxels at 2 cm
    (11 voxels in each 3x3x3 neighbourhood: surfaces, as in real indoor scans).
    """
    rng = np.random.default_rng(seed)
    lx, ly, lz = room
    parts, colours = [], []

    def add(pts, rgb):
        parts.append(pts)
        colours.append(np.clip(np.asarray(rgb, np.float64) + rng.normal(0, 12, (len(pts), 3)), 0, 255))

    add(_plane(rng, (0, 0, 0), (lx, 0, 0), (0, ly, 0), spacing, jitter), (150, 120, 90))  # floor
    for o, u in (((0, 0, 0), (lx, 0, 0)), ((0, ly, 0), (lx, 0, 0)), ((0, 0, 0), (0, ly, 0)),
                 ((lx, 0, 0), (0, ly, 0))):
        add(_plane(rng, o, u, (0, 0, lz), spacing, jitter), (220, 218, 210))  # walls
    for _ in range(2):  # tables: top and four legs
        x, y = rng.uniform(1.0, lx - 2.5), rng.uniform(1.0, ly - 2.0)
        w, d, h = rng.uniform(1.2, 1.8), rng.uniform(0.7, 1.0), 0.75
        add(_box(rng, (x, y, h - 0.04), (x + w, y + d, h), spacing, jitter, bottom=True), (120, 80, 50))
        for cx, cy in ((x, y), (x + w - 0.05, y), (x, y + d - 0.05), (x + w - 0.05, y + d - 0.05)):
            add(_box(rng, (cx, cy, 0), (cx + 0.05, cy + 0.05, h - 0.04), spacing, jitter), (90, 60, 40))
        for _ in range(4):  # chairs around it: seat and back
            cx, cy = x + rng.uniform(-0.5, w), y + rng.choice([-0.6, d + 0.1])
            add(_box(rng, (cx, cy, 0.42), (cx + 0.45, cy + 0.45, 0.46), spacing, jitter, bottom=True),
                (60, 60, 140))
            add(_box(rng, (cx, cy, 0.46), (cx + 0.45, cy + 0.04, 0.9), spacing, jitter), (60, 60, 140))
    for i in range(3):  # shelves along the wall at y = ly
        x = 0.3 + i * 1.4
        add(_box(rng, (x, ly - 0.35, 0), (x + 1.0, ly - 0.02, 2.0), spacing, jitter), (200, 190, 170))
    add(_box(rng, (lx - 1.0, 0.5, 0), (lx - 0.1, 2.7, 0.45), spacing, jitter), (140, 40, 40))  # sofa seat
    add(_box(rng, (lx - 0.35, 0.5, 0.45), (lx - 0.1, 2.7, 0.9), spacing, jitter), (140, 40, 40))  # its back
    for _ in range(8):  # boxes on the floor
        x, y, s = rng.uniform(0.2, lx - 0.8), rng.uniform(0.2, ly - 0.8), rng.uniform(0.2, 0.6)
        add(_box(rng, (x, y, 0), (x + s, y + s, s), spacing, jitter), rng.uniform(40, 220, 3))
    xyz = np.concatenate(parts) + 0.01
    rgb = np.concatenate(colours)
    return np.concatenate([xyz, rgb], 1).astype(np.float32)
