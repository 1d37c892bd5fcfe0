"""Depthwise sparse convolution against the float64 dense oracle.

A depthwise convolution is the dense oracle with a diagonal weight, ``W_full[k] = diag(w[k])``; its
weight gradient is the diagonal of the oracle's ``[K, C, C]`` weight gradient.

CPU: EXPLICIT for every kind, forward and backward, the public signature with a ``KernelMap`` and with
an ``(in_maps, out_maps, offsets)`` tuple, bad inputs; and the real ``kernels_cu/depthwise.cu`` run by
a CPU thread emulator (``depthwise_cpu_emulator.py``) with the backend's launch geometry. GPU (skipped
with "no GPU" elsewhere): IMPLICIT for every dtype × C ∈ {3, 17, 64, 256} × forward / dgrad / wgrad,
every parameter combination the autotuner may pick, poisoned (NaN-filled) destinations, every kind.
"""
import functools

import numpy as np
import pytest
from reference import TOL, dense_conv, dense_conv_grads, expected_out_coords, random_voxels, rel_err

import sparsevox as sv
from sparsevox.errors import AlgorithmUnavailableError
from sparsevox.testing import KINDS, kind_args

DTYPES = ["float64", "float32", "float16", "bfloat16"]


def np_dtype(name):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def diag(w):
    """``[K, C]`` depthwise weight → ``[K, C, C]`` dense weight with ``w[k]`` on the diagonal."""
    w = np.asarray(w, dtype=np.float64)
    full = np.zeros((w.shape[0], w.shape[1], w.shape[1]))
    idx = np.arange(w.shape[1])
    full[:, idx, idx] = w
    return full


def oracle(case, feats, w, grad_out=None):
    """Float64 ``out`` (and ``(grad_feats, grad_w)`` when ``grad_out`` is given) of the depthwise conv."""
    coords, ks, s, dil, tr = case["coords"], case["ks"], case["s"], case["dil"], case["tr"]
    out_coords = case["out_coords"]
    feats = np.asarray(feats, dtype=np.float64)
    out = dense_conv(coords, feats, diag(w), ks, s, dil, tr, out_coords)
    if grad_out is None:
        return out
    gf, gw_full = dense_conv_grads(coords, feats, diag(w), np.asarray(grad_out, np.float64), ks, s, dil, tr, out_coords)
    return out, gf, np.diagonal(gw_full, axis1=1, axis2=2).copy()


def make_case(rng, kind, ks=3, stride=2, dilation=1, batches=2, n=120, extent=7):
    """Input coords and the kernel map of one layer of the given kind (transposed: back onto fine sites)."""
    s, tr, gen = kind_args(kind, stride)
    fine = random_voxels(rng, n * batches, extent=extent, batches=batches)
    output = None
    coords = fine
    if kind == "transposed":
        output = sv.Voxels(fine, None)
        coords = expected_out_coords(fine, 2, s, 1, False, False)
    v = sv.Voxels(coords, None)
    kmap = sv.kernel_map(v, ks, s, dilation, tr, gen, output)
    return {"coords": coords, "ks": ks, "s": s, "dil": dilation, "tr": tr, "kmap": kmap,
            "out_coords": np.asarray(kmap.out_coords)}


# --- CPU: EXPLICIT --------------------------------------------------------------------------------

@pytest.mark.parametrize("ks,dilation", [(3, 1), (2, 1), ((3, 1, 3), 2)])
@pytest.mark.parametrize("kind", KINDS)
def test_explicit_forward_and_grads_match_oracle(rng, kind, ks, dilation):
    case = make_case(rng, kind, ks, 2, dilation)
    kmap = case["kmap"]
    c = 5
    x = rng.standard_normal((kmap.num_in, c))
    w = rng.standard_normal((kmap.num_offsets, c))
    g = rng.standard_normal((kmap.num_out, c))
    ref, rgf, rgw = oracle(case, x, w, g)
    out = sv.depthwise_forward(x, w, kmap, "explicit")
    assert out.shape == ref.shape and rel_err(out, ref) < TOL["float64"]
    gf, gw = sv.depthwise_backward(g, x, w, kmap, "explicit")
    assert gf.shape == x.shape and rel_err(gf, rgf) < TOL["float64"]
    assert gw.shape == w.shape and rel_err(gw, rgw) < TOL["float64"]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["submanifold", "strided", "transposed"])
def test_explicit_dtypes_within_tolerance(rng, kind, dtype):
    case = make_case(rng, kind)
    kmap = case["kmap"]
    dt = np_dtype(dtype)
    x = rng.standard_normal((kmap.num_in, 16)).astype(dt)
    w = rng.standard_normal((kmap.num_offsets, 16)).astype(dt)
    g = rng.standard_normal((kmap.num_out, 16)).astype(dt)
    ref, rgf, rgw = oracle(case, x.astype(np.float64), w.astype(np.float64), g.astype(np.float64))
    out = sv.depthwise_forward(x, w, kmap, "explicit")
    gf, gw = sv.depthwise_backward(g, x, w, kmap, "explicit")
    assert out.dtype == dt and gf.dtype == dt and gw.dtype == dt
    assert rel_err(out.astype(np.float64), ref) < TOL[dtype]
    assert rel_err(gf.astype(np.float64), rgf) < TOL[dtype]
    assert rel_err(gw.astype(np.float64), rgw) < TOL[dtype]


def test_explicit_grads_match_finite_differences(rng):
    """Central differences of ``sum(out * g)`` in float64 (independent of the oracle's backward)."""
    case = make_case(rng, "strided", n=40, extent=5, batches=1)
    kmap = case["kmap"]
    x = rng.standard_normal((kmap.num_in, 3))
    w = rng.standard_normal((kmap.num_offsets, 3))
    g = rng.standard_normal((kmap.num_out, 3))
    gf, gw = sv.depthwise_backward(g, x, w, kmap, "explicit")

    def loss(x_, w_):
        return float((sv.depthwise_forward(x_, w_, kmap, "explicit") * g).sum())

    eps = 1e-6
    for _ in range(6):
        i, c = rng.integers(kmap.num_in), rng.integers(3)
        d = np.zeros_like(x)
        d[i, c] = eps
        assert abs((loss(x + d, w) - loss(x - d, w)) / (2 * eps) - gf[i, c]) < 1e-6
        k, c = rng.integers(kmap.num_offsets), rng.integers(3)
        d = np.zeros_like(w)
        d[k, c] = eps
        assert abs((loss(x, w + d) - loss(x, w - d)) / (2 * eps) - gw[k, c]) < 1e-6


@pytest.mark.parametrize("as_tuple", [False, True], ids=["KernelMap", "tuple"])
def test_guide_signature(rng, as_tuple):
    case = make_case(rng, "submanifold")
    kmap = case["kmap"]
    x = rng.standard_normal((kmap.num_in, 7)).astype(np.float32)
    w = rng.standard_normal((kmap.num_offsets, 7)).astype(np.float32)
    km = (kmap.in_maps, kmap.out_maps, kmap.offsets) if as_tuple else kmap
    fwd = [sv.SPARSE_DEPTHWISE_CONV_FWD_ALGO_MODE.EXPLICIT, sv.SPARSE_DEPTHWISE_CONV_FWD_ALGO_MODE.IMPLICIT]
    bwd = [sv.SPARSE_DEPTHWISE_CONV_BWD_ALGO_MODE.EXPLICIT, "implicit"]
    out = sv.spatially_sparse_depthwise_conv(x, w, km, kmap.num_out, fwd_algo=fwd, bwd_algo=bwd)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (kmap.num_out, 7)
    assert rel_err(out, oracle(case, x, w)) < TOL["float32"]


def test_guide_signature_torch_autograd(rng):
    torch = pytest.importorskip("torch")
    case = make_case(rng, "strided")
    kmap = case["kmap"]
    x = rng.standard_normal((kmap.num_in, 6))
    w = rng.standard_normal((kmap.num_offsets, 6))
    g = rng.standard_normal((kmap.num_out, 6))
    ref, rgf, rgw = oracle(case, x, w, g)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    out = sv.spatially_sparse_depthwise_conv(xt, wt, kmap, kmap.num_out, "explicit", "explicit")
    assert isinstance(out, torch.Tensor) and rel_err(out.detach().numpy(), ref) < TOL["float64"]
    out.backward(torch.tensor(g))
    assert rel_err(xt.grad.numpy(), rgf) < TOL["float64"]
    assert rel_err(wt.grad.numpy(), rgw) < TOL["float64"]


def test_bad_inputs_raise_value_error(rng):
    kmap = make_case(rng, "submanifold")["kmap"]
    k, n = kmap.num_offsets, kmap.num_in
    x = np.zeros((n, 4), np.float32)
    with pytest.raises(ValueError, match="K="):
        sv.spatially_sparse_depthwise_conv(x, np.zeros((k - 1, 4), np.float32), kmap, kmap.num_out)
    with pytest.raises(ValueError, match="C=4"):
        sv.spatially_sparse_depthwise_conv(x, np.zeros((k, 5), np.float32), kmap, kmap.num_out)
    with pytest.raises(ValueError, match="num_out_coords"):
        sv.spatially_sparse_depthwise_conv(x, np.zeros((k, 4), np.float32), kmap, kmap.num_out + 1)
    with pytest.raises(ValueError, match="rows"):
        sv.spatially_sparse_depthwise_conv(x[1:], np.zeros((k, 4), np.float32), kmap, kmap.num_out)
    with pytest.raises(ValueError, match="kernel_map"):
        sv.spatially_sparse_depthwise_conv(x, np.zeros((k, 4), np.float32), (kmap.in_maps,), kmap.num_out)
    with pytest.raises(ValueError, match="dtype"):
        sv.spatially_sparse_depthwise_conv(x, np.zeros((k, 4), np.float64), kmap, kmap.num_out)


def test_implicit_alone_on_cpu_is_a_clear_error(rng):
    kmap = make_case(rng, "submanifold")["kmap"]
    x = np.zeros((kmap.num_in, 4), np.float32)
    w = np.zeros((kmap.num_offsets, 4), np.float32)
    with pytest.raises(AlgorithmUnavailableError, match="implicit: IMPLICIT runs on CUDA GPUs only"):
        sv.spatially_sparse_depthwise_conv(x, w, kmap, kmap.num_out, fwd_algo="implicit")


def test_implicit_params_space_is_small():
    from sparsevox.algorithms import depthwise_implicit as dwi
    for direction in ("fwd", "dgrad", "wgrad"):
        params = dwi._params(direction, None)
        assert 1 <= len(params) <= 6 and len({tuple(sorted(p.items())) for p in params}) == len(params)


# --- GPU: IMPLICIT --------------------------------------------------------------------------------

GPU_CHANNELS = [3, 17, 64, 256]


@functools.lru_cache(maxsize=None)
def gpu_case(kind: str, c: int, n: int = 150, extent: int = 8):
    """A fixed case per (kind, C): CPU map and float64 inputs, shared by the dtype × direction tests."""
    seed = 1000 + 31 * KINDS.index(kind) + c
    rng = np.random.default_rng(seed)
    case = make_case(rng, kind, n=n, extent=extent)
    kmap = case["kmap"]
    x = rng.standard_normal((kmap.num_in, c))
    w = rng.standard_normal((kmap.num_offsets, c))
    g = rng.standard_normal((kmap.num_out, c))
    return case, x, w, g, seed


@functools.lru_cache(maxsize=None)
def quantised(kind, c, dtype):
    """Host inputs rounded to ``dtype`` and the float64 oracle of exactly those values."""
    import cupy
    case, x, w, g, seed = gpu_case(kind, c)
    # The oracle is read at the GPU map's own output sites (whatever order its builder chose).
    case = {**case, "out_coords": cupy.asnumpy(gpu_kmap(kind, c).out_coords)}
    dt = np_dtype(dtype)
    xq, wq, gq = (a.astype(dt) for a in (x, w, g))
    ref = oracle(case, xq.astype(np.float64), wq.astype(np.float64), gq.astype(np.float64))
    return xq, wq, gq, ref, seed


def gpu_inputs(kind, c, dtype):
    """GPU kernel map, inputs quantised to ``dtype`` on the GPU, ``(out, grad_feats, grad_w)`` oracle, seed."""
    import cupy
    xq, wq, gq, ref, seed = quantised(kind, c, dtype)
    return gpu_kmap(kind, c), cupy.asarray(xq), cupy.asarray(wq), cupy.asarray(gq), ref, seed


@functools.lru_cache(maxsize=None)
def gpu_kmap(kind, c):
    """The same geometry's kernel map built from GPU coordinates (one per case, so derived tables are shared)."""
    import cupy
    case = gpu_case(kind, c)[0]
    s, tr, gen = kind_args(kind, 2)
    output = None
    if kind == "transposed":
        output = sv.Voxels(cupy.asarray(case["out_coords"]), None)
    kmap = sv.kernel_map(sv.Voxels(cupy.asarray(case["coords"]), None), case["ks"], s, case["dil"], tr, gen, output)
    assert kmap.num_out == case["out_coords"].shape[0]
    return kmap


def poisoned(shape, dtype):
    """A GPU destination filled with NaN, so any element the kernel does not write shows up."""
    import cupy
    return cupy.asarray(np.full(shape, np.nan, dtype=dtype))


def param_sets(direction):
    from sparsevox.algorithms import depthwise_implicit as dwi
    return dwi._params(direction, None)


@pytest.mark.gpu
@pytest.mark.parametrize("direction", ["fwd", "dgrad", "wgrad"])
@pytest.mark.parametrize("c", GPU_CHANNELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_implicit_matches_oracle(dtype, c, direction):
    import cupy
    from sparsevox.algorithms import depthwise_implicit as dwi
    kmap, x, w, g, (ref, rgf, rgw), seed = gpu_inputs("submanifold", c, dtype)
    print(f"seed={seed}")
    for p in param_sets(direction):
        if direction == "fwd":
            dst = poisoned((kmap.num_out, c), x.dtype)
            got = dwi.forward(x, w, kmap, out=dst, **p)
            assert got is dst
            want = ref
        elif direction == "dgrad":
            dst = poisoned((kmap.num_in, c), x.dtype)
            got = dwi.dgrad(g, w, kmap, out=dst, **p)
            want = rgf
        else:
            got = dwi.wgrad(x, g, kmap, kmap.num_offsets, **p)
            want = rgw
        got = cupy.asnumpy(got)
        assert got.dtype == x.dtype and got.shape == want.shape
        err = rel_err(got.astype(np.float64), want)
        assert err < TOL[dtype], f"{direction} {p}: rel err {err:.3g} (tolerance {TOL[dtype]})"


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_implicit_every_kind_through_public_api(kind, dtype):
    """IMPLICIT chosen by name through the core entry points, for every kind (odd C = 17, and C = 130)."""
    for c in (17, 130):
        kmap, x, w, g, (ref, rgf, rgw), _ = gpu_inputs(kind, c, dtype)
        out = sv.spatially_sparse_depthwise_conv(x, w, kmap, kmap.num_out, "implicit", "implicit")
        gf, gw = sv.depthwise_backward(g, x, w, kmap, "implicit")
        for got, want in ((out, ref), (gf, rgf), (gw, rgw)):
            err = rel_err(got.get().astype(np.float64), want)
            assert err < TOL[dtype], f"{kind} C={c}: rel err {err:.3g}"


@pytest.mark.gpu
def test_neighbour_tables_and_lists_match_csr():
    import cupy
    from sparsevox.algorithms import depthwise_implicit as dwi
    kmap = gpu_kmap("strided", 17)
    nbr = cupy.asnumpy(dwi.neighbour_table(kmap))
    rev = cupy.asnumpy(dwi.neighbour_table(kmap, reverse=True))
    assert dwi.neighbour_table(kmap) is kmap.derived["depthwise.nbr"]  # cached
    ins, outs, off = (cupy.asnumpy(a) for a in (kmap.in_maps, kmap.out_maps, kmap.offsets))
    want = np.full((kmap.num_offsets, kmap.num_out), -1, np.int32)
    want_rev = np.full((kmap.num_offsets, kmap.num_in), -1, np.int32)
    for k in range(kmap.num_offsets):
        sl = slice(off[k], off[k + 1])
        want[k, outs[sl]] = ins[sl]
        want_rev[k, ins[sl]] = outs[sl]
    np.testing.assert_array_equal(nbr, want)
    np.testing.assert_array_equal(rev, want_rev)
    for reverse, table in ((False, want), (True, want_rev)):  # per-row lists: row r's (source, k) in k order
        ptr, nb = (cupy.asnumpy(a) for a in dwi.neighbour_list(kmap, reverse))
        for r in range(table.shape[1]):
            ks = np.nonzero(table[:, r] >= 0)[0]
            np.testing.assert_array_equal(nb[ptr[r]:ptr[r + 1]], np.stack([table[ks, r], ks], 1))


@pytest.mark.gpu
def test_implicit_empty_and_unaligned_inputs():
    """No pairs at all (outputs are zeros, not garbage), and a feature view whose rows are misaligned."""
    import cupy
    from sparsevox.algorithms import depthwise_implicit as dwi
    kmap, x, w, _, (ref, _, _), _ = gpu_inputs("submanifold", 64, "float16")
    # A non-contiguous column view (made contiguous by the backend).
    wide = cupy.zeros((kmap.num_in, 65), dtype=x.dtype)
    wide[:, 1:] = x
    out = dwi.forward(wide[:, 1:], w, kmap)
    assert rel_err(out.get().astype(np.float64), ref) < TOL["float16"]
    # Contiguous but starting 2 bytes past an allocation: the 16-byte loads must narrow to scalar ones.
    shifted = cupy.empty(x.size + 1, dtype=x.dtype)[1:].reshape(x.shape)
    shifted[...] = x
    assert rel_err(dwi.forward(shifted, w, kmap).get().astype(np.float64), ref) < TOL["float16"]
    empty = sv.KernelMap(cupy.zeros(0, cupy.int32), cupy.zeros(0, cupy.int32), cupy.zeros(28, cupy.int32),
                         np.zeros(28, np.int64), 5, 4, None)
    xs = cupy.ones((5, 8), cupy.float32)
    ws = cupy.ones((27, 8), cupy.float32)
    assert float(cupy.abs(dwi.forward(xs, ws, empty)).max()) == 0.0
    assert float(cupy.abs(dwi.dgrad(cupy.ones((4, 8), cupy.float32), ws, empty)).max()) == 0.0
    assert float(cupy.abs(dwi.wgrad(xs, cupy.ones((4, 8), cupy.float32), empty, 27)).max()) == 0.0


# --- CPU: the real CUDA source, emulated (threads on the CPU) --------------------------------------

def emulated(kind, c, dtype, params_fwd, params_wgrad, shift=0):
    """Forward, dgrad and wgrad of ``kernels_cu/depthwise.cu`` run by the CPU emulator with the backend's
    own launch geometry; destinations poisoned with NaN. Returns ``[(name, got, want)]``."""
    import depthwise_cpu_emulator as emu

    from sparsevox.algorithms import depthwise_implicit as dwi
    case, x, w, g, _ = gpu_case(kind, c, n=60, extent=6)  # small: one OS thread per CUDA thread
    kmap = case["kmap"]
    dt = np_dtype(dtype)
    ctype = dwi._CTYPE[dtype]
    ref, rgf, rgw = oracle(case, *(a.astype(dt).astype(np.float64) for a in (x, w, g)))
    buf = np.empty(x.size + shift, dt)[shift:].reshape(x.shape)  # shift > 0: rows not 16-byte aligned
    buf[...] = x.astype(dt)
    xq, wq, gq = buf, w.astype(dt), g.astype(dt)
    k, pairs = kmap.num_offsets, kmap.num_pairs
    off = kmap.offsets_host.astype(np.int32)
    ins, outs = np.asarray(kmap.in_maps, np.int32), np.asarray(kmap.out_maps, np.int32)
    results = []
    for rows, src, dst, want, name in ((kmap.num_out, xq, (ins, outs), ref, "fwd"),
                                       (kmap.num_in, gq, (outs, ins), rgf, "dgrad")):
        table = np.full((k, rows), -1, np.int32)
        emu.launch("depthwise_build_table", *dwi.table_launch(pairs), (*dst, off, k, pairs, rows, table))
        ptr = dwi.list_offsets(table, np)
        nb = np.full((pairs, 2), -7, np.int32)
        emu.launch("depthwise_build_list", *dwi.list_launch(rows), (table, k, rows, ptr, nb))
        r, kk = np.nonzero(table.T >= 0)  # row-major: by row, then k
        np.testing.assert_array_equal(nb, np.stack([table[kk, r], kk], 1))
        for p in params_fwd:
            out = np.full((rows, c), np.nan, dt)
            vec = dwi.vec_width(c, dt.itemsize, (src.ctypes.data, wq.ctypes.data, out.ctypes.data))
            ilp, grid, block = dwi.gather_launch(rows, c, vec, p["ilp"], p["block"])
            if p["nbr"] == "table":
                kernel, args = "depthwise_gather", (src, wq, table, out, rows, k, c)
            else:
                kernel, args = "depthwise_gather_list", (src, wq, ptr, nb, out, rows, c)
            emu.launch(f"{kernel}<{ctype}, {vec}, {ilp}>", grid, block, args)
            results.append((f"{name} vec={vec} {p}", out, want))
    acc = np.float64 if dtype == "float64" else np.float32
    for p in params_wgrad:
        gw = np.zeros((k, c), acc)
        vec = dwi.vec_width(c, dt.itemsize, (xq.ctypes.data, gq.ctypes.data))
        grid, block, smem = dwi.wgrad_launch(int(np.diff(off).max()), k, c, vec, p["chunk"], p["threads"],
                                             gw.itemsize)
        emu.launch(f"depthwise_wgrad<{ctype}, {vec}>", grid, block, (xq, gq, ins, outs, off, gw, c, p["chunk"]), smem)
        if acc != dt:  # the backend's rounding kernel for float16 / bfloat16
            out = np.full(gw.shape, np.nan, dt)
            emu.launch(f"depthwise_cast<{ctype}>", *dwi.cast_launch(gw.size), (gw, out, np.int64(gw.size)))
            np.testing.assert_array_equal(out.view(np.uint16), gw.astype(dt).view(np.uint16))  # round to nearest even
            gw = out
        results.append((f"wgrad vec={vec} {p}", gw.astype(dt), rgw))
    return results


def _emulator_or_skip():
    import depthwise_cpu_emulator as emu
    ok, why = emu.available()
    if not ok:
        pytest.skip(f"CUDA CPU emulator unavailable: {why}")


@pytest.mark.parametrize("c", [3, 17, 64, 130])
@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_kernels_match_oracle(dtype, c):
    """Every dtype × vector width (C = 3, 17: scalar; 130: 2-wide; 64: 16-byte), submanifold."""
    _emulator_or_skip()
    wgrad_params = param_sets("wgrad")[:1] + [{"chunk": 16, "threads": 64}]
    fwd_params = param_sets("fwd")[:1] + param_sets("fwd")[-1:]  # a list and a table variant
    for name, got, want in emulated("submanifold", c, dtype, fwd_params, wgrad_params):
        err = rel_err(got.astype(np.float64), want)
        assert err < TOL[dtype], f"{name}: rel err {err:.3g}"


@pytest.mark.parametrize("kind", KINDS)
def test_emulated_kernels_every_kind_and_param(kind):
    """Every kind × every parameter combination the autotuner may pick (float16, C = 64)."""
    _emulator_or_skip()
    small_chunks = {"chunk": 16, "threads": 64}  # several blocks per offset: the cross-block atomics
    for name, got, want in emulated(kind, 64, "float16", param_sets("fwd"), param_sets("wgrad") + [small_chunks]):
        err = rel_err(got.astype(np.float64), want)
        assert err < TOL["float16"], f"{kind} {name}: rel err {err:.3g}"


def test_emulated_kernels_unaligned_rows_take_scalar_loads():
    _emulator_or_skip()
    fwd_params = param_sets("fwd")[:1] + param_sets("fwd")[-1:]
    results = emulated("strided", 64, "float16", fwd_params, param_sets("wgrad")[:1], shift=1)
    assert all("vec=1" in name for name, _, _ in results[:2] + results[-1:])
    for name, got, want in results:
        assert rel_err(got.astype(np.float64), want) < TOL["float16"], name
