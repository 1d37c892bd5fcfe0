"""The XLA FFI custom call (``kernels_cu/xla_ffi/launch_handler.cc``): build, load, launch table, checks.

On the CPU: the library builds from jaxlib's headers, loads without a GPU or driver, its table registers
and forgets launches, and every check of the CUDA handler runs through XLA itself via the CPU twin
``sparsevox_launch_dryrun`` (same decoding, checks and parameter packing, no launch). The GPU tests
compare the FFI forward with the buffer_callback path and the float64 oracle.
"""
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


# --- on a GPU: the FFI forward against buffer_callback and the float64 oracle (NOT YET RUN) -------------

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
    if not ffi_lib.available()[0]:
        ffi_build.build()
        ffi_lib.reset()
    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    try:
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
        g = jax.grad(lambda f: svj.conv_features(f, wj, kmap, fwd_algo="implicit_gemm").astype(jnp.float32).sum())(v.feats)
        assert g.shape == v.feats.shape  # the backward still runs through buffer_callback
    finally:
        jax.config.update("jax_enable_x64", False)


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
