"""Prepared launches through the CUDA driver (``Launch.launch(..., stream=handle)``) on the GPU: the same
bits as CuPy's launch of the same Launch, for the forward and dgrad launches (one pass and mask splits)
and the weight gradient, on torch's current stream and on a side stream; also from a thread that has not
called CUDA yet, and through the torch adapter's fast path."""
import threading

import numpy as np
import pytest
from reference import random_voxels

import sparsevox as sv
from sparsevox import _arrays
from sparsevox.algorithms import implicit_gemm as ig

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch", reason="torch not installed")
cupy = pytest.importorskip("cupy", reason="CuPy not installed")

_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}
SLEEP = 50_000_000  # cycles the side stream sleeps before producing an input (tens of ms)


def _bits(t):
    return t.view(_INT[t.element_size()])


def _assert_same_bits(got, want, what):
    assert got.shape == want.shape and got.dtype == want.dtype, what
    assert torch.equal(_bits(got), _bits(want)), f"{what}: the driver launch differs from CuPy's"


def _kmap(rng):
    c = random_voxels(rng, 900, extent=12, batches=2)
    return sv.kernel_map(sv.Voxels(torch.from_numpy(c).cuda(), None), 3)


def _deterministic_wgrad(dt, c_in, c_out, kmap, dev):
    """A weight-gradient Launch with one chunk per offset, so every accumulator element gets one atomic add
    (the default split adds several partial sums in a run-dependent order: not bitwise repeatable)."""
    bk = ig._bk(dt)
    chunk = -(-int(np.diff(kmap.offsets_host).max()) // bk) * bk
    e = 16 // ig._SIZE[dt]
    vec = c_in % e == 0 and c_out % e == 0
    return ig._prepare_wgrad(dt, c_in, c_out, kmap, kmap.num_offsets, 32, chunk, vec, dev)


def _cases(kmap, dt, c_in, c_out, dev):
    """``name -> (Launch, (a, b) shapes)`` for every launch shape the adapters use."""
    n_in, n_out, k = kmap.num_in, kmap.num_out, kmap.num_offsets
    fwd_in, dgrad_in = ((n_in, c_in), (k, c_in, c_out)), ((n_out, c_out), (k, c_out, c_in))
    return {
        "fwd": (ig.prepare("fwd", dt, c_in, c_out, kmap, dev), fwd_in),
        "fwd mask_split=2": (ig.prepare("fwd", dt, c_in, c_out, kmap, dev, mask_split=2), fwd_in),
        "dgrad": (ig.prepare("dgrad", dt, c_in, c_out, kmap, dev), dgrad_in),
        "dgrad mask_split=3": (ig.prepare("dgrad", dt, c_in, c_out, kmap, dev, mask_split=3), dgrad_in),
        "wgrad": (_deterministic_wgrad(dt, c_in, c_out, kmap, dev), ((n_in, c_in), (n_out, c_out))),
    }


def _output(prep, dtype):
    if prep.acc_dtype is not None:  # the weight gradient accumulates into zeros
        return torch.zeros(prep.out_shape, dtype=getattr(torch, prep.acc_dtype), device="cuda")
    return torch.full(prep.out_shape, float("nan"), dtype=dtype, device="cuda")  # every element is written


def _both(prep, a, b, dtype, dev):
    """``(CuPy launch's output, driver launch's output)`` on torch's current stream."""
    handle = _arrays.torch_stream_handle(torch, dev)
    via_cupy, via_driver = _output(prep, dtype), _output(prep, dtype)
    with cupy.cuda.Device(dev), _arrays.external_stream(handle, dev):
        assert prep.launch(a.data_ptr(), b.data_ptr(), via_cupy.data_ptr())
    assert prep.launch(a.data_ptr(), b.data_ptr(), via_driver.data_ptr(), stream=handle)
    return via_cupy, via_driver


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("channels", [(32, 64), (17, 3)])
def test_driver_launch_matches_cupy_launch_bitwise(rng, dtype, channels):
    kmap = _kmap(rng)
    dev = torch.cuda.current_device()
    tdt = getattr(torch, dtype)
    side = torch.cuda.Stream()
    for name, (prep, shapes) in _cases(kmap, dtype, *channels, dev).items():
        a, b = (torch.from_numpy(rng.standard_normal(s) / np.sqrt(s[-1])).cuda().to(tdt) for s in shapes)
        via_cupy, via_driver = _both(prep, a, b, tdt, dev)
        torch.cuda.synchronize()
        assert not torch.isnan(via_cupy).any(), name
        _assert_same_bits(via_driver, via_cupy, f"{name} {dtype} {channels}, current stream")

        # On a side stream whose input is produced after a long sleep: a launch on any other stream would
        # read the poisoned buffer before the copy lands.
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            a2 = torch.full_like(a, float("nan"))
            torch.cuda._sleep(SLEEP)
            a2.copy_(a)
            side_cupy, side_driver = _both(prep, a2, b, tdt, dev)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        _assert_same_bits(side_cupy, via_cupy, f"{name} {dtype} {channels}, CuPy launch on a side stream")
        _assert_same_bits(side_driver, via_cupy, f"{name} {dtype} {channels}, driver launch on a side stream")


def test_default_weight_gradient_launch_matches_cupy_launch(rng):
    """The searched weight-gradient split (several atomic partial sums per element): equal up to the
    order of the float32 additions."""
    kmap = _kmap(rng)
    dev = torch.cuda.current_device()
    prep = ig.prepare("wgrad", "float16", 32, 64, kmap, dev, gemm_block_size=64, split_k_factor=4)
    a = torch.randn(kmap.num_in, 32, device="cuda").half()
    b = torch.randn(kmap.num_out, 64, device="cuda").half()
    via_cupy, via_driver = _both(prep, a, b, torch.float16, dev)
    torch.cuda.synchronize()
    torch.testing.assert_close(via_driver, via_cupy, rtol=1e-4, atol=1e-4)


def test_driver_launch_from_a_thread_without_cuda_context(rng):
    """A fresh thread has no current CUDA context until it calls the runtime; the driver path makes one
    current first (as CuPy's launcher does), instead of failing with an invalid-context error."""
    if torch.cuda.current_device() != 0:
        pytest.skip("a new thread starts on device 0")
    kmap = _kmap(rng)
    prep, (sa, sb) = _cases(kmap, "float16", 32, 64, 0)["fwd"]
    a, b = torch.randn(*sa, device="cuda").half(), torch.randn(*sb, device="cuda").half()
    want, _ = _both(prep, a, b, torch.float16, 0)
    out = _output(prep, torch.float16)
    torch.cuda.synchronize()
    result = {}

    def launch():
        try:
            result["ok"] = prep.launch(a.data_ptr(), b.data_ptr(), out.data_ptr(), stream=0)
            cupy.cuda.runtime.deviceSynchronize()
        except Exception as e:  # noqa: BLE001 - reported below
            result["error"] = e
    t = threading.Thread(target=launch)
    t.start()
    t.join()
    assert result.get("ok") is True, result.get("error")
    _assert_same_bits(out, want, "launched from a fresh thread")


def test_adapter_launches_through_the_driver_on_torchs_stream(rng, monkeypatch):
    """After the first call, the torch adapter's calls (no_grad forward, and forward + backward) launch
    through the driver on torch's current stream, and give the bits of the first (planned) call."""
    svt = pytest.importorskip("sparsevox.adapters.torch")
    kmap = _kmap(rng)
    algo = ["implicit_gemm"]
    f = torch.randn(kmap.num_in, 32, device="cuda").half().requires_grad_(True)
    w = (torch.randn(27, 32, 32, device="cuda") / 30).half().requires_grad_(True)
    g = torch.randn(kmap.num_out, 32, device="cuda").half()
    out0 = svt.conv_features(f, w, kmap, algo, algo)  # plans and prepares
    gf0, gw0 = torch.autograd.grad(out0, (f, w), g)
    streams, real = [], ig.Launch.launch

    def recording(self, a, b, out, stream=None):
        streams.append(stream)
        return real(self, a, b, out, stream)
    monkeypatch.setattr(ig.Launch, "launch", recording)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        with torch.no_grad():
            out1 = svt.conv_features(f, w, kmap, algo, algo)
        assert out1.grad_fn is None
    torch.cuda.current_stream().wait_stream(side)
    assert streams == [side.cuda_stream]
    out2 = svt.conv_features(f, w, kmap, algo, algo)
    gf2, gw2 = torch.autograd.grad(out2, (f, w), g)
    assert len(streams) == 4 and None not in streams  # forward, dgrad, wgrad
    torch.cuda.synchronize()
    for got, want, what in ((out1, out0, "no_grad forward"), (out2, out0, "forward"), (gf2, gf0, "dgrad")):
        _assert_same_bits(got.detach(), want.detach(), what)
    torch.testing.assert_close(gw2, gw0, rtol=1e-2, atol=1e-3)  # float32 atomics: the order may differ
