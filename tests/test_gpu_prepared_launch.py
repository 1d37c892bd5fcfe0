"""The torch adapter's prepared launches on the GPU: after the first call of a signature, later calls
launch IMPLICIT_GEMM from tensor addresses (sparsevox.conv.prepared). Every call must still match the
float64 oracle, forward and both gradients, on fresh inputs, for each dtype; misaligned views and odd
channel counts must take a correct path too."""
import sys

import numpy as np
import pytest
from reference import TOL, dense_conv, dense_conv_grads, random_voxels, rel_err

import sparsevox as sv
from sparsevox import conv as sv_conv
from sparsevox.algorithms import implicit_gemm as ig
from sparsevox._arrays import to_host

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch", reason="torch not installed")
svt = pytest.importorskip("sparsevox.adapters.torch")

ALGO = ["implicit_gemm"]


def _scene(rng, kind):
    c = random_voxels(rng, 900, extent=12, batches=2)
    v = sv.Voxels(torch.from_numpy(c).cuda(), None)
    if kind == "submanifold":
        return v, sv.kernel_map(v, 3), 3, 1, c
    kmap = sv.kernel_map(v, 2, 2)
    return v, kmap, 2, 2, to_host(kmap.out_coords)


def _poison_allocator(kmap, c_in, c_out, dtype):
    """Leave NaN-filled blocks of the output sizes in torch's caching allocator, so a launch that fails
    to write part of a torch.empty output shows NaNs."""
    blocks = [torch.full(shape, float("nan"), device="cuda", dtype=dtype)
              for shape in ((kmap.num_out, c_out), (kmap.num_in, c_in))]
    del blocks


def _fresh(rng, kmap, c_in, c_out, dtype):
    _poison_allocator(kmap, c_in, c_out, dtype)
    for key, val in kmap.derived.items():  # outputs allocated one call ahead: poisoned too
        if isinstance(key, tuple) and key[0] == "spare":
            with torch.inference_mode(val[0].is_inference()):
                val[0].fill_(float("nan"))
    k = kmap.num_offsets
    f = torch.from_numpy(rng.standard_normal((kmap.num_in, c_in))).cuda().to(dtype)
    w = torch.from_numpy(rng.standard_normal((k, c_in, c_out)) / np.sqrt(k * c_in)).cuda().to(dtype)
    g = torch.from_numpy(rng.standard_normal((kmap.num_out, c_out))).cuda().to(dtype)
    return f.requires_grad_(True), w.requires_grad_(True), g


class _Launches(list):
    """Output shapes of the prepared launches, in order; ``streams``: the stream each got (None: CuPy's
    current stream, else a raw handle for the driver path)."""
    streams: list


def _count_launches(monkeypatch) -> _Launches:
    """Record the output shape (and stream argument) of every prepared launch from now on."""
    calls, real = _Launches(), ig.Launch.launch
    calls.streams = []

    def counting(self, a, b, out, stream=None):
        calls.append(self.out_shape)
        calls.streams.append(stream)
        return real(self, a, b, out, stream)
    monkeypatch.setattr(ig.Launch, "launch", counting)
    return calls


def _check(v_coords, out_coords, kmap, ks, s, f, w, g, out, gf, gw, dtype_name):
    args = (v_coords, f.detach().double().cpu().numpy(), w.detach().double().cpu().numpy())
    ref = dense_conv(*args, ks, s, 1, False, out_coords)
    rgf, rgw = dense_conv_grads(*args, g.double().cpu().numpy(), ks, s, 1, False, out_coords)
    tol = TOL[dtype_name]
    assert rel_err(out.detach().double().cpu().numpy(), ref) < tol
    assert rel_err(gf.double().cpu().numpy(), rgf) < tol
    assert rel_err(gw.double().cpu().numpy(), rgw) < tol


@pytest.mark.parametrize("kind", ["submanifold", "strided"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [(32, 64), (17, 3)])
def test_repeated_calls_match_the_oracle(rng, kind, dtype, channels):
    v, kmap, ks, s, out_coords = _scene(rng, kind)
    coords = v.coords.cpu().numpy()
    for call in range(3):  # call 0 plans; calls 1 and 2 launch the prepared kernels
        f, w, g = _fresh(rng, kmap, *channels, dtype)
        out = svt.conv_features(f, w, kmap, ALGO, ALGO)
        gf, gw = torch.autograd.grad(out, (f, w), g)
        _check(coords, out_coords, kmap, ks, s, f, w, g, out, gf, gw, str(dtype).split(".")[1])
    name = str(dtype).split(".")[1]
    prepared = [val for key, val in kmap.derived.items() if isinstance(key, tuple) and key[0].startswith("torch.")]
    assert len(prepared) == 3 and all(prepared), f"expected fwd, dgrad, wgrad launches for {name}, got {prepared}"


def test_later_calls_skip_the_core(rng, monkeypatch):
    v, kmap, ks, s, out_coords = _scene(rng, "submanifold")
    f, w, g = _fresh(rng, kmap, 32, 32, torch.float16)
    torch.autograd.grad(svt.conv_features(f, w, kmap, ALGO, ALGO), (f, w), g)

    def boom(*a, **k):
        raise AssertionError("the call planned although a prepared launch exists")
    monkeypatch.setattr(sv_conv, "plan", boom)
    calls = _count_launches(monkeypatch)
    f, w, g = _fresh(rng, kmap, 32, 32, torch.float16)
    out = svt.conv_features(f, w, kmap, ALGO, ALGO)
    gf, gw = torch.autograd.grad(out, (f, w), g)
    assert len(calls) == 3  # fwd, dgrad, wgrad, each launched once from addresses
    _check(v.coords.cpu().numpy(), out_coords, kmap, ks, s, f, w, g, out, gf, gw, "float16")


@pytest.mark.parametrize("kind", ["submanifold", "strided"])
def test_a_fresh_map_of_a_known_layer_skips_the_core(rng, monkeypatch, kind):
    """Training makes new maps every step: a layer signature planned on one map launches on the next
    map (another scan, row counts in the same bucket) without the core call or planning, and matches
    the oracle, forward and both gradients."""
    v, kmap, ks, s, out_coords = _scene(rng, kind)
    f, w, g = _fresh(rng, kmap, 32, 32, torch.float16)
    torch.autograd.grad(svt.conv_features(f, w, kmap, ALGO, ALGO), (f, w), g)

    def boom(*a, **k):
        raise AssertionError("a fresh map of a known layer went through the core call")
    monkeypatch.setattr(sv_conv, "plan", boom)  # every core call plans first
    v2, kmap2, ks, s, out_coords2 = _scene(rng, kind)  # a new scan: new coordinates, new map
    assert kmap2 is not kmap
    calls = _count_launches(monkeypatch)
    f, w2, g = _fresh(rng, kmap2, 32, 32, torch.float16)
    w2 = w.detach().clone().requires_grad_(True)
    out = svt.conv_features(f, w2, kmap2, ALGO, ALGO)
    gf, gw = torch.autograd.grad(out, (f, w2), g)
    assert len(calls) == 3
    _check(v2.coords.cpu().numpy(), out_coords2, kmap2, ks, s, f, w2, g, out, gf, gw, "float16")


def test_misaligned_view_falls_back_correctly(rng):
    """A feature view starting 2 bytes into its storage cannot use the 16-byte loads the launch was
    prepared with: the call must take the ordinary path (which picks scalar loads) and stay exact."""
    v, kmap, ks, s, out_coords = _scene(rng, "submanifold")
    f, w, g = _fresh(rng, kmap, 32, 32, torch.float16)
    svt.conv_features(f, w, kmap, ALGO, ALGO)  # plan + prepare
    base = torch.from_numpy(rng.standard_normal(kmap.num_in * 32 + 1)).cuda().half()
    f2 = base[1:].view(kmap.num_in, 32)
    assert f2.data_ptr() % 16 != 0 and f2.is_contiguous()
    out = svt.conv_features(f2, w, kmap, ALGO, ALGO)
    ref = dense_conv(v.coords.cpu().numpy(), f2.double().cpu().numpy(), w.detach().double().cpu().numpy(),
                     ks, s, 1, False, out_coords)
    assert rel_err(out.detach().double().cpu().numpy(), ref) < TOL["float16"]


def test_prepared_launch_follows_the_current_stream(rng):
    v, kmap, ks, s, out_coords = _scene(rng, "submanifold")
    f, w, g = _fresh(rng, kmap, 32, 32, torch.float16)
    svt.conv_features(f, w, kmap, ALGO, ALGO)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(int(5e7))  # the result is wrong unless the launch is ordered after this
        f2 = f.detach() * 2
        out = svt.conv_features(f2, w.detach(), kmap, ALGO, ALGO)
    torch.cuda.current_stream().wait_stream(side)
    ref = dense_conv(v.coords.cpu().numpy(), f2.double().cpu().numpy(), w.detach().double().cpu().numpy(),
                     ks, s, 1, False, out_coords)
    assert rel_err(out.double().cpu().numpy(), ref) < TOL["float16"]


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_jax_repeated_jit_grad_matches_the_oracle(rng, dtype, monkeypatch, jax_x64):
    """The JAX adapter's callbacks launch prepared kernels from XLA's buffer addresses after the first
    call: each call (fresh inputs, map closed over) must match the oracle, and later calls must launch
    fwd/dgrad/wgrad from addresses."""
    jax = pytest.importorskip("jax", reason="jax not installed")
    if jax.default_backend() != "gpu":
        pytest.skip("jax has no GPU backend here")
    import jax.numpy as jnp
    svj = pytest.importorskip("sparsevox.adapters.jax")
    c = random_voxels(rng, 900, extent=12, batches=2)
    v = sv.Voxels(jnp.asarray(c), None)
    kmap = svj.kernel_map(v, 3)
    k = kmap.num_in

    def fresh():
        f = jnp.asarray(rng.standard_normal((k, 32))).astype(dtype)
        w = jnp.asarray(rng.standard_normal((27, 32, 16)) / np.sqrt(27 * 32)).astype(dtype)
        g = jnp.asarray(rng.standard_normal((k, 16))).astype(dtype)
        return f, w, g
    fwd = jax.jit(lambda f, w: svj.conv_features(f, w, kmap, ALGO, ALGO))
    grad = jax.jit(jax.grad(lambda f, w, g: (svj.conv_features(f, w, kmap, ALGO, ALGO).astype(jnp.float64)
                                              * g.astype(jnp.float64)).sum(), argnums=(0, 1)))
    calls = _count_launches(monkeypatch)
    for call in range(3):
        f, w, g = fresh()
        n_before = len(calls)
        out = fwd(f, w)
        gf, gw = grad(f, w, g)
        if call > 0:
            # the jitted forward, and grad's dgrad and wgrad (XLA may drop grad's own forward: the
            # loss value is not returned) all launch from addresses
            shapes = set(calls[n_before:])
            assert {(k, 16), (k, 32), (27, 32, 16)} <= shapes, shapes
            # the forward goes through the callback's fast path: the driver, on XLA's raw stream
            fwd_streams = [st for sh, st in zip(calls[n_before:], calls.streams[n_before:]) if sh == (k, 16)]
            assert fwd_streams and all(isinstance(st, int) for st in fwd_streams), fwd_streams
        fn, wn, gn = (np.asarray(a, dtype=np.float64) for a in (f, w, g))
        ref = dense_conv(c, fn, wn, 3, 1, 1, False, c)
        rgf, rgw = dense_conv_grads(c, fn, wn, gn, 3, 1, 1, False, c)
        tol = TOL[dtype]
        assert rel_err(np.asarray(out, np.float64), ref) < tol
        assert rel_err(np.asarray(gf, np.float64), rgf) < tol
        assert rel_err(np.asarray(gw, np.float64), rgw) < tol


def _spares(kmap):
    return {key: val for key, val in kmap.derived.items() if isinstance(key, tuple) and key[0] == "spare"}


def _oracle_fwd(v, kmap, f, w):
    return dense_conv(v.coords.cpu().numpy(), f.double().cpu().numpy(), w.double().cpu().numpy(), 3, 1, 1, False,
                      v.coords.cpu().numpy())


def test_eager_forward_without_grad_launches_directly_and_keeps_earlier_outputs(rng, monkeypatch):
    """No-grad eager calls after the first go straight to the prepared launch (no planning, one launch),
    into an output allocated one call ahead: each call's output is its own (a later call must not
    write into an output already returned), every one matching the oracle."""
    v, kmap, *_ = _scene(rng, "submanifold")
    f, w, _ = _fresh(rng, kmap, 32, 32, torch.float16)
    with torch.no_grad():
        svt.conv_features(f, w, kmap, ALGO, ALGO)  # plan + prepare

        def boom(*a, **k):
            raise AssertionError("the call planned although a prepared launch exists")
        monkeypatch.setattr(sv_conv, "plan", boom)

        def no_tensors(*a, **k):
            raise AssertionError("the call went through conv_tensors: the direct eager path was not taken")
        monkeypatch.setattr(svt, "conv_tensors", no_tensors)
        calls = _count_launches(monkeypatch)
        ins, outs = [], []
        for _ in range(3):
            fi = _fresh(rng, kmap, 32, 32, torch.float16)[0].detach()
            ins.append(fi)
            outs.append(svt.conv_features(fi, w.detach(), kmap, ALGO, ALGO))
    assert len(calls) == 3
    assert len({o.data_ptr() for o in outs}) == 3
    spare = _spares(kmap)
    assert len(spare) == 1 and all(t.data_ptr() not in {o.data_ptr() for o in outs} for t, *_ in spare.values())
    for fi, o in zip(ins, outs):
        assert rel_err(o.double().cpu().numpy(), _oracle_fwd(v, kmap, fi, w.detach())) < TOL["float16"]


def test_autocast_inference_takes_the_direct_path_and_matches_the_oracle(rng, monkeypatch):
    """A float32 weight on float16 features under autocast, no grad: cast once and launched from the
    direct eager path (not through the checked autograd path), the first call of a fresh map included."""
    v, kmap, *_ = _scene(rng, "submanifold")
    f, w, _ = _fresh(rng, kmap, 32, 32, torch.float16)
    w32 = w.detach().float()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        svt.conv_features(f.detach(), w32, kmap, ALGO, ALGO)  # plan + prepare
        fn = sys.modules[svt.conv_features.__module__]

        def checked(*a, **k):
            raise AssertionError("the call took the checked autograd path")
        monkeypatch.setattr(fn, "_checked", checked)
        calls = _count_launches(monkeypatch)
        outs = [svt.conv_features(f.detach(), w32, kmap, ALGO, ALGO) for _ in range(2)]
        fresh_v, fresh_kmap, *_ = _scene(rng, "submanifold")  # a fresh map: its first call, same path
        ff = _fresh(rng, fresh_kmap, 32, 32, torch.float16)[0].detach()
        fresh_out = svt.conv_features(ff, w32, fresh_kmap, ALGO, ALGO)
    assert len(calls) >= 2 and all(o.dtype == torch.float16 for o in outs + [fresh_out])
    want = _oracle_fwd(v, kmap, f.detach(), w32.half())
    for o in outs:
        assert rel_err(o.double().cpu().numpy(), want) < TOL["float16"]
    assert rel_err(fresh_out.double().cpu().numpy(), _oracle_fwd(fresh_v, fresh_kmap, ff, w32.half())) < TOL["float16"]


def test_spare_output_is_not_used_on_another_stream(rng):
    v, kmap, *_ = _scene(rng, "submanifold")
    f, w, _ = _fresh(rng, kmap, 32, 32, torch.float16)
    f, w = f.detach(), w.detach()
    svt.conv_features(f, w, kmap, ALGO, ALGO)
    svt.conv_features(f, w, kmap, ALGO, ALGO)  # prepared: leaves a spare made on the current stream
    (made_on_main,) = [t.data_ptr() for t, *_ in _spares(kmap).values()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(int(5e7))
        f2 = f * 2
        out = svt.conv_features(f2, w, kmap, ALGO, ALGO)
    torch.cuda.current_stream().wait_stream(side)
    assert out.data_ptr() != made_on_main
    assert rel_err(out.double().cpu().numpy(), _oracle_fwd(v, kmap, f2, w)) < TOL["float16"]
    (side_spare,) = _spares(kmap).values()
    assert side_spare[1] == side.cuda_stream


def test_spare_outputs_can_be_turned_off(rng, monkeypatch):
    monkeypatch.setattr(svt, "SPARE_OUTPUT_MAX_BYTES", 0)
    v, kmap, *_ = _scene(rng, "submanifold")
    f, w, _ = _fresh(rng, kmap, 32, 32, torch.float16)
    for _ in range(3):
        out = svt.conv_features(f.detach(), w.detach(), kmap, ALGO, ALGO)
    assert not _spares(kmap)
    assert rel_err(out.double().cpu().numpy(), _oracle_fwd(v, kmap, f.detach(), w.detach())) < TOL["float16"]


def test_spare_made_in_inference_mode_never_reaches_a_differentiable_call(rng):
    """Evaluation under torch.inference_mode, then training on the same map: the training forward must
    not return an inference tensor (it could not be saved for backward or updated in place)."""
    v, kmap, ks, s, out_coords = _scene(rng, "submanifold")
    f, w, g = _fresh(rng, kmap, 32, 32, torch.float16)
    with torch.inference_mode():
        for _ in range(3):  # plan, prepared (leaves a spare), prepared with the spare
            svt.conv_features(f.detach(), w.detach(), kmap, ALGO, ALGO)
    assert any(val[0].is_inference() for val in _spares(kmap).values())
    for _ in range(2):
        f, w, g = _fresh(rng, kmap, 32, 32, torch.float16)
        out = svt.conv_features(f, w, kmap, ALGO, ALGO)
        assert not out.is_inference()
        gf, gw = torch.autograd.grad(out, (f, w), g)
        _check(v.coords.cpu().numpy(), out_coords, kmap, ks, s, f, w, g, out, gf, gw, "float16")
        out.detach().relu_()  # in place, as an activation would: raises on an inference tensor
        plain = svt.conv_features(f.detach(), w.detach(), kmap, ALGO, ALGO)  # the no-grad eager path
        assert not plain.is_inference()
        plain.relu_()


def test_graph_capture_leaves_spares_alone_and_replays_correctly(rng):
    v, kmap, *_ = _scene(rng, "submanifold")
    f, w, _ = _fresh(rng, kmap, 32, 32, torch.float16)
    f, w = f.detach(), w.detach()
    static_f = f.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on the capture's side stream: plan, prepare, leave a spare
        for _ in range(3):
            svt.conv_features(static_f, w, kmap, ALGO, ALGO)
    torch.cuda.current_stream().wait_stream(side)
    before = {key: val[0].data_ptr() for key, val in _spares(kmap).items()}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = svt.conv_features(static_f, w, kmap, ALGO, ALGO)
    assert {key: val[0].data_ptr() for key, val in _spares(kmap).items()} == before
    for _ in range(2):
        new_f = _fresh(rng, kmap, 32, 32, torch.float16)[0].detach()
        static_f.copy_(new_f)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out.double().cpu().numpy(), _oracle_fwd(v, kmap, new_f, w)) < TOL["float16"]


def test_a_spare_that_does_not_fit_is_not_made(rng, monkeypatch):
    v, kmap, *_ = _scene(rng, "submanifold")
    f, w, _ = _fresh(rng, kmap, 32, 32, torch.float16)
    f, w = f.detach(), w.detach()
    svt.conv_features(f, w, kmap, ALGO, ALGO)  # plan + prepare

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (test)")
    monkeypatch.setattr(torch, "empty_like", oom)
    out = svt.conv_features(f, w, kmap, ALGO, ALGO)
    assert not _spares(kmap)
    assert rel_err(out.double().cpu().numpy(), _oracle_fwd(v, kmap, f, w)) < TOL["float16"]
