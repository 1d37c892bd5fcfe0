"""The adapters on the GPU: opcheck, torch.compile, AMP, streams, no host sync, JAX jit(grad)."""
import time

import numpy as np
import pytest
from reference import TOL, dense_conv, dense_conv_grads, random_voxels, rel_err

import sparsevox as sv

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch", reason="torch not installed")
svt = pytest.importorskip("sparsevox.adapters.torch")


def _layer(rng, n=400, c_in=16, c_out=8, dtype=torch.float32, device="cuda"):
    c = random_voxels(rng, n, extent=10, batches=2)
    f = torch.randn(len(c), c_in, device=device, dtype=dtype)
    w = torch.randn(27, c_in, c_out, device=device, dtype=dtype) / np.sqrt(27 * c_in)
    return sv.Voxels(torch.from_numpy(c).to(device), f), w


def _oracle(v, w):
    c = v.coords.cpu().numpy()
    return dense_conv(c, v.feats.double().cpu().numpy(), w.double().cpu().numpy(), 3, 1, 1, False, c)


def test_opcheck_cuda(rng):
    v, w = _layer(rng)
    kmap = sv.kernel_map(v, 3)
    i, o, off = svt.kernel_map_tensors(kmap)
    assert i.is_cuda and not off.is_cuda
    torch.library.opcheck(torch.ops.sparsevox.conv_fwd, (v.feats, w, i, o, off, kmap.num_out, "explicit_gemm"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_runs_in_low_precision(rng, dtype):
    v, w = _layer(rng)
    w.requires_grad_(True)
    with torch.autocast("cuda", dtype=dtype):
        out = sv.spatially_sparse_conv(v, w)
    assert out.feats.dtype == dtype
    assert rel_err(out.feats.detach().double().cpu().numpy(), _oracle(v, w.detach())) < TOL[str(dtype).split(".")[1]]
    out.feats.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32


@pytest.mark.parametrize("prepared", [False, True])
def test_autocast_weight_gradient_is_not_rounded_to_16_bits(rng, prepared):
    """Under float16 autocast a float32 weight's gradient is the wgrad's float32 accumulation itself:
    against float64 (on the float16-rounded features, weight and output gradient the layer ran with) its
    error is float32's, far below one float16 rounding (~3e-4 relative). Before, it was rounded to float16
    and cast back. That holds for every call: through a prepared launch (``prepared``: the map's second
    call; a fresh map's calls of a known layer signature take the same path) and for the first call of a
    signature in the process, the core call (its wgrad hands over the accumulator since the weight
    gradient's ``gw_dtype`` reached the algorithms; before, that call was float16-accurate only).
    The features' gradient is checked too."""
    v, w = _layer(rng, n=2000, c_in=32, c_out=32)
    w.requires_grad_(True)
    f = v.feats.clone().requires_grad_(True)
    x = sv.Voxels(v.coords, f)
    g = torch.randn(len(v.coords), 32, device="cuda", dtype=torch.float16)
    for _ in range(2 if prepared else 1):
        w.grad = f.grad = None
        with torch.autocast("cuda", dtype=torch.float16):
            # IMPLICIT_GEMM: the algorithm with prepared launches (AUTO could pick one without)
            out = sv.spatially_sparse_conv(x, w, fwd_algo="implicit_gemm", bwd_algo="implicit_gemm")
        assert out.feats.dtype == torch.float16
        (out.feats * g).sum().backward()
    assert w.grad.dtype == torch.float32 and f.grad.dtype == torch.float32
    c = v.coords.cpu().numpy()
    x16, w16 = f.detach().half().double().cpu().numpy(), w.detach().half().double().cpu().numpy()
    gf, gw = dense_conv_grads(c, x16, w16, g.double().cpu().numpy(), 3, 1, 1, False, c)
    assert rel_err(w.grad.double().cpu().numpy(), gw) < 1e-5
    # the features' gradient is a float16 output of dgrad (the layer's input was float16 under autocast)
    assert rel_err(f.grad.double().cpu().numpy(), gf) < TOL["float16"]


def test_autocast_inference_follows_an_in_place_weight_update(rng):
    """Under autocast without grad, an in-place change of the weight shows in the next call (negated
    weights give the negated output): nothing keeps a stale low-precision copy."""
    v, w = _layer(rng)
    w = torch.nn.Parameter(w)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        a = sv.spatially_sparse_conv(v, w).feats.float()
        w.mul_(-1)
        b = sv.spatially_sparse_conv(v, w).feats.float()
    assert a.abs().max() > 0
    torch.testing.assert_close(b, -a)


def test_torch_compile_inductor_fullgraph(rng):
    v, w = _layer(rng)
    kmap = sv.kernel_map(v, 3)
    maps = svt.kernel_map_tensors(kmap)

    def f(feats, w, in_maps, out_maps, offsets):
        return torch.relu(svt.conv_tensors(feats, w, in_maps, out_maps, offsets, kmap.num_out)).sum(1)

    out = torch.compile(f, fullgraph=True)(v.feats, w, *maps)
    torch.testing.assert_close(out, f(v.feats, w, *maps))


def test_no_host_sync_with_cached_map(rng):
    v, w = _layer(rng, n=2000, c_in=32, c_out=32)
    f = v.feats.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    for _ in range(2):  # build and cache the map, compile kernels, settle the autotuner
        out = sv.spatially_sparse_conv(v.replace(f), w)
        out.feats.sum().backward()
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e9))  # ~1 s of GPU clock cycles on the current stream
    t = time.perf_counter()
    out = sv.spatially_sparse_conv(v.replace(f), w)
    out.feats.sum().backward()
    elapsed = time.perf_counter() - t
    still_running = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert still_running, f"the layer waited for the GPU (returned after {elapsed:.3f} s with the stream idle)"


def test_runs_on_callers_stream(rng):
    v, w = _layer(rng)
    ref = _oracle(v, w)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(int(2e8))  # work queued before ours on the side stream must finish first
        out = sv.spatially_sparse_conv(v, w)
    side.synchronize()
    assert rel_err(out.feats.double().cpu().numpy(), ref) < TOL["float32"]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_second_device(rng, monkeypatch):
    """Data on cuda:1 while cuda:0 is current: the first call plans, the later ones take the prepared
    launches through the driver (which must make cuda:1 current), forward and backward; every call
    matches the oracle."""
    from sparsevox.algorithms import implicit_gemm as ig
    v, w = _layer(rng, device="cuda:1")
    assert torch.cuda.current_device() == 0
    c = v.coords.cpu().numpy()
    f = v.feats.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    g = torch.randn(len(c), w.shape[2], device="cuda:1")
    args = (c, v.feats.double().cpu().numpy(), w.detach().double().cpu().numpy())
    ref = dense_conv(*args, 3, 1, 1, False, c)
    rgf, rgw = dense_conv_grads(*args, g.double().cpu().numpy(), 3, 1, 1, False, c)
    streams, real = [], ig.Launch.launch

    def recording(self, a, b, out, stream=None):
        streams.append(stream)
        return real(self, a, b, out, stream)
    monkeypatch.setattr(ig.Launch, "launch", recording)
    for _ in range(3):
        f.grad = w.grad = None
        out = sv.spatially_sparse_conv(v.replace(f), w, fwd_algo="implicit_gemm", bwd_algo="implicit_gemm")
        assert out.feats.device == torch.device("cuda:1")
        out.feats.backward(g)
        torch.cuda.synchronize(1)
        assert rel_err(out.feats.detach().double().cpu().numpy(), ref) < TOL["float32"]
        assert rel_err(f.grad.double().cpu().numpy(), rgf) < TOL["float32"]
        assert rel_err(w.grad.double().cpu().numpy(), rgw) < TOL["float32"]
    assert any(st is not None for st in streams), "no prepared driver launch on the second device"


def test_jax_jit_grad_on_gpu(rng):
    jax = pytest.importorskip("jax", reason="jax not installed")
    if jax.default_backend() != "gpu":
        pytest.skip("jax has no GPU backend here")
    import jax.numpy as jnp
    svj = pytest.importorskip("sparsevox.adapters.jax")
    c = random_voxels(rng, 400, extent=10, batches=2)
    f = rng.standard_normal((len(c), 16)).astype(np.float32)
    w = (rng.standard_normal((27, 16, 8)) / 20).astype(np.float32)
    g = rng.standard_normal((len(c), 8)).astype(np.float32)
    v = sv.Voxels(jnp.asarray(c), jnp.asarray(f))
    kmap = svj.kernel_map(v, 3)
    loss = jax.jit(jax.grad(lambda f, w: (svj.conv_features(f, w, kmap) * g).sum(), argnums=(0, 1)))
    gf, gw = loss(jnp.asarray(f), jnp.asarray(w))
    assert next(iter(gf.devices())).platform == "gpu"
    rgf, rgw = dense_conv_grads(c, f, w, g, 3, 1, 1, False, c)
    assert rel_err(np.asarray(gf), rgf) < TOL["float32"] and rel_err(np.asarray(gw), rgw) < TOL["float32"]
