"""The JAX adapter on the CPU: custom_vjp under jit and grad, check_grads, pytrees, module API."""
import numpy as np
import pytest
from reference import dense_conv, dense_conv_grads, rel_err

import sparsevox as sv
from sparsevox.testing import KINDS

jax = pytest.importorskip("jax", reason="jax not installed")
import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

svj = pytest.importorskip("sparsevox.adapters.jax")
from jax_cases import scene  # noqa: E402


pytestmark = pytest.mark.usefixtures("jax_x64")


def _case(rng, kind):
    v, out_v, geo, out_coords = scene(rng, kind)
    ks, s, tr, gen = geo["kernel_size"], geo["stride"], geo["transposed"], geo["generative"]
    w = rng.standard_normal((ks ** 3, 3, 2))
    kmap = svj.kernel_map(v, ks, s, 1, tr, gen, out_v)
    return v, jnp.asarray(w), kmap, (ks, s, tr), out_coords


@pytest.mark.parametrize("kind", KINDS)
def test_jit_grad_matches_oracle(rng, kind):
    v, w, kmap, (ks, s, tr), out_coords = _case(rng, kind)
    g = jnp.asarray(rng.standard_normal((kmap.num_out, 2)))

    @jax.jit
    def loss(f, w):
        return (svj.conv_features(f, w, kmap) * g).sum()

    gf, gw = jax.grad(loss, argnums=(0, 1))(v.feats, w)
    rgf, rgw = dense_conv_grads(np.asarray(v.coords), np.asarray(v.feats), np.asarray(w), np.asarray(g), ks, s, 1,
                                tr, out_coords)
    assert rel_err(gf, rgf) < 1e-12 and rel_err(gw, rgw) < 1e-12
    out = jax.jit(svj.conv_features)(v.feats, w, kmap)
    assert rel_err(out, dense_conv(np.asarray(v.coords), np.asarray(v.feats), np.asarray(w), ks, s, 1, tr,
                                   out_coords)) < 1e-12


def test_check_grads(rng):
    v, w, kmap, _, _ = _case(rng, "strided")
    check_grads(lambda f, w: svj.conv_features(f, w, kmap), (v.feats, w), order=1, modes=("rev",))
    dw = jnp.asarray(rng.standard_normal((8, 3)))
    check_grads(lambda f, w: svj.depthwise_features(f, w, kmap), (v.feats, dw), order=1, modes=("rev",))


def test_vmap_sequential(rng):
    v, w, kmap, _, _ = _case(rng, "submanifold")
    fs = jnp.stack([v.feats, 2 * v.feats])
    out = jax.vmap(lambda f: svj.conv_features(f, w, kmap))(fs)
    np.testing.assert_allclose(out[1], 2 * out[0], rtol=1e-12)


def test_voxels_is_a_pytree_and_module_api(rng):
    v, _, kmap, _, _ = _case(rng, "submanifold")
    leaves = jax.tree_util.tree_leaves(v)
    assert len(leaves) == 2
    params = svj.init_conv(jax.random.PRNGKey(0), 3, 4, kernel_size=3, dtype=jnp.float64)
    assert params["weight"].shape == (27, 3, 4)
    out = jax.jit(svj.apply_conv)(params, v.feats, kmap)
    ref = svj.conv_features(v.feats, params["weight"], kmap) + params["bias"]
    np.testing.assert_allclose(out, ref)
    with pytest.raises(ValueError, match="K=27"):
        svj.conv_features(v.feats, jnp.zeros((8, 3, 4)), kmap)


def test_layer_classes_init_apply(rng):
    v, _, kmap, _, _ = _case(rng, "submanifold")
    conv = svj.SpatiallySparseConv(3, 4, dtype=jnp.float64)
    p = conv.init(jax.random.PRNGKey(0))
    np.testing.assert_allclose(jax.jit(conv.apply)(p, v.feats, kmap),
                               svj.conv_features(v.feats, p["weight"], kmap) + p["bias"])
    dw = svj.SpatiallySparseDepthwiseConv(3, dtype=jnp.float64)
    q = dw.init(jax.random.PRNGKey(1))
    assert q["weight"].shape == (27, 3)
    full = np.stack([np.diag(w) for w in np.asarray(q["weight"])])  # depthwise = diagonal dense weights
    ref = dense_conv(np.asarray(v.coords), np.asarray(v.feats), full, 3, 1, 1, False, np.asarray(v.coords))
    assert rel_err(np.asarray(dw.apply(q, v.feats, kmap)) - np.asarray(q["bias"]), ref) < 1e-12
    with pytest.raises(ValueError, match="in_channels"):
        svj.SpatiallySparseConv(0, 4)


def test_closed_over_and_argument_maps_reuse_the_core_map(rng):
    """jit embeds a closed-over map as constants (a copy of its arrays), and on the CPU ``from_core``
    copies too; the callback must still find the core map (and its cached tables) instead of wrapping
    a new KernelMap on every call."""
    from sparsevox.kernel_map import recall_stats
    v, w, kmap, (ks, s, tr), out_coords = _case(rng, "submanifold")
    closed = jax.jit(lambda f, w: svj.conv_features(f, w, kmap))
    as_arg = jax.jit(svj.conv_features)
    grad = jax.jit(jax.grad(lambda f, w: svj.conv_features(f, w, kmap).sum(), (0, 1)))
    misses = recall_stats["misses"]
    for _ in range(3):
        a, b = closed(v.feats, w), as_arg(v.feats, w, kmap)
        jax.block_until_ready(grad(v.feats, w))
    assert recall_stats["misses"] == misses
    ref = dense_conv(np.asarray(v.coords), np.asarray(v.feats), np.asarray(w), ks, s, 1, tr, out_coords)
    assert rel_err(a, ref) < 1e-12 and rel_err(b, ref) < 1e-12


def test_a_map_of_a_temporary_voxels_keeps_its_core_map(rng):
    """``svj.kernel_map(Voxels(...), 3)`` with the Voxels dropped at once: the JAX map the user holds
    must keep the core map (and its cached tables) alive, so calls do not rebuild them."""
    import gc

    from sparsevox.kernel_map import recall_stats
    v, w, _, _, _ = _case(rng, "submanifold")
    kmap = svj.kernel_map(sv.Voxels(v.coords, v.feats), 3)
    gc.collect()
    assert kmap.source.ref() is not None
    fwd = jax.jit(svj.conv_features)
    fwd(v.feats, w, kmap).block_until_ready()
    misses = recall_stats["misses"]
    for _ in range(3):
        fwd(v.feats, w, kmap).block_until_ready()
    assert recall_stats["misses"] == misses
    copy = jax.tree_util.tree_map(lambda a: a, kmap)  # pytree copies carry only the weak source
    assert not hasattr(copy, "_core") and copy.source is kmap.source


def test_a_changed_copy_is_not_taken_for_its_source_map(rng):
    """Same static source, different arrays (a user's edit): the callback must use the arrays it got."""
    import dataclasses
    v, w, kmap, (ks, s, tr), out_coords = _case(rng, "submanifold")
    counts = np.diff(kmap.offsets)
    assert counts.max() > 1
    j = int(np.argmax(counts > 1))  # an offset with several pairs (the draw decides which)
    # reverse the pairs of offset j: still a valid map, different result
    seg = slice(kmap.offsets[j], kmap.offsets[j + 1])
    edited = dataclasses.replace(kmap, in_maps=kmap.in_maps.at[seg].set(kmap.in_maps[seg][::-1]))
    assert edited.source is kmap.source
    got = jax.jit(svj.conv_features)(v.feats, w, edited)
    f, wn = np.asarray(v.feats), np.asarray(w)
    im, om = np.asarray(edited.in_maps), np.asarray(edited.out_maps)
    want = np.zeros((kmap.num_out, wn.shape[2]))
    for kk in range(len(kmap.offsets) - 1):
        lo, hi = kmap.offsets[kk], kmap.offsets[kk + 1]
        np.add.at(want, om[lo:hi], f[im[lo:hi]] @ wn[kk])
    assert rel_err(got, want) < 1e-12
    assert rel_err(got, dense_conv(np.asarray(v.coords), f, wn, ks, s, 1, tr, out_coords)) > 1e-6


@pytest.mark.parametrize("op", ["conv", "depthwise"])
@pytest.mark.parametrize("stride", [1, 2])
def test_bucketed_map_matches_the_exact_one_under_jit_and_grad(rng, op, stride):
    """A bucketed map (rows and pairs padded to buckets, issue 20): the real rows of the output and of the
    features' gradient equal the unbucketed map's, the padding rows are zeros (NaN-poisoned padding
    features must not leak), and the weight gradient is the same."""
    from reference import random_voxels
    v = sv.Voxels(jnp.asarray(random_voxels(rng, 500, extent=10, batches=2)), None)
    core = sv.kernel_map(v, 3 if stride == 1 else 2, stride)
    exact = svj.JaxKernelMap.from_core(core)
    n_in, n_out = svj.bucket_rows(core.num_in), svj.bucket_rows(core.num_out)
    bm = svj.JaxKernelMap.bucketed_from_core(core, n_in, n_out)
    assert (bm.num_in, bm.num_out, len(bm.offsets)) == (n_in, n_out, core.num_offsets + 1) and bm.bucketed
    k = core.num_offsets
    x = jnp.asarray(rng.standard_normal((core.num_in, 6)))
    w = jnp.asarray(rng.standard_normal((k, 6, 5) if op == "conv" else (k, 6)))
    fn = svj.conv_features if op == "conv" else svj.depthwise_features
    xp = jnp.full((n_in, 6), jnp.nan).at[:core.num_in].set(x)
    f = jax.jit(fn)
    out, out_b = f(x, w, exact), f(xp, w, bm)
    assert out_b.shape == (n_out, out.shape[1])
    assert rel_err(out_b[:core.num_out], out) < 1e-12 and not bool(jnp.any(out_b[core.num_out:]))
    g = jnp.asarray(rng.standard_normal(out.shape))
    gp = jnp.zeros((n_out, out.shape[1])).at[:core.num_out].set(g)
    gx, gw = jax.jit(jax.grad(lambda a, b: (fn(a, b, exact) * g).sum(), argnums=(0, 1)))(x, w)
    gx_b, gw_b = jax.jit(jax.grad(lambda a, b: (fn(a, b, bm) * gp).sum(), argnums=(0, 1)))(xp, w)
    assert rel_err(gx_b[:core.num_in], gx) < 1e-12 and not bool(jnp.any(gx_b[core.num_in:]))
    assert rel_err(gw_b, gw) < 1e-12


def test_bucketed_map_must_hold_the_real_rows(rng):
    from reference import random_voxels
    core = sv.kernel_map(sv.Voxels(jnp.asarray(random_voxels(rng, 300, extent=8)), None), 3)
    with pytest.raises(ValueError, match="must hold the map's own"):
        svj.JaxKernelMap.bucketed_from_core(core, core.num_in - 1, core.num_out)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("stride", [1, 2])
def test_gpu_fresh_bucketed_maps_launch_from_the_signatures_plan(rng, dtype, stride):
    """Bucketed maps on the GPU (written 2026-12-05 without a GPU): the first map of a layer signature runs
    the core call and keeps its plan under the signature; the next fresh maps (other scans) make their
    launch objects from that plan (kept on their core maps) and write the real rows into XLA's buffers,
    the padding rows zero. Forward and both gradients against the float64 oracle, NaN-poisoned padding."""
    from reference import TOL, dense_conv_grads, random_voxels
    ks = 3 if stride == 1 else 2
    w64 = rng.standard_normal((ks ** 3, 8, 12)) / np.sqrt(ks ** 3 * 8)
    w = jnp.asarray(w64, dtype)
    keys = [("jax.bucketed." + d, dtype, 8, w.shape, None, sv.allow_tf32()) for d in ("fwd", "dgrad", "wgrad")]
    for scan in range(3):
        c = random_voxels(rng, 900 + 37 * scan, extent=12, batches=2)
        v = sv.Voxels(jnp.asarray(c), None)
        core = sv.kernel_map(v, ks, stride)
        bm = svj.JaxKernelMap.bucketed_from_core(core, svj.bucket_rows(core.num_in), svj.bucket_rows(core.num_out))
        x64 = rng.standard_normal((core.num_in, 8))
        g64 = rng.standard_normal((core.num_out, 12))
        xp = jnp.full((bm.num_in, 8), jnp.nan, dtype).at[:core.num_in].set(jnp.asarray(x64, dtype))
        gp = jnp.zeros((bm.num_out, 12), dtype).at[:core.num_out].set(jnp.asarray(g64, dtype))
        out, vjp = jax.vjp(lambda a, b: svj.conv_features(a, b, bm), xp, w)
        gx, gw = vjp(gp)
        assert not bool(jnp.any(out[core.num_out:])) and not bool(jnp.any(gx[core.num_in:]))
        xr, wr, gr = (np.asarray(a, np.float64) for a in (xp[:core.num_in], w, gp[:core.num_out]))
        out_c = np.asarray(sv.Voxels.from_core_coords(core.out_coords, None, v.origin).coords) if stride > 1 else c
        rgx, rgw = dense_conv_grads(c, xr, wr, gr, ks, stride, 1, False, out_c)
        want_out = dense_conv(c, xr, wr, ks, stride, 1, False, out_c)
        for got, want in ((out[:core.num_out], want_out), (gx[:core.num_in], rgx), (gw, rgw)):
            assert rel_err(np.asarray(got, np.float64), want) < TOL[dtype]
        if scan:  # a later scan: launch objects made from the signature's plan, no core call of its own
            assert all(core.derived.get(k) for k in keys), {k[0]: core.derived.get(k) for k in keys}


def test_bucketed_plans_pass_from_one_fresh_map_to_the_next(monkeypatch):
    """The host rule of the bucketed GPU path (its kernels run only on a GPU): the first map of a signature
    has no launch object and no plan; after its core call the plan is kept under the signature, and the
    next map of the same layer (row counts in the same buckets) gets its launch object made from that plan,
    kept on the map; a map of another bucket or another channel count does not."""
    import types

    from sparsevox.tuning import tune_cache

    def core_map(n_in, n_out):
        return types.SimpleNamespace(num_in=n_in, num_out=n_out, num_offsets=27, kind="submanifold", stride=(1, 1, 1),
                                     in_maps=types.SimpleNamespace(device=types.SimpleNamespace(id=0)), derived={})
    made = []
    monkeypatch.setattr(sv.conv, "remember_prepared", lambda kmap, key, op, d, f, w, algo: ("algo", {"d": d}))
    monkeypatch.setattr(sv.conv, "prepare_choice",
                        lambda choice, d, dt, ci, co, kmap, dev: made.append((choice, d, dt, ci, co)) or f"launch-{d}")
    monkeypatch.setattr(tune_cache, "plans", {})
    f, w = np.zeros((700, 8), np.float32), np.zeros((27, 8, 12), np.float32)
    first, second, other_bucket = core_map(700, 700), core_map(720, 720), core_map(3000, 3000)
    for d in ("fwd", "dgrad", "wgrad"):
        n_made = len(made)
        prep, key = svj._bucketed_prep(first, d, "float32", 8, w.shape, None)
        assert prep is None and len(made) == n_made
        svj._bucketed_remember(first, key, d, f, w, None)
        prep, key2 = svj._bucketed_prep(second, d, "float32", 8, w.shape, None)
        assert key2 == key and prep == f"launch-{d}" and second.derived[key] == prep
        assert made[-1] == (("algo", {"d": d}), d, "float32", 8, 12)
        assert svj._bucketed_prep(other_bucket, d, "float32", 8, w.shape, None)[0] is None
        assert svj._bucketed_prep(second, d, "float32", 16, (27, 16, 12), None)[0] is None
