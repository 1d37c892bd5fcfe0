"""Input validation of the JAX and Flax adapters: bad input is a ValueError naming the argument and what
was expected, raised at trace time from static facts (shapes, dtypes, static fields), never an XLA
runtime error from inside a callback, a silent truncation or an empty result."""
import numpy as np
import pytest
from reference import random_voxels

import sparsevox as sv

jax = pytest.importorskip("jax", reason="jax not installed")
import jax.numpy as jnp  # noqa: E402

svj = pytest.importorskip("sparsevox.adapters.jax")


@pytest.fixture
def scene(rng):
    """Float32 JAX ``Voxels`` (4 channels), their SubM k3 map and a matching conv weight ``[27, 4, 6]``."""
    v = sv.Voxels(jnp.asarray(random_voxels(rng, 150, extent=6, batches=2)),  # 150 of 432 sites: all unique
                  jnp.asarray(rng.standard_normal((150, 4)), jnp.float32))
    return v, svj.kernel_map(v, 3), jnp.zeros((27, 4, 6), jnp.float32)


@pytest.fixture
def svf():
    pytest.importorskip("flax", reason="flax not installed")
    return pytest.importorskip("sparsevox.adapters.flax")


# --- feature functions -------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["conv", "depthwise"])
def test_feats_must_have_the_maps_rows_and_a_float_dtype(scene, op):
    v, kmap, w = scene
    fn, w = (svj.conv_features, w) if op == "conv" else (svj.depthwise_features, w[:, :, 0])
    n = kmap.num_in
    rows = rf"feats must have shape \[{n}, C\] \(kmap.num_in rows\)"
    with pytest.raises(ValueError, match=rows + r", got \(100, 4\)"):
        fn(v.feats[:100], w, kmap)
    with pytest.raises(ValueError, match=rows):
        fn(v.feats[:, 0], w, kmap)
    with pytest.raises(ValueError, match="feats dtype must be one of .*got int32"):
        fn(v.feats.astype(jnp.int32), w.astype(jnp.int32), kmap)
    # at trace time: eval_shape runs no callback, jit raises while tracing
    with pytest.raises(ValueError, match=rows):
        jax.eval_shape(fn, v.feats[:100], w, kmap)
    with pytest.raises(ValueError, match=rows):
        jax.jit(lambda f: fn(f, w, kmap))(v.feats[:100])
    assert fn(v.feats, w, kmap).shape[0] == kmap.num_out


def test_bucketed_map_feats_have_the_bucket_rows(scene):
    v, kmap, w = scene
    core = kmap._core
    bm = svj.JaxKernelMap.bucketed_from_core(core, svj.bucket_rows(core.num_in), svj.bucket_rows(core.num_out))
    padded = jnp.zeros((bm.num_in, 4), jnp.float32).at[:core.num_in].set(v.feats)
    assert svj.conv_features(padded, w, bm).shape == (bm.num_out, 6)
    for feats in (v.feats[:100], v.feats):  # fewer rows than real, and the unpadded real rows
        with pytest.raises(ValueError, match=rf"feats must have shape \[{bm.num_in}, C\] \(kmap.num_in rows\)"):
            svj.conv_features(feats, w, bm)


def test_kmap_must_be_a_jax_kernel_map(scene):
    v, kmap, w = scene
    for call in (lambda: svj.conv_features(v.feats, w, kmap._core),
                 lambda: svj.depthwise_features(v.feats, w[:, :, 0], kmap._core),
                 lambda: svj.max_pool_features(v.feats, kmap._core)):
        with pytest.raises(ValueError, match="kmap must be a JaxKernelMap .*got KernelMap"):
            call()


def test_algorithm_names_are_checked_at_trace_time(scene):
    v, kmap, w = scene
    with pytest.raises(ValueError, match="fwd_algo: unknown algorithm 'bogus'"):
        svj.conv_features(v.feats, w, kmap, fwd_algo="bogus")
    # the backward's algorithm: refused by the forward call, not at the first gradient
    with pytest.raises(ValueError, match="bwd_algo: unknown algorithm 'bogus'"):
        svj.depthwise_features(v.feats, w[:, :, 0], kmap, bwd_algo="bogus")


def test_global_pool_num_batches(scene):
    v, _, _ = scene
    batch = jnp.zeros(v.num_voxels, jnp.int32)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=f"num_batches must be an integer >= 1, got {bad!r}"):
            svj.global_pool_features(v.feats, batch, bad)
    assert svj.global_pool_features(v.feats, batch, np.int64(2)).shape == (2, 4)
    # no rows: no item either (Voxels.batch_size of empty voxels), as the core
    assert svj.global_pool_features(v.feats[:0], batch[:0], 0).shape == (0, 4)


def test_to_dense_batch_size(scene):
    v, _, _ = scene
    coords = v.coords - v.coords.min(0)
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match=f"batch_size must be an integer >= 1, got {bad!r}"):
            svj.to_dense_features(v.feats, coords, (6, 6, 6), bad)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 2.5"):
        svj.to_dense(sv.Voxels(coords, v.feats), (6, 6, 6), 2.5)
    assert svj.to_dense_features(v.feats[:0], coords[:0], (6, 6, 6), 0).shape == (0, 4, 6, 6, 6)


# --- layer classes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, match", [
    (lambda: svj.SpatiallySparseConv(4, 6, kernel_size=0), "kernel_size must be >= 1"),
    (lambda: svj.SpatiallySparseConv(4, 6, kernel_size=-3), "kernel_size must be >= 1"),
    (lambda: svj.SpatiallySparseConv(4, 6, kernel_size=(3, 3)), "kernel_size must be an int or a 3-tuple"),
    (lambda: svj.SpatiallySparseConv(4, 6, kernel_size=2.5), "kernel_size must be an int or a 3-tuple"),
    (lambda: svj.SpatiallySparseConv(4, 6, stride=0), "stride must be >= 1"),
    (lambda: svj.SpatiallySparseConv(4, 6, dilation=(1, 1, 0)), "dilation must be >= 1"),
    (lambda: svj.SpatiallySparseConv(2.5, 6), "in_channels must be an integer >= 1, got 2.5"),
    (lambda: svj.SpatiallySparseConv(4, True), "out_channels must be an integer >= 1, got True"),
    (lambda: svj.SpatiallySparseConv(4, 6, fwd_algo="bogus"), "fwd_algo: unknown algorithm"),
    (lambda: svj.SpatiallySparseDepthwiseConv(0), "^channels must be an integer >= 1, got 0"),
    (lambda: svj.SpatiallySparseDepthwiseConv(4, kernel_size=(3, 3)), "kernel_size must be an int or a 3-tuple"),
    (lambda: svj.SpatiallySparseDepthwiseConv(4, bwd_algo="bogus"), "bwd_algo: unknown algorithm"),
    (lambda: svj.init_conv(jax.random.PRNGKey(0), 4, 6, kernel_size=0), "kernel_size must be >= 1"),
    (lambda: svj.init_conv(jax.random.PRNGKey(0), 2.5, 6), "in_channels must be an integer >= 1"),
])
def test_layer_arguments_are_checked_when_made(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_layer_geometry_is_normalised():
    conv = svj.SpatiallySparseConv(4, 6, kernel_size=(3, 1, 3), stride=np.int64(2))
    assert (conv.kernel_size, conv.stride, conv.dilation) == ((3, 1, 3), (2, 2, 2), (1, 1, 1))
    assert conv.init(jax.random.PRNGKey(0))["weight"].shape == (9, 4, 6)
    assert svj.SpatiallySparseDepthwiseConv(4, kernel_size=(1, 3, 3)).init(jax.random.PRNGKey(0))["weight"].shape \
        == (9, 4)


# --- Flax ----------------------------------------------------------------------------------------------------

def test_flax_constructors_name_their_own_arguments(svf):
    from flax import nnx
    for make, match in [(lambda r: svf.MinkUNet(4, 0, rngs=r), "num_classes must be an int >= 1, got 0"),
                        (lambda r: svf.MinkUNet(0, 4, rngs=r), "in_channels must be an int >= 1, got 0"),
                        (lambda r: svf.MinkUNet(2.5, 4, rngs=r), "in_channels must be an int >= 1, got 2.5"),
                        (lambda r: svf.ResidualBlock(0, 4, rngs=r), "c_in must be an int >= 1"),
                        (lambda r: svf.ResidualBlock(4, 2.5, rngs=r), "c_out must be an int >= 1")]:
        with pytest.raises(ValueError, match=match):
            make(nnx.Rngs(0))


def test_flax_global_pool_checks_num_batches_at_the_call(svf, scene):
    v, _, _ = scene
    batch = jnp.zeros(v.num_voxels, jnp.int32)
    for bad in (0, 2.5):
        with pytest.raises(ValueError, match=f"num_batches must be an int >= 1, got {bad!r}"):
            svf.GlobalPool("avg")(v.feats, batch, num_batches=bad)
    assert svf.GlobalPool("max", np.int64(2))(v.feats, batch).shape == (2, 4)


def test_flax_batchnorm_says_what_torch_does_below_two_rows(svf):
    from flax import nnx
    bn = svf.BatchNorm(3, rngs=nnx.Rngs(0))
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match=r"got 1 \(as torch\)"):
        bn(x[:1])
    with pytest.raises(ValueError, match=r"got 0 \(torch's BatchNorm1d returns an empty result instead\)"):
        bn(x[:0])
    torch = pytest.importorskip("torch", reason="torch not installed (the claims about it)")
    tbn = torch.nn.BatchNorm1d(3).train()
    assert tbn(torch.zeros(0, 3)).shape == (0, 3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        tbn(torch.zeros(1, 3))
