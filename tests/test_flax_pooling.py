"""Flax NNX pooling modules (sparsevox.adapters.flax: MaxPool3d, AvgPool3d, GlobalPool, Unpool) on the
CPU: against the NumPy core ops and direct NumPy computations, under nnx.jit and jax.grad, with exact
and bucketed maps."""
import numpy as np
import pytest
from reference import random_voxels

import sparsevox as sv
from sparsevox import pooling

jax = pytest.importorskip("jax", reason="jax not installed")
pytest.importorskip("flax", reason="flax not installed")
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

svf = pytest.importorskip("sparsevox.adapters.flax")
pytestmark = pytest.mark.usefixtures("jax_x64")  # float64 against the NumPy core (tests/conftest.py)


def _voxels(rng, n=300, extent=9, batches=2, c=5):
    coords = random_voxels(rng, n, extent=extent, batches=batches)
    return coords, rng.standard_normal((len(coords), c))


@pytest.mark.parametrize("cls,core_fwd", [(svf.MaxPool3d, pooling.max_pool_forward),
                                          (svf.AvgPool3d, pooling.avg_pool_forward)])
@pytest.mark.parametrize("ks,st", [(2, None), (3, 2)])
def test_local_pooling_matches_the_core_forward_and_backward(rng, cls, core_fwd, ks, st):
    coords, feats = _voxels(rng)
    v = sv.Voxels(jnp.asarray(coords), jnp.asarray(feats))
    pool = cls(ks, st)
    maps = svf.level_maps(v, pool)
    assert list(maps.maps) == [pool.map_key] == [svf.map_key(pool.kernel_size, pool.stride, (1, 1, 1), False, False)]
    out = nnx.jit(lambda p, x, m: p(x, m))(pool, v.feats, maps)
    core = sv.kernel_map(sv.Voxels(coords, feats), pool.kernel_size, pool.stride)
    pmap = pooling.pool_map(core)
    want = core_fwd(feats, pmap)
    want = want[0] if isinstance(want, tuple) else want
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-12, atol=0)
    w = rng.standard_normal(want.shape)
    g = jax.grad(lambda x: (pool(x, maps) * w).sum())(v.feats)
    if cls is svf.MaxPool3d:
        _, arg = pooling.max_pool_forward(feats, pmap)
        g_want = pooling.max_pool_backward(w, arg, pmap)
    else:
        g_want = pooling.avg_pool_backward(w, pmap)
    np.testing.assert_allclose(np.asarray(g), g_want, rtol=1e-12, atol=1e-15)
    # the output sites are the strided convolution's: the same map (and rows) as a conv of that geometry
    conv = svf.SparseConv(5, 3, pool.kernel_size, stride=pool.stride, rngs=nnx.Rngs(0))
    assert conv.map_key == pool.map_key and svf.level_maps(v, conv, pool).maps.keys() == {pool.map_key}


def test_pooling_in_a_sequence_moves_the_sites(rng):
    coords, feats = _voxels(rng)
    v = sv.Voxels(jnp.asarray(coords), jnp.asarray(feats))
    rngs = nnx.Rngs(0)
    ok = svf.SparseSequential(svf.SparseConv(5, 8, 3, rngs=rngs), jax.nn.relu, svf.MaxPool3d(2), jax.nn.relu)
    out = ok(v.feats, ok.kernel_maps(v))
    assert out.shape == (sv.kernel_map(sv.Voxels(coords, feats), 2, 2).num_out, 8)
    bad = svf.SparseSequential(svf.MaxPool3d(2), svf.SparseConv(5, 8, 3, rngs=rngs))
    with pytest.raises(ValueError, match="changed the sites"):
        bad(v.feats, bad.kernel_maps(v))
    with pytest.raises(ValueError, match="needs LevelMaps or a JaxKernelMap"):
        svf.MaxPool3d(2)(v.feats, None)


@pytest.mark.parametrize("mode", ["avg", "max", "sum"])
def test_global_pool_per_item_exact_and_bucketed(rng, mode):
    coords, feats = _voxels(rng, batches=3)
    v = sv.Voxels(jnp.asarray(coords), jnp.asarray(feats))
    gp = svf.GlobalPool(mode, num_batches=3)
    reduce = {"avg": np.mean, "max": np.max, "sum": np.sum}[mode]
    want = np.stack([reduce(feats[coords[:, 0] == b], axis=0) for b in range(3)])
    exact = svf.level_maps(v)
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x, maps: m(x, maps))(gp, v.feats, exact)), want,
                               rtol=1e-12)
    bucketed = svf.level_maps(v, bucket=True)
    xb = bucketed.pad(v.feats) + jnp.where(bucketed.mask()[:, None], 0.0, 50.0)  # padding must not count
    got = gp(xb, bucketed)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12)
    g = jax.grad(lambda x: gp(x, bucketed).sum())(xb)
    assert not np.asarray(g[len(coords):]).any()  # no gradient to padding rows
    # the batch column may be passed directly, num_batches at the call
    np.testing.assert_allclose(np.asarray(svf.GlobalPool(mode)(v.feats, jnp.asarray(coords[:, 0]), num_batches=3)),
                               want, rtol=1e-12)


def test_global_pool_arguments_are_checked(rng):
    coords, feats = _voxels(rng)
    v = sv.Voxels(jnp.asarray(coords), jnp.asarray(feats))
    with pytest.raises(ValueError, match="mode must be one of"):
        svf.GlobalPool("median")
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_batches must be an int >= 1"):
            svf.GlobalPool("avg", num_batches=bad)
    with pytest.raises(ValueError, match="GlobalPool needs num_batches"):
        svf.GlobalPool("avg")(v.feats, svf.level_maps(v))


def test_unpool_gives_each_fine_voxel_its_parent(rng):
    coords, feats = _voxels(rng)
    fine = sv.Voxels(jnp.asarray(coords), jnp.asarray(feats))
    pool, up = svf.MaxPool3d(2), svf.Unpool(2)
    coarse_feats = pool(fine.feats, svf.level_maps(fine, pool))
    coarse = svf.coarser(fine, 2, 2)
    parent = up.parents(coarse, fine)
    c_coarse = np.asarray(coarse.coords)
    key = {tuple(r): i for i, r in enumerate(c_coarse.tolist())}
    want_parent = [key[(c[0], c[1] // 2, c[2] // 2, c[3] // 2)] for c in coords.tolist()]
    assert np.asarray(parent).tolist() == want_parent
    out = nnx.jit(lambda m, x, p: m(x, p))(up, coarse_feats, parent)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(coarse_feats)[want_parent])
    g = jax.grad(lambda x: up(x, parent).sum())(coarse_feats)
    np.testing.assert_array_equal(np.asarray(g)[:, 0], np.bincount(want_parent, minlength=len(c_coarse)))


def test_global_pool_still_refuses_batch_indices_out_of_range(rng):
    """Only padding rows (batch -1) are set aside; an index >= num_batches or another negative one is
    the core's ValueError, not a silently dropped row."""
    x = jnp.asarray(rng.standard_normal((4, 3)))
    for batch in ([0, 0, 1, 1], [0, -3, 0, 0]):
        with pytest.raises(Exception, match="batch indices must be in"):
            jax.block_until_ready(svf.GlobalPool("sum", num_batches=1)(x, jnp.asarray(batch)))
