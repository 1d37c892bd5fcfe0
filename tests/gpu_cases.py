"""Helpers shared by the GPU kernel tests: dtypes, transfers, and random cases quantised to a dtype.

The case's host inputs are quantised to the tested dtype first, so the float64 oracle sees exactly the
values the kernels see.
"""
import numpy as np
from reference import expected_out_coords, random_voxels

import sparsevox as sv
from sparsevox.testing import kind_args


def np_dtype(name: str) -> np.dtype:
    """NumPy dtype of a dtype name (bfloat16 through ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def to_gpu(a, dtype: str):
    """Host values as a CuPy array of ``dtype`` (through float32, or float64 for float64)."""
    import cupy
    return cupy.asarray(np.asarray(a, dtype=np.float64 if dtype == "float64" else np.float32)).astype(dtype)


def host(a) -> np.ndarray:
    """A CuPy array as float64 NumPy."""
    return np.asarray(a.astype("float64").get())


def quantised_case(rng, kind, c_in, c_out, dtype, n=400, extent=10, ks=3) -> dict:
    """A GPU kernel map of ``kind`` on random voxels and float64 host inputs quantised to ``dtype``.

    Returns ``coords``, ``feats [N, C_in]``, ``weight [K, C_in, C_out]`` (host float64), ``kmap``, ``s``,
    ``tr``, ``ks``, ``out_coords`` (host), and the GPU inputs ``x`` (the Voxels' feats) and ``w``.
    """
    import cupy
    s, tr, gen = kind_args(kind, 2)
    fine = random_voxels(rng, n, extent=extent, batches=2)
    output = None
    if kind == "transposed":
        output = sv.Voxels(cupy.asarray(fine), None)
        coords = expected_out_coords(fine, 2, s, 1, False, False)
    else:
        coords = fine
    q = np_dtype(dtype)
    feats = rng.standard_normal((len(coords), c_in)).astype(q).astype(np.float64)
    weight = (rng.standard_normal((ks ** 3, c_in, c_out)) / np.sqrt(c_in * 4)).astype(q).astype(np.float64)
    v = sv.Voxels(cupy.asarray(coords), to_gpu(feats, dtype))
    kmap = sv.kernel_map(v, ks, s, 1, tr, gen, output)
    return dict(coords=coords, feats=feats, weight=weight, kmap=kmap, s=s, tr=tr, ks=ks,
                out_coords=cupy.asnumpy(kmap.out_coords), x=v.feats, w=to_gpu(weight, dtype))


def queue_sleep(ns: int) -> None:
    """Queue a one-thread kernel that sleeps ``ns`` nanoseconds (by the global timer) on the current
    stream: work queued after it is still pending ``ns`` later unless the host waited for it."""
    _sleep_kernel()((1,), (1,), (np.uint64(ns),))


def _sleep_kernel():
    import cupy
    return cupy.RawKernel(r'''
    extern "C" __global__ void sleep_ns(unsigned long long ns) {
        unsigned long long t0, t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
        do { __nanosleep(100000); asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
    }''', "sleep_ns")
