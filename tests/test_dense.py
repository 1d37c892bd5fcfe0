"""``to_dense`` / ``from_dense`` against loop references, their core adjoints, every dtype (16-bit
floats move as bits), errors; GPU variants (skipped with "no GPU")."""
import numpy as np
import pytest
from segment_backends import DTYPES, host, np_dtype, quantise, to_gpu

import sparsevox as sv
from sparsevox import dense


def random_grid_voxels(rng, n, shape, batches):
    x, y, z = shape
    flat = rng.choice(batches * x * y * z, size=min(n, batches * x * y * z), replace=False)
    b, rest = np.divmod(flat, x * y * z)
    xi, rest = np.divmod(rest, y * z)
    yi, zi = np.divmod(rest, z)
    return np.stack([b, xi, yi, zi], 1).astype(np.int32)


def ref_to_dense(coords, feats, shape, batches):
    d = np.zeros((batches, feats.shape[1]) + tuple(shape))
    for (b, x, y, z), f in zip(coords.tolist(), feats):
        for c in range(feats.shape[1]):
            d[b, c, x, y, z] = f[c]
    return d


@pytest.mark.parametrize("dtype", DTYPES)
def test_to_dense_and_back(rng, dtype):
    shape = (5, 3, 4)
    coords = random_grid_voxels(rng, 40, shape, 3)
    feats = quantise(rng.standard_normal((len(coords), 3)), dtype)
    feats[feats == 0] = 1.0  # from_dense finds nonzero sites
    v = sv.Voxels(coords, feats.astype(np_dtype(dtype)))
    d = sv.to_dense(v, shape)
    nb = int(coords[:, 0].max()) + 1
    assert d.shape == (nb, 3) + shape and d.dtype == np_dtype(dtype)
    np.testing.assert_array_equal(d.astype(np.float64), ref_to_dense(coords, feats, shape, nb))
    back = sv.from_dense(d)
    order = np.lexsort(coords.T[::-1])  # from_dense returns sites sorted by (b, x, y, z)
    np.testing.assert_array_equal(back.coords, coords[order])
    np.testing.assert_array_equal(back.feats.astype(np.float64), feats[order])
    assert back.feats.dtype == np_dtype(dtype)
    assert sv.to_dense(v, shape, batch_size=nb + 2).shape[0] == nb + 2


def test_core_adjoints(rng):
    shape = (4, 4, 3)
    coords = random_grid_voxels(rng, 20, shape, 2)
    feats = rng.standard_normal((len(coords), 2))
    nb = int(coords[:, 0].max()) + 1
    g = rng.standard_normal((nb, 2) + shape)
    gf = dense.to_dense_backward(g, coords)
    want = np.array([[g[b, c, x, y, z] for c in range(2)] for b, x, y, z in coords.tolist()])
    np.testing.assert_array_equal(gf, want)
    assert np.isclose(np.sum(dense.to_dense_forward(feats, coords, shape, nb) * g), np.sum(feats * gf))
    gd = dense.from_dense_backward(feats, coords, g.shape)
    np.testing.assert_array_equal(gd, ref_to_dense(coords, feats, shape, nb))
    np.testing.assert_array_equal(dense.from_dense_forward(g, coords), want)


def test_from_dense_zero_rules_and_mask(rng):
    d = np.zeros((2, 2, 3, 3, 3), np.float32)
    d[0, 1, 1, 2, 0] = -0.0   # negative zero: inactive
    d[1, 0, 2, 2, 2] = np.nan  # NaN: active
    d[1, 1, 0, 0, 1] = 3.0
    v = sv.from_dense(d)
    np.testing.assert_array_equal(v.coords, [[1, 0, 0, 1], [1, 2, 2, 2]])
    assert v.feats[0].tolist() == [0.0, 3.0] and np.isnan(v.feats[1, 0])
    mask = np.zeros((2, 3, 3, 3), bool)
    mask[0, 1, 1, 1] = mask[1, 0, 0, 1] = True
    vm = sv.from_dense(d, mask)
    np.testing.assert_array_equal(vm.coords, [[0, 1, 1, 1], [1, 0, 0, 1]])
    np.testing.assert_array_equal(vm.feats, [[0, 0], [0, 3]])


def test_errors_name_the_argument_and_range(rng):
    v = sv.Voxels(np.array([[0, 1, 2, 3], [1, 0, -1, 0]], np.int32), np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"y coordinates must be in \[0, 3\] for spatial_shape \(4, 4, 4\), got range \[-1, 2\]"):
        sv.to_dense(v, (4, 4, 4))
    w = sv.Voxels(np.array([[0, 1, 2, 3]], np.int32), np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match=r"z coordinates must be in \[0, 2\]"):
        sv.to_dense(w, (4, 4, 3))
    with pytest.raises(ValueError, match=r"spatial_shape must be 3 ints >= 1"):
        sv.to_dense(w, (4, 4))
    with pytest.raises(ValueError, match=r"spatial_shape must be 3 ints >= 1"):
        sv.to_dense(w, (4, 0, 4))
    with pytest.raises(ValueError, match=r"batch indices must be in \[0, 0\]"):
        sv.to_dense(sv.Voxels(np.array([[1, 0, 0, 0]], np.int32), np.ones((1, 1))), (2, 2, 2), batch_size=1)
    with pytest.raises(ValueError, match=r"dense must have shape \[B, C, X, Y, Z\]"):
        sv.from_dense(np.zeros((2, 3, 3, 3)))
    with pytest.raises(ValueError, match=r"mask must have shape \(1, 2, 2, 2\)"):
        sv.from_dense(np.zeros((1, 1, 2, 2, 2)), np.zeros((2, 2, 2), bool))
    with pytest.raises(ValueError, match="dense dtype"):
        dense.from_dense_forward(np.zeros((1, 1, 2, 2, 2), np.int32), np.zeros((1, 4), np.int32))


def test_empty():
    v = sv.Voxels(np.zeros((0, 4), np.int32), np.zeros((0, 3), np.float32))
    assert sv.to_dense(v, (2, 2, 2)).shape == (0, 3, 2, 2, 2)
    e = sv.from_dense(np.zeros((1, 3, 2, 2, 2), np.float32))
    assert e.coords.shape == (0, 4) and e.feats.shape == (0, 3)


def test_torch_cpu_in_torch_out(rng):
    torch = pytest.importorskip("torch")
    coords = random_grid_voxels(rng, 10, (3, 3, 3), 2)
    f = torch.randn(len(coords), 2, dtype=torch.bfloat16)
    v = sv.Voxels(torch.as_tensor(coords), f)
    d = sv.to_dense(v, (3, 3, 3))
    assert isinstance(d, torch.Tensor) and d.dtype == torch.bfloat16
    back = sv.from_dense(d)
    assert isinstance(back.feats, torch.Tensor) and back.feats.dtype == torch.bfloat16


@pytest.fixture
def cupy():
    return pytest.importorskip("cupy")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_to_dense_and_back(cupy, rng, dtype):
    shape = (9, 5, 7)
    coords = random_grid_voxels(rng, 200, shape, 3)
    feats = quantise(rng.standard_normal((len(coords), 5)), dtype)
    feats[feats == 0] = 1.0
    v = sv.Voxels(cupy.asarray(coords), to_gpu(feats, dtype))
    d = sv.to_dense(v, shape)
    assert isinstance(d, cupy.ndarray) and d.dtype == v.feats.dtype
    nb = int(coords[:, 0].max()) + 1
    np.testing.assert_array_equal(host(d), ref_to_dense(coords, feats, shape, nb))
    back = sv.from_dense(d)
    order = np.lexsort(coords.T[::-1])
    np.testing.assert_array_equal(cupy.asnumpy(back.coords), coords[order])
    np.testing.assert_array_equal(host(back.feats), feats[order])
    g = dense.to_dense_backward(d, cupy.asarray(coords))
    np.testing.assert_array_equal(host(g), feats)
