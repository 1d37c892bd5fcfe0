"""Run the real ``kernels_cu/pooling.cu`` on the CPU, so the GPU path of :mod:`sparsevox.segments`
(the same Python launch code, the same kernels) is tested without a GPU.

The kernels use no shared memory, barriers or atomics, so a launch is a plain loop over blocks and
threads in one OS thread. The CUDA source is compiled as C++20 with a prelude: ``_Float16`` for
``__half`` and round-to-nearest-even bit arithmetic for ``__nv_bfloat16``. Every name expression the
backend can ask for (:func:`sparsevox.segments._name_expressions`) gets an ``extern "C"`` entry point
taking the launch geometry.

:class:`EmulatedDevice` stands in for :class:`sparsevox.segments.CupyDevice` with NumPy arrays; with
``poison=True`` its ``empty`` fills new arrays with NaN (floats) or -7 (ints), so an output element a
kernel does not write shows up.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

PRELUDE = r"""
#include <cstdint>
#include <cstring>
#include <cstddef>
struct dim3 { unsigned x = 1, y = 1, z = 1; };
static dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
struct __half { _Float16 v; };
struct __nv_bfloat16 { uint16_t x; };
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half_rn(float f) { return __half{(_Float16)f}; }
inline float __bfloat162float(__nv_bfloat16 b) {
    uint32_t u = uint32_t(b.x) << 16; float f; std::memcpy(&f, &u, 4); return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u; std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fc0};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16{uint16_t(u >> 16)};
}
template <class F> void emu_launch(dim3 grid, dim3 block, F f) {
    gridDim = grid; blockDim = block;
    for (unsigned bz = 0; bz < grid.z; ++bz) for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3{bx, by, bz};
        for (unsigned tz = 0; tz < block.z; ++tz) for (unsigned ty = 0; ty < block.y; ++ty)
        for (unsigned tx = 0; tx < block.x; ++tx) {
            threadIdx = dim3{tx, ty, tz};
            f();
        }
    }
}
"""

_GEOM = "unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz"
_LAUNCH = "emu_launch(dim3{gx, gy, gz}, dim3{bx, by, bz}, [=] {"


def symbol(expr: str) -> str:
    return "emu_" + re.sub(r"\W+", "_", expr).strip("_")


def _entry(expr: str) -> str:
    kernel, args = re.fullmatch(r"(\w+)<(.*)>", expr).groups()
    types_ = [a.strip() for a in args.split(",")]
    ti, to = types_[0], types_[-1]
    acc = "double" if ti == "double" else "float"
    if kernel == "segment_sum":
        params = (f"const {ti}* s, const int* p, const int* i, const {acc}* w, int use_w, {to}* o, "
                  "int rows, int C")
        call = f"segment_sum<{args}>(s, p, i, w, use_w, o, rows, C);"
    elif kernel == "segment_max":
        params = (f"const {ti}* s, const int* p, const int* i, const int* ai, int use_ai, {to}* o, int* a, "
                  "int rows, int C")
        call = f"segment_max<{args}>(s, p, i, ai, use_ai, o, a, rows, C);"
    else:
        params = f"const {ti}* s, const int* a, const int* p, const int* i, {ti}* o, int rows, int C"
        call = f"segment_routed_sum<{args}>(s, a, p, i, o, rows, C);"
    return f'extern "C" void {symbol(expr)}({_GEOM}, {params}) {{ {_LAUNCH} {call} }}); }}'


def _source() -> str:
    from sparsevox.segments import _name_expressions
    body = (ROOT / "kernels_cu" / "pooling.cu").read_text()
    body = re.sub(r"#include <cuda_(fp16|bf16)\.h>", "", body)
    exprs = sorted({e for t in ("__half", "__nv_bfloat16", "float", "double") for e in _name_expressions(t)})
    return "\n".join([PRELUDE, body, *(_entry(e) for e in exprs)])


@functools.lru_cache(maxsize=None)
def library():
    """The compiled emulator (cached in the temp folder by source hash)."""
    src = _source()
    out = Path(tempfile.gettempdir()) / f"sparsevox_pooling_emu_{hashlib.sha1(src.encode()).hexdigest()[:16]}.so"
    if not out.exists():
        cpp = out.with_suffix(f".{os.getpid()}.cpp")
        cpp.write_text(src)
        tmp = out.with_suffix(f".{os.getpid()}.so")
        subprocess.run(["g++", "-std=c++20", "-O1", "-fno-strict-aliasing", "-shared", "-fPIC",
                        str(cpp), "-o", str(tmp)], check=True, capture_output=True, text=True)
        tmp.replace(out)
    return ctypes.CDLL(str(out))


def available() -> tuple[bool, str]:
    if shutil.which("g++") is None:
        return False, "g++ not found"
    try:
        library()
    except subprocess.CalledProcessError as e:
        return False, f"emulator build failed: {e.stderr[-2000:]}"
    return True, ""


def _arg(a):
    if isinstance(a, np.ndarray):
        assert a.flags.c_contiguous, "kernel arguments must be contiguous"
        return ctypes.c_void_p(a.ctypes.data)
    assert isinstance(a, np.int32), f"scalar kernel arguments must be np.int32, got {type(a)}"
    return ctypes.c_int(int(a))


def launch(expr: str, grid, block, args) -> None:
    """Run kernel ``expr`` (a name expression) with CUDA launch geometry (grid, block)."""
    g = tuple(grid) + (1,) * (3 - len(grid))
    b = tuple(block) + (1,) * (3 - len(block))
    assert all(v >= 1 for v in g + b) and b[0] * b[1] * b[2] <= 1024 and g[1] <= 65535 and g[2] <= 65535
    getattr(library(), symbol(expr))(*(ctypes.c_uint(v) for v in g + b), *(_arg(a) for a in args))


def _poisoned_numpy():
    """NumPy, except that ``empty`` returns NaN (floats) or -7 (ints) filled arrays."""
    mod = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})

    def empty(shape, dtype=float):
        dt = np.dtype(dtype)
        return np.full(shape, np.nan if dt.kind == "f" or dt.name == "bfloat16" else -7, dtype=dt)
    mod.empty = empty
    return mod


class EmulatedDevice:
    """The GPU path's device object on NumPy arrays: kernels run by the emulator; ``launches`` records
    the name expressions run (and which module's dtype they were asked from)."""

    def __init__(self, poison: bool = True):
        self.xp = _poisoned_numpy() if poison else np
        self.launches: list[tuple[str, str]] = []

    def kernel(self, expr: str, ctype: str):
        from sparsevox.segments import _name_expressions
        assert expr in _name_expressions(ctype), f"{expr} is not instantiated in the {ctype} module"
        self.launches.append((expr, ctype))
        return lambda grid, block, args: launch(expr, grid, block, args)
