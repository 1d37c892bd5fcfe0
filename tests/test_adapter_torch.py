"""The PyTorch adapter on the CPU: gradcheck, opcheck, modules."""
import warnings

import numpy as np
import pytest
from reference import dense_conv, expected_out_coords, random_voxels, rel_err

import sparsevox as sv
from sparsevox.testing import KINDS, kind_args

torch = pytest.importorskip("torch", reason="torch not installed")
svt = pytest.importorskip("sparsevox.adapters.torch")


def _case(rng, kind, c_in=3, c_out=2, dtype=torch.float64):
    s, tr, gen = kind_args(kind, 2)
    fine = random_voxels(rng, 60, extent=6, batches=2)
    out_v = None
    coords = fine
    if kind == "transposed":
        out_v = sv.Voxels(torch.from_numpy(fine), None)
        coords = expected_out_coords(fine, 2, 2, 1, False, False)
    f = torch.randn(len(coords), c_in, dtype=dtype, requires_grad=True)
    w = torch.randn(8 if kind != "submanifold" else 27, c_in, c_out, dtype=dtype, requires_grad=True)
    ks = 2 if kind != "submanifold" else 3
    return sv.Voxels(torch.from_numpy(coords), f), w, out_v, dict(kernel_size=ks, stride=s, transposed=tr,
                                                                     generative=gen, output_voxels=out_v)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(rng, kind):
    v, w, _, args = _case(rng, kind)
    kmap = sv.kernel_map(v, args["kernel_size"], args["stride"], 1, args["transposed"], args["generative"],
                         args["output_voxels"])
    assert torch.autograd.gradcheck(lambda f, w: svt.conv_features(f, w, kmap), (v.feats, w))


def test_a_second_derivative_raises_instead_of_being_zero(rng):
    """The gradients are computed by raw kernels, not by differentiable torch ops: a double backward
    (create_graph=True, then differentiating the gradient) must raise, not silently give zeros."""
    v, w, _, args = _case(rng, "submanifold")
    out = sv.spatially_sparse_conv(v, w, **args)
    (gw,) = torch.autograd.grad(out.feats.square().sum(), w, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate"):
        torch.autograd.grad(gw.sum(), v.feats)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_oracle_and_returns_torch(rng, kind):
    v, w, _, args = _case(rng, kind)
    out = sv.spatially_sparse_conv(v, w, **args)
    assert isinstance(out.feats, torch.Tensor) and out.feats.requires_grad
    ref = dense_conv(v.coords.numpy(), v.feats.detach().numpy(), w.detach().numpy(), args["kernel_size"],
                     args["stride"], 1, args["transposed"], out.coords.numpy())
    assert rel_err(out.feats.detach().numpy(), ref) < 1e-12


def test_opcheck(rng):
    v, w, _, args = _case(rng, "strided", dtype=torch.float32)
    kmap = sv.kernel_map(v, 2, 2)
    i, o, off = svt.kernel_map_tensors(kmap)
    torch.library.opcheck(torch.ops.sparsevox.conv_fwd, (v.feats, w, i, o, off, kmap.num_out, ""))
    g = torch.randn(kmap.num_out, w.shape[2])
    torch.library.opcheck(torch.ops.sparsevox.conv_bwd, (g, v.feats.detach(), w.detach(), i, o, off, "", True, True))


def test_modules_and_bias(rng):
    v, _, _, _ = _case(rng, "submanifold", dtype=torch.float32)
    conv = svt.SpatiallySparseConv(3, 5, kernel_size=3)
    assert conv.weight.shape == (27, 3, 5) and conv.bias.shape == (5,)
    assert "3, 5, kernel_size=(3, 3, 3)" in repr(conv)
    bound = 1 / np.sqrt(3 * 27)
    assert conv.weight.abs().max() <= bound
    out = conv(v)
    ref = sv.spatially_sparse_conv(v, conv.weight).feats + conv.bias
    torch.testing.assert_close(out.feats, ref)
    out.feats.sum().backward()
    assert conv.weight.grad is not None and conv.bias.grad is not None
    down = svt.SparseConv3d(3, 4, kernel_size=2, stride=2, bias=False)
    up = svt.SparseConv3d(4, 3, kernel_size=2, stride=2, transposed=True)
    y = up(down(v), output_voxels=v)
    assert y.feats.shape == (v.num_voxels, 3) and "transposed=True" in repr(up)
    with pytest.raises(ValueError, match="in_channels"):
        svt.SpatiallySparseConv(0, 3)


def test_depthwise_module_and_gradcheck(rng):
    v, _, _, _ = _case(rng, "submanifold")
    dw = svt.SpatiallySparseDepthwiseConv(3, kernel_size=3, dtype=torch.float64)
    out = dw(v)
    kmap = sv.kernel_map(v, 3)
    full = torch.diag_embed(dw.weight.detach())  # depthwise = dense conv with diagonal weights
    ref = dense_conv(v.coords.numpy(), v.feats.detach().numpy(), full.numpy(), 3, 1, 1, False, v.coords.numpy())
    assert rel_err((out.feats - dw.bias).detach().numpy(), ref) < 1e-12
    w = dw.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda f, w: svt.spatially_sparse_depthwise_conv(f, w, kmap, kmap.num_out), (v.feats, w))
    # the guide's signature with a CSR tuple
    i, o, off = kmap
    out2 = sv.spatially_sparse_depthwise_conv(v.feats, w, (torch.from_numpy(i), torch.from_numpy(o),
                                                           torch.from_numpy(off)), v.num_voxels)
    torch.testing.assert_close(out2, out.feats - dw.bias)


def test_bwd_algo_reaches_backward(rng, monkeypatch):
    v, w, _, args = _case(rng, "submanifold", dtype=torch.float32)
    out = sv.spatially_sparse_conv(v, w, **args, bwd_algo="implicit_gemm")
    with pytest.raises(sv.AlgorithmUnavailableError):
        out.feats.sum().backward()


def test_torch_compile_fullgraph_module_stack(rng):
    """Maps are built outside the compiled region and passed in as tensors."""
    v, _, _, _ = _case(rng, "submanifold", dtype=torch.float32)
    kmap = sv.kernel_map(v, 3)
    maps = svt.kernel_map_tensors(kmap)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = svt.SpatiallySparseConv(3, 8)
            self.b = svt.SpatiallySparseConv(8, 3)

        def forward(self, feats, in_maps, out_maps, offsets, num_out: int):
            x = torch.relu(svt.conv_tensors(feats, self.a.weight, in_maps, out_maps, offsets, num_out) + self.a.bias)
            return svt.conv_tensors(x, self.b.weight, in_maps, out_maps, offsets, num_out) + self.b.bias + feats

    block = Block()
    f = v.feats.detach().requires_grad_(True)
    eager = block(f, *maps, kmap.num_out)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    out = compiled(f, *maps, kmap.num_out)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert f.grad is not None and block.a.weight.grad is not None


def _spy_functions(monkeypatch) -> list:
    """Record which autograd.Function each eager call goes through."""
    used = []
    for fn in (svt._ConvFunction, svt._DepthwiseFunction):
        real = fn.apply

        def apply(*args, _real=real, _name=fn.__name__):
            used.append(_name)
            return _real(*args)
        monkeypatch.setattr(fn, "apply", apply)
    return used


def test_calls_without_gradients_skip_the_autograd_function(rng, monkeypatch):
    v, w, _, args = _case(rng, "submanifold")
    kmap = sv.kernel_map(v, 3)
    want = svt.conv_features(v.feats, w, kmap)  # through the Function: inputs require grad
    used = _spy_functions(monkeypatch)
    with torch.no_grad():
        out = svt.conv_features(v.feats, w, kmap)
        dw = svt.spatially_sparse_depthwise_conv(v.feats, w[:, :, 0], kmap, kmap.num_out)
    assert used == [] and out.grad_fn is None and not out.requires_grad and dw.grad_fn is None
    torch.testing.assert_close(out, want.detach(), rtol=0, atol=0)
    f0, w0 = v.feats.detach(), w.detach()
    out = svt.conv_features(f0, w0, kmap)  # grad mode on, but nothing requires grad
    assert used == [] and out.grad_fn is None
    torch.testing.assert_close(out, want.detach(), rtol=0, atol=0)

    out = svt.conv_features(f0, w, kmap)  # the weight's gradient flows: the Function runs
    assert used == ["conv_function"] and out.grad_fn is not None
    out.sum().backward()
    assert w.grad is not None
    out = sv.spatially_sparse_conv(v, w, **args)
    assert used == ["conv_function"] * 2 and out.feats.grad_fn is not None
    with torch.autograd.forward_ad.dual_level():  # forward AD: the Function decides, as before
        svt.conv_features(f0, w0, kmap)
    assert used == ["conv_function"] * 3
    with torch.no_grad(), warnings.catch_warnings():  # a trace records the Function as its node
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(lambda f, w: svt.conv_features(f, w, kmap), (f0, w0), check_trace=False)
        f1 = torch.randn_like(f0)
        torch.testing.assert_close(traced(f1, w0), svt.conv_features(f1, w0, kmap), rtol=0, atol=0)
    assert used[:4] == ["conv_function"] * 4


def test_kernel_map_lookup_by_the_arguments_as_given(rng, monkeypatch):
    """A cached map is found by the raw arguments (no normalising) and is the same object the
    normalising path returns; other arguments give other maps, and arguments triple() rejects still
    raise although they compare equal to accepted ones."""
    from sparsevox import geometry
    v, _, _, _ = _case(rng, "submanifold")
    m = sv.kernel_map(v, 3)
    assert sv.kernel_map(v, (3, 3, 3)) is m and sv.kernel_map(v, [3, 3, 3]) is m
    assert sv.kernel_map(v, np.int64(3)) is m and sv.kernel_map(v, 3, 1, 1, False, False) is m
    shared = v.replace(v.feats * 2)  # same geometry, same maps
    assert sv.kernel_map(shared, 3) is m
    calls = []
    real_triple = geometry.triple
    monkeypatch.setattr(geometry, "triple", lambda *a, **k: calls.append(a) or real_triple(*a, **k))
    assert sv.kernel_map(v, 3) is m and sv.kernel_map(v, (3, 3, 3)) is m and calls == []
    d2 = sv.kernel_map(v, 3, dilation=2)
    assert d2 is not m and calls and sv.kernel_map(v, 3, dilation=2) is d2
    down = sv.kernel_map(v, 2, 2)
    assert down is not m and down.kind == "strided" and sv.kernel_map(v, 2, 2) is down
    for bad in (dict(kernel_size=3.0), dict(stride=True), dict(dilation=1.0)):
        with pytest.raises(ValueError, match="must be an int or a 3-tuple"):
            sv.kernel_map(v, **bad)
    with pytest.raises(ValueError, match="needs output_voxels"):
        sv.kernel_map(v, 2, 2, transposed=True)
    up = sv.kernel_map(sv.Voxels(torch.from_numpy(down.out_coords), None), 2, 2, transposed=True, output_voxels=v)
    assert up.kind == "transposed"


def test_weight_on_another_device_is_a_value_error(rng):
    """A weight that is not on the features' device is refused by name, before any launch (a prepared
    launch would otherwise read a foreign address)."""
    c = random_voxels(rng, 60, extent=5)
    v = sv.Voxels(torch.from_numpy(c), torch.zeros(len(c), 4))
    kmap = sv.kernel_map(v, 3)
    with pytest.raises(ValueError, match="weight is on meta and the features on cpu"):
        svt.conv_features(v.feats, torch.empty(27, 4, 2, device="meta"), kmap)
    with pytest.raises(ValueError, match="depthwise_weight is on meta"):
        svt.spatially_sparse_depthwise_conv(v.feats, torch.empty(27, 4, device="meta"), kmap, kmap.num_out)


def test_map_first_used_in_inference_mode_still_trains(rng):
    """Evaluation under torch.inference_mode first, then a differentiable call on the same map: the
    map's tensors (saved for backward) must not be inference tensors."""
    c = random_voxels(rng, 60, extent=5)
    v = sv.Voxels(torch.from_numpy(c), None)
    kmap = sv.kernel_map(v, 3)
    f = torch.randn(len(c), 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(27, 3, 2, dtype=torch.float64, requires_grad=True)
    with torch.inference_mode():
        svt.conv_features(f.detach(), w.detach(), kmap)
    assert not any(t.is_inference() for t in svt.kernel_map_tensors(kmap))
    gf, gw = torch.autograd.grad(svt.conv_features(f, w, kmap).sum(), (f, w))
    assert gf.shape == f.shape and gw.shape == w.shape

