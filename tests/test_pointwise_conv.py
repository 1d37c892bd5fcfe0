"""A 1x1x1 stride-1 submanifold convolution left to ``auto`` is a matmul in the torch adapter: same values
and gradients as the sparse path, no kernel map built; named algorithms and TF32 policy still respected."""
import pytest
from reference import random_voxels, rel_err

import sparsevox as sv

torch = pytest.importorskip("torch")
svt = pytest.importorskip("sparsevox.adapters.torch")


def _voxels(rng, dtype=torch.float64, device="cpu"):
    coords = torch.from_numpy(random_voxels(rng, 300, extent=10, batches=2)).to(device)
    feats = torch.randn(len(coords), 5, dtype=dtype, device=device, requires_grad=True)
    return sv.Voxels(coords, feats)


def _run(v, layer):
    out = layer(v)
    g = torch.randn_like(out.feats)
    (out.feats * g).sum().backward()
    return out.feats.detach().clone(), v.feats.grad.clone(), layer.weight.grad.clone()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_matmul_path_equals_the_sparse_path(rng, device):
    torch.manual_seed(int(rng.integers(1 << 30)))
    fast = svt.SparseConv3d(5, 7, kernel_size=1).double().to(device)
    ref = svt.SparseConv3d(5, 7, kernel_size=1, fwd_algo="explicit_gemm", bwd_algo="explicit_gemm").double().to(device)
    ref.load_state_dict(fast.state_dict())
    v1 = _voxels(rng, device=device)
    v2 = sv.Voxels(v1.coords, v1.feats.detach().clone().requires_grad_(True))
    torch.manual_seed(1)
    a = _run(v1, fast)
    torch.manual_seed(1)
    b = _run(v2, ref)
    for x, y in zip(a, b):
        assert rel_err(x.cpu().numpy(), y.cpu().numpy()) < 1e-12
    assert not v1._kmaps, "the matmul path built a kernel map"
    assert v2._kmaps, "a named algorithm must run the sparse path"


def test_other_geometries_take_the_sparse_path(rng):
    for kw in ({"kernel_size": 3}, {"kernel_size": 1, "stride": 2}, {"kernel_size": (1, 1, 3)}):
        v = _voxels(rng)
        svt.SparseConv3d(5, 4, **kw).double()(v)
        assert v._kmaps, kw


def test_pointwise_rules():
    f32 = torch.zeros(2, 3)
    pw = svt.functional._is_pointwise
    assert pw(1, 1, False, False, f32, None, None)
    assert pw((1, 1, 1), (1, 1, 1), False, False, f32, "auto", "auto")
    assert not pw(1, 1, False, False, f32, "implicit_gemm", None)
    assert not pw(1, 1, True, False, f32, None, None)
    assert not pw(1, 1, False, False, torch.zeros(2, 3, dtype=torch.float16), None, None)  # CPU half: core path


def test_wrong_weight_shape_is_a_clear_error(rng):
    v = _voxels(rng)
    with pytest.raises(ValueError, match="C_in=5"):
        svt.spatially_sparse_conv(v, torch.zeros(1, 4, 3, dtype=torch.float64), kernel_size=1)


def test_output_voxels_take_the_sparse_path(rng):
    """k1 s1 onto other sites (output_voxels) is a strided map, not a row-wise product."""
    v = _voxels(rng)
    other = sv.Voxels(v.coords[::2].clone(), None)
    layer = svt.SparseConv3d(5, 3, kernel_size=1).double()
    ref = svt.SparseConv3d(5, 3, kernel_size=1, fwd_algo="explicit_gemm").double()
    ref.load_state_dict(layer.state_dict())
    out = layer(v, output_voxels=other)
    assert out.feats.shape == (len(other.coords), 3)
    assert rel_err(out.feats.detach().numpy(), ref(v, output_voxels=other).feats.detach().numpy()) < 1e-12


def test_reduced_precision_reductions_are_off_during_the_product_and_restored():
    m = torch.backends.cuda.matmul
    saved = m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction
    try:
        m.allow_fp16_reduced_precision_reduction = m.allow_bf16_reduced_precision_reduction = True
        with svt.functional._float32_accumulation():
            assert not m.allow_fp16_reduced_precision_reduction and not m.allow_bf16_reduced_precision_reduction
        assert m.allow_fp16_reduced_precision_reduction and m.allow_bf16_reduced_precision_reduction
        for feats in (torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.float16)):  # not 16-bit CUDA: untouched
            with svt.functional._float32_accumulation(feats):
                assert m.allow_fp16_reduced_precision_reduction and m.allow_bf16_reduced_precision_reduction
    finally:
        m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction = saved
