"""Run the real ``kernels_cu/depthwise.cu`` on the CPU, so its index arithmetic is tested without a GPU.

The CUDA source is compiled as C++20 with a prelude: one OS thread per CUDA thread of a block (blocks
run one after another), a ``std::barrier`` for ``__syncthreads``, ``std::atomic_ref`` for
``atomicAdd``, dynamic shared memory as one buffer per block, ``_Float16`` for ``__half`` and
round-to-nearest-even bit arithmetic for ``__nv_bfloat16``. Every template instantiation the backend
can ask for (:func:`sparsevox.algorithms.depthwise_implicit._name_expressions`) gets an ``extern "C"``
entry point taking the launch geometry. Slow (thousands of threads per launch): keep inputs small.
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
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

PRELUDE = r"""
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#include <algorithm>
struct dim3 { unsigned x = 1, y = 1, z = 1; };
static thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
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
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) int2 { int x, y; };
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
using std::min;
static std::barrier<>* g_block;
static std::vector<unsigned char> g_smem;
inline void __syncthreads() { g_block->arrive_and_wait(); }
template <class F> void emu_launch(dim3 grid, dim3 block, size_t smem, F f) {
    const int n = block.x * block.y * block.z;
    gridDim = grid; blockDim = block;
    g_smem.assign(smem + 16, 0);
    std::barrier<> bb(n);
    g_block = &bb;
    std::vector<std::thread> ts;
    for (int t = 0; t < n; ++t)
        ts.emplace_back([&, t] {
            threadIdx = dim3{unsigned(t % block.x), unsigned(t / block.x % block.y), unsigned(t / (block.x * block.y))};
            for (unsigned b = 0; b < grid.x * grid.y * grid.z; ++b) {
                blockIdx = dim3{b % grid.x, b / grid.x % grid.y, b / (grid.x * grid.y)};
                f();
                bb.arrive_and_wait();  // the block is done; the next one may reuse shared memory
            }
        });
    for (auto& t : ts) t.join();
}
"""

_GEOM = "unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, size_t smem"
_LAUNCH = "emu_launch(dim3{gx, gy, gz}, dim3{bx, by, bz}, smem, [=] {"


def _entry(expr: str) -> str:
    """``extern "C"`` entry point for one name expression, e.g. ``depthwise_gather<__half, 8, 1>``."""
    kernel, args = re.fullmatch(r"(\w+)<(.*)>", expr).groups()
    ctype = args.split(",")[0].strip()
    acc = "double" if ctype == "double" else "float"
    sym = "emu_" + re.sub(r"\W+", "_", expr).strip("_")
    if kernel == "depthwise_gather":
        params = f"const {ctype}* s, const {ctype}* w, const int* t, {ctype}* d, int rows, int K, int C"
        call = f"depthwise_gather<{args}>(s, w, t, d, rows, K, C);"
    elif kernel == "depthwise_cast":
        params = f"const float* s, {ctype}* d, long long n"
        call = f"depthwise_cast<{args}>(s, d, n);"
    elif kernel == "depthwise_gather_list":
        params = f"const {ctype}* s, const {ctype}* w, const int* p, const int2* nb, {ctype}* d, int rows, int C"
        call = f"depthwise_gather_list<{args}>(s, w, p, nb, d, rows, C);"
    else:
        params = (f"const {ctype}* x, const {ctype}* g, const int* i, const int* o, const int* off, {acc}* dw, "
                  "int C, int chunk")
        call = f"depthwise_wgrad<{args}>(x, g, i, o, off, dw, C, chunk);"
    return f'extern "C" void {sym}({_GEOM}, {params}) {{ {_LAUNCH} {call} }}); }}'


def symbol(expr: str) -> str:
    return "emu_" + re.sub(r"\W+", "_", expr).strip("_")


def _source() -> str:
    from sparsevox.algorithms.depthwise_implicit import _name_expressions
    body = (ROOT / "kernels_cu" / "depthwise.cu").read_text()
    body = re.sub(r"#include <cuda_(fp16|bf16)\.h>", "", body)
    body = body.replace("extern __shared__ unsigned char smem_raw[];", "unsigned char* smem_raw = g_smem.data();")
    entries = [_entry(e) for t in ("__half", "__nv_bfloat16", "float", "double") for e in _name_expressions(t)]
    table = (f'extern "C" void emu_depthwise_build_table({_GEOM}, const int* f, const int* t, const int* off, '
             f'int K, int L, int rows, int* table) {{ {_LAUNCH} '
             'depthwise_build_table(f, t, off, K, L, rows, table); }); }')
    lst = (f'extern "C" void emu_depthwise_build_list({_GEOM}, const int* table, int K, int rows, const int* ptr, '
           f'int2* nb) {{ {_LAUNCH} depthwise_build_list(table, K, rows, ptr, nb); }}); }}')
    return "\n".join([PRELUDE, body, *entries, table, lst])


@functools.lru_cache(maxsize=None)
def library():
    """The compiled emulator (cached in the temp folder by source hash)."""
    return compile_library(_source(), "depthwise")


def compile_library(src: str, name: str):
    """``src`` (C++20) compiled as a shared library, cached in the temp folder by source hash."""
    out = Path(tempfile.gettempdir()) / f"sparsevox_{name}_emu_{hashlib.sha1(src.encode()).hexdigest()[:16]}.so"
    if not out.exists():
        cpp = out.with_suffix(".cpp")
        cpp.write_text(src)
        tmp = out.with_suffix(f".{os.getpid()}.{id(src)}.so")  # pytest-xdist workers may compile it at once
        subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", "-fno-strict-aliasing", "-shared", "-fPIC",
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
    if isinstance(a, np.int64):
        return ctypes.c_longlong(int(a))
    return ctypes.c_int(int(a))


def launch(expr: str, grid, block, args, shared_mem: int = 0) -> None:
    """Run kernel ``expr`` (a name expression or ``depthwise_build_table``) with CUDA launch geometry."""
    g = tuple(grid) + (1,) * (3 - len(grid))
    b = tuple(block) + (1,) * (3 - len(block))
    fn = getattr(library(), symbol(expr))
    fn(*(ctypes.c_uint(v) for v in g + b), ctypes.c_size_t(shared_mem), *(_arg(a) for a in args))
