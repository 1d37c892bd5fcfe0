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
