"""Network layers of the Flax adapter on the CPU: LevelMaps, SparseSequential, BatchNorm, InstanceNorm,
ResidualBlock against their torch twins in float64 (weights copied by torch names), under nnx.jit; the
torch-name weight conversion; the package's re-exports."""
import numpy as np
import pytest
from reference import random_voxels, rel_err

import sparsevox as sv

pytest.importorskip("flax", reason="flax not installed")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

svf = pytest.importorskip("sparsevox.adapters.flax")
torch = pytest.importorskip("torch", reason="torch not installed (the twins the layers are judged against)")
svt = pytest.importorskip("sparsevox.adapters.torch")

pytestmark = pytest.mark.usefixtures("jax_x64", "one_thread")
F64 = dict(param_dtype=jnp.float64)




def _pair(rng, n=150, c=4, batches=2, extent=6, coords=None):
    """The same scene as JAX and torch ``Voxels`` (float64)."""
    coords = random_voxels(rng, n, extent=extent, batches=batches) if coords is None else coords
    feats = rng.standard_normal((len(coords), c))
    return sv.Voxels(jnp.asarray(coords), jnp.asarray(feats)), sv.Voxels(torch.from_numpy(coords),
                                                                          torch.from_numpy(feats))


def _randomise(tmod, rng):
    """Non-trivial torch BatchNorm/InstanceNorm affine params and running statistics."""
    with torch.no_grad():
        for name, t in tmod.state_dict().items():
            if name.endswith(("running_var",)):
                t.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, t.shape)))
            elif name.endswith(("running_mean", "bias")) or (name.endswith("weight") and t.ndim == 1):
                t.copy_(torch.from_numpy(rng.standard_normal(t.shape)))


def _jit_call(module, x, maps):
    return nnx.jit(lambda m, x, maps: m(x, maps))(module, x, maps)


# --- the package ----------------------------------------------------------------------------------

def test_package_exports_and_keeps_the_module_api():
    from sparsevox.adapters.flax import conv
    for name in svf.__all__:
        assert hasattr(svf, name), name
    for name in ("SparseConv", "SparseDepthwiseConv", "SparseSequential", "BatchNorm", "InstanceNorm",
                 "ResidualBlock", "MinkUNet", "LevelMaps", "level_maps", "load_torch_state_dict"):
        assert name in svf.__all__
    assert svf.SparseConv is conv.SparseConv and svf._positive is conv._positive  # private: via __getattr__
    with pytest.raises(AttributeError, match="no attribute"):
        svf.no_such_name


# --- LevelMaps ----------------------------------------------------------------------------------------

def test_level_maps_hold_every_geometry_once_and_the_batch_column(rng):
    v, _ = _pair(rng)
    rngs = nnx.Rngs(0)
    net = svf.SparseSequential(svf.SparseConv(4, 8, rngs=rngs), svf.SparseDepthwiseConv(8, rngs=rngs),
                               svf.SparseConv(8, 8, 1, rngs=rngs),
                               svf.SparseConv(8, 4, (3, 1, 3), dilation=2, rngs=rngs),
                               svf.SparseConv(4, 4, 2, stride=2, rngs=rngs))
    maps = net.kernel_maps(v)
    assert sorted(maps.maps) == ["k1", "k2_s2", "k3", "k3x1x3_d2"]
    assert maps.maps["k3"] is svf.SparseConv(1, 1, rngs=rngs).kernel_map(v)  # cached on the Voxels
    np.testing.assert_array_equal(maps.batch, np.asarray(v.coords)[:, 0])
    assert maps.batch.dtype == jnp.int32 and maps.num_sites == v.num_voxels
    leaves = jax.tree_util.tree_leaves(maps)
    assert len(leaves) == 2 * 4 + 1  # in/out index arrays of 4 maps + the batch column
    assert svf.map_key((2, 2, 2), (2, 2, 2), (1, 1, 1), True, False) == "k2_s2_transposed"
    assert svf.map_key((3, 3, 3), (1, 1, 1), (1, 1, 1), True, True) == "k3_generative"
    with pytest.raises(ValueError, match="no 'k5' map"):
        svf.SparseConv(4, 4, 5, rngs=rngs)(v.feats, maps)
    with pytest.raises(ValueError, match="needs output_voxels"):
        svf.level_maps(v, svf.SparseConv(4, 4, 2, stride=2, transposed=True, rngs=rngs))
    with pytest.raises(ValueError, match="outside jit"):
        jax.jit(lambda c: svf.level_maps(sv.Voxels(c, None, check=False)).batch)(v.coords)


# --- SparseSequential ------------------------------------------------------------------------------

def test_sequential_matches_torch_and_passes_maps_only_to_modules_that_take_them(rng):
    v, tv = _pair(rng)
    rngs = nnx.Rngs(0)
    net = svf.SparseSequential(svf.SparseConv(4, 8, 3, use_bias=False, **F64, rngs=rngs),
                               svf.BatchNorm(8, **F64, rngs=rngs), jax.nn.relu,
                               svf.SparseSequential(svf.SparseConv(8, 8, 1, **F64, rngs=rngs), jnp.tanh),
                               svf.InstanceNorm(8, affine=True, **F64), nnx.Linear(8, 5, **F64, rngs=rngs))
    assert [svf.takes_maps(m) for m in net.layers] == [True, False, False, True, True, False]
    tnet = svt.SparseSequential(svt.SparseConv3d(4, 8, 3, bias=False), svt.BatchNorm(8), torch.nn.ReLU(),
                                svt.SparseSequential(svt.SparseConv3d(8, 8, 1), torch.nn.Tanh()),
                                svt.InstanceNorm(8, affine=True), torch.nn.Linear(8, 5)).double()
    _randomise(tnet, rng)
    svf.load_torch_state_dict(net, tnet.state_dict())
    maps = net.kernel_maps(v)
    for train in (False, True):
        tnet.train(train)
        net.train() if train else net.eval()
        with torch.no_grad():
            ref = tnet(tv).feats.numpy()
        assert rel_err(_jit_call(net, v.feats, maps), ref) < 1e-12
    assert rel_err(svf.torch_state_dict(net)["1.running_var"], tnet[1].running_var.numpy()) < 1e-12


def test_sequential_refuses_maps_after_the_sites_change(rng):
    v, _ = _pair(rng)
    rngs = nnx.Rngs(0)
    ok = svf.SparseSequential(svf.SparseConv(4, 4, 2, stride=2, rngs=rngs), svf.BatchNorm(4, rngs=rngs), jax.nn.relu)
    maps = ok.kernel_maps(v)
    out = ok(v.feats.astype(jnp.float32), maps)
    assert out.shape == (maps.maps["k2_s2"].num_out, 4)
    bad = svf.SparseSequential(svf.SparseConv(4, 4, 2, stride=2, rngs=rngs), jax.nn.relu,
                               svf.SparseConv(4, 4, rngs=rngs))
    with pytest.raises(ValueError, match="layer 2 .*takes kernel maps, but layer 0 changed the sites"):
        bad(v.feats.astype(jnp.float32), bad.kernel_maps(v))


# --- BatchNorm ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_matches_torch_in_both_modes_with_its_running_statistics(rng, affine):
    x = rng.standard_normal((57, 6)) * 3 + 1
    bn = svf.BatchNorm(6, eps=1e-3, momentum=0.3, affine=affine, **F64, rngs=nnx.Rngs(0))
    tbn = torch.nn.BatchNorm1d(6, eps=1e-3, momentum=0.3, affine=affine).double()
    _randomise(tbn, rng)
    svf.load_torch_state_dict(bn, tbn.state_dict())
    assert bn.momentum == pytest.approx(0.7) and bn.mean.dtype == jnp.float64
    step = nnx.jit(lambda m, x: m(x))
    for _ in range(2):  # training: batch statistics; running ones move (unbiased variance, as torch)
        ref = tbn.train()(torch.from_numpy(x)).detach().numpy()
        assert rel_err(step(bn, jnp.asarray(x)), ref) < 1e-12
        for key, t in (("running_mean", tbn.running_mean), ("running_var", tbn.running_var)):
            assert rel_err(svf.torch_state_dict(bn)[key], t.numpy()) < 1e-12, key
    bn.eval()
    assert bn.use_running_average
    ref = tbn.eval()(torch.from_numpy(x)).detach().numpy()
    assert rel_err(step(bn, jnp.asarray(x)), ref) < 1e-12
    ref = tbn.train()(torch.from_numpy(x)).detach().numpy()
    assert rel_err(bn(jnp.asarray(x), use_running_average=False), ref) < 1e-12


def test_batchnorm_dtypes_gradients_and_errors(rng):
    x = jnp.asarray(rng.standard_normal((40, 3)), jnp.float16)
    bn = svf.BatchNorm(3, rngs=nnx.Rngs(0))
    assert bn(x).dtype == jnp.float32 and bn.var.dtype == jnp.float32  # promoted with float32 params
    assert svf.BatchNorm(3, dtype=jnp.float16, rngs=nnx.Rngs(0))(x).dtype == jnp.float16
    # no gradient flows into the running statistics; the batch statistics are differentiated through
    bn64 = svf.BatchNorm(3, **F64, rngs=nnx.Rngs(0))
    xx = jnp.asarray(rng.standard_normal((40, 3)))
    g = jax.grad(lambda x: (nnx.clone(bn64)(x) ** 3).sum())(xx)
    tx = torch.from_numpy(np.array(xx)).requires_grad_()
    (torch.nn.BatchNorm1d(3).double()(tx) ** 3).sum().backward()
    assert rel_err(g, tx.grad.numpy()) < 1e-12
    with pytest.raises(ValueError, match="more than 1 voxel"):
        bn(x[:1])
    assert bn(x[:1], use_running_average=True).shape == (1, 3)
    with pytest.raises(ValueError, match=r"needs features \[N, 3\]"):
        bn(x[:, :2])
    with pytest.raises(ValueError, match="momentum must be"):
        svf.BatchNorm(3, momentum=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_features must be"):
        svf.BatchNorm(0, rngs=nnx.Rngs(0))


# --- InstanceNorm -----------------------------------------------------------------------------------

@pytest.mark.parametrize("affine", [False, True])
def test_instancenorm_matches_torch_per_batch_item(rng, affine):
    coords = random_voxels(rng, 90, extent=6, batches=3)
    coords[:, 0][coords[:, 0] == 2] = 5  # batch items 0, 1, 5 (3 and 4 empty)
    lone = np.array([[7, 0, 0, 0]], np.int32)  # an item with one voxel: zeros before the affine part
    coords = np.concatenate([coords[:40], lone, coords[40:]])
    v, tv = _pair(rng, coords=coords, c=5)
    norm = svf.InstanceNorm(5, eps=1e-4, affine=affine, **F64, rngs=nnx.Rngs(0))
    tnorm = svt.InstanceNorm(5, eps=1e-4, affine=affine).double()
    _randomise(tnorm, rng)
    svf.load_torch_state_dict(norm, tnorm.state_dict())
    ref = tnorm(tv).feats.detach().numpy()
    out = _jit_call(norm, v.feats, norm.kernel_maps(v))
    assert rel_err(out, ref) < 1e-12
    np.testing.assert_allclose(out[40], np.asarray(norm.bias[...]) if affine else 0, atol=1e-12)
    assert rel_err(norm(v.feats, v.coords[:, 0]), ref) < 1e-12  # the batch column itself
    g = rng.standard_normal(ref.shape)
    gx = jax.grad(lambda x: (norm(x, v.coords[:, 0]) * g).sum())(v.feats)
    tx = tv.feats.clone().requires_grad_()
    (tnorm(tv.replace(tx)).feats * torch.from_numpy(g)).sum().backward()
    assert rel_err(gx, tx.grad.numpy()) < 1e-10


def test_instancenorm_dtypes_and_errors(rng):
    v, _ = _pair(rng, c=3)
    norm = svf.InstanceNorm(3)
    assert not nnx.state(norm, nnx.Param)  # no params without affine
    half = v.feats.astype(jnp.bfloat16)
    assert norm(half, v.coords[:, 0]).dtype == jnp.bfloat16
    assert svf.InstanceNorm(3, affine=True, rngs=nnx.Rngs(0))(half, v.coords[:, 0]).dtype == jnp.float32
    with pytest.raises(ValueError, match="needs LevelMaps or the batch indices"):
        norm(v.feats, svf.SparseConv(3, 3, rngs=nnx.Rngs(0)).kernel_map(v))
    with pytest.raises(ValueError, match=r"InstanceNorm\(3\) needs features"):
        norm(v.feats[:-1], v.coords[:, 0])


# --- ResidualBlock ---------------------------------------------------------------------------------

@pytest.mark.parametrize("c_in, c_out", [(6, 6), (4, 7)])
def test_residual_block_matches_torch_forward_and_gradients(rng, c_in, c_out):
    v, tv = _pair(rng, c=c_in)
    block = svf.ResidualBlock(c_in, c_out, **F64, rngs=nnx.Rngs(0))
    tblock = svt.ResidualBlock(c_in, c_out).double()
    _randomise(tblock, rng)
    svf.load_torch_state_dict(block, tblock.state_dict())
    assert (block.skip is None) == (c_in == c_out)
    maps = block.kernel_maps(v)
    assert sorted(maps.maps) == (["k3"] if c_in == c_out else ["k1", "k3"])
    g = rng.standard_normal((v.num_voxels, c_out))
    for train in (False, True):
        tblock.train(train)
        block.train() if train else block.eval()
        tx = tv.feats.clone().requires_grad_()
        tout = tblock(tv.replace(tx)).feats
        tblock.zero_grad()
        (tout * torch.from_numpy(g)).sum().backward()
        out = _jit_call(block, v.feats, maps)
        assert rel_err(out, tout.detach().numpy()) < 1e-12
        grads, gx = nnx.jit(nnx.grad(lambda m, x: (m(x, maps) * g).sum(), argnums=(0, 1)))(nnx.clone(block), v.feats)
        assert rel_err(gx, tx.grad.numpy()) < 1e-10
        flat = _grads_by_torch_name(block, grads)
        for name, p in tblock.named_parameters():
            assert rel_err(flat[name], p.grad.numpy()) < 1e-10, name


def test_residual_block_and_instancenorm_pass_finite_differences(rng):
    """Gradients of the composition (train-mode BatchNorm, 1x1 skip, InstanceNorm) against finite
    differences, independent of the torch twins."""
    from jax.test_util import check_grads
    v, _ = _pair(rng, n=60, c=3, extent=5)
    net = svf.SparseSequential(svf.ResidualBlock(3, 4, **F64, rngs=nnx.Rngs(0)),
                               svf.InstanceNorm(4, affine=True, **F64))
    maps = net.kernel_maps(v)
    # eps 1e-6, not 1e-4: a random step of 1e-4 in ~500 parameters moves some of the 240 ReLU inputs
    # across 0, and the difference quotient then misses by ~2% (both modes); 1e-6 steps over no kink
    for train in (True, False):
        net.train() if train else net.eval()
        graphdef, params, rest = nnx.split(net, nnx.Param, ...)

        def fn(p, f):  # a fresh module per call (train-mode BatchNorm writes its running statistics)
            return nnx.merge(graphdef, p, jax.tree_util.tree_map(lambda a: a, rest))(f, maps)
        check_grads(fn, (params, v.feats), order=1, modes=("rev",), eps=1e-6)


def _grads_by_torch_name(module, grads):
    """Gradients (an nnx State of the Params) under torch's parameter names."""
    graphdef, _, rest = nnx.split(module, nnx.Param, ...)
    return svf.torch_state_dict(nnx.merge(graphdef, grads, rest))


# --- weights by torch names ------------------------------------------------------------------------

def test_torch_weights_round_trip_and_errors(rng):
    tblock = svt.ResidualBlock(3, 5).double()
    _randomise(tblock, rng)
    block = svf.ResidualBlock(3, 5, rngs=nnx.Rngs(0))  # float32: values are cast
    svf.load_torch_state_dict(block, tblock.state_dict())
    assert block.main.layers[0].weight.dtype == jnp.float32
    back = svt.ResidualBlock(3, 5).double()
    exported = svf.torch_state_dict(block)
    back.load_state_dict({k: torch.from_numpy(np.asarray(a, np.float64)) for k, a in exported.items()})
    for k, t in tblock.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            np.testing.assert_allclose(back.state_dict()[k].numpy(), t.numpy(), rtol=1e-6, err_msg=k)
    # copies, not views: torch's in-place updates (running statistics, optimiser steps) leave Flax alone
    bn, tbn = svf.BatchNorm(3, **F64, rngs=nnx.Rngs(0)), torch.nn.BatchNorm1d(3).double()
    svf.load_torch_state_dict(bn, tbn.state_dict())
    tbn.train()(torch.randn(9, 3, dtype=torch.float64) + 5)
    np.testing.assert_array_equal(bn.mean[...], 0.0)
    exported = svf.torch_state_dict(bn)
    exported["running_var"] += 1
    np.testing.assert_array_equal(bn.var[...], 1.0)
    lin, tlin = nnx.Linear(3, 4, **F64, rngs=nnx.Rngs(0)), torch.nn.Linear(3, 4).double()
    svf.load_torch_state_dict(lin, tlin.state_dict())
    np.testing.assert_array_equal(lin.kernel[...], tlin.weight.detach().numpy().T)  # [out, in] -> [in, out]

    with pytest.raises(ValueError, match="torch keys without a Flax twin \\['skip.0.weight'"):
        svf.load_torch_state_dict(svf.ResidualBlock(5, 5, rngs=nnx.Rngs(0)), svt.ResidualBlock(5, 5).state_dict()
                                  | {"skip.0.weight": torch.zeros(1, 5, 5)})
    with pytest.raises(ValueError, match="without a torch key \\['skip.0.weight'"):
        svf.load_torch_state_dict(svf.ResidualBlock(3, 5, rngs=nnx.Rngs(0)), svt.ResidualBlock(5, 5).state_dict())
    with pytest.raises(ValueError, match="main.0.weight: the torch value has shape"):
        svf.load_torch_state_dict(svf.ResidualBlock(3, 5, rngs=nnx.Rngs(0)),
                                  svt.ResidualBlock(3, 5, kernel_size=2).state_dict())
    partial = svf.ResidualBlock(3, 5, rngs=nnx.Rngs(0))
    svf.load_torch_state_dict(partial, {"main.1.running_var": torch.full((5,), 3.0)}, strict=False)
    np.testing.assert_array_equal(partial.main.layers[1].var[...], 3.0)

    class Odd(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros(2))
    with pytest.raises(ValueError, match="no torch names are known for the variables \\['w'\\] of Odd"):
        svf.torch_state_dict(Odd())
