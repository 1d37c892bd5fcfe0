"""Trilinear devoxelisation against a brute-force float64 reference (a loop over points and corners,
a dict of voxels), forward and backward, on the NumPy path and the emulated GPU path; its agreement
with ``Voxels.from_points``' voxel convention; GPU variants for every dtype (skipped with "no GPU")."""
import math

import numpy as np
import pytest
from reference import random_voxels
from segment_backends import DTYPES, TOL, backend, host, np_dtype, poison_gpu, quantise, rel_err, to_gpu  # noqa: F401
from segment_backends import use_emulator

import sparsevox as sv
from sparsevox import points as pts_mod


def ref_devoxelize(coords, feats, points, voxel_size, batch=None):
    """``(out [P, C], taps)``: taps[p] = [(row, weight)] of the present corners, weights summing to 1."""
    vs = voxel_size if isinstance(voxel_size, tuple) else (voxel_size,) * 3
    rows = {tuple(int(v) for v in c): i for i, c in enumerate(coords)}
    out = np.zeros((len(points), feats.shape[1]))
    taps = []
    for p, xyz in enumerate(points):
        b = 0 if batch is None else int(batch[p])
        u = [float(xyz[a]) / vs[a] - 0.5 for a in range(3)]
        i0 = [math.floor(v) for v in u]
        t = [u[a] - i0[a] for a in range(3)]
        found = []
        for dx in (0, 1):
            for dy in (0, 1):
                for dz in (0, 1):
                    w = (t[0] if dx else 1 - t[0]) * (t[1] if dy else 1 - t[1]) * (t[2] if dz else 1 - t[2])
                    key = (b, i0[0] + dx, i0[1] + dy, i0[2] + dz)
                    if key in rows and w > 0:
                        found.append((rows[key], w))
        total = sum(w for _, w in found)
        found = [(r, w / total) for r, w in found] if total > 0 else []
        for r, w in found:
            out[p] += w * feats[r]
        taps.append(found)
    return out, taps


def ref_backward(taps, grad, n_vox):
    g = np.zeros((n_vox, grad.shape[1]))
    for p, found in enumerate(taps):
        for r, w in found:
            g[r] += w * grad[p]
    return g


def make_case(rng, voxel_size, n=120, p=80, batches=2, c=4, dtype="float64"):
    coords = random_voxels(rng, n, extent=6, batches=batches)
    feats = quantise(rng.standard_normal((len(coords), c)), dtype)
    vs = np.broadcast_to(np.asarray(voxel_size, dtype=np.float64), (3,))
    lo, hi = -3 * vs - vs, 3 * vs + vs  # some points beyond every voxel: zeros
    points = rng.uniform(lo, hi, (p, 3))
    batch = rng.integers(0, batches, p)
    return coords, feats, points, batch


@pytest.mark.parametrize("voxel_size", [0.25, (0.3, 0.5, 0.2)])
def test_devoxelize_matches_brute_force(backend, rng, voxel_size):
    coords, feats, points, batch = make_case(rng, voxel_size)
    v = sv.Voxels(coords, feats)
    want, taps = ref_devoxelize(coords, feats, points, voxel_size, batch)
    got = sv.devoxelize(v, points, voxel_size, batch)
    assert got.shape == want.shape and got.dtype == np.float64
    assert rel_err(got, want) < 1e-13
    idx, w = pts_mod.devoxelize_weights(v, points, voxel_size, batch)
    assert idx.dtype == np.int32 and idx.shape == (len(points), 8) and w.shape == (len(points), 8)
    sums = w.sum(1)
    assert np.allclose(sums[sums > 0], 1.0) and np.all((idx >= 0) == (w > 0))
    grad = rng.standard_normal(want.shape)
    gf = pts_mod.devoxelize_backward(grad, idx, w, len(coords))
    assert rel_err(gf, ref_backward(taps, grad, len(coords))) < 1e-13
    # adjoint identity <devox(f), g> = <f, devox^T(g)>
    assert np.isclose(np.sum(pts_mod.devoxelize_forward(feats, idx, w) * grad), np.sum(feats * gf), rtol=1e-12)


def test_points_at_centres_take_the_voxel_feature_exactly(backend, rng):
    coords = random_voxels(rng, 80, extent=6, batches=2)
    feats = rng.standard_normal((len(coords), 3))
    v = sv.Voxels(coords, feats)
    vs = (0.5, 0.25, 0.125)  # powers of two: the centres are exact
    centres = (coords[:, 1:] + 0.5) * np.array(vs)
    np.testing.assert_array_equal(sv.devoxelize(v, centres, vs, coords[:, 0]), feats)


def test_lone_voxel_gives_its_feature_to_every_point_inside_it(backend, rng):
    """Consistency with ``from_points``: each point's own voxel (floor(xyz / voxel_size)) is one of its
    8 corners, so with no neighbours a point reads exactly its voxel's feature (renormalisation)."""
    vs = 0.2
    pts = rng.uniform(-1, 1, (2000, 3))  # ~54 kept (of 200, none in about one run of 250: an empty case)
    cells = np.floor(pts / vs).astype(np.int64)
    keep = (cells % 3 == 0).all(1)  # voxels 3 apart: no two share a point's 8 corners
    pts = pts[keep]
    feats_pts = rng.standard_normal((len(pts), 2))
    v = sv.Voxels.from_points(pts, vs, features=feats_pts)
    got = sv.devoxelize(v, pts, vs)
    rows = {tuple(c): i for i, c in enumerate(np.asarray(v.coords)[:, 1:].tolist())}
    want = np.array([v.feats[rows[tuple(c)]] for c in np.floor(pts / vs).astype(int).tolist()])
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_point_with_no_voxel_around_gets_zeros_and_absent_corners_renormalise(backend):
    coords = np.array([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]], np.int32)
    feats = np.array([[1.0], [3.0], [10.0]])
    v = sv.Voxels(coords, feats)
    pts = np.array([[1.0, 0.5, 0.5],      # between the centres of (0,0,0) and (1,0,0): 1/2 each
                    [0.6, 0.5, 0.5],      # 0.9 / 0.1
                    [1.0, 0.9, 0.5],      # y off-centre: corners at y=1 absent, renormalised
                    [5.0, 5.0, 5.0]])     # nothing around: zeros
    got = sv.devoxelize(v, pts, 1.0)
    np.testing.assert_allclose(got[:, 0], [2.0, 1.2, 2.0, 0.0], rtol=1e-14)
    np.testing.assert_allclose(sv.devoxelize(v, pts[:1], 1.0, np.array([1])), [[10.0]])


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_kernels_every_dtype(monkeypatch, rng, dtype):
    use_emulator(monkeypatch)
    coords, feats, points, batch = make_case(rng, 0.25, c=5, dtype=dtype)
    v = sv.Voxels(coords, feats.astype(np_dtype(dtype)))
    want, taps = ref_devoxelize(coords, feats, points, 0.25, batch)
    got = sv.devoxelize(v, points, 0.25, batch)
    assert got.dtype == np_dtype(dtype) and rel_err(got, want) < TOL[dtype]
    idx, w = pts_mod.devoxelize_weights(v, points, 0.25, batch)
    grad = quantise(rng.standard_normal(want.shape), dtype)
    gf = pts_mod.devoxelize_backward(grad.astype(np_dtype(dtype)), idx, w, len(coords))
    assert gf.dtype == np_dtype(dtype) and rel_err(gf, ref_backward(taps, grad, len(coords))) < TOL[dtype]


def test_bad_arguments(rng):
    coords, feats, points, batch = make_case(rng, 0.25, n=20, p=5)
    v = sv.Voxels(coords, feats)
    with pytest.raises(ValueError, match="voxel_size must be positive"):
        sv.devoxelize(v, points, 0.0)
    with pytest.raises(ValueError, match="voxel_size must be a float or 3 floats"):
        sv.devoxelize(v, points, (1.0, 2.0))
    with pytest.raises(ValueError, match=r"points must have shape \[P, 3\]"):
        sv.devoxelize(v, points[:, :2], 0.25)
    with pytest.raises(ValueError, match="finite"):
        sv.devoxelize(v, np.full((1, 3), np.nan), 0.25)
    with pytest.raises(ValueError, match=r"batch must be an integer array of shape \[5\]"):
        sv.devoxelize(v, points, 0.25, batch[:3])
    with pytest.raises(ValueError, match=r"batch indices must be in \[0, 1023\]"):
        sv.devoxelize(v, points, 0.25, np.full(5, -1))
    with pytest.raises(ValueError, match=r"idx and w must have shape \[P, 8\]"):
        pts_mod.devoxelize_forward(feats, np.zeros((5, 4), np.int32), np.zeros((5, 4)))


@pytest.fixture
def cupy():
    return pytest.importorskip("cupy")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_devoxelize_matches_brute_force(monkeypatch, cupy, rng, dtype):
    poison_gpu(monkeypatch, cupy)
    coords, feats, points, batch = make_case(rng, (0.3, 0.5, 0.2), n=400, p=500, c=21, dtype=dtype)
    v = sv.Voxels(cupy.asarray(coords), to_gpu(feats, dtype))
    want, taps = ref_devoxelize(coords, feats, points, (0.3, 0.5, 0.2), batch)
    got = sv.devoxelize(v, cupy.asarray(points), (0.3, 0.5, 0.2), cupy.asarray(batch))
    assert isinstance(got, cupy.ndarray) and got.dtype == v.feats.dtype
    assert rel_err(host(got), want) < TOL[dtype]
    idx, w = pts_mod.devoxelize_weights(v, cupy.asarray(points), (0.3, 0.5, 0.2), cupy.asarray(batch))
    grad = quantise(rng.standard_normal(want.shape), dtype)
    gf = pts_mod.devoxelize_backward(to_gpu(grad, dtype), idx, w, len(coords))
    assert rel_err(host(gf), ref_backward(taps, grad, len(coords))) < TOL[dtype]
