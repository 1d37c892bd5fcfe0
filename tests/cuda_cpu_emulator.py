"""Run ``kernels_cu/kernel_map.cu`` on the CPU: the CUDA source compiled as C++ with one OS thread per
CUDA thread (blocks run one after another, so ``__shared__`` becomes ``static``), barriers for
``__syncthreads``, a per-warp exchange for ``__shfl_up_sync`` / ``__shfl_xor_sync`` / ``__ballot_sync``
and ``std::atomic_ref`` for the atomics.

Blocks run in blockIdx order, so ``kmap_compact``'s tickets follow blockIdx and its look-back always
finds the previous tile's inclusive prefix at once; ``EmulatedDevice(prefix_every=n)`` builds the
kernels with ``SVX_KMAP_PREFIX_EVERY=n`` (only tiles ``t % n == 0`` and the first tile of each offset
publish a prefix) so the look-back also sums aggregates across several 32-tile windows. For the same
reason every offset total a tile waits for is complete when it starts: a wait that does not end at once
waits on a later ticket or for a wrong count, a bug that can hang the GPU, so the kernels are built
with ``SVX_KMAP_SPIN_STUCK`` and that launch raises ``RuntimeError`` instead of spinning forever.
``EmulatedDevice(items=i, probe_items=j)`` instantiates ``kmap_compact<256, i>`` and
``kmap_probe<256, j>`` (rows per thread of a tile; defaults: the GPU builder's), so small inputs can
still span many tiles; ``window=w`` builds the hash lookups with ``SVX_HASH_WINDOW=w`` (0: the source's).

It exists so that the GPU kernel-map builder (:mod:`sparsevox.cuda.gpu_kernel_map`, the same Python code
and the same kernels) can be checked against the NumPy builder on machines without a GPU. It is slow
(thousands of threads per launch): keep inputs small. Needs g++ with C++20 (``<barrier>``).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import weakref
from pathlib import Path

import numpy as np

from sparsevox.cuda import gpu_kernel_map

ROOT = Path(__file__).resolve().parents[1]

PRELUDE = r"""
#include <atomic>
#include <barrier>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>
struct dim3 { unsigned x = 0, y = 0, z = 0; };
struct ulonglong2 { unsigned long long x, y; };
static thread_local dim3 threadIdx, blockIdx;
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
static std::barrier<>* g_block;
static std::vector<std::unique_ptr<std::barrier<>>> g_warps;
static int g_lanes[32][32];
static std::atomic<int> g_spin_stuck{0};
#define SVX_KMAP_SPIN_STUCK() { g_spin_stuck = 1; break; }  // see kernel_map.cu look_back, offset_base
extern "C" int emu_spin_stuck() { return g_spin_stuck.exchange(0); }
template <class T> inline T __ldcg(const T* p) { return *p; }
inline void __syncthreads() { g_block->arrive_and_wait(); }
// Every warp intrinsic is one exchange: each lane publishes a value, the warp meets, each lane reads what
// it needs from the published row, the warp meets again (so the row can be reused).
template <class Read> inline auto warp_exchange(int v, Read read) {
    int w = threadIdx.x / 32, l = threadIdx.x % 32;
    g_lanes[w][l] = v;
    g_warps[w]->arrive_and_wait();
    auto r = read(g_lanes[w], l);
    g_warps[w]->arrive_and_wait();
    return r;
}
inline int __shfl_up_sync(unsigned, int v, int d) {
    return warp_exchange(v, [&](const int* row, int l) { return l >= d ? row[l - d] : v; });
}
inline int __shfl_xor_sync(unsigned, int v, int m) {
    return warp_exchange(v, [&](const int* row, int l) { return row[l ^ m]; });
}
inline int __shfl_sync(unsigned, int v, int src) {
    return warp_exchange(v, [&](const int* row, int) { return row[src & 31]; });
}
inline unsigned __ballot_sync(unsigned, int p) {  // full warps only (BLOCK is a multiple of 32)
    return warp_exchange(p ? 1 : 0, [](const int* row, int) {
        unsigned r = 0;
        for (int i = 0; i < 32; ++i) r |= (unsigned)row[i] << i;
        return r;
    });
}
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
    return std::atomic_ref<unsigned long long>(*a).fetch_add(v);
}
inline unsigned atomicAdd(unsigned* a, unsigned v) { return std::atomic_ref<unsigned>(*a).fetch_add(v); }
inline unsigned long long atomicExch(unsigned long long* a, unsigned long long v) {
    return std::atomic_ref<unsigned long long>(*a).exchange(v);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long cmp, unsigned long long val) {
    std::atomic_ref<unsigned long long> r(*a);
    r.compare_exchange_strong(cmp, val);
    return cmp;  // the old value either way
}
inline unsigned long long atomicMin(unsigned long long* a, unsigned long long v) {
    std::atomic_ref<unsigned long long> r(*a);
    unsigned long long old = r.load();
    while (v < old && !r.compare_exchange_weak(old, v)) {}
    return old;
}
template <class F> void emu_launch(int grid, int block, F f) {
    std::barrier<> bb(block);
    g_block = &bb;
    g_warps.clear();
    for (int w = 0; w < (block + 31) / 32; ++w)
        g_warps.emplace_back(new std::barrier<>(block < 32 ? block : 32));
    std::vector<std::thread> ts;
    for (int t = 0; t < block; ++t)
        ts.emplace_back([&, t] {
            threadIdx.x = t;
            for (int b = 0; b < grid; ++b) { blockIdx.x = b; f(); bb.arrive_and_wait(); }
        });
    for (auto& t : ts) t.join();
}
"""

# (kernel, template block, C parameter list, argument names); probe's and compact's templates also take ITEMS
WRAPPERS = [
    ("insert", 256, "const int* c, int n, unsigned long long* t, unsigned long long mask, int* clear, int rows",
     "c, n, t, mask, clear, rows"),
    ("probe", 256, "const int* q, int m, int nbm, int K, int tr, int sym, int sx, int sy, int sz, int kx, "
                   "int ky, int kz, int dx, int dy, int dz, const unsigned long long* t, unsigned long long mask, "
                   "int* cand",
     "q, m, nbm, K, tr, sym, sx, sy, sz, kx, ky, kz, dx, dy, dz, t, mask, cand"),
    ("compact", 256, "int m, int nbm, int K, const int* cand, const unsigned long long* status, "
                     "unsigned long long* state, int* ib, int* ob, int* offsets, long long* info",
     "m, nbm, K, cand, status, state, ib, ob, offsets, info"),
    ("candidate_keys", 256, "const int* c, int n, int count, int mode, int sx, int sy, int sz, int kx, int ky, "
                            "int kz, int dx, int dy, int dz, unsigned long long* keys, unsigned long long* status",
     "c, n, count, mode, sx, sy, sz, kx, ky, kz, dx, dy, dz, keys, status"),
    ("unique_heads", 256, "const unsigned long long* keys, int count, int* heads", "keys, count, heads"),
    ("unique_info", 256, "const int* pos, int count, const unsigned long long* status, long long* info",
     "pos, count, status, info"),
    ("unique_unpack", 256, "const unsigned long long* keys, const int* heads, const int* pos, int count, int* out",
     "keys, heads, pos, count, out"),
]


def _source(prefix_every: int = 0, items: int = gpu_kernel_map.ITEMS, probe_items: int = gpu_kernel_map.PROBE_ITEMS,
            window: int = 0) -> str:
    kcu = ROOT / "kernels_cu"
    body = (kcu / "kernel_map.cu").read_text().replace('#include "common/hash.cuh"', "")
    defines = [f"#define SVX_KMAP_PREFIX_EVERY {prefix_every}"] if prefix_every else []
    defines += [f"#define SVX_HASH_WINDOW {window}"] if window else []
    parts = [*defines, PRELUDE, (kcu / "common" / "hash.cuh").read_text(), body]
    for name, block, params, args in WRAPPERS:
        kernel = gpu_kernel_map.kernel_name(name, block, probe_items if name == "probe" else items)
        parts.append(f'extern "C" void emu_kmap_{name}(int grid, int block, {params}) {{\n'
                     f'    emu_launch(grid, block, [=] {{ {kernel}({args}); }});\n}}')
    return "\n".join(parts)


def available() -> tuple[bool, str]:
    if shutil.which("g++") is None:
        return False, "g++ not found"
    try:
        _library()
    except Exception as e:  # noqa: BLE001  (any build failure means: cannot emulate here)
        return False, f"emulator build failed: {e}"
    return True, ""


@functools.lru_cache(maxsize=None)
def _library(prefix_every: int = 0, items: int = gpu_kernel_map.ITEMS, probe_items: int = gpu_kernel_map.PROBE_ITEMS,
             window: int = 0):
    src = _source(prefix_every, items, probe_items, window)
    digest = hashlib.sha1(src.encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"sparsevox_kmap_emu_{digest}.so"
    if not out.exists():
        cpp = out.with_suffix(".cpp")
        cpp.write_text(src)
        tmp = out.with_suffix(f".{os.getpid()}.tmp.so")  # pytest-xdist workers may compile it at once
        subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", str(cpp), "-o", str(tmp)],
                       check=True, capture_output=True, text=True)
        tmp.replace(out)
    return ctypes.CDLL(str(out))


class _Addr:
    """A raw address the builder passes to a kernel (the GPU device's ``ptr``), holding the array it
    points into only weakly: a launch fails when that array is gone, where on a GPU the memory pool may
    already have handed the block to the next allocation."""
    __slots__ = ("base", "start")

    def __init__(self, a, start):
        self.base, self.start = weakref.ref(a), start

    def array(self):
        """The memory from the address on, as a NumPy view (for tests that look at it)."""
        a = self.base()
        if a is None:
            raise RuntimeError("a kernel argument points into an array that no longer exists")
        return a[self.start:]


def _c_arg(a):
    if isinstance(a, _Addr):
        return ctypes.c_void_p(a.array().ctypes.data)
    if isinstance(a, np.ndarray):
        assert a.flags.c_contiguous, "kernel arguments must be contiguous"
        return ctypes.c_void_p(a.ctypes.data)
    if isinstance(a, np.uint64):
        return ctypes.c_ulonglong(int(a))
    if isinstance(a, (np.int32, int)):
        return ctypes.c_int(int(a))
    raise TypeError(f"unsupported kernel argument {type(a)}")


class _PoisonedNumpy:
    """NumPy whose ``empty`` fills the new array with 0xAB bytes: a kernel or memset that misses part of
    an allocation leaves values no real result has (recycled memory could hold the right ones)."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def empty(shape, dtype=float):
        a = np.empty(shape, dtype)
        a.reshape(-1).view(np.uint8).fill(0xAB)
        return a


class EmulatedDevice:
    """Drop-in for :class:`sparsevox.cuda.gpu_kernel_map.CupyDevice`: NumPy arrays (allocations poisoned),
    kernels on the CPU."""
    xp = _PoisonedNumpy()

    def __init__(self, prefix_every: int = 0, items: int = gpu_kernel_map.ITEMS,
                 probe_items: int = gpu_kernel_map.PROBE_ITEMS, window: int = 0):
        self.lib = _library(prefix_every, items, probe_items, window)
        self.tile_items, self.probe_items = items, probe_items  # the builder sizes the grids by them
        self.launches: list[str] = []
        self.grids: list[int] = []  # grid size of each launch, in launch order
        self.args: list[tuple] = []  # the scalar arguments of each launch (arrays as None), in order
        self.fills: list[int] = []  # element count of each fill_ones (one memsetAsync on the GPU), in order
        self.reads = 0  # host_result calls (the map build's pending result)

    def launch(self, name, grid, block, args):
        self.launches.append(name)
        self.grids.append(grid)
        self.args.append(tuple(None if isinstance(a, np.ndarray) else a for a in args))
        getattr(self.lib, f"emu_kmap_{name}")(ctypes.c_int(grid), ctypes.c_int(block), *(_c_arg(a) for a in args))
        if self.lib.emu_spin_stuck():
            raise RuntimeError(f"kmap_{name}: a spin-wait did not end at once (a wait on a later "
                               f"ticket or for a wrong count: on a GPU, a hang)")

    def fill_ones(self, a, start=0, count=None):
        count = a.size - start if count is None else count
        self.fills.append(count)
        a[start:start + count].view(np.uint8).fill(0xFF)

    @staticmethod
    def ptr(a, start=0):
        return _Addr(a, start)

    @staticmethod
    def view(a, start, shape, dtype):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize // a.itemsize
        return a[start:start + n].view(dtype).reshape(shape)

    def clear_log(self):
        """Forget the launches, grids, arguments and fills recorded so far."""
        self.launches.clear()
        self.grids.clear()
        self.args.clear()
        self.fills.clear()

    def to_host(self, a):
        return np.array(a, copy=True)

    @staticmethod
    def host_buffer(nbytes):
        mem = np.full(nbytes, 0xAB, np.uint8)  # poisoned: a value the kernel does not write shows
        return _Addr(mem, 0), mem

    def host_result(self, mem, count, dtype):
        """The GPU device's pending result; here the values are copied when the builder asks for them
        (``wait``), as a GPU read would give whatever the kernels left there."""
        self.reads += 1
        return _Read(mem.view(dtype)[:count])

    def copy_pairs(self, src, stride, n, read=None):
        return np.array(src[:n], copy=True), np.array(src[stride:stride + n], copy=True)


class _Read:
    __slots__ = ("a", "keep")

    def __init__(self, a):
        self.a, self.keep = a, ()

    def wait(self):
        return np.array(self.a, copy=True)
