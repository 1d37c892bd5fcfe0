"""The XLA FFI custom call (``kernels_cu/xla_ffi/launch_handler.cc``): build, load, launch table, checks.

On the CPU: the library builds from jaxlib's headers, loads without a GPU or driver, its table registers
and forgets launches, and every check of the CUDA handler runs through XLA itself via the CPU twin
``sparsevox_launch_dryrun`` (same decoding, checks and parameter packing, no launch), and the JAX glue of
the backward runs against an emulation of the kernels. The GPU tests compare the FFI forward (GPU-verified
at ce287b0) and backward (not yet run on a GPU) with the buffer_callback path and the float64 oracle.
"""
import contextlib
import logging
import os
import shutil
import struct

import numpy as np
import pytest

from sparsevox.cuda import ffi_build, ffi_lib

jax = pytest.importorskip("jax", reason="jax not installed")
jnp = jax.numpy

HAVE_COMPILER = any(shutil.which(c) for c in ("g++", "c++", "nvcc")) or bool(os.environ.get("CXX"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A fresh build of the library (a few seconds), made the one ffi_lib opens for this module's tests."""
    if not HAVE_COMPILER:
        pytest.skip("no compiler")
    path = ffi_build.build(tmp_path_factory.mktemp("ffi") / ffi_lib.LIB_NAME)
    old = os.environ.get(ffi_lib.ENV_VAR)
    os.environ[ffi_lib.ENV_VAR] = str(path)
    ffi_lib.reset()
    yield path
    if old is None:
        os.environ.pop(ffi_lib.ENV_VAR, None)
    else:
        os.environ[ffi_lib.ENV_VAR] = old
    ffi_lib.reset()


def _step(slots=None, args=(None, None, 0xDEAD, np.int32(5), None, np.int32(7))):
    return (0x1234, 10, 128, 0, args, {0: 0, 1: 1, 4: 2} if slots is None else slots)


def test_the_headers_are_jaxs_and_the_library_exports_its_entry_points(built):
    assert ffi_build.xla_include() == type(ffi_build.xla_include())(jax.ffi.include_dir())
    assert ffi_lib.available() == (True, "")
    assert ffi_lib.handler_address(ffi_lib.TARGET) and ffi_lib.handler_address(ffi_lib.DRYRUN_TARGET)
    with pytest.raises(ValueError, match="no FFI handler"):
        ffi_lib.handler_address("cuLaunchKernel")


def test_builds_without_cuda_h(tmp_path):
    """No CUDA toolkit: the handler declares the three driver types itself."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if not cxx:
        pytest.skip("no compiler")
    cmd = ffi_build.command(cxx, ffi_build.source_file(), tmp_path / "x.so", ffi_build.xla_include(), None)
    assert "-DSPARSEVOX_NO_CUDA_H" in cmd
    out = ffi_build.build(tmp_path / "lib.so", cuda_inc=None, cxx=cxx) if ffi_build.cuda_include() is None else None
    if out is None:  # a toolkit is installed: build the fallback by hand
        import subprocess
        subprocess.run(cmd, check=True, capture_output=True)
        out = tmp_path / "x.so"
    assert out.stat().st_size > 0


def test_loads_without_a_driver_and_says_why_it_cannot_launch(built):
    ok, why = ffi_lib.driver_available()
    if not ok:
        assert "libcuda.so.1" in why
    assert ffi_lib.count() >= 0


def test_missing_library_is_a_reason_with_the_build_command(monkeypatch, tmp_path):
    monkeypatch.setenv(ffi_lib.ENV_VAR, str(tmp_path / "absent.so"))
    ffi_lib.reset()
    try:
        ok, why = ffi_lib.available()
        assert not ok and "python -m sparsevox build-ffi" in why
        with pytest.raises(RuntimeError, match="build-ffi"):
            ffi_lib.count()
    finally:
        ffi_lib.reset()


def test_check_reports_unknown_ids_and_wrong_counts(built):
    assert "unknown launch_id 987654" in ffi_lib.check(987654, 2, 1)
    lid = ffi_lib.register([_step()], 2, 1)
    try:
        assert ffi_lib.check(lid, 2, 1) == ""
        assert f"launch_id {lid} takes 2 input and 1 output buffers, got 3 and 1" in ffi_lib.check(lid, 3, 1)
        assert "got 2 and 0" in ffi_lib.check(lid, 2, 0)
    finally:
        ffi_lib.forget(lid)


def test_the_table_registers_and_forgets(built):
    before = ffi_lib.count()
    ids = [ffi_lib.register([_step()], 2, 1) for _ in range(3)]
    assert len(set(ids)) == 3 and ffi_lib.count() == before + 3
    assert ffi_lib.forget(ids[1]) and not ffi_lib.forget(ids[1])
    assert ffi_lib.count() == before + 2
    assert "unknown launch_id" in ffi_lib.check(ids[1], 2, 1) and ffi_lib.check(ids[0], 2, 1) == ""
    for i in ids:
        ffi_lib.forget(i)
    assert ffi_lib.count() == before


@pytest.mark.parametrize("step, n_args, n_rets, align, match", [
    (_step({3: 0}), 2, 1, 1, "not an 8-byte parameter"),     # a slot on an int32
    (_step({9: 0}), 2, 1, 1, "not an 8-byte parameter"),     # past the last parameter
    (_step({0: 3}), 2, 1, 1, "names buffer 3 of 3"),
    (_step(), 2, 1, 12, "power of two"),
    ((0x1, 0, 128, 0, (None,), {0: 0}), 1, 0, 1, "grid and block"),
])
def test_register_refuses_bad_layouts(built, step, n_args, n_rets, align, match):
    before = ffi_lib.count()
    with pytest.raises(ValueError, match=match):
        ffi_lib.register([step], n_args, n_rets, align=align)
    assert ffi_lib.count() == before


def test_packing_fills_the_slots_of_the_template(built):
    """Parameters at their natural alignment (as in a C struct), buffer addresses in the slots."""
    blob, offsets, sizes = ffi_lib.layout((None, np.int32(5), None, np.int16(2), np.float64(1.5)))
    assert offsets == [0, 8, 16, 24, 32] and sizes == [8, 4, 8, 2, 8] and len(blob) == 40
    lid = ffi_lib.register([_step(), _step({5: 0, 1: 2}, (0, None, np.int32(1), 0, 0, None))], 2, 1,
                           [16, 32, 64], align=16)
    try:
        b = ffi_lib.pack(lid, 0, [0x100, 0x200, 0x300], [16, 32, 64], 2)
        assert struct.unpack("@QQQiiQi", b[:44]) == (0x100, 0x200, 0xDEAD, 5, 0, 0x300, 7)
        b1 = ffi_lib.pack(lid, 1, [0x100, 0x200, 0x300], [16, 32, 64], 2)
        assert struct.unpack("@QQi", b1[:20])[:2] == (0, 0x300) and struct.unpack_from("@Q", b1, 40)[0] == 0x100
        with pytest.raises(ValueError, match="input 1 at 0x208 is not 16-byte aligned"):
            ffi_lib.pack(lid, 0, [0x100, 0x208, 0x300], [16, 32, 64], 2)
        with pytest.raises(ValueError, match="output 0 has 60 bytes, the prepared launch expects 64"):
            ffi_lib.pack(lid, 0, [0x100, 0x200, 0x300], [16, 32, 60], 2)
        with pytest.raises(ValueError, match="has 2 steps, asked for 2"):
            ffi_lib.pack(lid, 2, [0x100, 0x200, 0x300], [16, 32, 64], 2)
    finally:
        ffi_lib.forget(lid)


@pytest.fixture(scope="module")
def dryrun(built):
    """``call(launch_id, *arrays)``: the CPU twin as a jitted XLA custom call returning ``[5, 3]`` float32."""
    try:
        jax.ffi.register_ffi_target(ffi_lib.DRYRUN_TARGET, jax.ffi.pycapsule(ffi_lib.handler_address(ffi_lib.DRYRUN_TARGET)),
                                    platform="cpu")
    except Exception as e:  # already registered by an earlier module instance
        if "already" not in str(e).lower():
            raise

    def call(launch_id, *arrays):
        fn = jax.ffi.ffi_call(ffi_lib.DRYRUN_TARGET, jax.ShapeDtypeStruct((5, 3), jnp.float32), vmap_method="sequential")
        cpu = jax.devices("cpu")[0]  # the twin is a CPU handler: also where JAX's default backend is the GPU
        return jax.jit(lambda *a: fn(*a, launch_id=np.int64(launch_id)))(
            *(jax.device_put(a, cpu) for a in arrays)).block_until_ready()
    return call


def test_the_handler_checks_and_packs_through_xla(built, dryrun):
    """XLA decodes the typed binding (variadic buffers, the int64 attribute), the handler checks the
    buffers and packs the template with XLA's addresses; every refusal is an XLA error with our message."""
    f, w = jnp.ones((4, 2), jnp.float32), jnp.ones((27, 2, 3), jnp.float32)
    lid = ffi_lib.register([_step()], 2, 1, [f.nbytes, w.nbytes, 5 * 3 * 4])
    try:
        dryrun(lid, f, w)
        b = ffi_lib.last_params(lid)
        a0, a1, fixed, five, out, seven = struct.unpack("@QQQiQi", b[:44])
        assert (fixed, five, seven) == (0xDEAD, 5, 7) and 0 not in (a0, a1, out) and len({a0, a1, out}) == 3
        assert ffi_lib.pack(lid, 0, [a0, a1, out], [f.nbytes, w.nbytes, 60], 2) == b  # the same packing
        bad = [((lid + 1000, f, w), "unknown launch_id"), ((lid, f), "takes 2 input and 1 output buffers, got 1 and 1"),
               ((lid, f, w, w), "got 3 and 1"), ((lid, jnp.ones((5, 2), jnp.float32), w), "input 0 has 40 bytes")]
        for args, match in bad:
            with pytest.raises(Exception, match=match):
                dryrun(*args)
        ffi_lib.forget(lid)  # a compiled call that outlives its launch fails cleanly
        with pytest.raises(Exception, match=f"unknown launch_id {lid}"):
            dryrun(lid, f, w)
    finally:
        ffi_lib.forget(lid)


def test_an_aliased_accumulator_reaches_the_handler_as_the_output(built, dryrun):
    """The wgrad call's form: a third input aliased to the output (``input_output_aliases={2: 0}``), which the
    kernels add into. Through XLA the handler gets one address for both, and what the call returns is that
    buffer's content (the dry run launches nothing, so the input's 7s come back)."""
    f, w = jnp.ones((4, 2), jnp.float32), jnp.ones((27, 2, 3), jnp.float32)
    lid = ffi_lib.register([_step({0: 0, 1: 1, 2: 2, 4: 3}, (None, None, None, np.int32(5), None, np.int32(7)))],
                           3, 1, [f.nbytes, w.nbytes, 60, 60])
    try:
        fn = jax.ffi.ffi_call(ffi_lib.DRYRUN_TARGET, jax.ShapeDtypeStruct((5, 3), jnp.float32),
                              vmap_method="sequential", input_output_aliases={2: 0})
        cpu = jax.devices("cpu")[0]
        out = jax.jit(lambda f, w: fn(f, w, jnp.full((5, 3), 7.0, jnp.float32), launch_id=np.int64(lid)))(
            jax.device_put(f, cpu), jax.device_put(w, cpu))
        np.testing.assert_array_equal(np.asarray(out), np.full((5, 3), 7.0))
        a0, a1, acc, five, out_addr, seven = struct.unpack("@QQQiQi", ffi_lib.last_params(lid)[:44])
        assert acc == out_addr and len({a0, a1, acc}) == 3 and (five, seven) == (5, 7)
    finally:
        ffi_lib.forget(lid)


class _StubLaunch:
    """A prepared Launch as the registration reads it: IMPLICIT_GEMM's argument layout (holes 0, 1, 5)."""
    holes, vec, device_id = (0, 1, 5), False, -1

    def __init__(self, acc_dtype=None):
        self.acc_dtype = acc_dtype

    def raw_steps(self):
        args = (None, None, 0xAA, 0xBB, 0xCC, None, np.int32(3), np.int32(4))
        return [(0x1234, 10, 128, 0, args), (0x5678, 2, 64, 0, args)]


@pytest.mark.parametrize("direction", ["fwd", "dgrad", "wgrad"])
def test_ffi_registration_routes_each_hole_to_its_buffer(built, direction):
    """What ``_ffi_register`` stores for a direction: the handler packs input 0 into the Launch's hole
    ``a``, input 1 into ``b`` and the output (for wgrad the 4th buffer, aliased to the zeroed input) into
    ``out``, in every step, and refuses buffers of other sizes than the call's."""
    svj = pytest.importorskip("sparsevox.adapters.jax")
    f_shape, w_shape, num_out = (40, 6), (27, 6, 5), 33
    lid = svj._ffi_register(_StubLaunch("float32" if direction == "wgrad" else None), direction, num_out, f_shape,
                            w_shape, "float16")
    try:
        sizes = svj._ffi_buffer_bytes(direction, num_out, f_shape, w_shape, 2, 4)
        n_args = svj._FFI_BUFFERS[direction][0]
        assert len(sizes) == n_args + 1
        want = {"fwd": [40 * 6 * 2, 27 * 30 * 2, 33 * 5 * 2], "dgrad": [33 * 5 * 2, 27 * 30 * 2, 40 * 6 * 2],
                "wgrad": [40 * 6 * 2, 33 * 5 * 2, 27 * 30 * 4, 27 * 30 * 4]}[direction]
        assert sizes == want
        addrs = [0x1000 * (i + 1) for i in range(len(sizes))]
        for step in (0, 1):
            b = ffi_lib.pack(lid, step, addrs, sizes, n_args)
            a, bb, t1, t2, t3, out, three, four = struct.unpack("@QQQQQQii", b[:56])
            assert (a, bb, out) == (addrs[0], addrs[1], addrs[-1]) and (t1, t2, t3, three, four) == (0xAA, 0xBB, 0xCC, 3, 4)
        with pytest.raises(ValueError, match="bytes"):
            ffi_lib.pack(lid, 0, addrs, [s + 2 for s in sizes], n_args)
    finally:
        ffi_lib.forget(lid)


class _FakeLaunch:
    """What the JAX glue reads of a prepared Launch (flip_b, acc_dtype, out_shape)."""

    def __init__(self, direction, core, f_shape, w_shape, dtype):
        from sparsevox.algorithms.implicit_gemm import _mirrored
        k, c_in, c_out = w_shape
        self.direction, self.core = direction, core
        self.flip_b = direction == "dgrad" and _mirrored(core)
        self.acc_dtype = ("float64" if dtype == "float64" else "float32") if direction == "wgrad" else None
        self.out_shape = {"fwd": (core.num_out, c_out), "dgrad": tuple(f_shape), "wgrad": tuple(w_shape)}[direction]

    def run(self, a, b, out):
        """The kernels' semantics as the Launch docstring states them, on the map's pairs in float64."""
        from sparsevox.algorithms.explicit_gemm import _segments
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        res = np.zeros(self.out_shape) if out is None else np.array(out, np.float64)
        for k, i, o in _segments(self.core):
            if self.direction == "fwd":
                np.add.at(res, o, a[i] @ b[k])
            elif self.direction == "dgrad" and self.flip_b:  # the forward tables, rows as inputs, W[K-1-k]^T
                np.add.at(res, o, a[i] @ b[k])
            elif self.direction == "dgrad":
                np.add.at(res, i, a[o] @ b[k])
            else:  # wgrad adds into the zeroed accumulator
                res[k] += a[i].T @ b[o]
        return res


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("kernel, stride", [(3, 1), (2, 2)], ids=["subm-mirrored", "k2s2"])
def test_the_ffi_backward_hands_each_call_what_its_launch_expects(rng, monkeypatch, dtype, kernel, stride):
    """The JAX side of the FFI backward on the CPU: the custom calls are replaced by an emulation of the
    prepared kernels' documented semantics (``_FakeLaunch``), so what is checked is the glue: which buffers
    each call gets (their byte sizes are the ones the launch is registered with), the dgrad's transposed and,
    for a mirrored map, offset-reversed weight, the wgrad's zeroed accumulator aliased to its output and cast
    to the weight's dtype. Against the NumPy reference's gradients (float64 copies)."""
    svj = pytest.importorskip("sparsevox.adapters.jax")
    import sparsevox as sv
    from reference import TOL, random_voxels, rel_err
    c = random_voxels(rng, 200, extent=6, batches=2)
    f = rng.standard_normal((len(c), 6)).astype(dtype)
    w = (rng.standard_normal((kernel ** 3, 6, 5)) / 9).astype(dtype)
    cpu = jax.devices("cpu")[0]  # the emulation reads the map on the host (also where jax has a GPU)
    v = sv.Voxels(jax.device_put(c, cpu), jax.device_put(f, cpu))
    kmap = svj.kernel_map(v, kernel, stride)
    core = kmap.source.ref()
    g = rng.standard_normal((kmap.num_out, 5)).astype(dtype)
    launches, calls = {}, []

    def fake_launch(core_map, direction, dt, f_shape, w_shape, algo):
        assert core_map is core and dt == dtype
        lid = len(launches) + 1
        launches[lid] = _FakeLaunch(direction, core_map, f_shape, w_shape, dt)
        return lid, launches[lid]

    def fake_ffi_call(target, result, vmap_method=None, input_output_aliases=None):
        def call(*args, launch_id):
            prep = launches[int(launch_id)]
            n_args, _ = svj._FFI_BUFFERS[prep.direction]
            itemsize = np.dtype(dtype).itemsize
            sizes = svj._ffi_buffer_bytes(prep.direction, core.num_out, f.shape, w.shape, itemsize, 4)
            assert [a.size * a.dtype.itemsize for a in args] + [int(np.prod(result.shape)) * result.dtype.itemsize] \
                == sizes and len(args) == n_args
            calls.append((prep.direction, input_output_aliases, result.dtype))

            def host(*arrays):
                out = arrays[2] if input_output_aliases else None
                return prep.run(arrays[0], arrays[1], out).astype(result.dtype)
            return jax.pure_callback(host, result, *args)
        return call

    monkeypatch.setattr(svj, "_ffi_core", lambda m: m.source.ref())
    monkeypatch.setattr(svj, "_ffi_launch", fake_launch)
    monkeypatch.setattr(jax.ffi, "ffi_call", fake_ffi_call)
    out, vjp = jax.vjp(lambda f, w: svj.conv_features(f, w, kmap), jax.device_put(f, cpu), jax.device_put(w, cpu))
    gf, gw = vjp(jax.device_put(g, cpu))
    assert [d for d, *_ in calls] == ["fwd", "dgrad", "wgrad"]
    assert calls[2][1] == {2: 0} and calls[2][2] == np.float32 and calls[1][1] is None
    assert launches[2].flip_b == (kernel == 3)
    assert gf.dtype == gw.dtype == np.dtype(dtype)
    ref = sv.conv_backward(g.astype(np.float64), f.astype(np.float64), w.astype(np.float64), core)
    ref_out = sv.conv_forward(f.astype(np.float64), w.astype(np.float64), core)
    for got, want in ((out, ref_out), (gf, ref[0]), (gw, ref[1])):
        assert rel_err(np.asarray(got, np.float64), want) < TOL[dtype]


def test_cpu_jax_takes_the_fallback_and_says_so_once(built, caplog, monkeypatch, rng):
    if jax.default_backend() == "gpu":
        pytest.skip("jax has a GPU backend here: the no-GPU fallback is checked where it has none (CI)")
    svj = pytest.importorskip("sparsevox.adapters.jax")
    import sparsevox as sv
    from reference import random_voxels
    for setting, reason in (("1", "no GPU backend"), ("0", "SPARSEVOX_JAX_FFI=0")):
        monkeypatch.setenv("SPARSEVOX_JAX_FFI", setting)
        svj._ffi_path.cache_clear()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sparsevox.adapters.jax"):
            c = random_voxels(rng, 30, extent=5)
            v = sv.Voxels(jnp.asarray(c), jnp.asarray(rng.standard_normal((len(c), 2)), jnp.float32))
            kmap = svj.kernel_map(v, 3)
            w = jnp.asarray(rng.standard_normal((27, 2, 4)), jnp.float32)
            for _ in range(2):
                out = jax.jit(lambda f, w: svj.conv_features(f, w, kmap))(v.feats, w)
            assert svj.jax_call_path() == ("buffer_callback", svj.jax_call_path()[1])
        lines = [r.getMessage() for r in caplog.records if r.name == "sparsevox.adapters.jax"]
        assert len(lines) == 1 and "buffer_callback" in lines[0] and reason in lines[0], lines
        ref = sv.conv_forward(np.asarray(v.feats), np.asarray(w), sv.kernel_map(v, 3))
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    svj._ffi_path.cache_clear()


def test_the_build_command(built, tmp_path, capsys):
    from sparsevox.__main__ import main
    assert main(["build-ffi", "--output", str(tmp_path / "lib.so")]) == 0
    assert (tmp_path / "lib.so").stat().st_size > 0
    assert main(["build-ffi", "--xla-include", str(tmp_path)]) == 1  # no headers there: a message, status 1
    err = capsys.readouterr().err
    assert "build-ffi: built" in err and "has no xla/ffi/api/ffi.h" in err


# --- on a GPU: the FFI forward and backward against buffer_callback and the float64 oracle ---------------

@contextlib.contextmanager
def _gpu_ffi(dtype: str):
    """The FFI library built (here, when missing) and, for float64, JAX's x64 mode on while the body runs."""
    if not ffi_lib.available()[0]:
        ffi_build.build()
        ffi_lib.reset()
    jax.config.update("jax_enable_x64", dtype == "float64")
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)


def _gpu_case(rng, dtype, c_in=16, c_out=32, n=400):
    import sparsevox as sv
    from reference import random_voxels
    c = random_voxels(rng, n, extent=10, batches=2)
    f = rng.standard_normal((len(c), c_in))
    w = rng.standard_normal((27, c_in, c_out)) / np.sqrt(27 * c_in)
    v = sv.Voxels(jnp.asarray(c), jnp.asarray(f, dtype))
    return c, f, w, v


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_gpu_ffi_forward_matches_buffer_callback_and_the_oracle(rng, monkeypatch, dtype):
    svj = pytest.importorskip("sparsevox.adapters.jax")
    from reference import TOL, dense_conv, rel_err
    with _gpu_ffi(dtype):
        c, f, w, v = _gpu_case(rng, dtype)
        kmap = svj.kernel_map(v, 3)
        wj = jnp.asarray(w, dtype)
        results = {}
        for setting in ("1", "0"):
            monkeypatch.setenv("SPARSEVOX_JAX_FFI", setting)
            fn = jax.jit(lambda f, w: svj.conv_features(f, w, kmap, fwd_algo="implicit_gemm"))
            hlo = fn.lower(v.feats, wj).as_text()
            assert (ffi_lib.TARGET in hlo) == (setting == "1"), hlo[:2000]
            results[setting] = np.asarray(fn(v.feats, wj), np.float64)
        ref = dense_conv(c, f.astype(dtype).astype(np.float64), w.astype(dtype).astype(np.float64), 3, 1, 1, False, c)
        assert rel_err(results["1"], ref) < TOL[dtype]
        np.testing.assert_allclose(results["1"], results["0"], rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
@pytest.mark.parametrize("kernel, stride", [(3, 1), (2, 2)], ids=["subm-mirrored", "k2s2"])
def test_gpu_ffi_backward_matches_buffer_callback_and_the_oracle(rng, monkeypatch, dtype, kernel, stride):
    """The FFI backward (dgrad and wgrad custom calls; written without a GPU on 2026-12-05): the jitted
    gradient's HLO has their two sparsevox_launch calls, its gradients match the float64 oracle and the
    buffer_callback path, and the weight gradient of 16-bit data is the float32 accumulator rounded once."""
    svj = pytest.importorskip("sparsevox.adapters.jax")
    from reference import TOL, dense_conv_grads, rel_err
    with _gpu_ffi(dtype):
        c, f, w, v = _gpu_case(rng, dtype, c_in=16, c_out=24, n=600)
        w = rng.standard_normal((kernel ** 3, 16, 24)) / np.sqrt(kernel ** 3 * 16)
        kmap = svj.kernel_map(v, kernel, stride)
        out_c = np.asarray(svj.spatially_sparse_conv(v, jnp.asarray(w, dtype), kernel, stride).coords)  # row order
        assert len(out_c) == kmap.num_out
        g = rng.standard_normal((kmap.num_out, 24))
        wj, gj = jnp.asarray(w, dtype), jnp.asarray(g, dtype)
        results = {}
        for setting in ("1", "0"):
            monkeypatch.setenv("SPARSEVOX_JAX_FFI", setting)

            def loss(f, w):
                # summed in float64 for float64 data: a float32 sum would hand the backward g rounded to
                # float32 (the GPU run at e9f6612: 2.5e-8 against the oracle's full-precision g)
                acc = jnp.float64 if dtype == "float64" else jnp.float32
                out = svj.conv_features(f, w, kmap, fwd_algo="implicit_gemm", bwd_algo="implicit_gemm")
                return (out.astype(acc) * gj.astype(acc)).sum()
            fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
            hlo = fn.lower(v.feats, wj).as_text()
            # dgrad and wgrad (the gradient of a loss linear in the output does not need the forward, which
            # XLA then drops: the GPU run at e9f6612 counted 2 calls with all three launches registered)
            n_calls = hlo.count(ffi_lib.TARGET)
            assert n_calls >= 2 if setting == "1" else n_calls == 0, f"SPARSEVOX_JAX_FFI={setting}: {n_calls} calls"
            results[setting] = [np.asarray(a, np.float64) for a in fn(v.feats, wj)]
        x64, w64, g64 = (a.astype(dtype).astype(np.float64) for a in (f, w, g))
        rgf, rgw = dense_conv_grads(c, x64, w64, g64, kernel, stride, 1, False, out_c)
        for got, want, ref in zip(results["1"], results["0"], (rgf, rgw)):
            assert rel_err(got, ref) < TOL[dtype]
            assert rel_err(got, want) < 2 * TOL[dtype]
        if dtype == "float16":  # accumulated in float32, rounded to float16 once: within float16's rounding
            assert rel_err(results["1"][1], rgw) < 1e-3


@pytest.mark.gpu
def test_gpu_forgotten_launch_fails_cleanly(rng, monkeypatch):
    svj = pytest.importorskip("sparsevox.adapters.jax")
    monkeypatch.setenv("SPARSEVOX_JAX_FFI", "1")
    c, f, w, v = _gpu_case(rng, "float32")
    kmap = svj.kernel_map(v, 3)
    fn = jax.jit(lambda f, w: svj.conv_features(f, w, kmap, fwd_algo="implicit_gemm"))
    fn(v.feats, jnp.asarray(w, jnp.float32)).block_until_ready()
    core = kmap.source.ref()
    ids = [h[0] for k, h in core.derived.items() if isinstance(k, tuple) and k[:1] == ("jax.ffi.fwd",) and h]
    assert ids, "the FFI path was not taken"
    for i in ids:
        ffi_lib.forget(i)
    with pytest.raises(Exception, match="unknown launch_id"):
        fn(v.feats, jnp.asarray(w, jnp.float32)).block_until_ready()
