"""The torch modules' fused inference BatchNorm (:meth:`sparsevox.adapters.torch.BatchNorm.fused`, used by
``SparseSequential`` for BN + ReLU and by ``ResidualBlock`` for BN + add + ReLU), on the GPU against float64
CPU copies of the same modules (the unfused torch chain); hooks, training and gradients take the module
chain. The kernel itself: ``test_norm_act.py``."""
import copy
import sys

import pytest
from reference import random_voxels

import sparsevox as sv
from sparsevox.cuda import norm_act

torch = pytest.importorskip("torch", reason="torch not installed")
svt = pytest.importorskip("sparsevox.adapters.torch")


def test_fused_does_not_apply_on_the_cpu_or_in_training():
    bn = svt.BatchNorm(4).eval()
    assert bn.fused(torch.randn(5, 4)) is None  # a CPU tensor: torch's BatchNorm runs
    bn.train()
    assert bn.fused(torch.randn(5, 4)) is None


def _randomised(module, rng):
    """Random affine parameters and running statistics (a fresh module's are 1, 0, 0, 1)."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            c = m.num_features
            m.weight.data = torch.from_numpy(rng.normal(1, 0.3, c)).float()
            m.bias.data = torch.from_numpy(rng.normal(0, 0.5, c)).float()
            m.running_mean.data = torch.from_numpy(rng.normal(0, 1, c)).float()
            m.running_var.data = torch.from_numpy(rng.uniform(0.2, 3, c)).float()
    return module


def _counting(monkeypatch):
    calls = []
    real = norm_act.batchnorm_eval
    monkeypatch.setattr(norm_act, "batchnorm_eval", lambda *a: calls.append(a[12]) or real(*a))
    return calls


def _no_conv_fusion(monkeypatch):
    """The modules' path as before the convolution epilogue (sparsevox.adapters.torch.fused)."""
    from sparsevox.adapters.torch import layers
    monkeypatch.setattr(layers, "conv_bn_act", lambda *a, **k: None)


GPU_TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 1e-5, torch.float64: 1e-12}


def _voxels(rng, n, c, dtype, device):
    coords = random_voxels(rng, n, extent=12, batches=2)
    return sv.Voxels(torch.from_numpy(coords).to(device),
                     torch.from_numpy(rng.normal(0, 2, (len(coords), c))).to(device=device, dtype=dtype))


def _close(got, want, dtype):
    got, want = got.double().cpu(), want.double().cpu()
    scale = want.abs().max().clamp_min(1.0)
    torch.testing.assert_close(got, want, rtol=GPU_TOL[dtype], atol=GPU_TOL[dtype] * float(scale))


def _bn_float64(bn, x):
    """The torch BatchNorm chain's answer in float64 on the CPU."""
    f = lambda t: None if t is None else t.detach().double().cpu()  # noqa: E731
    return torch.nn.functional.batch_norm(f(x), f(bn.running_mean), f(bn.running_var), f(bn.weight), f(bn.bias),
                                          False, 0.0, bn.eps)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("params_like_features", [False, True])
def test_gpu_batchnorm_eval_is_one_launch_and_matches_float64(rng, monkeypatch, dtype, params_like_features):
    calls = _counting(monkeypatch)
    bn = _randomised(svt.BatchNorm(24, eps=1e-3), rng).eval().cuda()
    if params_like_features:
        bn.to(dtype)
    v = _voxels(rng, 500, 24, dtype, "cuda")
    with torch.no_grad():
        got = bn(v).feats
    assert calls == [False] and got.dtype == dtype and got.shape == v.feats.shape
    _close(got, _bn_float64(bn, v.feats), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("c,misaligned", [(13, False), (24, True), (24, False), (4104, False)])
def test_gpu_batchnorm_act_vector_and_scalar_forms_match_float64(rng, dtype, c, misaligned):
    """The kernel's 16-byte form (channels a multiple of 16 bytes, aligned rows), its one-channel form (an
    odd channel count; features starting off a 16-byte boundary) and rows wider than one block's columns
    (C = 4104), with a residual and ReLU, the output poisoned (NaN through the caching allocator), against
    float64 on the CPU."""
    from sparsevox.adapters.torch.norm_act import batchnorm_act
    bn = _randomised(torch.nn.BatchNorm1d(c, eps=1e-3), rng).eval().cuda()
    n = 300
    flat = torch.from_numpy(rng.normal(0, 2, n * c + 1)).to(device="cuda", dtype=dtype)
    x = (flat[1:] if misaligned else flat[:-1]).view(n, c)
    assert (x.data_ptr() % 16 != 0) == misaligned
    r = torch.from_numpy(rng.normal(0, 1, (n, c))).to(device="cuda", dtype=dtype)
    poison = torch.full((n, c), float("nan"), device="cuda", dtype=dtype)
    del poison  # the caching allocator hands this block to the output: unwritten elements stay NaN
    with torch.no_grad():
        got = batchnorm_act(bn, x, r, relu=True)
    assert got is not None and got.dtype == dtype and not got.isnan().any()
    _close(got, torch.relu(_bn_float64(bn, x) + r.double().cpu()), dtype)


@pytest.mark.gpu
def test_gpu_batchnorm_reads_statistics_written_through_data(rng):
    bn = _randomised(svt.BatchNorm(8), rng).eval().cuda()
    v = _voxels(rng, 200, 8, torch.float16, "cuda")
    with torch.no_grad():
        first = bn(v).feats
        bn.running_mean.data.add_(300.0)  # no version bump: a cached scale/shift would miss it
        bn.weight.data.mul_(-2.0)
        second = bn(v).feats
    assert not torch.equal(first, second)
    _close(second, _bn_float64(bn, v.feats), torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_sequential_and_residual_block_fuse_and_match_float64(rng, monkeypatch, dtype):
    """Conv + BN + ReLU and a residual block (both BN + ReLU and BN + add + ReLU fused) against float64 CPU
    copies, under autocast for float16 (float32 parameters, as users run inference). The convolution's own
    epilogue fusion (test_fused_epilogue.py) is off here: this is the path of a layer without a prepared launch."""
    _no_conv_fusion(monkeypatch)
    calls = _counting(monkeypatch)
    net = _randomised(svt.SparseSequential(svt.SparseConv3d(8, 16, 3, bias=False), svt.BatchNorm(16),
                                           torch.nn.ReLU(inplace=True), svt.ResidualBlock(16, 24)), rng).eval()
    ref = copy.deepcopy(net).double()
    net.cuda()
    v = _voxels(rng, 600, 8, torch.float32, "cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=dtype == torch.float16):
        got = net(v).feats
    # first BN + ReLU, the block's first BN + ReLU, its skip BN (alone), its last BN + add + ReLU
    assert sorted(calls) == [False, True, True, True]
    with torch.no_grad():
        want = ref(sv.Voxels(v.coords.cpu(), v.feats.double().cpu())).feats
    _close(got, want, dtype)


@pytest.mark.gpu
def test_gpu_hooks_training_and_gradients_take_the_module_chain(rng, monkeypatch):
    _no_conv_fusion(monkeypatch)
    calls = _counting(monkeypatch)
    net = _randomised(svt.SparseSequential(svt.SparseConv3d(4, 8, 3, bias=False), svt.BatchNorm(8),
                                           torch.nn.ReLU()), rng).cuda().eval()
    v = _voxels(rng, 300, 4, torch.float32, "cuda")
    seen = []
    handle = net[2].register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        hooked = net(v).feats
    handle.remove()
    assert seen == [1] and calls == [False]  # BN fused alone, the hooked ReLU called
    calls.clear()
    out = net(v).feats  # gradients wanted: torch's BatchNorm and ReLU
    assert calls == [] and out.requires_grad
    _close(out, hooked, torch.float32)
    net.train()
    with torch.no_grad():
        net(v)
    assert calls == []  # training: batch statistics, running averages updated by torch


@pytest.mark.gpu
def test_gpu_compat_sequential_fuses_batchnorm_and_relu(rng, monkeypatch):
    """spconv's idiom, ``SparseSequential(SubMConv3d, nn.BatchNorm1d, nn.ReLU)`` on sparsevox.compat.spconv,
    in evaluation: one launch for the BatchNorm and the ReLU, the float64 CPU copy's answer."""
    spconv = pytest.importorskip("sparsevox.compat.spconv")
    calls = _counting(monkeypatch)
    net = _randomised(spconv.SparseSequential(spconv.SubMConv3d(4, 16, 3, bias=False, indice_key="s"),
                                              torch.nn.BatchNorm1d(16), torch.nn.ReLU()), rng).eval()
    got, want = _compat_on_gpu_and_float64(spconv, net, rng)
    assert calls == [True]
    _close(got, want, torch.float32)


def _compat_on_gpu_and_float64(spconv, net, rng):
    """``(features on the GPU in float32, features of a float64 CPU copy)`` of an evaluation-mode compat
    network on one random 4-channel input."""
    ref = copy.deepcopy(net).double()
    net.cuda()
    coords = torch.from_numpy(random_voxels(rng, 400, extent=12, batches=2)).int()
    feats = torch.from_numpy(rng.normal(0, 2, (len(coords), 4)))
    with torch.no_grad():
        got = net(spconv.SparseConvTensor(feats.float().cuda(), coords.cuda(), [12, 12, 12], 2)).features
        want = ref(spconv.SparseConvTensor(feats, coords, [12, 12, 12], 2)).features
    return got, want


def test_compat_sequential_runs_a_lone_batchnorm_through_the_fused_path(rng, monkeypatch):
    """A BatchNorm not followed by a ReLU (the end of spconv's residual main branch) goes to
    ``batchnorm_act`` with ``relu=False``, one followed by a ReLU with ``relu=True`` (both modules
    consumed); where it declines (here: a stand-in that declines on odd calls), the modules run."""
    spconv = pytest.importorskip("sparsevox.compat.spconv")
    modules = sys.modules[spconv.SparseSequential.__module__]
    asked = []

    def fake(bn, x, residual=None, relu=False):
        asked.append(relu)
        if len(asked) % 2:
            return None  # declined: the module chain runs
        y = torch.nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return torch.relu(y) if relu else y
    monkeypatch.setattr(modules, "batchnorm_act", fake)
    net = _randomised(spconv.SparseSequential(torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.BatchNorm1d(4),
                                              torch.nn.BatchNorm1d(4), torch.nn.ReLU()), rng).eval().double()
    ref = copy.deepcopy(net)
    coords = torch.from_numpy(random_voxels(rng, 50, extent=6, batches=1)).int()
    x = spconv.SparseConvTensor(torch.from_numpy(rng.normal(0, 2, (len(coords), 4))), coords, [6, 6, 6], 1)
    with torch.no_grad():
        got = net(x).features
        want = x.features
        for m in ref:
            want = m(want)
    assert asked == [True, False, True]  # BN+ReLU (declined, ran as modules), lone BN, BN+ReLU
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
def test_gpu_compat_residual_branch_fuses_its_trailing_batchnorm(rng, monkeypatch):
    """``SparseSequential(SubMConv3d, BN, ReLU, SubMConv3d, BN)`` in evaluation: two launches, the second
    without ReLU, and the float64 CPU copy's answer."""
    spconv = pytest.importorskip("sparsevox.compat.spconv")
    calls = _counting(monkeypatch)
    net = _randomised(spconv.SparseSequential(spconv.SubMConv3d(4, 16, 3, bias=False, indice_key="s"),
                                              torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                              spconv.SubMConv3d(16, 8, 3, bias=False, indice_key="s"),
                                              torch.nn.BatchNorm1d(8)), rng).eval()
    got, want = _compat_on_gpu_and_float64(spconv, net, rng)
    assert calls == [True, False]
    _close(got, want, torch.float32)


@pytest.mark.gpu
def test_gpu_strided_or_short_parameters_take_the_module_chain(rng, monkeypatch):
    calls = _counting(monkeypatch)
    bn = _randomised(svt.BatchNorm(8), rng).eval().cuda()
    strided = torch.randn(8, 2, device="cuda")[:, 0]
    bn.weight = torch.nn.Parameter(strided, requires_grad=False)
    v = _voxels(rng, 100, 8, torch.float32, "cuda")
    with torch.no_grad():
        got = bn(v).feats
    assert calls == []
    _close(got, _bn_float64(bn, v.feats), torch.float32)
