"""A convolution fused with the evaluation BatchNorm, residual add and ReLU after it (the IMPLICIT_GEMM
forward's epilogue, ``kernels_cu/implicit_gemm.cu``; :mod:`sparsevox.adapters.torch.fused`), on the GPU
against float64: the kernel through its prepared launch on NaN-poisoned outputs (every dtype, tile shape
forms, a mask split, 3xTF32, odd channel counts), and the torch modules that use it. The host-side rules
(which step gets the epilogue, the argument checks): ``test_prepared_launch_cpu.py``."""
import copy

import numpy as np
import pytest
from reference import dense_conv, random_voxels
from test_norm_act_torch import _close, _randomised, _voxels

import sparsevox as sv
from sparsevox.algorithms import implicit_gemm as ig

torch = pytest.importorskip("torch", reason="torch not installed")
svt = pytest.importorskip("sparsevox.adapters.torch")
from sparsevox.adapters.torch import fused, layers  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def test_conv_bn_act_does_not_apply_on_the_cpu_or_with_a_gradient(rng):
    conv, bn = svt.SparseConv3d(4, 8, 3, bias=False), svt.BatchNorm(8).eval()
    v = _voxels(rng, 50, 4, torch.float32, "cpu")
    assert fused.conv_bn_act(conv, v, bn) is None  # CPU tensors: the modules run
    assert fused.plain_conv(conv) and not fused.plain_conv(svt.SparseConv3d(4, 8, 3))  # a bias: not fused
    assert not fused.plain_conv(svt.SparseConv3d(4, 8, 2, stride=2, transposed=True, bias=False))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,params", [
    ("float16", {}), ("float16", {"fwd_block_size": 128, "gemm_block_size": 32}), ("bfloat16", {}),
    ("float16", {"sort_rows": True, "mask_split": 2}), ("float32", {}), ("float32", {"tf32x3": True}),
    ("float32", {"sort_rows": True, "mask_split": 3}), ("float64", {})])
@pytest.mark.parametrize("c_in,c_out", [(16, 32), (5, 7)])  # vector loads; scalar loads, odd column pairs
@pytest.mark.parametrize("what", ["bn_relu", "bn_residual_relu", "bn_no_affine", "residual_only"])
def test_epilogue_matches_float64(rng, dtype, params, c_in, c_out, what):
    coords = random_voxels(rng, 700, extent=10, batches=2)
    v = sv.Voxels(torch.from_numpy(coords).cuda(), None)
    kmap = sv.kernel_map(v, 3)
    tdt = DTYPES[dtype]
    f = torch.from_numpy(rng.normal(0, 1, (kmap.num_in, c_in))).cuda().to(tdt)
    w = torch.from_numpy(rng.normal(0, 1, (27, c_in, c_out)) / np.sqrt(27 * c_in)).cuda().to(tdt)
    r = torch.from_numpy(rng.normal(0, 1, (kmap.num_out, c_out))).cuda().to(tdt)
    mean = torch.from_numpy(rng.normal(0, 0.5, c_out)).float().cuda()
    var = torch.from_numpy(rng.uniform(0.2, 3, c_out)).float().cuda()
    gamma = torch.from_numpy(rng.normal(1, 0.3, c_out)).float().cuda()
    beta = torch.from_numpy(rng.normal(0, 0.5, c_out)).float().cuda()
    eps = 1e-3
    prep = ig.prepare("fwd", dtype, c_in, c_out, kmap, 0, **params)
    assert prep.fusable
    bn = what != "residual_only"
    affine = what != "bn_no_affine"
    res = what in ("bn_residual_relu", "residual_only")
    relu = what != "bn_no_affine"
    ep = ig.epilogue_args(mean.data_ptr() if bn else 0, var.data_ptr() if bn else 0,
                          gamma.data_ptr() if bn and affine else 0, beta.data_ptr() if bn and affine else 0,
                          r.data_ptr() if res else 0, eps, relu)
    out = torch.full((kmap.num_out, c_out), float("nan"), device="cuda", dtype=tdt)
    assert prep.launch(f.data_ptr(), w.data_ptr(), out.data_ptr(), torch.cuda.current_stream().cuda_stream, ep)
    y = dense_conv(coords, f.double().cpu().numpy(), w.double().cpu().numpy(), (3, 3, 3), (1, 1, 1), (1, 1, 1),
                   False, coords)
    y = torch.from_numpy(y)
    if bn:
        y = (y - mean.double().cpu()) / torch.sqrt(var.double().cpu() + eps)
        if affine:
            y = y * gamma.double().cpu() + beta.double().cpu()
    if res:
        y = y + r.double().cpu()
    if relu:
        y = torch.relu(y)
    assert not out.isnan().any(), "an output element was not written"
    tol = {"float16": 1e-2, "bfloat16": 3e-2, "float32": 1e-5, "float64": 1e-12}[dtype]
    scale = float(y.abs().max().clamp_min(1.0))
    torch.testing.assert_close(out.double().cpu(), y, rtol=tol, atol=tol * scale)


def _fused_launches(monkeypatch):
    """The epilogue (or None) of every prepared launch from now on."""
    seen = []
    real = ig.Launch.launch

    def launch(self, a, b, out, stream=None, epilogue=None):
        seen.append(epilogue)
        return real(self, a, b, out, stream, epilogue)
    monkeypatch.setattr(ig.Launch, "launch", launch)
    return seen


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_modules_fuse_after_their_first_call_and_match_float64(rng, monkeypatch, dtype):
    """Conv + BN + ReLU, a strided conv + BN + ReLU and a residual block (conv + BN + ReLU, then conv + BN + add
    + ReLU; its 1x1 skip is a matmul + BN) against float64 CPU copies, under autocast for float16. A layer's
    first call on a signature plans its launch through the modules; the next forward fuses, and the
    results agree (on NaN-poisoned memory)."""
    net = _randomised(svt.SparseSequential(
        svt.SparseConv3d(8, 16, 3, bias=False), svt.BatchNorm(16), torch.nn.ReLU(inplace=True),
        svt.SparseConv3d(16, 16, 2, stride=2, bias=False), svt.BatchNorm(16), torch.nn.ReLU(inplace=True),
        svt.ResidualBlock(16, 24)), rng).eval()
    ref = copy.deepcopy(net).double()
    net.cuda()
    v = _voxels(rng, 900, 8, torch.float32, "cuda")
    with torch.no_grad():
        want = ref(sv.Voxels(v.coords.cpu(), v.feats.double().cpu())).feats
    seen = _fused_launches(monkeypatch)
    outs = []
    for _ in range(2):
        for shape in ((len(v.coords), 24), (len(v.coords), 16)):  # NaN blocks of the outputs' sizes, freed
            del_me = torch.full(shape, float("nan"), device="cuda", dtype=dtype)
            del del_me
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=dtype == torch.float16):
            outs.append(net(sv.Voxels(v.coords, v.feats.clone())))
    fused_calls = [e for e in seen if e is not None]
    # the second forward: the stem conv, the strided conv and the block's two 3x3 convs, each one launch
    assert len(fused_calls) >= 4, seen
    assert sum(1 for e in fused_calls if e[4]) >= 1  # the residual block's last conv took the skip
    for out in outs:
        assert out.feats.dtype == dtype and not out.feats.isnan().any()
        _close(out.feats, want, dtype)


@pytest.mark.gpu
def test_training_hooks_and_gradients_take_the_modules(rng, monkeypatch):
    net = _randomised(svt.SparseSequential(svt.SparseConv3d(4, 8, 3, bias=False), svt.BatchNorm(8),
                                           torch.nn.ReLU()), rng).cuda().eval()
    v = _voxels(rng, 300, 4, torch.float32, "cuda")
    with torch.no_grad():
        net(v)  # plans the launch
    seen = _fused_launches(monkeypatch)
    handle = net[0].register_forward_hook(lambda *a: None)
    with torch.no_grad():
        hooked = net(v).feats  # a hooked convolution runs as a module
    handle.remove()
    assert not any(e is not None for e in seen)
    out = net(v).feats  # gradients wanted: the autograd path
    assert out.requires_grad and not any(e is not None for e in seen)
    trained = copy.deepcopy(net).train()
    with torch.no_grad():
        trained(v)
    assert not any(e is not None for e in seen)  # training: batch statistics
    with torch.no_grad():
        again = net(v).feats
    assert any(e is not None for e in seen)
    _close(again, hooked, torch.float32)
    assert layers.conv_bn_act is fused.conv_bn_act
