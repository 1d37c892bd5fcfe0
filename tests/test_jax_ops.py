"""The JAX adapter's network ops (``custom_vjp`` over buffer callbacks): on the CPU the Voxels forms equal
the core's NumPy result bit for bit; the feature forms (geometry built outside jit) equal them under
``jit``; ``jax.grad`` under ``jit`` equals the core's backward functions and passes ``check_grads``
(finite differences) for every op; vmap; the emulated GPU kernels under the adapter (poisoned outputs);
GPU variants compare JAX on the GPU (float32, float16) with the core on the CPU in float64."""
import numpy as np
import pytest
from ops_cases import OPS, POOL_ARGS, VS, Scene, run_numpy
from segment_backends import TOL, poison_gpu, quantise, rel_err, use_emulator

import sparsevox as sv
from sparsevox import dense as _dense, pooling, points as _points

jax = pytest.importorskip("jax", reason="jax not installed")
import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

svj = pytest.importorskip("sparsevox.adapters.jax")

pytestmark = pytest.mark.usefixtures("jax_x64")


@pytest.fixture(autouse=True)
def _cpu_unless_marked_gpu(request):
    """The tests without the ``gpu`` mark check the adapter against the NumPy core on JAX's CPU backend,
    to the bit (the same arithmetic); on a machine with a GPU, JAX would put their arrays there, where the
    segment kernels sum in another order. The ``gpu`` tests below compare the GPU with the CPU."""
    if request.node.get_closest_marker("gpu") is not None:
        yield
        return
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def features_form(s, name, device=None):
    """``(level, fn(feats))``: op ``name`` as the adapter's feature function, with its geometry built
    here, outside jit, from concrete coordinates (what a jitted training step closes over)."""
    level = OPS[name][0]
    put = (lambda a: jax.device_put(np.asarray(a), device)) if device is not None else jnp.asarray
    v = sv.Voxels(put(s.level(level)), None)
    if name.startswith(("max_pool", "avg_pool")):
        ks, st = POOL_ARGS[name]
        kmap = svj.pool_kernel_map(v, ks, st)
        op = svj.max_pool_features if name.startswith("max") else svj.avg_pool_features
        return level, lambda f: op(f, kmap)
    if name.startswith("global_pool"):
        return level, lambda f: svj.global_pool_features(f, v.batch_index(), v.batch_size, name[12:])
    if name == "unpool":
        parent = svj.unpool_parents(v, sv.Voxels(put(s.coords), None), 2)
        return level, lambda f: svj.unpool_features(f, parent)
    if name == "devoxelize":
        idx, w = svj.devoxelize_weights(v, put(s.points), VS, put(s.pbatch))
        return level, lambda f: svj.devoxelize_features(f, idx, w)
    bsz = s.batches + 1 if name == "to_dense_batch_size" else s.batches
    coords = put(s.coords)
    return level, lambda f: svj.to_dense_features(f, coords, s.shape, bsz)


def core_vjp(s, name, feats, g):
    """The input gradient of op ``name`` by the core's backward function (NumPy, float64)."""
    v = sv.Voxels(s.level(OPS[name][0]), feats)
    if name.startswith(("max_pool", "avg_pool")):
        pmap = pooling.pool_map(sv.kernel_map(v, *pooling._pool_geometry(*POOL_ARGS[name])))
        if name.startswith("avg"):
            return pooling.avg_pool_backward(g, pmap)
        return pooling.max_pool_backward(g, pooling.max_pool_forward(feats, pmap)[1], pmap)
    if name.startswith("global_pool"):
        mode, batch = name[12:], s.coords[:, 0]
        _, arg = pooling.global_pool_forward(feats, batch, s.batches, mode)
        return pooling.global_pool_backward(g, batch, mode, arg)
    if name == "unpool":
        return pooling.unpool_backward(g, pooling.parent_rows(v, sv.Voxels(s.coords, None), 2), len(s.coarse))
    if name == "devoxelize":
        idx, w = _points.devoxelize_weights(v, s.points, VS, s.pbatch)
        return _points.devoxelize_backward(g, idx, w, len(s.coords))
    return _dense.to_dense_backward(g, s.coords)


# --- forward ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", OPS)
def test_voxels_forms_equal_core_numpy(rng, name):
    s = Scene(rng)
    level = OPS[name][0]
    feats = s.feats(level, distinct=False)
    out = OPS[name][1](s, sv.Voxels(jnp.asarray(s.level(level)), jnp.asarray(feats)), jnp.asarray)
    assert isinstance(out, jax.Array) and out.dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(out), run_numpy(s, name, feats))


@pytest.mark.parametrize("name", OPS)
def test_feature_forms_under_jit_equal_core_numpy(rng, name):
    s = Scene(rng)
    level, fn = features_form(s, name)
    feats = s.feats(level, distinct=False)
    np.testing.assert_array_equal(np.asarray(jax.jit(fn)(jnp.asarray(feats))), run_numpy(s, name, feats))


# --- gradients ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", OPS)
def test_jit_grad_equals_core_backward(rng, name):
    s = Scene(rng)
    level, fn = features_form(s, name)
    feats = s.feats(level)
    g = rng.standard_normal(run_numpy(s, name, feats).shape)
    got = jax.jit(jax.grad(lambda f: (fn(f) * g).sum()))(jnp.asarray(feats))
    assert rel_err(np.asarray(got), core_vjp(s, name, feats, g)) < 1e-13


@pytest.mark.parametrize("name", OPS)
def test_check_grads_finite_differences(rng, name):
    s = Scene(rng, n=30, extent=4, c=2, points=12)
    level, fn = features_form(s, name)
    check_grads(fn, (jnp.asarray(s.feats(level)),), order=1, modes=("rev",))


@pytest.mark.parametrize("name", ["max_pool3,2", "global_pool_max", "unpool", "devoxelize", "to_dense"])
def test_voxels_forms_under_jit_and_grad_with_closed_over_geometry(rng, name):
    """The Voxels forms (``sv.max_pool`` on JAX Voxels) trace under jit when the coordinates and points
    are concrete arrays closed over and only the features are traced."""
    s = Scene(rng)
    level, fn = OPS[name]
    const = {id(a): jnp.asarray(a) for a in (s.coords, s.coarse, s.points, s.pbatch)}
    coords = const[id(s.level(level))]
    feats = s.feats(level)
    g = rng.standard_normal(run_numpy(s, name, feats).shape)

    def loss(f):
        return (fn(s, sv.Voxels(coords, f), lambda a: const[id(a)]) * g).sum()
    got = jax.jit(jax.grad(loss))(jnp.asarray(feats))
    assert rel_err(np.asarray(got), core_vjp(s, name, feats, g)) < 1e-13
    np.testing.assert_array_equal(np.asarray(jax.grad(loss)(jnp.asarray(feats))), np.asarray(got))


def test_vmap_runs_per_element(rng):
    s = Scene(rng)
    for name in ("max_pool2,None", "avg_pool3,2", "unpool", "global_pool_sum"):
        level, fn = features_form(s, name)
        f = jnp.asarray(s.feats(level))
        out = jax.vmap(fn)(jnp.stack([f, -f]))
        np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(fn(f)))
        np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(fn(-f)))


def test_devoxelize_gradient_in_the_weights(rng):
    s = Scene(rng, n=30, extent=4, c=2, points=12)
    v = sv.Voxels(jnp.asarray(s.coords), None)
    idx, w = svj.devoxelize_weights(v, jnp.asarray(s.points), VS, jnp.asarray(s.pbatch))
    assert idx.dtype == jnp.int32 and w.dtype == jnp.float64 and idx.shape == w.shape == (12, 8)
    check_grads(lambda f, w: svj.devoxelize_features(f, idx, w), (jnp.asarray(s.feats("fine")), w), order=1,
                modes=("rev",))


# --- geometry: skips line up, maps are shared, traced geometry is refused --------------------------------

@pytest.mark.parametrize("ks,st", [(2, 2), (3, 2), ((2, 1, 3), (2, 1, 1))])
def test_pool_map_is_the_strided_convs_and_sites_line_up(rng, ks, st):
    s = Scene(rng, n=150, extent=8)
    v = sv.Voxels(jnp.asarray(s.coords), jnp.asarray(s.feats("fine")))
    assert svj.pool_kernel_map(v, ks, st) is svj.kernel_map(v, ks, st)
    k = int(np.prod(np.broadcast_to(ks, 3)))
    conv = svj.spatially_sparse_conv(v, jnp.asarray(rng.standard_normal((k, s.c, 4))), ks, st)
    for out in (svj.max_pool(v, ks, st), sv.avg_pool(v, ks, st)):
        np.testing.assert_array_equal(np.asarray(out.coords), np.asarray(conv.coords))
    both = sv.Voxels.cat(conv, sv.max_pool(v, ks, st))  # one geometry, row for row
    assert both.feats.shape == (conv.num_voxels, 4 + s.c)
    up = sv.unpool(sv.max_pool(v, 2), v)
    assert up.coords is v.coords


def test_traced_geometry_is_a_clear_error(rng):
    s = Scene(rng)
    v = sv.Voxels(jnp.asarray(s.coords), jnp.asarray(s.feats("fine")))
    with pytest.raises(ValueError, match="points must be a concrete array"):
        jax.grad(lambda p: sv.devoxelize(v, p, VS).sum())(jnp.asarray(s.points))
    with pytest.raises(ValueError, match="dense must be a concrete array.*active_sites"):
        jax.jit(lambda d: svj.from_dense(d).feats)(jnp.asarray(s.dense()))


def test_errors_name_the_argument(rng):
    s = Scene(rng)
    v = sv.Voxels(jnp.asarray(s.coords), jnp.asarray(s.feats("fine")))
    kmap = svj.pool_kernel_map(v, 2)
    with pytest.raises(ValueError, match=f"feats must have shape \\[{len(s.coords)}, C\\]"):
        svj.max_pool_features(jnp.zeros((3, 2)), kmap)
    with pytest.raises(ValueError, match="feats dtype must be one of"):
        svj.avg_pool_features(jnp.zeros((len(s.coords), 2), jnp.int32), kmap)
    with pytest.raises(ValueError, match=r"mode must be one of"):
        svj.global_pool_features(v.feats, v.batch_index(), 2, "mean")
    with pytest.raises(ValueError, match=r"batch must have shape"):
        svj.global_pool_features(v.feats, jnp.zeros(3, jnp.int32), 2)
    with pytest.raises(ValueError, match=r"idx must have shape \[_, 8\]"):
        svj.devoxelize_features(v.feats, jnp.zeros((4, 7), jnp.int32), jnp.zeros((4, 7)))
    with pytest.raises(ValueError, match=r"x coordinates must be in \[0, 1\]"):
        sv.to_dense(v, (2, 8, 8))
    with pytest.raises(Exception, match=r"x coordinates must be in \[0, 1\]"):  # inside the callback
        jax.block_until_ready(svj.to_dense_features(v.feats, v.coords, (2, 8, 8), s.batches))
    lonely = sv.Voxels(jnp.asarray([[0, 9, 9, 9]], jnp.int32), None)
    with pytest.raises(ValueError, match=r"fine voxel \[0, 9, 9, 9\] has no parent"):
        sv.unpool(sv.max_pool(v, 2), lonely)
    with pytest.raises(ValueError, match="voxels must be a sparsevox.Voxels"):
        svj.max_pool(v.feats)


def test_empty_inputs():
    v = sv.Voxels(jnp.zeros((0, 4), jnp.int32), jnp.zeros((0, 3)))

    def loss(f):
        w = sv.Voxels(v.coords, f)
        outs = [sv.max_pool(w, 2).feats, sv.avg_pool(w, 3, 2).feats, sv.global_pool(w, "max"),
                sv.unpool(w, sv.Voxels(jnp.zeros((0, 4), jnp.int32), None)).feats,
                sv.devoxelize(w, jnp.ones((4, 3)), 1.0), sv.to_dense(w, (2, 2, 2))]
        assert [o.shape for o in outs] == [(0, 3), (0, 3), (0, 3), (0, 3), (4, 3), (0, 3, 2, 2, 2)]
        return sum(o.sum() for o in outs)
    assert loss(v.feats) == 0
    assert jax.grad(loss)(v.feats).shape == (0, 3)


def test_exports_are_what_the_core_looks_up():
    for name in ("max_pool", "avg_pool", "global_pool", "unpool", "devoxelize", "to_dense", "from_dense"):
        assert name in svj.__all__ and pooling._adapter("jax", name) is getattr(svj, name)
    for name in svj.__all__:
        assert hasattr(svj, name), name


def test_direct_calls_with_numpy_voxels_are_the_core(rng):
    s = Scene(rng)
    v = sv.Voxels(s.coords, s.feats("fine"))
    np.testing.assert_array_equal(svj.max_pool(v, 2).feats, sv.max_pool(v, 2).feats)
    np.testing.assert_array_equal(svj.global_pool(v, "max"), sv.global_pool(v, "max"))
    assert isinstance(svj.to_dense(v, s.shape), np.ndarray)


# --- dense grids -------------------------------------------------------------------------------------------

def test_from_dense_forward_and_gradients(rng):
    s = Scene(rng)
    d = s.dense()
    got, want = sv.from_dense(jnp.asarray(d)), sv.from_dense(d)
    assert isinstance(got.feats, jax.Array) and got.coords.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got.coords), want.coords)
    np.testing.assert_array_equal(np.asarray(got.feats), want.feats)
    coords = svj.active_sites(jnp.asarray(d))  # outside jit: the sites depend on the values
    g = rng.standard_normal(want.feats.shape)
    gd = jax.jit(jax.grad(lambda x: (svj.from_dense_features(x, coords) * g).sum()))(jnp.asarray(d))
    np.testing.assert_array_equal(np.asarray(gd), _dense.from_dense_backward(g, want.coords, d.shape))
    check_grads(lambda x: svj.from_dense_features(x, coords), (jnp.asarray(d),), order=1, modes=("rev",))
    mask = np.abs(d).sum(1) > 0
    masked = svj.from_dense(jnp.asarray(d), jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(masked.coords), want.coords)


def test_to_dense_from_dense_round_trip(rng):
    s = Scene(rng)
    v = sv.Voxels(jnp.asarray(s.coords), jnp.asarray(s.feats("fine")))
    back = sv.from_dense(sv.to_dense(v, s.shape))
    order = np.lexsort(s.coords.T[::-1])
    np.testing.assert_array_equal(np.asarray(back.feats), np.asarray(v.feats)[order])


# --- JAX's default precision, and the emulated GPU kernels -------------------------------------------------

def test_float32_without_x64(rng):
    """Without jax_enable_x64 the interpolation weights are float32: within float32 roundoff of the core."""
    s = Scene(rng)
    jax.config.update("jax_enable_x64", False)
    try:
        feats = s.feats("fine").astype(np.float32)
        v = sv.Voxels(jnp.asarray(s.coords), jnp.asarray(feats))
        idx, w = svj.devoxelize_weights(v, jnp.asarray(s.points, jnp.float32), VS, jnp.asarray(s.pbatch, jnp.int32))
        assert w.dtype == jnp.float32 and idx.dtype == jnp.int32
        got = sv.devoxelize(v, s.points, VS, s.pbatch)
        assert got.dtype == jnp.float32
        assert rel_err(np.asarray(got), run_numpy(s, "devoxelize", feats.astype(np.float64))) < 1e-6
        np.testing.assert_array_equal(np.asarray(sv.max_pool(v, 3, 2).feats),
                                      run_numpy(s, "max_pool3,2", feats))
    finally:
        jax.config.update("jax_enable_x64", True)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", ["max_pool3,2", "avg_pool(2, 1, 3),(2, 1, 1)", "global_pool_max",
                                  "global_pool_avg", "unpool", "devoxelize", "to_dense"])
def test_emulated_gpu_kernels_under_the_adapter(monkeypatch, rng, name, dtype):
    """The segment kernels (``kernels_cu/pooling.cu`` run by the CPU emulator, outputs poisoned) inside
    the callbacks, forward and backward, match the NumPy path; dtype kept."""
    s = Scene(rng, n=80, extent=5, c=5)
    level, fn = features_form(s, name)
    feats = jnp.asarray(s.feats(level)).astype(dtype)
    g = None
    results = []
    for emulate in (False, True):
        if emulate:
            use_emulator(monkeypatch)
        out, vjp = jax.vjp(fn, feats)
        if g is None:
            g = jnp.asarray(quantise(rng.standard_normal(out.shape), dtype)).astype(dtype)
        (gf,) = vjp(g)
        assert out.dtype == gf.dtype == jnp.dtype(dtype)
        results.append((np.asarray(out.astype(jnp.float64)), np.asarray(gf.astype(jnp.float64))))
    (o0, g0), (o1, g1) = results
    assert rel_err(o1, o0) < TOL[dtype] and rel_err(g1, g0) < TOL[dtype]


# --- GPU ----------------------------------------------------------------------------------------------------

@pytest.fixture
def jax_gpu():
    if jax.default_backend() != "gpu":
        pytest.skip("jax has no GPU backend here")
    return jax.devices("gpu")[0]


@pytest.fixture
def cupy():
    return pytest.importorskip("cupy")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("name", OPS)
def test_gpu_jit_grad_matches_the_cpu(monkeypatch, cupy, jax_gpu, rng, name, dtype):
    """On the GPU (callbacks on XLA's stream, kernel outputs poisoned): jit(value_and_grad) of each op
    against the core on the CPU in float64, for the same quantised inputs."""
    poison_gpu(monkeypatch, cupy)
    s = Scene(rng, n=400, extent=10, batches=3, c=19, points=300)
    level, fn = features_form(s, name, jax_gpu)
    feats = quantise(s.feats(level, distinct=False), dtype)
    want = run_numpy(s, name, feats)
    g = quantise(rng.standard_normal(want.shape), dtype)
    gj = jax.device_put(g.astype(dtype), jax_gpu)

    def loss(f):
        out = fn(f)
        return (out.astype(jnp.float32) * gj.astype(jnp.float32)).sum(), out
    (_, out), gf = jax.jit(jax.value_and_grad(loss, has_aux=True))(jax.device_put(feats.astype(dtype), jax_gpu))
    assert next(iter(out.devices())).platform == "gpu" and out.dtype == jnp.dtype(dtype) == gf.dtype
    assert rel_err(np.asarray(out.astype(jnp.float32)), want) < TOL[dtype]
    assert rel_err(np.asarray(gf.astype(jnp.float32)), core_vjp(s, name, feats, g)) < TOL[dtype]


@pytest.mark.gpu
def test_gpu_voxels_forms_and_from_dense(cupy, jax_gpu, rng):
    s = Scene(rng, n=400, extent=10, batches=3, c=7)
    put = lambda a: jax.device_put(np.asarray(a), jax_gpu)  # noqa: E731
    v = sv.Voxels(put(s.coords), put(s.feats("fine").astype(np.float32)))
    pooled = sv.max_pool(v, 3, 2)
    assert next(iter(pooled.feats.devices())).platform == "gpu"
    np.testing.assert_array_equal(np.asarray(pooled.feats), run_numpy(s, "max_pool3,2", s.feats("fine")))
    d = s.dense().astype(np.float32)
    got = sv.from_dense(put(d))
    np.testing.assert_array_equal(np.asarray(got.coords), sv.from_dense(d).coords)
    np.testing.assert_array_equal(np.asarray(got.feats), sv.from_dense(d).feats)
