"""EXPLICIT_GEMM on the GPU (CuPy) against the float64 dense oracle, TF32 opt-in, and zero-copy interop:
torch CUDA tensors, JAX GPU arrays and CuPy arrays in, the caller's library and device out, work on the
caller's stream."""
import numpy as np
import pytest
from gpu_cases import np_dtype
from reference import TOL, dense_conv, dense_conv_grads, expected_out_coords, random_voxels, rel_err

import sparsevox as sv
from sparsevox import _arrays
from sparsevox.testing import DTYPES, KINDS, kind_args


@pytest.fixture
def cupy():
    return pytest.importorskip("cupy")


def make_case(rng, kind, c_in=16, c_out=8, ks=3, stride=2, batches=2):
    """NumPy float64 inputs: (coords, feats, weight, output coords or None, (stride, transposed, generative))."""
    s, tr, gen = kind_args(kind, stride)
    fine = random_voxels(rng, 90 * batches, extent=7, batches=batches)
    out = None
    if kind == "transposed":
        out, coords = fine, expected_out_coords(fine, 2, s, 1, False, False)
    else:
        coords = fine
    k = int(np.prod(np.broadcast_to(ks, 3)))
    return coords, rng.standard_normal((len(coords), c_in)), rng.standard_normal((k, c_in, c_out)), out, (s, tr, gen)


def gpu_conv(cupy, rng, kind, dtype, c_in=16, c_out=8):
    """Run forward, dgrad and wgrad through EXPLICIT_GEMM on CuPy; return results and the float64 oracle."""
    dt = np_dtype(dtype)
    coords, f64, w64, out, (s, tr, gen) = make_case(rng, kind, c_in, c_out)
    f, w = f64.astype(dt), w64.astype(dt)  # the oracle sees the rounded inputs
    v = sv.Voxels(cupy.asarray(coords), cupy.asarray(f))
    out_v = None if out is None else sv.Voxels(cupy.asarray(out), None)
    kmap = sv.kernel_map(v, 3, s, 1, tr, gen, out_v)
    fc, wc = cupy.asarray(f), cupy.asarray(w)
    y = sv.conv_forward(fc, wc, kmap, fwd_algo="explicit_gemm")
    g64 = rng.standard_normal(tuple(y.shape))
    g = g64.astype(dt)
    gf, gw = sv.conv_backward(cupy.asarray(g), fc, wc, kmap, bwd_algo="explicit_gemm")
    oc = kmap.out_coords.get()
    f_, w_, g_ = (a.astype(np.float64) for a in (f, w, g))
    ref_y = dense_conv(coords, f_, w_, 3, s, 1, tr, oc)
    ref_gf, ref_gw = dense_conv_grads(coords, f_, w_, g_, 3, s, 1, tr, oc)
    return (y, gf, gw), (ref_y, ref_gf, ref_gw), dt


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_explicit_matches_dense_oracle(cupy, rng, kind, dtype):
    sv.allow_tf32(False)
    got, ref, dt = gpu_conv(cupy, rng, kind, dtype)
    for name, a, b in zip(("forward", "dgrad", "wgrad"), got, ref):
        assert isinstance(a, cupy.ndarray) and a.dtype == dt, f"{name}: {type(a)} {a.dtype}"
        assert a.shape == b.shape, f"{name}: shape {a.shape} != {b.shape}"
        err = rel_err(a.get().astype(np.float64), b)
        assert err < TOL[dtype], f"{kind} {dtype} {name}: rel err {err:.2e} >= {TOL[dtype]:.0e}"


@pytest.mark.gpu
def test_gpu_tf32_only_when_allowed(cupy, rng):
    """float32 stays IEEE unless sparsevox.allow_tf32(True); then TF32 (error ~1e-4..1e-3, < 5e-3).
    CuPy's process-wide float32 compute type is restored after every call."""
    from cupy._core import _routines_linalg as linalg
    before = linalg.get_compute_type(np.dtype(np.float32))
    try:
        sv.allow_tf32(False)
        got, ref, _ = gpu_conv(cupy, rng, "submanifold", "float32", c_in=64, c_out=64)
        ieee = max(rel_err(a.get(), b) for a, b in zip(got, ref))
        assert ieee < TOL["float32"]
        assert linalg.get_compute_type(np.dtype(np.float32)) == before
        sv.allow_tf32(True)
        got, ref, _ = gpu_conv(cupy, rng, "submanifold", "float32", c_in=64, c_out=64)
        tf32 = max(rel_err(a.get(), b) for a, b in zip(got, ref))
        assert linalg.get_compute_type(np.dtype(np.float32)) == before
    finally:
        sv.allow_tf32(False)
    assert tf32 < 5e-3, f"TF32 rel err {tf32:.2e}"
    assert tf32 > 10 * ieee, f"allow_tf32(True) did not engage TF32 (err {tf32:.2e} vs IEEE {ieee:.2e})"


# --- interop: zero-copy in, the caller's library and device out, the caller's stream ---------------

def test_cpu_origins_need_no_stream():
    with _arrays.on_caller_stream(_arrays.Origin("numpy")) as s:
        assert s is None


def test_stream_wrappers_are_cached_and_name_the_handle():
    pytest.importorskip("cupy")  # wrapping a handle needs no device
    s = _arrays.external_stream(0x1234, 0)
    assert s.ptr == 0x1234 and _arrays.external_stream(0x1234, 0) is s
    assert _arrays.external_stream(0, 0).ptr == 0  # torch's default stream: the legacy default stream


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    return torch


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int32"])
def test_torch_cuda_roundtrip_zero_copy(cupy, dtype):
    torch = _torch_cuda()
    t = torch.arange(40, device="cuda").reshape(10, 4).to(getattr(torch, dtype))
    a, origin = _arrays.to_core(t)
    assert isinstance(a, cupy.ndarray) and a.data.ptr == t.data_ptr() and a.shape == (10, 4)
    assert a.device.id == t.device.index and origin.on_gpu
    back = _arrays.from_core(a, origin)
    assert isinstance(back, torch.Tensor) and back.device == t.device and back.dtype == t.dtype
    assert back.data_ptr() == t.data_ptr()
    assert torch.equal(back, t)


@pytest.mark.gpu
def test_torch_work_runs_on_the_callers_stream(cupy, rng):
    torch = _torch_cuda()
    coords, f64, w64, _, _ = make_case(rng, "submanifold")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        f = torch.from_numpy(f64.astype(np.float32)).cuda()
        w = torch.from_numpy(w64.astype(np.float32)).cuda()
        origin = _arrays.Origin("torch", f.device)
        with _arrays.on_caller_stream(origin) as s:
            assert cupy.cuda.get_current_stream().ptr == side.cuda_stream == s.ptr
            assert cupy.cuda.Device().id == f.device.index
            fc, origin = _arrays.to_core(f)
            wc, _ = _arrays.to_core(w)
            kmap = sv.kernel_map(sv.Voxels(cupy.asarray(coords), None), 3)
            y = _arrays.from_core(sv.conv_forward(fc, wc, kmap, fwd_algo="explicit_gemm"), origin)
    side.synchronize()
    assert isinstance(y, torch.Tensor) and y.device == f.device
    ref = dense_conv(coords, f64.astype(np.float32), w64.astype(np.float32), 3, 1, 1, False, coords)
    assert rel_err(y.cpu().numpy(), ref) < TOL["float32"]
    # the default stream maps to CuPy's null stream; wrappers are cached per (device, handle)
    with _arrays.on_caller_stream(_arrays.Origin("torch", f.device)) as s0:
        assert s0.ptr == torch.cuda.current_stream().cuda_stream
    dev = f.device.index
    assert _arrays.external_stream(side.cuda_stream, dev) is _arrays.external_stream(side.cuda_stream, dev)


@pytest.mark.gpu
def test_cupy_roundtrip_is_identity(cupy):
    a = cupy.arange(12, dtype=cupy.float32).reshape(3, 4)
    core, origin = _arrays.to_core(a)
    assert core is a and _arrays.from_core(core, origin) is a
    with _arrays.on_caller_stream(origin) as s:
        assert s.ptr == cupy.cuda.get_current_stream().ptr


def _jax_gpu():
    jax = pytest.importorskip("jax")
    try:
        devs = jax.devices("gpu")
    except RuntimeError:
        devs = []
    if not devs:
        pytest.skip("jax has no GPU backend")
    return jax, devs[0]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jax_gpu_roundtrip_zero_copy(cupy, dtype):
    jax, dev = _jax_gpu()
    import jax.numpy as jnp
    x = jax.device_put(jnp.arange(40, dtype=getattr(jnp, dtype)).reshape(10, 4), dev)
    a, origin = _arrays.to_core(x)
    assert isinstance(a, cupy.ndarray) and origin.on_gpu
    assert a.data.ptr == x.unsafe_buffer_pointer()
    back = _arrays.from_core(a, origin)
    assert isinstance(back, jax.Array) and back.devices() == {dev} and back.dtype == x.dtype
    assert bool(jnp.array_equal(back, x))


@pytest.mark.gpu
def test_public_api_returns_the_callers_library_on_the_gpu(cupy, rng):
    coords, f64, w64, _, _ = make_case(rng, "strided")
    f, w = f64.astype(np.float32), w64.astype(np.float32)
    ref = dense_conv(coords, f, w, 3, 2, 1, False, expected_out_coords(coords, 3, 2, 1, False, False))
    out = sv.spatially_sparse_conv(sv.Voxels(cupy.asarray(coords), cupy.asarray(f)), cupy.asarray(w), 3, 2,
                                   fwd_algo="explicit_gemm")
    assert isinstance(out.feats, cupy.ndarray) and isinstance(out.coords, cupy.ndarray)
    assert rel_err(out.feats.get(), ref) < TOL["float32"]
    torch = _torch_cuda()
    tv = sv.Voxels(torch.from_numpy(coords).cuda(), torch.from_numpy(f).cuda())
    out = sv.spatially_sparse_conv(tv, torch.from_numpy(w).cuda(), 3, 2, fwd_algo="explicit_gemm")
    assert isinstance(out.feats, torch.Tensor) and out.feats.is_cuda and isinstance(out.coords, torch.Tensor)
    assert rel_err(out.feats.detach().cpu().numpy(), ref) < TOL["float32"]
