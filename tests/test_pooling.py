"""Max / average / global pooling and unpooling against brute-force float64 references written with
loops and dicts, forward and backward, on the NumPy path and on the GPU path run by the CPU emulator
(``kernels_cu/pooling.cu``, poisoned outputs); GPU variants for every dtype (skipped with "no GPU")."""
import numpy as np
import pytest
from reference import random_voxels
from segment_backends import (DTYPES, TOL, backend, host, np_dtype, poison_gpu, quantise, rel_err,  # noqa: F401
                              to_gpu, use_emulator)

import sparsevox as sv
from sparsevox import pooling, segments

# --- brute-force references ------------------------------------------------------------------------


def window_offsets(ks):
    """DESIGN.md's kernel offsets, z fastest: odd k centred, even k from 0."""
    axes = [[i - (k - 1) // 2 if k % 2 else i for i in range(k)] for k in ks]
    return [(a, b, c) for a in axes[0] for b in axes[1] for c in axes[2]]


def triple(v):
    return tuple(v) if isinstance(v, tuple) else (v, v, v)


def ref_pool(coords, feats, ks, st):
    """``(out coords, max, argmax, mean, members)`` by loops: outputs are unique(floor(c / s)) sorted
    (stride 1: the input sites in input order); members[o] = the input rows in o's window, ascending."""
    ks, st = triple(ks), triple(st)
    rows = {tuple(int(v) for v in c): i for i, c in enumerate(coords)}
    if st == (1, 1, 1):
        outs = [tuple(int(v) for v in c) for c in coords]
    else:
        outs = sorted({(b, x // st[0], y // st[1], z // st[2]) for b, x, y, z in rows})
    c = feats.shape[1]
    mx, mean = np.zeros((len(outs), c)), np.zeros((len(outs), c))
    arg = np.full((len(outs), c), -1)
    members = []
    for o, (b, x, y, z) in enumerate(outs):
        m = sorted(rows[q] for q in ((b, st[0] * x + dx, st[1] * y + dy, st[2] * z + dz)
                                     for dx, dy, dz in window_offsets(ks)) if q in rows)
        members.append(m)
        for ch in range(c):
            best = None
            for i in m:
                if best is None or feats[i, ch] > feats[best, ch]:
                    best = i
            if best is not None:
                mx[o, ch], arg[o, ch] = feats[best, ch], best
            if m:
                mean[o, ch] = sum(feats[i, ch] for i in m) / len(m)
    return np.array(outs, dtype=np.int64).reshape(-1, 4), mx, arg, mean, members


def ref_pool_grads(grad, n_in, arg, members):
    """Adjoints by loops: max sends grad[o, c] to arg[o, c]; mean sends grad[o] / count to each member."""
    g_max, g_avg = np.zeros((n_in, grad.shape[1])), np.zeros((n_in, grad.shape[1]))
    for o, m in enumerate(members):
        for ch in range(grad.shape[1]):
            if arg[o, ch] >= 0:
                g_max[arg[o, ch], ch] += grad[o, ch]
        for i in m:
            g_avg[i] += grad[o] / len(m)
    return g_max, g_avg


def ref_global(batch, feats, nb, mode):
    out = np.zeros((nb, feats.shape[1]))
    arg = np.full((nb, feats.shape[1]), -1)
    for b in range(nb):
        rows = [i for i in range(len(batch)) if batch[i] == b]
        for ch in range(feats.shape[1]):
            vals = [feats[i, ch] for i in rows]
            if not rows:
                continue
            if mode == "max":
                best = rows[0]
                for i in rows:
                    if feats[i, ch] > feats[best, ch]:
                        best = i
                out[b, ch], arg[b, ch] = feats[best, ch], best
            else:
                out[b, ch] = sum(vals) / (len(rows) if mode == "avg" else 1)
    return out, arg


def ref_global_grad(batch, grad, arg, mode):
    g = np.zeros((len(batch), grad.shape[1]))
    counts = {b: int(np.sum(batch == b)) for b in set(batch.tolist())}
    for i, b in enumerate(batch):
        for ch in range(grad.shape[1]):
            if mode == "max":
                g[i, ch] = grad[b, ch] if arg[b, ch] == i else 0.0
            else:
                g[i, ch] = grad[b, ch] / (counts[b] if mode == "avg" else 1)
    return g


CASES = [(2, None), (3, 2), (3, 1), (2, 2), ((2, 1, 3), (2, 1, 1)), (1, 2), (3, 3)]


def make_voxels(rng, n=150, extent=7, batches=3, c=5, dtype="float64"):
    coords = random_voxels(rng, n, extent=extent, batches=batches)
    feats = quantise(rng.standard_normal((len(coords), c)), dtype)
    return coords, feats


# --- CPU: NumPy and the emulated GPU path ----------------------------------------------------------

@pytest.mark.parametrize("ks,st", CASES)
def test_pool_forward_backward_match_brute_force(backend, rng, ks, st):
    coords, feats = make_voxels(rng)
    v = sv.Voxels(coords, feats)
    st_eff = ks if st is None else st
    oc, mx, arg, mean, members = ref_pool(coords, feats, ks, st_eff)
    pm, pa = sv.max_pool(v, ks, st), sv.avg_pool(v, ks, st)
    for out in (pm, pa):
        np.testing.assert_array_equal(out.coords, oc)
    np.testing.assert_array_equal(pm.feats, mx)
    assert rel_err(pa.feats, mean) < 1e-13
    # core forward / backward
    pmap = pooling.pool_map(sv.kernel_map(v, ks, st_eff))
    out, am = pooling.max_pool_forward(feats, pmap)
    np.testing.assert_array_equal(am, arg)
    grad = rng.standard_normal(out.shape)
    g_max, g_avg = ref_pool_grads(grad, len(coords), arg, members)
    assert rel_err(pooling.max_pool_backward(grad, am, pmap), g_max) < 1e-13
    assert rel_err(pooling.avg_pool_backward(grad, pmap), g_avg) < 1e-13
    assert pooling.max_pool_backward(grad, am, pmap).dtype == np.float64


@pytest.mark.parametrize("ks,st", [(2, 2), (3, 2), (3, 1), ((1, 2, 3), (1, 2, 2))])
def test_pool_sites_and_rows_are_the_strided_convs(rng, ks, st):
    coords, feats = make_voxels(rng, c=2)
    v = sv.Voxels(coords, feats)
    k = int(np.prod(triple(ks)))
    conv = sv.spatially_sparse_conv(v, rng.standard_normal((k, 2, 3)), ks, st)
    for out in (sv.max_pool(v, ks, st), sv.avg_pool(v, ks, st)):
        np.testing.assert_array_equal(out.coords, conv.coords)
    if st == 1:
        assert sv.max_pool(v, ks, st).coords is v.coords  # same geometry object, maps shared


def test_max_pool_ties_go_to_the_lowest_input_row(backend, rng):
    coords = random_voxels(rng, 200, extent=6, batches=2)
    feats = rng.integers(0, 3, (len(coords), 4)).astype(np.float64)  # many ties
    v = sv.Voxels(coords, feats)
    _, mx, arg, _, members = ref_pool(coords, feats, 3, 2)
    pmap = pooling.pool_map(sv.kernel_map(v, 3, 2))
    out, am = pooling.max_pool_forward(feats, pmap)
    np.testing.assert_array_equal(out, mx)
    np.testing.assert_array_equal(am, arg)
    for o, m in enumerate(members):  # the winner is the first row holding the maximum
        for ch in range(4):
            assert am[o, ch] == min(i for i in m if feats[i, ch] == mx[o, ch])
    g = pooling.max_pool_backward(np.ones_like(out), am, pmap)
    assert g.sum() == out.size and set(np.unique(g)) <= set(range(28))


def test_max_pool_nan_propagates_and_takes_the_gradient(backend):
    coords = np.array([[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 5, 5, 5]], np.int32)
    feats = np.array([[1.0, 2.0], [np.nan, 7.0], [np.nan, -1.0], [3.0, 3.0]])
    v = sv.Voxels(coords, feats)
    pmap = pooling.pool_map(sv.kernel_map(v, 2, 2))
    out, am = pooling.max_pool_forward(feats, pmap)
    assert np.isnan(out[0, 0]) and out[0, 1] == 7.0 and am[0, 0] == 1 and am[0, 1] == 1
    np.testing.assert_array_equal(out[1], [3.0, 3.0])
    g = pooling.max_pool_backward(np.ones_like(out), am, pmap)
    np.testing.assert_array_equal(g, [[0, 0], [1, 1], [0, 0], [1, 1]])


def test_pool_output_without_inputs_is_zero(backend):
    # kernel 1, stride 2: output 0 reads only input 0, which is absent; input 1 maps to output 0
    v = sv.Voxels(np.array([[0, 1, 1, 1], [0, 2, 2, 2]], np.int32), np.array([[-5.0], [-2.0]]))
    pm, pa = sv.max_pool(v, 1, 2), sv.avg_pool(v, 1, 2)
    np.testing.assert_array_equal(pm.coords, [[0, 0, 0, 0], [0, 1, 1, 1]])
    np.testing.assert_array_equal(pm.feats, [[0.0], [-2.0]])
    np.testing.assert_array_equal(pa.feats, [[0.0], [-2.0]])
    pmap = pooling.pool_map(sv.kernel_map(v, 1, 2))
    out, am = pooling.max_pool_forward(v.feats, pmap)
    np.testing.assert_array_equal(am, [[-1], [1]])
    np.testing.assert_array_equal(pooling.max_pool_backward(np.ones((2, 1)), am, pmap), [[0.0], [1.0]])


@pytest.mark.parametrize("op", ["max", "avg"])
def test_pool_backward_matches_finite_differences(rng, op):
    coords, feats = make_voxels(rng, n=60, extent=5, batches=2, c=3)
    v = sv.Voxels(coords, feats)
    pmap = pooling.pool_map(sv.kernel_map(v, 3, 2))
    fwd = (lambda f: pooling.max_pool_forward(f, pmap)[0]) if op == "max" else \
        (lambda f: pooling.avg_pool_forward(f, pmap))
    out = fwd(feats)
    grad = rng.standard_normal(out.shape)
    got = pooling.max_pool_backward(grad, pooling.max_pool_forward(feats, pmap)[1], pmap) if op == "max" \
        else pooling.avg_pool_backward(grad, pmap)
    eps, fd = 1e-6, np.zeros_like(feats)
    for i in range(feats.shape[0]):
        for ch in range(feats.shape[1]):
            d = np.zeros_like(feats)
            d[i, ch] = eps
            fd[i, ch] = np.sum((fwd(feats + d) - fwd(feats - d)) * grad) / (2 * eps)
    assert rel_err(got, fd) < 1e-7


@pytest.mark.parametrize("mode", ["avg", "max", "sum"])
def test_global_pool_matches_brute_force(backend, rng, mode):
    coords, feats = make_voxels(rng, n=120, batches=4)
    coords = coords[coords[:, 0] != 1]  # batch item 1 empty: zeros
    feats = feats[: len(coords)]
    v = sv.Voxels(coords, feats)
    nb = int(coords[:, 0].max()) + 1
    want, arg = ref_global(coords[:, 0], feats, nb, mode)
    got = sv.global_pool(v, mode)
    assert got.shape == (nb, feats.shape[1]) and got.dtype == feats.dtype
    assert rel_err(got, want) < 1e-13 and not got[1].any()
    out, am = pooling.global_pool_forward(feats, coords[:, 0], nb, mode)
    grad = rng.standard_normal(out.shape)
    if mode == "max":
        np.testing.assert_array_equal(am, arg)
    else:
        assert am is None
    g = pooling.global_pool_backward(grad, coords[:, 0], mode, am)
    assert rel_err(g, ref_global_grad(coords[:, 0], grad, arg, mode)) < 1e-13


@pytest.mark.parametrize("mode", ["avg", "max", "sum"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_global_pool_long_segments_take_two_passes(monkeypatch, rng, mode, dtype):
    """GPU path (emulated): segments longer than CHUNK reduce in chunks, then over the chunks' partials."""
    dev = use_emulator(monkeypatch)
    monkeypatch.setattr(segments, "CHUNK", 7)
    coords, _ = make_voxels(rng, n=90, batches=3, c=3, dtype=dtype)
    feats = rng.integers(-2, 3, (len(coords), 3)).astype(np.float64)  # ties across chunks: lowest row wins
    nb = int(coords[:, 0].max()) + 1
    want, arg = ref_global(coords[:, 0], feats, nb, mode)
    out, am = pooling.global_pool_forward(feats.astype(np_dtype(dtype)), coords[:, 0], nb, mode)
    assert out.dtype == np_dtype(dtype)
    assert rel_err(out, want) < TOL[dtype], mode
    if mode == "max":
        np.testing.assert_array_equal(am, arg)
    acc = "double" if dtype == "float64" else "float"
    names = {e for e, _ in dev.launches}
    assert any(e.endswith(f", {acc}>") for e in names), names  # the partials pass ran


@pytest.mark.parametrize("c", [1, 6, 37])  # 37: two channel blocks of the launch grid
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_kernels_every_dtype(monkeypatch, rng, dtype, c):
    """The GPU path for every dtype: inputs quantised to the dtype, float64 brute force as the truth."""
    use_emulator(monkeypatch)
    dt = np_dtype(dtype)
    coords, feats = make_voxels(rng, n=120, c=c, dtype=dtype)
    v = sv.Voxels(coords, feats.astype(dt))
    oc, mx, arg, mean, members = ref_pool(coords, feats, 3, 2)
    pmap = pooling.pool_map(sv.kernel_map(v, 3, 2))
    out, am = pooling.max_pool_forward(v.feats, pmap)
    assert out.dtype == dt and am.dtype == np.int32
    np.testing.assert_array_equal(out.astype(np.float64), mx)
    np.testing.assert_array_equal(am, arg)
    avg = pooling.avg_pool_forward(v.feats, pmap)
    assert avg.dtype == dt and rel_err(avg, mean) < TOL[dtype]
    grad = quantise(rng.standard_normal(out.shape), dtype)
    g_max, g_avg = ref_pool_grads(grad, len(coords), arg, members)
    assert rel_err(pooling.max_pool_backward(grad.astype(dt), am, pmap), g_max) < TOL[dtype]
    assert rel_err(pooling.avg_pool_backward(grad.astype(dt), pmap), g_avg) < TOL[dtype]
    for mode in ("avg", "max", "sum"):
        want, _ = ref_global(coords[:, 0], feats, int(coords[:, 0].max()) + 1, mode)
        assert rel_err(sv.global_pool(v, mode), want) < TOL[dtype], mode
    coarse = sv.max_pool(v, 2)
    fine = sv.unpool(coarse, v)
    assert fine.feats.dtype == dt
    want, _ = ref_unpool(coords, host_coords(coarse), coarse.feats.astype(np.float64), 2)
    np.testing.assert_array_equal(fine.feats.astype(np.float64), want)


def host_coords(v):
    return np.asarray(v.coords, dtype=np.int64)


def ref_unpool(fine, coarse, coarse_feats, s):
    s = triple(s)
    rows = {tuple(int(v) for v in c): i for i, c in enumerate(coarse)}
    parent = [rows[(int(b), x // s[0], y // s[1], z // s[2])] for b, x, y, z in fine.tolist()]
    return np.array([coarse_feats[p] for p in parent]).reshape(len(fine), -1), parent


@pytest.mark.parametrize("stride", [2, (2, 1, 3)])
def test_unpool_forward_backward(backend, rng, stride):
    coords, feats = make_voxels(rng, n=160, c=4)
    fine = sv.Voxels(coords, None)
    coarse = sv.avg_pool(sv.Voxels(coords, feats), stride)
    want, parent = ref_unpool(coords, host_coords(coarse), coarse.feats, stride)
    out = sv.unpool(coarse, fine, stride)
    assert out.coords is fine.coords
    np.testing.assert_array_equal(out.feats, want)
    grad = rng.standard_normal(out.feats.shape)
    g = np.zeros(coarse.feats.shape)
    for i, p in enumerate(parent):
        g[p] += grad[i]
    got = pooling.unpool_backward(grad, np.array(parent, np.int32), coarse.num_voxels)
    assert rel_err(got, g) < 1e-13
    np.testing.assert_array_equal(pooling.parent_rows(coarse, fine, stride), parent)


def test_unpool_missing_parent_is_an_error_naming_it():
    coarse = sv.Voxels(np.array([[0, 0, 0, 0]], np.int32), np.ones((1, 2)))
    fine = sv.Voxels(np.array([[0, 1, 1, 1], [1, 1, 0, 0], [0, 2, 0, 0]], np.int32), None)
    with pytest.raises(ValueError, match=r"fine voxel \[1, 1, 0, 0\] has no parent \[1, 0, 0, 0\].*2 fine"):
        sv.unpool(coarse, fine)


def test_empty_inputs(backend):
    v = sv.Voxels(np.zeros((0, 4), np.int32), np.zeros((0, 3)))
    for op in (sv.max_pool, sv.avg_pool):
        out = op(v, 2)
        assert out.feats.shape == (0, 3) and out.coords.shape == (0, 4)
    assert sv.global_pool(v, "max").shape == (0, 3)
    assert sv.unpool(v, sv.Voxels(np.zeros((0, 4), np.int32), None)).feats.shape == (0, 3)


def test_bad_arguments_name_the_argument(rng):
    coords, feats = make_voxels(rng, n=20, c=2)
    v = sv.Voxels(coords, feats)
    with pytest.raises(ValueError, match="kernel_size must be >= 1"):
        sv.max_pool(v, 0)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        sv.avg_pool(v, 2, 0)
    with pytest.raises(ValueError, match="kernel_size must be an int or a 3-tuple"):
        sv.max_pool(v, (2, 2))
    with pytest.raises(ValueError, match=r"mode must be one of \('avg', 'max', 'sum'\), got 'mean'"):
        sv.global_pool(v, "mean")
    with pytest.raises(ValueError, match="stride must be >= 1"):
        sv.unpool(v, v, 0)
    with pytest.raises(ValueError, match="voxels must be a sparsevox.Voxels"):
        sv.max_pool(feats, 2)
    pmap = pooling.pool_map(sv.kernel_map(v, 2, 2))
    with pytest.raises(ValueError, match=f"feats must have {len(coords)} rows"):
        pooling.max_pool_forward(feats[:-1], pmap)
    with pytest.raises(ValueError, match="grad_out must have"):
        pooling.avg_pool_backward(np.zeros((pmap.num_out + 1, 2)), pmap)
    with pytest.raises(ValueError, match=r"feats dtype must be one of"):
        pooling.avg_pool_forward(feats.astype(np.int32), pmap)
    with pytest.raises(ValueError, match=r"batch indices must be in \[0, 1\]"):
        pooling.global_pool_forward(feats, np.full(len(coords), 2), 2, "sum")
    with pytest.raises(ValueError, match="needs the argmax"):
        pooling.global_pool_backward(np.zeros((1, 2)), np.zeros(len(coords), np.int32), "max")


# --- GPU ------------------------------------------------------------------------------------------

@pytest.fixture
def cupy():
    return pytest.importorskip("cupy")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ks,st", [(2, None), (3, 2), (3, 1)])
def test_gpu_pool_matches_brute_force(monkeypatch, cupy, rng, dtype, ks, st):
    poison_gpu(monkeypatch, cupy)
    coords, feats = make_voxels(rng, n=400, extent=10, c=19, dtype=dtype)
    v = sv.Voxels(cupy.asarray(coords), to_gpu(feats, dtype))
    oc, mx, arg, mean, members = ref_pool(coords, feats, ks, ks if st is None else st)
    pm, pa = sv.max_pool(v, ks, st), sv.avg_pool(v, ks, st)
    assert isinstance(pm.feats, cupy.ndarray) and pm.feats.dtype == v.feats.dtype
    np.testing.assert_array_equal(cupy.asnumpy(pm.coords), oc)
    np.testing.assert_array_equal(host(pm.feats), mx)
    assert rel_err(host(pa.feats), mean) < TOL[dtype]
    pmap = pooling.pool_map(sv.kernel_map(v, ks, ks if st is None else st))
    out, am = pooling.max_pool_forward(v.feats, pmap)
    np.testing.assert_array_equal(cupy.asnumpy(am), arg)
    grad = quantise(rng.standard_normal(out.shape), dtype)
    g_max, g_avg = ref_pool_grads(grad, len(coords), arg, members)
    gg = to_gpu(grad, dtype)
    assert rel_err(host(pooling.max_pool_backward(gg, am, pmap)), g_max) < TOL[dtype]
    assert rel_err(host(pooling.avg_pool_backward(gg, pmap)), g_avg) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["avg", "max", "sum"])
@pytest.mark.parametrize("n", [300, 5000])  # 5000 rows over 3 items: longer than CHUNK, two passes
def test_gpu_global_pool_matches_brute_force(monkeypatch, cupy, rng, dtype, mode, n):
    poison_gpu(monkeypatch, cupy)
    coords, feats = make_voxels(rng, n=n, extent=14, batches=4, c=33, dtype=dtype)
    coords, feats = coords[coords[:, 0] != 2], feats[coords[:, 0] != 2]  # an empty item
    nb = int(coords[:, 0].max()) + 1
    want, arg = ref_global(coords[:, 0], feats, nb, mode)
    b = cupy.asarray(coords[:, 0])
    out, am = pooling.global_pool_forward(to_gpu(feats, dtype), b, nb, mode)
    assert rel_err(host(out), want) < TOL[dtype]
    if mode == "max":
        np.testing.assert_array_equal(cupy.asnumpy(am), arg)
    grad = quantise(rng.standard_normal(want.shape), dtype)
    g = pooling.global_pool_backward(to_gpu(grad, dtype), b, mode, am)
    assert rel_err(host(g), ref_global_grad(coords[:, 0], grad, arg, mode)) < TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_unpool(monkeypatch, cupy, rng, dtype):
    poison_gpu(monkeypatch, cupy)
    coords, feats = make_voxels(rng, n=400, extent=10, c=7, dtype=dtype)
    fine = sv.Voxels(cupy.asarray(coords), to_gpu(feats, dtype))
    coarse = sv.max_pool(fine, 2)
    want, parent = ref_unpool(coords, cupy.asnumpy(coarse.coords), host(coarse.feats), 2)
    out = sv.unpool(coarse, fine)
    np.testing.assert_array_equal(host(out.feats), want)
    grad = quantise(rng.standard_normal(want.shape), dtype)
    g = np.zeros(coarse.feats.shape)
    for i, p in enumerate(parent):
        g[p] += grad[i]
    got = pooling.unpool_backward(to_gpu(grad, dtype), cupy.asarray(np.array(parent, np.int32)), coarse.num_voxels)
    assert rel_err(host(got), g) < TOL[dtype]


@pytest.mark.gpu
def test_gpu_pool_on_torch_tensors_returns_torch(cupy, rng):
    torch = pytest.importorskip("torch")
    coords, feats = make_voxels(rng, n=200, c=4, dtype="float32")
    v = sv.Voxels(torch.as_tensor(coords, device="cuda"), torch.as_tensor(feats, dtype=torch.float32, device="cuda"))
    out = sv.max_pool(v, 2)
    assert isinstance(out.feats, torch.Tensor) and out.feats.device.type == "cuda"
    _, mx, _, _, _ = ref_pool(coords, feats, 2, 2)
    np.testing.assert_array_equal(out.feats.double().cpu().numpy(), mx)
    g = sv.global_pool(v, "avg")
    assert isinstance(g, torch.Tensor) and g.shape == (int(coords[:, 0].max()) + 1, 4)


def test_torch_and_jax_cpu_get_their_own_arrays_back(rng):
    """Until the adapters wrap these ops, the core computes them in the caller's library; a torch tensor
    that requires grad is refused rather than silently detached."""
    torch = pytest.importorskip("torch")
    coords, feats = make_voxels(rng, n=80, c=3, dtype="bfloat16")
    v = sv.Voxels(torch.as_tensor(coords), torch.as_tensor(feats, dtype=torch.float32).bfloat16())
    _, mx, _, _, _ = ref_pool(coords, feats, 2, 2)
    out = sv.max_pool(v, 2)
    assert out.feats.dtype == torch.bfloat16 and out.coords.dtype == torch.int32
    np.testing.assert_array_equal(out.feats.double().numpy(), mx)
    assert sv.global_pool(v, "sum").dtype == torch.bfloat16
    assert sv.unpool(out, v).feats.dtype == torch.bfloat16
    import sparsevox.adapters.torch as ta
    if not hasattr(ta, "max_pool"):
        with pytest.raises(NotImplementedError, match="no differentiable max_pool"):
            sv.max_pool(sv.Voxels(v.coords, v.feats.float().requires_grad_()), 2)
    jnp = pytest.importorskip("jax.numpy")
    vj = sv.Voxels(jnp.asarray(coords), jnp.asarray(feats, dtype=jnp.float32))
    oj = sv.avg_pool(vj, 2)
    assert type(oj.feats).__module__.startswith("jax")
    assert sv.global_pool(vj, "max").shape == (int(coords[:, 0].max()) + 1, 3)
