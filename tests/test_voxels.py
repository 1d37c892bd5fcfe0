"""Voxels validation, voxelisation, DLPack round trips and bad inputs."""
import numpy as np
import pytest
from reference import dense_conv, random_voxels, rel_err

import sparsevox as sv
from sparsevox.geometry import BATCH_MAX, COORD_MAX, COORD_MIN


@pytest.fixture(params=["host", "hash"])
def validation(request, monkeypatch):
    """How ``Voxels`` validates: "host" (NumPy: sorted keys, min/max) or "hash" (the CuPy path: the GPU
    kernel-map builder's hash insert, here through the CUDA CPU emulator)."""
    if request.param == "hash":
        import cuda_cpu_emulator as emu
        ok, reason = emu.available()
        if not ok:
            pytest.skip(f"CUDA CPU emulator unavailable: {reason}")
        dev = emu.EmulatedDevice()
        from sparsevox import voxels
        monkeypatch.setattr(voxels, "_hash_device", lambda c: dev)
    return request.param


def test_duplicates_are_rejected_with_the_coordinate(validation):
    c = np.array([[0, 1, 2, 3], [1, 1, 2, 3], [0, 1, 2, 3]])
    with pytest.raises(ValueError, match=r"unique.*\[0, 1, 2, 3\] occurs more than once \(1 duplicate rows in all\)"):
        sv.Voxels(c, np.zeros((3, 1), np.float32))


@pytest.mark.parametrize("row,what", [([0, COORD_MAX + 1, 0, 0], "x"), ([0, 0, COORD_MIN - 1, 0], "y"),
                                      ([0, 0, 0, COORD_MAX + 1], "z"), ([BATCH_MAX + 1, 0, 0, 0], "batch"),
                                      ([-1, 0, 0, 0], "batch")])
def test_out_of_range_coordinates(validation, row, what):
    with pytest.raises(ValueError, match=what):
        sv.Voxels(np.array([row]), np.zeros((1, 2), np.float32))


def test_valid_and_empty_coords_pass(validation, rng):
    c = random_voxels(rng, 50)
    v = sv.Voxels(c, np.zeros((len(c), 2), np.float32))
    assert (v._hash is not None) == (validation == "hash")
    assert sv.Voxels(np.zeros((0, 4), np.int32), np.zeros((0, 2), np.float32))._hash is None


def test_limits_are_accepted_and_maps_stay_exact_at_the_edges(rng):
    c = np.array([[0, COORD_MAX, COORD_MAX, COORD_MAX], [0, COORD_MAX - 1, COORD_MAX, COORD_MAX],
                  [BATCH_MAX, COORD_MIN, COORD_MIN, COORD_MIN], [BATCH_MAX, COORD_MIN + 1, COORD_MIN, COORD_MIN],
                  [0, COORD_MIN, COORD_MAX, 0]], np.int32)
    f = rng.standard_normal((5, 2))
    w = rng.standard_normal((27, 2, 2))
    out = sv.spatially_sparse_conv(sv.Voxels(c, f), w)
    # each corner voxel sees exactly its one neighbour along x and itself; no wrap-around aliasing
    expect = np.stack([f[0] @ w[13] + f[1] @ w[4], f[1] @ w[13] + f[0] @ w[22],
                       f[2] @ w[13] + f[3] @ w[22], f[3] @ w[13] + f[2] @ w[4], f[4] @ w[13]])
    np.testing.assert_allclose(out.feats, expect, rtol=1e-12)


@pytest.mark.parametrize("coords,feats,match", [
    (np.zeros((3, 3), np.int32), np.zeros((3, 2), np.float32), r"\[N, 4\]"),
    (np.zeros((1, 4), np.int32), np.zeros((2, 2), np.float32), "rows"),
    (np.zeros((1, 4), np.float32), np.zeros((1, 2), np.float32), "integer"),
    (np.zeros((1, 4), np.int32), np.zeros((1, 2), np.int32), "dtype"),
    (np.zeros((1, 4), np.int32), np.zeros((1,), np.float32), r"\[N, C\]"),
])
def test_bad_shapes_and_dtypes(coords, feats, match):
    with pytest.raises(ValueError, match=match):
        sv.Voxels(coords, feats)


def test_weight_errors(rng):
    v = sv.Voxels(random_voxels(rng, 30), rng.standard_normal((30, 4)).astype(np.float32))
    with pytest.raises(ValueError, match="K=27"):
        sv.spatially_sparse_conv(v, np.zeros((8, 4, 2), np.float32))
    with pytest.raises(ValueError, match="C_in=4"):
        sv.spatially_sparse_conv(v, np.zeros((27, 3, 2), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        sv.spatially_sparse_conv(v, np.zeros((27, 4, 2), np.float64))
    with pytest.raises(ValueError, match="kernel_size"):
        sv.spatially_sparse_conv(v, np.zeros((27, 4, 2), np.float32), kernel_size=0)
    with pytest.raises(ValueError, match="stride"):
        sv.spatially_sparse_conv(v, np.zeros((27, 4, 2), np.float32), stride=(1, 2))
    with pytest.raises(ValueError, match="output_voxels"):
        sv.spatially_sparse_conv(v, np.zeros((8, 4, 2), np.float32), kernel_size=2, stride=2, transposed=True)
    with pytest.raises(ValueError, match="transposed=True"):
        sv.spatially_sparse_conv(v, np.zeros((8, 4, 2), np.float32), kernel_size=2, generative=True)


def test_generated_coordinates_out_of_range_is_an_error():
    v = sv.Voxels(np.array([[0, COORD_MAX // 2 + 1, 0, 0]]), np.ones((1, 1)))
    with pytest.raises(ValueError, match="generated output coordinates"):
        sv.spatially_sparse_conv(v, np.ones((8, 1, 1)), kernel_size=2, stride=2, transposed=True, generative=True)


@pytest.mark.parametrize("reduction", ["mean", "max", "sum"])
def test_from_points_matches_a_loop(rng, reduction):
    pts = np.concatenate([rng.uniform(-1, 1, (500, 3)), rng.standard_normal((500, 2))], 1).astype(np.float32)
    batch = rng.integers(0, 3, 500)
    v = sv.Voxels.from_points(pts, 0.25, batch=batch, reduction=reduction)
    groups = {}
    for p, b in zip(pts, batch):
        key = (int(b),) + tuple(int(x) for x in np.floor(p[:3].astype(np.float64) / 0.25))
        groups.setdefault(key, []).append(p[3:])
    assert v.num_voxels == len(groups)
    keys = sorted(groups)
    np.testing.assert_array_equal(v.coords, np.array(keys))
    red = {"mean": np.mean, "max": np.max, "sum": np.sum}[reduction]
    np.testing.assert_allclose(v.feats, np.array([red(groups[k], axis=0) for k in keys]), rtol=1e-5, atol=1e-6)
    assert v.feats.dtype == np.float32


def test_from_points_without_features_and_bad_args(rng):
    pts = rng.uniform(0, 1, (100, 3))
    v = sv.Voxels.from_points(pts, (0.5, 0.5, 1.0), reduction="sum")
    assert v.feats.shape == (v.num_voxels, 1) and v.feats.sum() == 100
    with pytest.raises(ValueError, match="voxel_size"):
        sv.Voxels.from_points(pts, 0)
    with pytest.raises(ValueError, match="reduction"):
        sv.Voxels.from_points(pts, 0.1, reduction="median")
    with pytest.raises(ValueError, match="finite"):
        sv.Voxels.from_points(np.full((2, 3), np.nan), 0.1)


def test_numpy_roundtrip_types(rng):
    v = sv.Voxels(random_voxels(rng, 40), rng.standard_normal((40, 3)).astype(np.float32))
    out = sv.spatially_sparse_conv(v, rng.standard_normal((8, 3, 2)).astype(np.float32), kernel_size=2, stride=2)
    assert isinstance(out.coords, np.ndarray) and isinstance(out.feats, np.ndarray)
    assert out.coords.dtype == np.int32


def test_torch_roundtrip_types(rng):
    torch = pytest.importorskip("torch", reason="torch not installed")
    c = random_voxels(rng, 40)
    f = rng.standard_normal((40, 3))
    w = rng.standard_normal((8, 3, 2))
    out = sv.spatially_sparse_conv(sv.Voxels(torch.from_numpy(c), torch.from_numpy(f)), torch.from_numpy(w),
                                   kernel_size=2, stride=2)
    assert isinstance(out.coords, torch.Tensor) and isinstance(out.feats, torch.Tensor)
    assert out.feats.dtype == torch.float64
    ref = dense_conv(c, f, w, 2, 2, 1, False, out.coords.numpy())
    assert rel_err(out.feats.detach().numpy(), ref) < 1e-12
    bf = sv.spatially_sparse_conv(sv.Voxels(torch.from_numpy(c), torch.from_numpy(f).bfloat16()),
                                  torch.from_numpy(w).bfloat16(), kernel_size=2, stride=2)
    assert bf.feats.dtype == torch.bfloat16


def test_jax_roundtrip_types(rng):
    jax = pytest.importorskip("jax", reason="jax not installed")
    import jax.numpy as jnp
    c = random_voxels(rng, 40)
    f = rng.standard_normal((40, 3)).astype(np.float32)
    w = rng.standard_normal((27, 3, 2)).astype(np.float32)
    out = sv.spatially_sparse_conv(sv.Voxels(jnp.asarray(c), jnp.asarray(f)), jnp.asarray(w))
    assert isinstance(out.feats, jax.Array)
    assert rel_err(np.asarray(out.feats), dense_conv(c, f, w, 3, 1, 1, False, c)) < 1e-5
    bf = sv.spatially_sparse_conv(sv.Voxels(jnp.asarray(c), jnp.asarray(f, jnp.bfloat16)), jnp.asarray(w, jnp.bfloat16))
    assert bf.feats.dtype == jnp.bfloat16


def test_triple_remembers_valid_values_only():
    """geometry.triple caches what it normalised: equal results from the cache, and values that compare
    equal to a cached one but are invalid (a bool, a float) or unhashable still go through the checks."""
    from sparsevox import geometry
    assert geometry.triple(3, "kernel_size") == (3, 3, 3) == geometry.triple(3, "kernel_size")
    assert geometry.triple((1, 2, 3), "stride") == (1, 2, 3) == geometry.triple([1, 2, 3], "stride")
    assert geometry.triple(np.int64(2), "stride") == (2, 2, 2)
    for bad in (True, 3.5, (1, 2), [0, 1, 1], 0):
        with pytest.raises(ValueError, match="kernel_size"):
            geometry.triple(bad, "kernel_size")
    assert geometry.triple(1, "dilation") == (1, 1, 1)
    with pytest.raises(ValueError, match="dilation"):
        geometry.triple(True, "dilation")
    with pytest.raises(ValueError, match=">= 2"):
        geometry.triple(1, "x", minimum=2)
