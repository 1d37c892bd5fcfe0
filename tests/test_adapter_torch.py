"""The PyTorch adapter on the CPU: gradcheck, opcheck, modules."""
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
