"""The Flax NNX MinkUNet on the CPU: its levels and maps, the same shapes as the torch MinkUNet, the same
logits, running statistics and gradients as torch's with copied weights (float64), nnx.jit equal to
eager, and training steps (the example) that reduce the loss."""
import sys
from pathlib import Path

import numpy as np
import pytest
from reference import random_voxels, rel_err

import sparsevox as sv

pytest.importorskip("flax", reason="flax not installed")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

svf = pytest.importorskip("sparsevox.adapters.flax")
from sparsevox.adapters import jax as svj  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not an installed package
from benchmarks.end_to_end import calibrate_batchnorm  # noqa: E402

SMALL = (8, 8, 8, 16, 16, 16, 8, 8, 8)


def _torch():
    torch = pytest.importorskip("torch", reason="torch not installed (the twin the model is judged against)")
    torch.set_num_threads(1)  # a shared 2-core machine
    return torch, pytest.importorskip("sparsevox.adapters.torch")


def _voxels(rng, n=400, extent=10, batches=2, c=4, shift=0, dtype=jnp.float64):
    coords = random_voxels(rng, n, extent=extent, batches=batches)
    coords[:, 1:] += shift
    return sv.Voxels(jnp.asarray(coords), jnp.asarray(rng.standard_normal((len(coords), c)), dtype))


def _levels(coords, n):
    """Voxel counts of levels 0..n: unique floor(c / 2^l) per batch."""
    c = np.asarray(coords, np.int64)
    return [len(np.unique(np.concatenate([c[:, :1], c[:, 1:] >> lvl], 1), axis=0)) for lvl in range(n + 1)]


def _cross_entropy(logits, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1).mean()


def _param_grads_by_torch_name(model, grads):
    """Gradients (an nnx State of the Params) under torch's parameter names."""
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    merged = svf.torch_state_dict(nnx.merge(graphdef, grads, rest))
    return {k: v for k, v in merged.items() if not k.endswith(("running_mean", "running_var"))}


# --- shapes and levels ---------------------------------------------------------------------------------

def test_default_shape_is_the_torch_shape(rng):
    torch, svt = _torch()
    net = svf.MinkUNet(4, 20, rngs=nnx.Rngs(0))
    assert net.widths == (32, 32, 64, 128, 256, 256, 128, 96, 96) and net.blocks == (2,) * 8
    tstate = {k: tuple(t.shape) for k, t in svt.MinkUNet(4, 20).state_dict().items()
              if not k.endswith("num_batches_tracked")}
    fstate = {k: a.shape for k, a in svf.torch_state_dict(net).items()}
    assert fstate == tstate  # every parameter and statistic, by torch name, in torch's layout
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(nnx.state(net, nnx.Param)))
    assert 21.5e6 < n_params < 22e6  # SPVNAS MinkUNet (cr 1): 21.7M
    assert float(jnp.abs(net.classifier.kernel[...]).max()) <= 1 / np.sqrt(96)  # torch's Linear init


def test_kernel_maps_per_level_and_forward_shapes(rng):
    v = _voxels(rng, n=500, extent=12, dtype=jnp.float32)
    net = svf.MinkUNet(4, 20, widths=SMALL, rngs=nnx.Rngs(0))
    maps = net.kernel_maps(v)
    counts = _levels(np.asarray(v.coords), 4)
    assert isinstance(maps, tuple) and [m.num_sites for m in maps] == counts
    # 1x1 maps only where a block changes channels: every decoder level (the concatenation), and the
    # encoder's 8 -> 16 at level 2; level 4's blocks keep 16 channels
    assert [sorted(m.maps) for m in maps] == [["k1", "k2_s2", "k3"]] + [["k1", "k2_s2", "k2_s2_transposed", "k3"]] * 3 \
        + [["k2_s2_transposed", "k3"]]
    for lvl, m in enumerate(maps):
        for key, k in m.maps.items():
            assert k.num_in == counts[lvl], (lvl, key)
            out = {"k2_s2": counts[min(lvl + 1, 4)], "k2_s2_transposed": counts[lvl - 1]}.get(key, counts[lvl])
            assert k.num_out == out, (lvl, key)
    np.testing.assert_array_equal(maps[0].batch, np.asarray(v.coords)[:, 0])
    assert maps[0].maps["k3"] is svj.kernel_map(v, 3)  # cached on the input Voxels
    assert net.kernel_maps(v)[2].maps["k3"] is maps[2].maps["k3"]  # levels too: nothing is rebuilt
    logits = net(v.feats, maps)
    assert logits.shape == (v.num_voxels, 20) and logits.dtype == jnp.float32
    np.testing.assert_allclose(net(v), logits, rtol=1e-6, atol=1e-6)  # Voxels in, maps built there


# --- the torch twin ------------------------------------------------------------------------------------

@pytest.mark.usefixtures("jax_x64")
@pytest.mark.parametrize("blocks", [1, (2, 1, 1, 2, 1, 2, 1, 2)])
def test_same_logits_statistics_and_gradients_as_torch(rng, blocks):
    torch, svt = _torch()
    v = _voxels(rng, n=400, extent=12, shift=-3)
    tv = sv.Voxels(torch.from_numpy(np.array(v.coords)), torch.from_numpy(np.array(v.feats)))
    torch.manual_seed(int(rng.integers(1 << 31)))
    tnet = svt.MinkUNet(4, 5, widths=SMALL, blocks=blocks).double()
    calibrate_batchnorm(tnet, tv)
    net = svf.MinkUNet(4, 5, widths=SMALL, blocks=blocks, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    svf.load_torch_state_dict(net, tnet.state_dict())
    maps = net.kernel_maps(v)
    forward = nnx.jit(lambda m, f, maps: m(f, maps))

    tnet.eval()
    net.eval()
    with torch.no_grad():
        ref = tnet(tv).numpy()
    assert rel_err(forward(net, v.feats, maps), ref) < 1e-12  # the architecture is torch's

    labels = rng.integers(0, 5, v.num_voxels)
    tnet.train()
    net.train()
    tlogits = tnet(tv)
    torch.nn.functional.cross_entropy(tlogits, torch.from_numpy(labels)).backward()
    loss_grad = nnx.jit(nnx.value_and_grad(lambda m, f, maps: _cross_entropy(m(f, maps), jnp.asarray(labels))))
    loss, grads = loss_grad(net, v.feats, maps)
    tloss = torch.nn.functional.cross_entropy(tlogits.detach(), torch.from_numpy(labels))
    assert abs(float(loss) - float(tloss)) < 1e-12
    fstate, tstate = svf.torch_state_dict(net), tnet.state_dict()
    for k in fstate:  # the running statistics moved as torch's did (one train step, unbiased variance)
        assert rel_err(fstate[k], tstate[k].numpy()) < 1e-12, k
    fgrads = _param_grads_by_torch_name(net, grads)
    tgrads = {k: p.grad.numpy() for k, p in tnet.named_parameters()}
    assert fgrads.keys() == tgrads.keys()
    for k in tgrads:
        assert rel_err(fgrads[k], tgrads[k]) < 1e-10, k


# --- jit, gradients, training ------------------------------------------------------------------------

@pytest.mark.usefixtures("jax_x64")
def test_jit_gives_the_eager_result(rng):
    v = _voxels(rng, n=300, extent=10)
    net = svf.MinkUNet(4, 3, widths=SMALL, blocks=1, param_dtype=jnp.float64, rngs=nnx.Rngs(1))
    maps = net.kernel_maps(v)
    labels = jnp.asarray(rng.integers(0, 3, v.num_voxels))
    twin = nnx.clone(net)
    eager = net(v.feats, maps)  # train mode: batch statistics; both update their running statistics
    jitted = nnx.jit(lambda m, f, maps: m(f, maps))(twin, v.feats, maps)
    assert rel_err(jitted, eager) < 1e-12
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(net, nnx.BatchStat)),
                              nnx.to_flat_state(nnx.state(twin, nnx.BatchStat))):
        assert rel_err(b[...], a[...]) < 1e-12, p
    loss = lambda m, f, maps: _cross_entropy(m(f, maps), labels)  # noqa: E731
    g_eager = nnx.grad(loss)(net, v.feats, maps)
    g_jit = nnx.jit(nnx.grad(loss))(twin, v.feats, maps)
    for (p, a), (_, b) in zip(nnx.to_flat_state(g_eager), nnx.to_flat_state(g_jit)):
        assert rel_err(b[...], a[...]) < 1e-10, p
    net.eval()
    twin.eval()
    assert rel_err(nnx.jit(lambda m, f, maps: m(f, maps))(twin, v.feats, maps), net(v.feats, maps)) < 1e-12


def test_gradients_reach_every_parameter(rng):
    v = _voxels(rng, n=300, extent=10, dtype=jnp.float32)
    net = svf.MinkUNet(4, 7, widths=SMALL, blocks=(1, 1, 1, 2, 1, 1, 1, 2), rngs=nnx.Rngs(2))
    labels = jnp.asarray(rng.integers(0, 7, v.num_voxels))
    grads = nnx.jit(nnx.grad(lambda m, f, maps: _cross_entropy(m(f, maps), labels)))(net, v.feats, net.kernel_maps(v))
    flat = nnx.to_flat_state(grads)
    n_params = len(jax.tree_util.tree_leaves(nnx.state(net, nnx.Param)))
    assert len(flat) == n_params
    missing = [p for p, g in flat if not bool(jnp.isfinite(g[...]).all()) or float(jnp.abs(g[...]).sum()) == 0]
    assert not missing, missing


@pytest.mark.parametrize("sgd", [False, True])
def test_training_example_reduces_the_loss(sgd):
    if not sgd:
        pytest.importorskip("optax", reason="optax not installed (the SGD case runs without it)")
    from sparsevox.examples import flax_train
    ratio = flax_train.main(["--steps", "6", "--crop", "2"] + (["--sgd"] if sgd else []))
    assert ratio < 0.7


@pytest.mark.usefixtures("jax_x64")
def test_row_order_follows_the_input(rng):
    """Logits are per row: permuting the input's rows permutes the logits (eval mode, eager)."""
    v = _voxels(rng, n=300, extent=10)
    net = svf.MinkUNet(4, 5, widths=SMALL, blocks=1, param_dtype=jnp.float64, rngs=nnx.Rngs(3))
    net.eval()
    ref = net(v)
    perm = rng.permutation(v.num_voxels)
    out = net(sv.Voxels(v.coords[perm], v.feats[perm]))
    assert rel_err(out, ref[perm]) < 1e-12


def test_bfloat16_computation_runs_and_stays_near_float32(rng):
    """A smoke check of ``dtype=bfloat16`` (float32 params): bfloat16 logits within a few percent of
    float32's (bfloat16 keeps ~3 digits; about 30 layers round in it)."""
    v = _voxels(rng, n=300, extent=10, dtype=jnp.float32)
    kw = dict(widths=SMALL, blocks=1, rngs=nnx.Rngs(4))
    half = svf.MinkUNet(4, 5, dtype=jnp.bfloat16, **kw)
    full = svf.MinkUNet(4, 5, widths=SMALL, blocks=1, rngs=nnx.Rngs(4))
    maps = full.kernel_maps(v)
    out = nnx.jit(lambda m, f, maps: m(f, maps))(half, v.feats.astype(jnp.bfloat16), maps)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out.astype(jnp.float32), full(v.feats, maps)) < 0.05


def test_arguments_are_checked(rng):
    with pytest.raises(ValueError, match="9 positive"):
        svf.MinkUNet(4, 5, widths=(8, 8), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="blocks"):
        svf.MinkUNet(4, 5, blocks=0, rngs=nnx.Rngs(0))
    net = svf.MinkUNet(3, 2, widths=SMALL, blocks=(1, 2, 1, 1, 1, 1, 2, 1), rngs=nnx.Rngs(0))
    assert len(net.encoder[1].blocks.layers) == 2 and len(net.decoder[2].blocks.layers) == 2
    v = _voxels(rng, n=100, extent=6, c=3, dtype=jnp.float32)
    maps = net.kernel_maps(v)
    with pytest.raises(ValueError, match="5 LevelMaps"):
        net(v.feats, maps[:4])
    with pytest.raises(ValueError, match="5 LevelMaps"):
        net(v.feats)
    with pytest.raises(ValueError, match=r"shape \[N=\d+, in_channels=3\]"):
        net(v.feats[:, :2], maps)
    with pytest.raises(ValueError, match="outside jit"):
        nnx.jit(lambda m, x: m(x))(net, v)  # Voxels are traced under jit: their maps cannot be built there


def test_the_package_docstring_example_runs(rng):
    """The usage pattern in ``sparsevox.adapters.flax``'s docstring, run as written (default MinkUNet)."""
    pytest.importorskip("optax", reason="optax not installed")
    doc = svf.__doc__
    block = doc[doc.index("::\n\n") + 4:doc.index("\n\n``python -m")]
    code = "\n".join(line[4:] for line in block.splitlines())
    coords = jnp.asarray(random_voxels(rng, 300, extent=10, batches=2))
    scope = dict(coords=coords, feats=jnp.asarray(rng.standard_normal((len(coords), 4)), jnp.float32),
                 labels=jnp.asarray(rng.integers(0, 20, len(coords)), jnp.int32))
    exec(compile(code, "sparsevox.adapters.flax docstring", "exec"), scope)
    assert np.isfinite(float(scope["loss"])) and scope["logits"].shape == (len(coords), 20)
    assert scope["model"].stem.layers[0].layers[1].use_running_average  # model.eval() reached the norms


# --- bucketed maps: one compilation per bucket, not per scan (issue 20) ----------------------------------

def _masked_loss(logits, labels, mask):
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
    return jnp.where(mask, ce, 0).sum() / mask.sum()


@pytest.mark.usefixtures("jax_x64")
def test_bucketed_maps_give_the_unbucketed_logits_statistics_and_gradients(rng):
    """Real rows of the bucketed network equal the unbucketed one's (train mode: batch statistics over
    the real rows only), the padding rows' logits are never NaN, running statistics and gradients match."""
    v = _voxels(rng, n=300, extent=10)
    net = svf.MinkUNet(4, 3, widths=SMALL, blocks=1, param_dtype=jnp.float64, rngs=nnx.Rngs(1))
    twin = nnx.clone(net)
    exact, bucketed = net.kernel_maps(v), twin.kernel_maps(v, bucket=True)
    n = v.num_voxels
    assert bucketed[0].num_sites == svj.bucket_rows(n) > n and int(bucketed[0].valid) == n
    assert all(m.num_sites >= e.num_sites for m, e in zip(bucketed, exact))
    labels = jnp.asarray(rng.integers(0, 3, n))
    feats_b, labels_b, mask = bucketed[0].pad(v.feats), bucketed[0].pad(labels), bucketed[0].mask()
    out = net(v.feats, exact)
    out_b = twin(feats_b, bucketed)
    assert out_b.shape == (bucketed[0].num_sites, 3) and bool(jnp.isfinite(out_b).all())
    assert rel_err(out_b[:n], out) < 1e-12
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(net, nnx.BatchStat)),
                              nnx.to_flat_state(nnx.state(twin, nnx.BatchStat))):
        assert rel_err(b[...], a[...]) < 1e-12, p
    g = nnx.grad(lambda m, f, maps: _cross_entropy(m(f, maps), labels))(net, v.feats, exact)
    g_b = nnx.grad(lambda m, f, maps: _masked_loss(m(f, maps), labels_b, mask))(twin, feats_b, bucketed)
    for (p, a), (_, b) in zip(nnx.to_flat_state(g), nnx.to_flat_state(g_b)):
        assert rel_err(b[...], a[...]) < 1e-10, p


def test_new_scans_in_one_bucket_reuse_the_compiled_step(rng):
    """Scans of different voxel counts run one compiled training step per bucket signature (a trace
    counter), where unbucketed maps compile once per scan."""
    net = svf.MinkUNet(4, 3, widths=SMALL, blocks=1, rngs=nnx.Rngs(5))
    traces = [0]

    @nnx.jit
    def step(model, feats, maps, labels):
        traces[0] += 1
        return nnx.grad(lambda m: _masked_loss(m(feats, maps), labels, maps[0].mask()))(model)

    scans, shapes = [], set()
    base = random_voxels(rng, 1200, extent=14, batches=2)
    for drop in (0, 1, 2, 3, 4):  # nearby sizes: mostly the same buckets at every level
        c = base[: len(base) - drop]
        v = sv.Voxels(jnp.asarray(c), jnp.asarray(rng.standard_normal((len(c), 4)), jnp.float32))
        maps = net.kernel_maps(v, bucket=True)
        shapes.add(tuple(m.num_sites for m in maps) + tuple(k.in_maps.shape[0] for m in maps for k in m.maps.values()))
        scans.append((v, maps))
    assert len(shapes) < len(scans), shapes  # a level may cross a bucket edge once or twice, not at every scan
    for v, maps in scans:
        labels = maps[0].pad(jnp.asarray(rng.integers(0, 3, v.num_voxels)))
        grads = step(net, maps[0].pad(v.feats), maps, labels)
        assert all(bool(jnp.isfinite(g[...]).all()) for _, g in nnx.to_flat_state(grads))
    assert traces[0] == len(shapes)  # one compilation per bucket signature, not per scan


def test_bucket_rows():
    assert [svj.bucket_rows(n) for n in (0, 1, 256, 257, 300, 511, 512, 513, 1000, 100_000)] == \
        [256, 256, 256, 288, 320, 512, 512, 576, 1024, 106496]
    for n in range(1, 5000, 37):
        b = svj.bucket_rows(n)
        assert b >= n and (b <= 256 or b <= n * 1.125 + 1)
    with pytest.raises(ValueError, match="n must be >= 0"):
        svj.bucket_rows(-1)


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pooling_on_bucketed_maps_equals_exact_on_the_real_rows(rng, kind):
    """Max/avg pooling over a bucketed map: the real output rows equal the exact map's, padding rows are
    zeros, and the gradient reaches only the real input rows (equal to the exact one there)."""
    v = _voxels(rng, n=200, extent=8, dtype=jnp.float32)
    core = sv.kernel_map(v, 2, 2)
    exact = svj.JaxKernelMap.from_core(core)
    bm = svj.JaxKernelMap.bucketed_from_core(core, svj.bucket_rows(core.num_in), svj.bucket_rows(core.num_out))
    fn = svj.max_pool_features if kind == "max" else svj.avg_pool_features
    x = jnp.asarray(rng.standard_normal((core.num_in, 4)), jnp.float32)
    xb = jnp.pad(x, ((0, bm.num_in - core.num_in), (0, 0)), constant_values=7.0)  # padding must not count
    w = jnp.asarray(rng.standard_normal((bm.num_out, 4)), jnp.float32)
    out_b = jax.jit(fn)(xb, bm)
    out_e = fn(x, exact)
    np.testing.assert_array_equal(np.asarray(out_b[:core.num_out]), np.asarray(out_e))
    assert not np.asarray(out_b[core.num_out:]).any()
    g_b = jax.grad(lambda f: (fn(f, bm) * w).sum())(xb)
    g_e = jax.grad(lambda f: (fn(f, exact) * w[:core.num_out]).sum())(x)
    np.testing.assert_allclose(np.asarray(g_b[:core.num_in]), np.asarray(g_e), rtol=1e-6, atol=1e-7)
    assert not np.asarray(g_b[core.num_in:]).any()


def test_bucketed_norms_ignore_padding_and_survive_tiny_levels(rng):
    """BatchNorm over the real rows only: 0 real rows gives zeros and unchanged running statistics (no
    NaN), 1 row leaves them unchanged too; InstanceNorm's padding rows (batch -1) come out as zeros;
    a SparseSequential given a bare bucketed map masks its BatchNorm."""
    bn = svf.BatchNorm(3, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)
    for valid in (0, 1):
        y = bn(x, valid=jnp.int32(valid))
        assert bool(jnp.isfinite(y).all()) and not bool(jnp.any(y[valid:]))
        assert bool((bn.mean[...] == 0).all()) and bool((bn.var[...] == 1).all())
    y5, y_exact = bn(x, valid=jnp.int32(5)), svf.BatchNorm(3, rngs=nnx.Rngs(0))(x[:5])
    assert rel_err(y5[:5], y_exact) < 1e-6 and not bool(jnp.any(y5[5:]))
    inorm = svf.InstanceNorm(3, affine=True, rngs=nnx.Rngs(0))
    inorm.bias[...] = jnp.ones(3)
    batch = jnp.asarray([0, 0, 1, 1, 1, -1, -1, -1], jnp.int32)
    y = inorm(x, batch)
    assert not bool(jnp.any(y[5:])) and rel_err(y[:5], inorm(x[:5], batch[:5])) < 1e-6
    v = _voxels(rng, n=200, extent=8, dtype=jnp.float32)
    conv = svf.SparseConv(4, 3, 3, use_bias=False, rngs=nnx.Rngs(1))
    core = sv.kernel_map(v, 3)
    bm = svj.JaxKernelMap.bucketed_from_core(core, svj.bucket_rows(core.num_in), svj.bucket_rows(core.num_out))
    seq = svf.SparseSequential(conv, svf.BatchNorm(3, rngs=nnx.Rngs(2)))
    twin = nnx.clone(seq)
    out = seq(jnp.zeros((bm.num_in, 4)).at[:v.num_voxels].set(v.feats), bm)
    assert rel_err(out[:v.num_voxels], twin(v.feats, svj.JaxKernelMap.from_core(core))) < 1e-5
    assert not bool(jnp.any(out[v.num_voxels:]))


def test_training_example_on_new_scans_compiles_per_bucket(capsys):
    """``flax_train --new-scans``: a different crop every step through bucketed maps; fewer compilations
    than steps, and a finite loss."""
    from sparsevox.examples import flax_train
    before = flax_train.TRACES[0]
    ratio = flax_train.main(["--steps", "8", "--crop", "2", "--sgd", "--new-scans"])
    compiles = flax_train.TRACES[0] - before
    assert np.isfinite(ratio) and 1 <= compiles < 8, compiles
    assert f"8 scans, {compiles} compilations" in capsys.readouterr().out
