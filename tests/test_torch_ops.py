"""The torch adapter's network ops (``adapters/torch/ops.py``) and modules (MaxPool3d, AvgPool3d,
GlobalPool, Unpool): on CPU tensors the forward equals the core's NumPy result bit for bit, gradcheck in
float64 for every op, the GPU path of the segment reductions run by the CPU emulator (poisoned outputs)
under the adapter, the modules inside SparseSequential, skip connections; GPU variants compare CUDA
tensors (float32, float16, bfloat16; poisoned kernel outputs) with the CPU in float64."""
import numpy as np
import pytest
from ops_cases import OPS, VS, Scene, run_numpy
from segment_backends import TOL, poison_gpu, quantise, rel_err, use_emulator

import sparsevox as sv
from sparsevox import pooling

torch = pytest.importorskip("torch", reason="torch not installed")
svt = pytest.importorskip("sparsevox.adapters.torch")
nn = torch.nn


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


def T(a):
    return torch.from_numpy(np.asarray(a))


def run_torch(s, name, feats, dtype=torch.float64, device="cpu"):
    """``(output, input feats leaf)`` of op ``name`` on torch tensors (the leaf requires grad)."""
    level, fn = OPS[name]
    coords = s.level(level)
    f = torch.as_tensor(feats, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_(True)
    return fn(s, sv.Voxels(T(coords).to(device), f), lambda a: T(a).to(device)), f


# --- forward: the core's NumPy result; backward: gradcheck ------------------------------------------

@pytest.mark.parametrize("name", OPS)
def test_forward_equals_core_numpy(rng, name):
    s = Scene(rng)
    feats = s.feats(OPS[name][0], distinct=False)
    out, _ = run_torch(s, name, feats)
    assert isinstance(out, torch.Tensor) and out.requires_grad and out.grad_fn is not None
    want = run_numpy(s, name, feats)
    assert out.dtype == torch.float64 and tuple(out.shape) == want.shape
    np.testing.assert_array_equal(out.detach().numpy(), want)


@pytest.mark.parametrize("name", OPS)
def test_gradcheck(rng, name):
    s = Scene(rng, n=30, extent=4, c=2, points=12)
    level, fn = OPS[name]
    coords = T(s.level(level))
    f = torch.from_numpy(s.feats(level)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: fn(s, sv.Voxels(coords, x), T), (f,))


@pytest.mark.parametrize("ks,st", [(2, 2), (3, 2), (3, 1)])
def test_max_pool_gradient_is_the_core_backward(rng, ks, st):
    s = Scene(rng, n=120, extent=6, c=4)
    feats = rng.integers(0, 3, (len(s.coords), 4)).astype(np.float64)  # ties: the lowest row wins
    v = sv.Voxels(T(s.coords), T(feats).requires_grad_(True))
    out = sv.max_pool(v, ks, st)
    g = rng.standard_normal(tuple(out.feats.shape))
    out.feats.backward(T(g))
    pmap = pooling.pool_map(sv.kernel_map(sv.Voxels(s.coords, feats), ks, st))
    _, argmax = pooling.max_pool_forward(feats, pmap)
    np.testing.assert_array_equal(v.feats.grad.numpy(), pooling.max_pool_backward(g, argmax, pmap))


def test_second_backward_with_retained_graph(rng):
    s = Scene(rng)
    out, f = run_torch(s, "max_pool3,2", s.feats("fine"))
    out.sum().backward(retain_graph=True)
    first = f.grad.clone()
    out.sum().backward()
    torch.testing.assert_close(f.grad, 2 * first)


# --- the GPU path of the core under the adapter, on the CPU -----------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["max_pool3,2", "avg_pool(2, 1, 3),(2, 1, 1)", "global_pool_max",
                                  "global_pool_avg", "unpool", "devoxelize", "to_dense"])
def test_emulated_gpu_kernels_under_the_adapter(monkeypatch, rng, name, dtype):
    """The segment kernels (``kernels_cu/pooling.cu``, run by the CPU emulator, outputs poisoned) under
    the adapter's forward and backward match the NumPy path, dtype kept."""
    s = Scene(rng, n=80, extent=5, c=5)
    level = OPS[name][0]
    feats = s.feats(level)
    g = None
    results = []
    for emulate in (False, True):
        if emulate:
            use_emulator(monkeypatch)
        out, f = run_torch(s, name, feats, dtype)
        if g is None:
            g = torch.as_tensor(quantise(rng.standard_normal(tuple(out.shape)), str(dtype)[6:])).to(dtype)
        out.backward(g)
        assert out.dtype == dtype and f.grad.dtype == dtype
        results.append((out.detach().double().numpy(), f.grad.double().numpy()))
    (o0, g0), (o1, g1) = results
    tol = TOL[str(dtype)[6:]]
    assert rel_err(o1, o0) < tol and rel_err(g1, g0) < tol


# --- modules ------------------------------------------------------------------------------------------

def _voxels(s, c=4, dtype=torch.float32):
    return sv.Voxels(T(s.coords), torch.randn(len(s.coords), c, dtype=dtype))


def test_modules_inside_sparse_sequential(rng):
    s = Scene(rng, n=150, extent=8, batches=3)
    v = _voxels(s)
    torch.manual_seed(0)
    conv1, conv2, lin = svt.SparseConv3d(4, 8, 3), svt.SparseConv3d(8, 8, 3), nn.Linear(8, 3)
    net = svt.SparseSequential(conv1, nn.ReLU(), svt.MaxPool3d(2), conv2, svt.AvgPool3d(3, 2),
                               svt.GlobalPool("max"), lin)
    out = net(v)
    assert isinstance(out, torch.Tensor) and out.shape == (s.batches, 3)
    h = conv1(v)
    h = conv2(sv.max_pool(h.replace(torch.relu(h.feats)), 2))
    ref = lin(sv.global_pool(sv.avg_pool(h, 3, 2), "max"))
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (conv1.weight, conv2.weight, lin.weight))
    assert "MaxPool3d(kernel_size=(2, 2, 2), stride=(2, 2, 2))" in repr(net)
    assert "AvgPool3d(kernel_size=(3, 3, 3), stride=(2, 2, 2))" in repr(net) and "GlobalPool(mode='max')" in repr(net)
    assert all(svt.layers.takes_voxels(m) for m in (svt.MaxPool3d(2), svt.GlobalPool(), svt.Unpool()))


def test_pool_modules_keep_voxels_and_default_stride(rng):
    s = Scene(rng, n=100, extent=6)
    v = _voxels(s)
    a, b = svt.MaxPool3d(2)(v), sv.max_pool(v, 2, 2)
    assert torch.equal(a.coords, b.coords) and torch.equal(a.feats, b.feats)
    sub = svt.AvgPool3d(3, 1)(v)
    assert sub.coords is v.coords and sub._kmaps is v._kmaps  # stride 1: the input's geometry, maps shared
    torch.testing.assert_close(sub.feats, sv.avg_pool(v, 3, 1).feats)


@pytest.mark.parametrize("ks,st", [(2, 2), (3, 2), ((2, 1, 3), (2, 1, 1))])
def test_skip_connection_lines_up(rng, ks, st):
    """Pooling's output sites and rows are the strided convolution's, from the same cached map: a
    pooled branch and a convolved branch add and concatenate."""
    s = Scene(rng, n=150, extent=8, batches=2)
    v = _voxels(s)
    v.feats.requires_grad_(True)
    conv = svt.SparseConv3d(4, 4, ks, stride=st)
    down, pooled = conv(v), svt.MaxPool3d(ks, st)(v)
    assert torch.equal(down.coords, pooled.coords)
    assert sv.kernel_map(v, ks, st) is sv.kernel_map(v, svt.MaxPool3d(ks, st).kernel_size,
                                                     svt.MaxPool3d(ks, st).stride)  # one map for both
    both = svt.cat_voxels(down + pooled, svt.AvgPool3d(ks, st)(v))
    assert both.feats.shape == (down.num_voxels, 8)
    both.feats.sum().backward()
    assert v.feats.grad is not None and conv.weight.grad is not None


def test_unpool_module_returns_fine_geometry(rng):
    s = Scene(rng, n=120, extent=8)
    v = _voxels(s, dtype=torch.float64)
    v.feats.requires_grad_(True)
    coarse = svt.MaxPool3d(2)(v)
    up = svt.Unpool(2)(coarse, v)
    assert up.coords is v.coords and up._kmaps is v._kmaps
    parent = pooling.parent_rows(coarse, v, 2)
    torch.testing.assert_close(up.feats, coarse.feats[torch.from_numpy(parent).long()])
    out = svt.cat_voxels(up, v)  # the UNet decoder's skip
    out.feats.sum().backward()
    assert v.feats.grad is not None
    assert repr(svt.Unpool((2, 1, 2))) == "Unpool(stride=(2, 1, 2))"


def test_global_pool_head_after_the_tensor(rng):
    """After GlobalPool the container hands the [B, C] tensor to plain modules."""
    s = Scene(rng, n=80, extent=6, batches=3)
    v = _voxels(s)
    net = svt.SparseSequential(svt.GlobalPool("avg"), nn.Linear(4, 2), nn.ReLU())
    torch.testing.assert_close(net(v), torch.relu(net[1](sv.global_pool(v, "avg"))))


# --- dtypes, empty inputs, errors, exports ----------------------------------------------------------------

def test_bfloat16_on_the_cpu(rng):
    s = Scene(rng)
    for name in ("max_pool2,None", "global_pool_sum", "unpool", "to_dense", "devoxelize"):
        out, f = run_torch(s, name, s.feats(OPS[name][0]), torch.bfloat16)
        out.float().sum().backward()
        assert out.dtype == torch.bfloat16 and f.grad.dtype == torch.bfloat16, name


def test_empty_inputs():
    v = sv.Voxels(torch.zeros((0, 4), dtype=torch.int32), torch.zeros((0, 3), dtype=torch.float64,
                                                                       requires_grad=True))
    outs = [sv.max_pool(v, 2).feats, sv.avg_pool(v, 3, 2).feats, sv.global_pool(v, "max"),
            sv.unpool(v, sv.Voxels(torch.zeros((0, 4), dtype=torch.int32), None)).feats,
            sv.devoxelize(v, torch.zeros((0, 3)), 1.0), sv.to_dense(v, (2, 2, 2))]
    assert [tuple(o.shape) for o in outs] == [(0, 3), (0, 3), (0, 3), (0, 3), (0, 3), (0, 3, 2, 2, 2)]
    sum(o.sum() for o in outs).backward()
    assert v.feats.grad.shape == (0, 3)
    pts = sv.devoxelize(v, torch.ones((4, 3)), 1.0)  # points with no voxel around them: zeros
    assert pts.shape == (4, 3) and not pts.detach().any()


def test_devoxelize_refuses_points_that_require_grad(rng):
    s = Scene(rng)
    v = sv.Voxels(T(s.coords), T(s.feats("fine")).requires_grad_(True))
    with pytest.raises(NotImplementedError, match="not in the point positions"):
        sv.devoxelize(v, T(s.points).requires_grad_(True), VS)
    with torch.no_grad():
        sv.devoxelize(v, T(s.points).requires_grad_(True), VS)


def test_errors_name_the_argument(rng):
    s = Scene(rng)
    v = sv.Voxels(T(s.coords), T(s.feats("fine")).requires_grad_(True))
    with pytest.raises(ValueError, match="kernel_size must be >= 1"):
        svt.MaxPool3d(0)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        svt.AvgPool3d(2, 0)
    with pytest.raises(ValueError, match=r"mode must be one of \('avg', 'max', 'sum'\), got 'mean'"):
        svt.GlobalPool("mean")
    with pytest.raises(ValueError, match=r"mode must be one of"):
        sv.global_pool(v, "mean")
    with pytest.raises(ValueError, match="stride must be >= 1"):
        svt.Unpool(0)
    with pytest.raises(ValueError, match="voxels must be a sparsevox.Voxels"):
        svt.max_pool(v.feats, 2)
    lonely = sv.Voxels(torch.tensor([[0, 9, 9, 9]], dtype=torch.int32), None)
    with pytest.raises(ValueError, match=r"fine voxel \[0, 9, 9, 9\] has no parent"):
        svt.Unpool(2)(sv.max_pool(v, 2), lonely)
    with pytest.raises(ValueError, match=r"x coordinates must be in \[0, 1\]"):
        sv.to_dense(v, (2, 8, 8))


def test_direct_calls_with_numpy_voxels_are_the_core(rng):
    s = Scene(rng)
    v = sv.Voxels(s.coords, s.feats("fine"))
    np.testing.assert_array_equal(svt.max_pool(v, 2).feats, sv.max_pool(v, 2).feats)
    np.testing.assert_array_equal(svt.global_pool(v, "sum"), sv.global_pool(v, "sum"))
    np.testing.assert_array_equal(svt.to_dense(v, s.shape), sv.to_dense(v, s.shape))
    assert isinstance(svt.unpool(sv.max_pool(v, 2), v).feats, np.ndarray)


def test_exports_are_what_the_core_looks_up():
    from sparsevox.adapters.torch import ops
    for name in ops.__all__:
        assert name in svt.__all__ and getattr(svt, name) is getattr(ops, name)
        assert pooling._adapter("torch", name) is getattr(ops, name)
    for name in ("MaxPool3d", "AvgPool3d", "GlobalPool", "Unpool"):
        assert name in svt.__all__ and getattr(svt, name) is getattr(svt.layers, name)


# --- from_dense ----------------------------------------------------------------------------------------

def test_from_dense_forward_and_gradients(rng):
    s = Scene(rng)
    d = s.dense()
    dt = T(d).requires_grad_(True)
    got = sv.from_dense(dt)
    want = sv.from_dense(d)
    np.testing.assert_array_equal(got.coords.numpy(), want.coords)
    np.testing.assert_array_equal(got.feats.detach().numpy(), want.feats)
    assert got.coords.dtype == torch.int32
    g = rng.standard_normal(tuple(got.feats.shape))
    got.feats.backward(T(g))
    expect = np.zeros_like(d)
    b, x, y, z = want.coords.T
    expect[b, :, x, y, z] = g
    np.testing.assert_array_equal(dt.grad.numpy(), expect)
    # with a mask the sites do not move under perturbation: gradcheck
    mask = T(np.abs(d).sum(1) > 0)
    small = T(d).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: sv.from_dense(x, mask).feats, (small,))
    bf = sv.from_dense(T(d).bfloat16().requires_grad_(True), mask)
    assert bf.feats.dtype == torch.bfloat16 and bf.coords.dtype == torch.int32


def test_to_dense_from_dense_round_trip_gradient(rng):
    s = Scene(rng)
    f = T(s.feats("fine")).requires_grad_(True)
    back = sv.from_dense(sv.to_dense(sv.Voxels(T(s.coords), f), s.shape))
    order = np.lexsort(s.coords.T[::-1])  # from_dense's sites are sorted
    torch.testing.assert_close(back.feats, f[torch.from_numpy(order)])
    back.feats.sum().backward()
    torch.testing.assert_close(f.grad, torch.ones_like(f))


# --- GPU ---------------------------------------------------------------------------------------------------

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def cupy():
    return pytest.importorskip("cupy")


def _name(dtype) -> str:
    return str(dtype).split(".")[1]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("name", OPS)
def test_gpu_ops_match_the_cpu(monkeypatch, cupy, rng, name, dtype):
    """CUDA tensors, kernel outputs poisoned: forward and gradient against the CPU in float64 on the same
    (quantised) values; results stay on the GPU in the input dtype."""
    poison_gpu(monkeypatch, cupy)
    s = Scene(rng, n=400, extent=10, batches=3, c=19, points=300)
    level = OPS[name][0]
    feats = quantise(s.feats(level, distinct=False), _name(dtype))
    out, f = run_torch(s, name, feats, dtype, "cuda")
    assert out.is_cuda and out.dtype == dtype
    g = quantise(rng.standard_normal(tuple(out.shape)), _name(dtype))
    out.backward(torch.from_numpy(g).to("cuda", dtype))
    assert f.grad.is_cuda and f.grad.dtype == dtype
    ref, rf = run_torch(s, name, feats)
    ref.backward(torch.from_numpy(g))
    tol = TOL[_name(dtype)]
    assert rel_err(out.detach().double().cpu().numpy(), ref.detach().numpy()) < tol
    assert rel_err(f.grad.double().cpu().numpy(), rf.grad.numpy()) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_from_dense(cupy, rng, dtype):
    s = Scene(rng, n=400, extent=10, batches=3, c=7)
    d = quantise(s.dense(), _name(dtype))
    dt = torch.from_numpy(d).to("cuda", dtype).requires_grad_(True)
    got = sv.from_dense(dt)
    want = sv.from_dense(d)
    assert got.coords.is_cuda and got.feats.dtype == dtype
    np.testing.assert_array_equal(got.coords.cpu().numpy(), want.coords)
    np.testing.assert_array_equal(got.feats.detach().double().cpu().numpy(), want.feats)
    got.feats.float().sum().backward()
    active = np.abs(d).sum(1, keepdims=True) > 0
    np.testing.assert_array_equal(dt.grad.double().cpu().numpy(), active * np.ones_like(d))


@pytest.mark.gpu
def test_gpu_network_on_a_side_stream_matches_the_cpu(monkeypatch, cupy, rng):
    poison_gpu(monkeypatch, cupy)
    s = Scene(rng, n=600, extent=12, batches=2)
    torch.manual_seed(0)
    net = svt.SparseSequential(svt.SparseConv3d(4, 8, 3), nn.ReLU(), svt.MaxPool3d(2), svt.AvgPool3d(3, 2),
                               svt.GlobalPool("max")).double()
    feats = torch.randn(len(s.coords), 4, dtype=torch.float64)
    ref = net(sv.Voxels(T(s.coords), feats))
    ref.sum().backward()
    want = net[0].weight.grad.clone()
    net.zero_grad(set_to_none=True)
    net_gpu = net.to("cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = net_gpu(sv.Voxels(T(s.coords).cuda(), feats.cuda()))
        out.sum().backward()
    stream.synchronize()
    torch.testing.assert_close(out.detach().cpu(), ref.detach())
    torch.testing.assert_close(net_gpu[0].weight.grad.cpu(), want)
