"""Network layers of the PyTorch adapter on CPU tensors (NumPy backend): SparseSequential, BatchNorm,
InstanceNorm, cat_voxels, ResidualBlock; and the package's re-exports."""
import numpy as np
import pytest
from reference import random_voxels

import sparsevox as sv

torch = pytest.importorskip("torch", reason="torch not installed")
svt = pytest.importorskip("sparsevox.adapters.torch")
nn = torch.nn


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


def _voxels(rng, n=120, c=4, batches=2, extent=6, dtype=torch.float64, coords=None):
    coords = random_voxels(rng, n, extent=extent, batches=batches) if coords is None else coords
    return sv.Voxels(torch.from_numpy(coords), torch.randn(len(coords), c, dtype=dtype))


# --- the package keeps the module's API -------------------------------------------------------------

def test_package_reexports_the_functional_api_and_forwards_settings(monkeypatch):
    from sparsevox.adapters.torch import functional
    for name in functional.__all__:
        assert getattr(svt, name) is getattr(functional, name)
    assert svt._ConvFunction is functional._ConvFunction  # private helpers: through __getattr__
    with pytest.raises(AttributeError, match="no attribute"):
        svt.no_such_name
    monkeypatch.setattr(svt, "SPARE_OUTPUT_MAX_BYTES", 0)
    assert functional.SPARE_OUTPUT_MAX_BYTES == 0  # the code reads it there
    monkeypatch.undo()
    assert functional.SPARE_OUTPUT_MAX_BYTES == svt.SPARE_OUTPUT_MAX_BYTES > 0
    for name in ("SparseSequential", "BatchNorm", "InstanceNorm", "ResidualBlock", "cat_voxels", "MinkUNet"):
        assert name in svt.__all__ and hasattr(svt, name)


# --- SparseSequential -------------------------------------------------------------------------------

def test_sequential_applies_feature_wise_modules_to_feats(rng):
    v = _voxels(rng, dtype=torch.float32)
    conv = svt.SparseConv3d(4, 8, 3, bias=False)
    bn, lin = nn.BatchNorm1d(8), nn.Linear(8, 5)
    net = svt.SparseSequential(conv, bn, nn.ReLU(), nn.Dropout(0.5), lin).eval()
    out = net(v)
    ref = lin(torch.relu(bn(conv(v).feats)))
    torch.testing.assert_close(out.feats, ref)
    assert out.coords is v.coords and out._kmaps is v._kmaps  # same geometry, cached maps shared
    assert sv.kernel_map(v, 3) is sv.kernel_map(out, 3)
    net.train()
    torch.manual_seed(0)
    dropped = net(v).feats
    assert dropped.shape == (v.num_voxels, 5)


def test_sequential_passes_voxels_to_modules_that_take_them(rng):
    v = _voxels(rng, dtype=torch.float32)

    class Shift(nn.Module):
        takes_voxels = True

        def forward(self, voxels):
            return voxels.replace(voxels.feats + 1)

    inner = svt.SparseSequential(Shift(), nn.ReLU())
    net = svt.SparseSequential(Shift(), inner, svt.BatchNorm(4), svt.InstanceNorm(4))
    assert all(svt.layers.takes_voxels(m) for m in net)
    assert not svt.layers.takes_voxels(nn.ReLU())
    out = net(v)
    assert isinstance(out, sv.Voxels) and out.feats.shape == (v.num_voxels, 4)


# --- BatchNorm ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_equals_batchnorm1d_on_feats(rng, train):
    v = _voxels(rng, c=6, dtype=torch.float32)
    ours, ref = svt.BatchNorm(6, momentum=0.3), nn.BatchNorm1d(6, momentum=0.3)
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.arange(6) * 0.5 - 1)
            m.bias.copy_(torch.arange(6) * 0.1)
            m.running_mean.fill_(0.2)
            m.running_var.fill_(1.5)
    ours.train(train)
    ref.train(train)
    out = ours(v)
    torch.testing.assert_close(out.feats, ref(v.feats.clone()))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert out.coords is v.coords
    assert set(ours.state_dict()) == set(ref.state_dict())


# --- InstanceNorm -------------------------------------------------------------------------------------

def _instance_norm_reference(coords, feats, eps, weight=None, bias=None):
    """Brute force in float64: each batch item and channel on its own."""
    c = np.asarray(coords)
    f = np.asarray(feats, dtype=np.float64)
    out = np.zeros_like(f)
    for b in np.unique(c[:, 0]):
        rows = c[:, 0] == b
        for ch in range(f.shape[1]):
            x = f[rows, ch]
            out[rows, ch] = (x - x.mean()) / np.sqrt(x.var() + eps)
    if weight is not None:
        out = out * np.asarray(weight, np.float64) + np.asarray(bias, np.float64)
    return out


@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_matches_per_batch_reference(rng, affine):
    # batch indices 0, 2, 5 (gaps), rows shuffled so the items interleave
    c = random_voxels(rng, 150, extent=6, batches=3)
    c[:, 0] = np.array([0, 2, 5])[c[:, 0]]
    c = c[rng.permutation(len(c))]
    v = sv.Voxels(torch.from_numpy(c), torch.randn(len(c), 5, dtype=torch.float64) * 3 + 2)
    norm = svt.InstanceNorm(5, eps=1e-3, affine=affine).double()
    if affine:
        with torch.no_grad():
            norm.weight.copy_(torch.linspace(0.5, 2, 5))
            norm.bias.copy_(torch.linspace(-1, 1, 5))
    out = norm(v)
    ref = _instance_norm_reference(c, v.feats.numpy(), 1e-3, *(
        (norm.weight.detach().numpy(), norm.bias.detach().numpy()) if affine else ()))
    np.testing.assert_allclose(out.feats.detach().numpy(), ref, rtol=1e-12, atol=1e-12)
    assert out.coords is v.coords and "affine=" + str(affine) in repr(norm)


def test_instance_norm_gradcheck_low_precision_and_errors(rng):
    c = random_voxels(rng, 30, extent=4, batches=2)
    f = torch.randn(len(c), 3, dtype=torch.float64, requires_grad=True)
    norm = svt.InstanceNorm(3, affine=True).double()
    w, b = norm.weight, norm.bias

    def fn(f, w, b):
        return torch.func.functional_call(norm, {"weight": w, "bias": b}, (sv.Voxels(torch.from_numpy(c), f),)).feats
    assert torch.autograd.gradcheck(fn, (f, w.detach().clone().requires_grad_(True),
                                         b.detach().clone().requires_grad_(True)))
    # float16 features: statistics in float32, result float16
    v16 = sv.Voxels(torch.from_numpy(c), f.detach().half())
    out16 = svt.InstanceNorm(3)(v16).feats
    assert out16.dtype == torch.float16
    ref = _instance_norm_reference(c, f.detach().half().double().numpy(), 1e-5)
    np.testing.assert_allclose(out16.double().numpy(), ref, atol=5e-3)
    with pytest.raises(ValueError, match="channels"):
        svt.InstanceNorm(4)(v16)


# --- cat_voxels ---------------------------------------------------------------------------------------

def test_cat_voxels_needs_one_geometry(rng):
    v = _voxels(rng, c=3)
    w = v.replace(torch.randn(v.num_voxels, 2, dtype=torch.float64))
    out = svt.cat_voxels(v, w)
    assert out.feats.shape == (v.num_voxels, 5) and out._kmaps is v._kmaps
    torch.testing.assert_close(out.feats, torch.cat([v.feats, w.feats], 1))
    same = sv.Voxels(v.coords.clone(), torch.zeros(v.num_voxels, 1, dtype=torch.float64))  # equal coords
    assert svt.cat_voxels(v, same).feats.shape[1] == 4
    perm = torch.randperm(v.num_voxels)
    shuffled = sv.Voxels(v.coords[perm], v.feats[perm])
    if not torch.equal(perm, torch.arange(v.num_voxels)):
        with pytest.raises(ValueError, match="one geometry"):
            svt.cat_voxels(v, shuffled)
    other = _voxels(rng, n=v.num_voxels - 5, c=3)
    with pytest.raises(ValueError, match="one geometry"):
        svt.cat_voxels(v, other)
    assert svt.cat_voxels(v) is v
    with pytest.raises(ValueError, match="at least one"):
        svt.cat_voxels()


# --- ResidualBlock ------------------------------------------------------------------------------------

def test_residual_block_shapes_and_skip(rng):
    v = _voxels(rng, c=4, dtype=torch.float32)
    same, wider = svt.ResidualBlock(4, 4), svt.ResidualBlock(4, 6)
    assert isinstance(same.skip, nn.Identity)
    assert wider.skip[0].weight.shape == (1, 4, 6) and isinstance(wider.skip[1], svt.BatchNorm)
    for block, c_out in ((same, 4), (wider, 6)):
        out = block(v)
        assert out.feats.shape == (v.num_voxels, c_out) and out.coords is v.coords
        assert (out.feats >= 0).all()
    # With the main branch's last BatchNorm zeroed, the block is relu(skip(x)).
    for block in (same, wider):
        with torch.no_grad():
            block.main[4].weight.zero_()
            block.main[4].bias.zero_()
        block.eval()
    torch.testing.assert_close(same(v).feats, torch.relu(v.feats))
    skip = wider.skip(v).feats
    torch.testing.assert_close(wider(v).feats, torch.relu(skip))
    ref = wider.skip[1](sv.spatially_sparse_conv(v, wider.skip[0].weight, kernel_size=1)).feats
    torch.testing.assert_close(skip, ref)


@pytest.mark.parametrize("c_out", [2, 3])
def test_residual_block_gradcheck(rng, c_out):
    c = random_voxels(rng, 24, extent=4, batches=2)
    block = svt.ResidualBlock(2, c_out).double()  # train mode: BatchNorm on batch statistics
    f = torch.randn(len(c), 2, dtype=torch.float64, requires_grad=True)
    names = ["main.0.weight", "main.3.weight", "main.4.weight"] + (["skip.0.weight"] if c_out != 2 else [])
    params = [dict(block.named_parameters())[n].detach().clone().requires_grad_(True) for n in names]

    def fn(f, *ps):
        return torch.func.functional_call(block, dict(zip(names, ps)), (sv.Voxels(torch.from_numpy(c), f),)).feats
    assert torch.autograd.gradcheck(fn, (f, *params))


def test_evaluation_batchnorm_follows_writes_through_data(rng):
    """Writes through ``.data`` (EMA updates, manual loading) do not bump a tensor's version, so no cache of
    folded parameters may outlive them: the next evaluation call on 16-bit features must use them (a
    cached fold keyed by versions returned the old scale here, and could overflow float16)."""
    import sparsevox as sv
    c = rng.choice(4000, size=50, replace=False)
    coords = torch.from_numpy(np.stack([np.zeros(50, np.int64), c // 400, (c // 20) % 20, c % 20], 1))
    x = sv.Voxels(coords, torch.randn(50, 3).to(torch.bfloat16))
    bn = svt.BatchNorm(3).eval()
    with torch.no_grad():
        first = bn(x).feats.float()
        bn.weight.data.fill_(2.0)
        bn.running_mean.data.fill_(300.0)
        second = bn(x).feats.float()
    want = (x.feats.float() - 300.0) / torch.sqrt(torch.ones(3) + bn.eps) * 2.0
    assert not torch.equal(first, second)
    torch.testing.assert_close(second, want, rtol=2e-2, atol=2.0)
    assert torch.isfinite(second).all()


def test_residual_block_takes_a_plain_batchnorm1d_in_its_main_branch(rng):
    """A user's nn.BatchNorm1d in place of the block's last BatchNorm: the block gives the module chain's
    answer in training and evaluation (the fused path is CUDA-only; its fallback hands the BN features)."""
    torch.manual_seed(0)
    blk = svt.ResidualBlock(4, 4).double()
    blk.main[4] = nn.BatchNorm1d(4).double()
    v = _voxels(rng, c=4)
    for train in (True, False):
        blk.train(train)
        with torch.no_grad():
            got = blk(v).feats
            from sparsevox.adapters.torch.layers import takes_voxels
            main = v
            for m in blk.main:
                main = m(main) if takes_voxels(m) else main.replace(m(main.feats))
            want = torch.relu(main.feats + v.feats)
        torch.testing.assert_close(got, want)
