"""The inference BatchNorm + residual + ReLU kernel (``kernels_cu/norm_act.cu``, :mod:`sparsevox.cuda.norm_act`)
without a GPU: the real kernel source runs on the CPU (compiled as C++ with the pooling emulator's prelude)
against a float64 reference, its output poisoned. The torch modules that launch it:
``test_norm_act_torch.py``."""
import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from pooling_cpu_emulator import PRELUDE

from sparsevox.cuda import norm_act

ROOT = Path(__file__).resolve().parents[1]
_EXTRA = r"""
#include <cmath>
#define __restrict__ __restrict
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }
"""
_TYPES = {"__half": np.float16, "__nv_bfloat16": np.uint16, "float": np.float32, "double": np.float64}


def _sym(expr):
    return "emu_" + re.sub(r"\W+", "_", expr).strip("_")


def _entry(expr):
    t, p, _, _ = [a.strip() for a in re.fullmatch(r"\w+<(.*)>", expr).group(1).split(",")]
    params = (f"const {t}* x, const {p}* m, const {p}* v, const {p}* w, const {p}* b, const {t}* r, {t}* y, "
              "long long rows, int c, double eps")
    return (f'extern "C" void {_sym(expr)}(unsigned gx, unsigned gy, unsigned bx, unsigned by, {params}) {{ '
            f'emu_launch(dim3{{gx, gy, 1}}, dim3{{bx, by, 1}}, [=] {{ {expr}(x, m, v, w, b, r, y, rows, c, eps); }}); }}')


@functools.lru_cache(maxsize=None)
def _library():
    body = re.sub(r"#include <cuda_(fp16|bf16)\.h>", "", (ROOT / "kernels_cu" / "norm_act.cu").read_text())
    src = "\n".join([PRELUDE, _EXTRA, body, *(_entry(e) for e in norm_act._NAMES)])
    out = Path(tempfile.gettempdir()) / f"sparsevox_norm_emu_{hashlib.sha1(src.encode()).hexdigest()[:16]}.so"
    if not out.exists():
        cpp = out.with_suffix(f".{os.getpid()}.cpp")
        cpp.write_text(src)
        tmp = out.with_suffix(f".{os.getpid()}.so")
        subprocess.run(["g++", "-std=c++20", "-O1", "-shared", "-fPIC", str(cpp), "-o", str(tmp)], check=True,
                       capture_output=True, text=True)
        tmp.replace(out)
    return ctypes.CDLL(str(out))


def _bf16(a):
    """float64 -> bfloat16 bits (round to nearest even), and back."""
    u = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _from_bf16(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _store(a, ctype):
    return _bf16(a) if ctype == "__nv_bfloat16" else np.asarray(a, _TYPES[ctype])


def _load(a, ctype):
    return _from_bf16(a) if ctype == "__nv_bfloat16" else a.astype(np.float64)


CASES = [(t, p) for t in ("__half", "__nv_bfloat16", "float", "double") for p in dict.fromkeys(("float", t))]
TOL = {"__half": 2e-3, "__nv_bfloat16": 1.6e-2, "float": 2e-6, "double": 1e-13}


_SIZES = {"__half": 2, "__nv_bfloat16": 2, "float": 4, "double": 8}


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found (the CPU emulator compiles the kernel)")
@pytest.mark.parametrize("t,p", CASES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("affine,residual", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("vector", [False, True])
def test_kernel_on_the_cpu_matches_float64(rng, t, p, relu, affine, residual, vector):
    """Every instantiation on random shapes, on a grid smaller than the work in both directions (the
    grid-stride loops over rows and over channel vectors run several rounds); ``vector``: the 16-byte
    form (channel counts a multiple of its width), else one channel per thread."""
    v = 16 // _SIZES[t] if vector else 1
    rows, eps = int(rng.integers(1, 40)), float(rng.uniform(1e-5, 1e-2))
    c = v * int(rng.integers(1, 7)) if vector else int(rng.integers(1, 13))
    x = _store(rng.normal(0, 3, (rows, c)), t)
    mean, var = _store(rng.normal(0, 1, c), p), _store(rng.uniform(0.1, 4, c), p)
    w = _store(rng.normal(1, 0.5, c), p) if affine else None
    b = _store(rng.normal(0, 1, c), p) if affine else None
    r = _store(rng.normal(0, 2, (rows, c)), t) if residual else None
    if t != "__nv_bfloat16":
        x.flat[0] = np.nan  # NaN survives the ReLU, as torch.relu keeps it
    y = np.full((rows, c), 0x7FC1 if t == "__nv_bfloat16" else np.nan, _TYPES[t])  # poison
    expr = f"batchnorm_eval<{t}, {p}, {'true' if relu else 'false'}, {v}>"
    ptr = lambda a: ctypes.c_void_p(None if a is None else a.ctypes.data)  # noqa: E731
    u = ctypes.c_uint
    getattr(_library(), _sym(expr))(u(2), u(1), u(2), u(3), ptr(x), ptr(mean), ptr(var), ptr(w), ptr(b), ptr(r),
                                    ptr(y), ctypes.c_longlong(rows), ctypes.c_int(c), ctypes.c_double(eps))
    want = (_load(x, t) - _load(mean, p)) / np.sqrt(_load(var, p) + (np.float32(eps) if t != "double" else eps))
    if affine:
        want = want * _load(w, p) + _load(b, p)
    if residual:
        want = want + _load(r, t)
    if relu:
        want = np.where(want < 0, 0, want)
    got = _load(y, t)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)  # every element written, NaN where the input had one
    scale = np.abs(want[~nan]).max(initial=1.0)
    np.testing.assert_allclose(got[~nan], want[~nan], rtol=TOL[t], atol=TOL[t] * scale)


def test_launch_shape_takes_16_byte_vectors_only_where_they_fit():
    # float16, C = 32: four 8-channel vectors per row, 64 rows per 256-thread block
    assert norm_act.launch_shape(1000, 32, "float16", 0x1000, 0x2000) == (8, (16, 1), (4, 64))
    # a channel count or an address that does not allow 16-byte accesses: one channel per thread
    assert norm_act.launch_shape(1000, 30, "float16", 0x1000, 0x2000)[0] == 1
    assert norm_act.launch_shape(1000, 32, "float16", 0x1000, 0x2008)[0] == 1
    assert norm_act.launch_shape(10, 64, "float64", 0, 0)[0] == 2
    # wide rows: blocks of 256 vector columns, the grid's y covering the rest
    v, grid, block = norm_act.launch_shape(3, 4096 * 8, "float16", 0, 0)
    assert (v, block, grid) == (8, (256, 1), (3, 16))
    # many rows: the grid stops at its x limit, the kernel's row loop covers the rest
    assert norm_act.launch_shape(10 ** 9, 8, "float32", 0, 0)[1][0] == 1 << 16


def test_bad_arguments_raise_value_errors_naming_them():
    with pytest.raises(ValueError, match="feature dtype"):
        norm_act.batchnorm_eval(0, 0, 0, 0, 0, 0, 0, 4, 4, 1e-5, "int8", "float32", False, 0)
    with pytest.raises(ValueError, match="parameter dtype"):
        norm_act.batchnorm_eval(0, 0, 0, 0, 0, 0, 0, 4, 4, 1e-5, "float16", "float64", False, 0)
    with pytest.raises(ValueError, match=r"channels must be in \[1, 2\*\*31\)"):
        norm_act.batchnorm_eval(0, 0, 0, 0, 0, 0, 0, 4, 0, 1e-5, "float32", "float32", False, 0)
    assert norm_act.param_type_ok("bfloat16", "bfloat16") and not norm_act.param_type_ok("float32", "float16")
