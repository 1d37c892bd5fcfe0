"""The Flax NNX modules on the CPU: oracle forward and gradients under nnx.jit/nnx.grad, training, errors."""
import subprocess
import sys

import numpy as np
import pytest
from reference import dense_conv, dense_conv_grads, rel_err

import sparsevox as sv
from sparsevox.testing import KINDS

pytest.importorskip("flax", reason="flax not installed")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

svf = pytest.importorskip("sparsevox.adapters.flax")
from jax_cases import scene as _scene  # noqa: E402


pytestmark = pytest.mark.usefixtures("jax_x64")


def _oracle_args(v, geo):
    return geo["kernel_size"], geo["stride"], 1, geo["transposed"]


@pytest.mark.parametrize("kind", KINDS)
def test_conv_jit_grad_match_oracle(rng, kind):
    v, out_v, geo, out_coords = _scene(rng, kind)
    layer = svf.SparseConv(3, 2, **geo, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    kmap = layer.kernel_map(v, out_v)
    g = jnp.asarray(rng.standard_normal((kmap.num_out, 2)))
    coords, feats, w = np.asarray(v.coords), np.asarray(v.feats), np.asarray(layer.weight[...])

    out = nnx.jit(lambda m, f, k: m(f, k))(layer, v.feats, kmap)
    ref = dense_conv(coords, feats, w, *_oracle_args(v, geo), out_coords) + np.asarray(layer.bias[...])
    assert out.dtype == jnp.float64 and rel_err(out, ref) < 1e-12

    grads = nnx.jit(nnx.grad(lambda m, f, k: (m(f, k) * g).sum()))(layer, v.feats, kmap)
    _, rgw = dense_conv_grads(coords, feats, w, np.asarray(g), *_oracle_args(v, geo), out_coords)
    assert rel_err(grads["weight"][...], rgw) < 1e-12
    np.testing.assert_allclose(grads["bias"][...], np.asarray(g).sum(0), rtol=1e-12)


@pytest.mark.parametrize("kind", ["submanifold", "strided"])
def test_depthwise_jit_grad_match_oracle(rng, kind):
    v, out_v, geo, out_coords = _scene(rng, kind)
    layer = svf.SparseDepthwiseConv(3, **geo, param_dtype=jnp.float64, rngs=nnx.Rngs(1))
    kmap = layer.kernel_map(v, out_v)
    g = jnp.asarray(rng.standard_normal((kmap.num_out, 3)))
    full = np.stack([np.diag(w) for w in np.asarray(layer.weight[...])])  # depthwise = diagonal dense weights
    coords, feats = np.asarray(v.coords), np.asarray(v.feats)

    out = nnx.jit(lambda m, f, k: m(f, k))(layer, v.feats, kmap)
    ref = dense_conv(coords, feats, full, *_oracle_args(v, geo), out_coords) + np.asarray(layer.bias[...])
    assert rel_err(out, ref) < 1e-12

    grads = nnx.grad(lambda m, f, k: (m(f, k) * g).sum())(layer, v.feats, kmap)
    _, rgw = dense_conv_grads(coords, feats, full, np.asarray(g), *_oracle_args(v, geo), out_coords)
    assert rel_err(grads["weight"][...], np.stack([np.diag(w) for w in rgw])) < 1e-12


def test_check_grads_finite_differences(rng):
    v, _, geo, _ = _scene(rng, "strided")
    for layer in (svf.SparseConv(3, 2, **geo, param_dtype=jnp.float64, rngs=nnx.Rngs(2)),
                  svf.SparseDepthwiseConv(3, **geo, param_dtype=jnp.float64, rngs=nnx.Rngs(3))):
        kmap = layer.kernel_map(v)
        graphdef, params = nnx.split(layer)
        check_grads(lambda p, f: nnx.merge(graphdef, p)(f, kmap), (params, v.feats), order=1, modes=("rev",))


def test_voxels_in_and_out(rng):
    v, out_v, geo, out_coords = _scene(rng, "submanifold")
    layer = svf.SparseConv(3, 4, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    kmap = layer.kernel_map(v)
    out = nnx.jit(lambda m, x, k: m(x, k))(layer, v, kmap)  # Voxels are a pytree: traced through jit
    assert isinstance(out, sv.Voxels)
    np.testing.assert_array_equal(np.asarray(out.coords), np.asarray(v.coords))
    np.testing.assert_allclose(out.feats, layer(v.feats, kmap), rtol=1e-12)

    v, _, geo, out_coords = _scene(rng, "strided")
    down = svf.SparseConv(3, 4, **geo, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    out = down(v)  # outside jit: the layer builds its own map and output sites
    np.testing.assert_array_equal(np.asarray(out.coords), out_coords)
    np.testing.assert_allclose(out.feats, down(v.feats, down.kernel_map(v)), rtol=1e-12)
    with pytest.raises(ValueError, match="output coordinates"):
        down(v, down.kernel_map(v))


def test_training_steps_reduce_loss(rng):
    optax = pytest.importorskip("optax")
    v, _, _, _ = _scene(rng, "submanifold")
    feats = v.feats.astype(jnp.float32)
    target = jnp.asarray(np.asarray(v.coords)[:, 3:4] > 0, jnp.float32)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.c1 = svf.SparseConv(3, 8, rngs=rngs)
            self.dw = svf.SparseDepthwiseConv(8, rngs=rngs)
            self.c2 = svf.SparseConv(8, 1, use_bias=False, rngs=rngs)

        def __call__(self, f, kmap):
            return self.c2(jax.nn.relu(self.dw(jax.nn.relu(self.c1(f, kmap)), kmap)), kmap)

    model = Net(nnx.Rngs(0))
    kmap = model.c1.kernel_map(v)  # all three layers are submanifold k3: one map serves them all
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, f, kmap):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(f, kmap) - target) ** 2))(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt, feats, kmap)) for _ in range(15)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_params_shapes_init_and_dtypes(rng):
    conv = svf.SparseConv(3, 5, kernel_size=(3, 1, 3), rngs=nnx.Rngs(0))
    assert conv.weight.shape == (9, 3, 5) and conv.bias.shape == (5,) and conv.weight.dtype == jnp.float32
    assert float(jnp.abs(conv.weight[...]).max()) <= 1 / np.sqrt(3 * 9)
    nobias = svf.SparseConv(3, 5, kernel_size=2, use_bias=False, rngs=nnx.Rngs(0))
    assert nobias.bias is None and set(nnx.state(nobias, nnx.Param).keys()) == {"weight"}
    dw = svf.SparseDepthwiseConv(6, kernel_size=2, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert dw.weight.shape == (8, 6) and dw.bias.shape == (6,) and dw.weight.dtype == jnp.bfloat16
    assert float(jnp.abs(dw.weight[...].astype(jnp.float32)).max()) <= 1 / np.sqrt(8) + 1e-2

    v, _, _, _ = _scene(rng, "submanifold")
    kmap = conv.kernel_map(v)
    assert conv(v.feats, kmap).dtype == jnp.float64  # promoted: float64 features, float32 params
    f32 = svf.SparseConv(3, 5, kernel_size=(3, 1, 3), dtype=jnp.float32, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    assert f32(v.feats, kmap).dtype == jnp.float32  # dtype forces the computation dtype


@pytest.mark.parametrize("make, match", [
    (lambda r: svf.SparseConv(0, 4, rngs=r), "in_features must be an int >= 1"),
    (lambda r: svf.SparseConv(3, -1, rngs=r), "out_features must be an int >= 1"),
    (lambda r: svf.SparseDepthwiseConv(0, rngs=r), "features must be an int >= 1"),
    (lambda r: svf.SparseConv(3, 4, kernel_size=0, rngs=r), "kernel_size must be >= 1"),
    (lambda r: svf.SparseConv(3, 4, stride=(1, 2), rngs=r), "stride must be an int or a 3-tuple"),
    (lambda r: svf.SparseDepthwiseConv(3, dilation=0, rngs=r), "dilation must be >= 1"),
    (lambda r: svf.SparseConv(3, 4, generative=True, rngs=r), "pass transposed=True"),
    (lambda r: svf.SparseConv(3, 4, param_dtype=jnp.int32, rngs=r), "param_dtype must be one of"),
    (lambda r: svf.SparseConv(3, 4, dtype="int8", rngs=r), "dtype must be one of"),
    (lambda r: svf.SparseConv(3, 4, fwd_algo="nope", rngs=r), "fwd_algo: unknown algorithm"),
    (lambda r: svf.SparseDepthwiseConv(3, bwd_algo="cutlass_implicit_gemm", rngs=r), "bwd_algo: unknown"),
])
def test_bad_arguments_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make(nnx.Rngs(0))


def test_bad_call_arguments_raise(rng):
    v, _, _, _ = _scene(rng, "submanifold")
    conv = svf.SparseConv(3, 4, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    kmap = conv.kernel_map(v)
    with pytest.raises(ValueError, match="kmap must be a JaxKernelMap"):
        conv(v.feats)
    with pytest.raises(ValueError, match="N_in="):
        conv(v.feats[:-1], kmap)
    with pytest.raises(ValueError, match="K=8"):  # a map of another kernel size: the adapter's check
        conv(v.feats, svf.SparseConv(3, 4, kernel_size=2, rngs=nnx.Rngs(0)).kernel_map(v))
    algo = svf.SparseConv(3, 4, fwd_algo=["explicit_gemm", "auto"], param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    assert algo.fwd_algo == ("explicit_gemm", "auto")  # lists become tuples: static under nnx.jit
    nnx.jit(lambda m, f, k: m(f, k))(algo, v.feats, kmap)


def test_only_this_module_imports_flax():
    code = ("import sys, sparsevox, sparsevox.adapters.jax, sparsevox.examples.jax_train; "
            "assert 'flax' not in sys.modules, 'flax imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
