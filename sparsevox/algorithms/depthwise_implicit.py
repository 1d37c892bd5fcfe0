"""Depthwise IMPLICIT: fused CUDA kernels (``kernels_cu/depthwise.cu``) on CuPy arrays.

forward / dgrad: one gather kernel; each output row and channel vector loops over the row's
neighbours and is written once (no atomics, no zero-fill). Neighbours come from a dense table
``[K, rows]`` int32 (-1 = absent) derived once per kernel map on the GPU and cached in
``kmap.derived``: ``"depthwise.nbr"`` (``nbr[k][out] = in``) for the forward, ``"depthwise.nbr_rev"``
(``rev[k][in] = out``) for dgrad; or from the per-row list of the present neighbours derived from
that table (``"depthwise.list"`` / ``"depthwise.list_rev"``), which reads 8 bytes per pair instead of
``4 K`` per row and has a shorter chain of dependent loads. Deriving them needs no device-to-host
copy (sizes come from ``kmap.offsets_host``), so a first call does not synchronise either.
wgrad reduces chunks of each offset's pairs per block and adds one float32 (float64) partial per
(block, k, c) into a ``[K, C]`` buffer.

Parameters searched by the autotuner: forward/dgrad ``nbr`` (table/list) × (``ilp`` channel vectors per
thread, ``block`` threads per block); wgrad ``chunk`` (pairs per block) × ``threads``.
"""
from __future__ import annotations

import numpy as np

from ..tuning.registry import Algorithm, gpu_unavailable, register

STEM = "depthwise"
_CTYPE = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double"}
_ILPS = (1, 2)
_FWD_PARAMS = [{"nbr": n, "ilp": i, "block": b} for n in ("list", "table") for i, b in ((1, 128), (1, 256), (2, 256))]
_WGRAD_PARAMS = [{"chunk": c, "threads": t} for c in (256, 1024, 4096) for t in (256, 512)]


def _vec_widths(ctype: str) -> tuple[int, ...]:
    """Vector widths compiled for a type: every power of two with ``VEC * itemsize <= 16`` bytes."""
    size = {"__half": 2, "__nv_bfloat16": 2, "float": 4, "double": 8}[ctype]
    return tuple(v for v in (1, 2, 4, 8) if v * size <= 16)


def _name_expressions(ctype: str) -> tuple[str, ...]:
    """Every kernel instantiated for one dtype: one module (one NVRTC compile) per dtype and device."""
    names = [f"{k}<{ctype}, {v}, {i}>" for k in ("depthwise_gather", "depthwise_gather_list")
             for v in _vec_widths(ctype) for i in _ILPS]
    names += [f"depthwise_wgrad<{ctype}, {v}>" for v in _vec_widths(ctype)]
    if ctype in ("__half", "__nv_bfloat16"):
        names.append(f"depthwise_cast<{ctype}>")
    return tuple(names)


_functions: dict = {}


def _function(kernel: str, ctype: str):
    """A compiled kernel, cached per (device, name) so a call costs one dict lookup."""
    import cupy
    key = (cupy.cuda.Device().id, kernel)
    fn = _functions.get(key)
    if fn is None:
        from ..cuda.cuda_loader import get_function
        fn = get_function(STEM, kernel, _name_expressions(ctype))
        _functions[key] = fn
    return fn


def vec_width(c: int, itemsize: int, ptrs) -> int:
    """Widest vector (elements) that divides C, fits 16 bytes, and every pointer's alignment allows."""
    v = 16 // itemsize
    while v > 1 and (c % v or any(p % (v * itemsize) for p in ptrs)):
        v //= 2
    return v


def gather_launch(rows: int, c: int, vec: int, ilp: int, block: int) -> tuple[int, tuple, tuple]:
    """``(ilp, grid, block)`` of ``depthwise_gather``: one thread per (row, group of ``ilp`` vectors)."""
    nvec = c // vec
    ilp = ilp if nvec > 1 else 1
    groups = -(-nvec // ilp)
    return ilp, (-(-rows * groups // block),), (block,)


def wgrad_launch(longest: int, k: int, c: int, vec: int, chunk: int, threads: int, acc_itemsize: int):
    """``(grid, block, shared_mem)`` of ``depthwise_wgrad``: grid (chunks of the longest offset, K,
    channel blocks of up to 32 vectors); block (vectors, pair lanes); one accumulator per thread and lane."""
    nvec = c // vec
    bx = min(nvec, 32)
    by = max(1, threads // bx)
    return (-(-longest // chunk), k, -(-nvec // bx)), (bx, by), by * vec * bx * acc_itemsize


def cast_launch(n: int) -> tuple[tuple, tuple]:
    """``(grid, block)`` of ``depthwise_cast``: one thread per element."""
    return (-(-n // 256),), (256,)


def table_launch(pairs: int) -> tuple[tuple, tuple]:
    """``(grid, block)`` of ``depthwise_build_table``: one thread per pair."""
    return (-(-pairs // 256),), (256,)


def _i32(a):
    import cupy
    return cupy.ascontiguousarray(cupy.asarray(a), dtype=cupy.int32)


def _csr(kmap):
    """``(in_maps, out_maps, offsets)`` as contiguous int32 device arrays (cached on the map)."""
    got = kmap.derived.get("depthwise.csr")
    if got is None:
        # device offsets, copied: no H2D copy, and no view keeping the builder's neighbour-table
        # allocation (which it shares) alive after IMPLICIT_GEMM lets it go
        got = (_i32(kmap.in_maps), _i32(kmap.out_maps), _i32(kmap.offsets).copy())
        kmap.derived["depthwise.csr"] = got
    return got


def neighbour_table(kmap, reverse: bool = False):
    """``[K, rows]`` int32 device table: ``nbr[k][out] = in`` (or ``rev[k][in] = out`` with ``reverse``).

    Built on the GPU from the CSR map in two launches (fill with -1, scatter) and cached in
    ``kmap.derived["depthwise.nbr"]`` / ``["depthwise.nbr_rev"]``.
    """
    key = "depthwise.nbr_rev" if reverse else "depthwise.nbr"
    table = kmap.derived.get(key)
    if table is not None:
        return table
    import cupy
    ins, outs, offsets = _csr(kmap)
    k, pairs = kmap.num_offsets, int(ins.shape[0])
    rows = kmap.num_in if reverse else kmap.num_out
    table = cupy.full((k, rows), -1, dtype=cupy.int32)
    if pairs:
        src, dst = (outs, ins) if reverse else (ins, outs)
        fn = _function("depthwise_build_table", "float")
        fn(*table_launch(pairs), (src, dst, offsets, np.int32(k), np.int32(pairs), np.int32(rows), table))
    kmap.derived[key] = table
    return table


def neighbour_list(kmap, reverse: bool = False):
    """``(ptr [rows + 1] int32, nb [L, 2] int32)``: row ``r``'s present neighbours are
    ``nb[ptr[r]:ptr[r + 1]]`` as (source row, offset k), k ascending. Derived from the table on the GPU
    without a device-to-host copy (a count, a prefix sum, one launch) and cached in
    ``kmap.derived["depthwise.list"]`` / ``["depthwise.list_rev"]``."""
    key = "depthwise.list_rev" if reverse else "depthwise.list"
    got = kmap.derived.get(key)
    if got is not None:
        return got
    import cupy
    table = neighbour_table(kmap, reverse)
    k, rows = table.shape
    ptr = list_offsets(table, cupy)
    nb = cupy.empty((kmap.num_pairs, 2), dtype=cupy.int32)
    if rows and kmap.num_pairs:
        fn = _function("depthwise_build_list", "float")
        fn(*list_launch(rows), (table, np.int32(k), np.int32(rows), ptr, nb))
    got = (ptr, nb)
    kmap.derived[key] = got
    return got


def list_offsets(table, xp):
    """``ptr [rows + 1]`` int32 of a ``[K, rows]`` table (NumPy or CuPy ``xp``): prefix sum of present entries."""
    ptr = xp.zeros(table.shape[1] + 1, dtype=xp.int32)
    ptr[1:] = xp.cumsum((table >= 0).sum(axis=0, dtype=xp.int32))
    return ptr


def list_launch(rows: int) -> tuple[tuple, tuple]:
    """``(grid, block)`` of ``depthwise_build_list``: one thread per row."""
    return (-(-rows // 128),), (128,)


def _gather(src, weight, kmap, reverse: bool, nbr: str, ilp: int, block: int, out=None):
    """``out[r, c] = sum over r's neighbours (s, k) of src[s, c] * weight[k, c]``: forward and dgrad."""
    import cupy
    if nbr not in ("table", "list"):
        raise ValueError(f"nbr must be 'table' or 'list', got {nbr!r}")
    src = cupy.ascontiguousarray(src)
    weight = cupy.ascontiguousarray(weight)
    k = kmap.num_offsets
    rows = kmap.num_in if reverse else kmap.num_out
    c = src.shape[1]
    if out is None:
        out = cupy.empty((rows, c), dtype=src.dtype)
    elif out.shape != (rows, c) or out.dtype != src.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {src.dtype} array of shape {(rows, c)}")
    if rows == 0 or c == 0:
        return out
    if src.shape[0] == 0 or k == 0 or kmap.num_pairs == 0:
        out.data.memset_async(0, out.nbytes)  # all-zero bits are 0.0 in every float dtype
        return out
    ctype = _CTYPE[src.dtype.name]
    vec = vec_width(c, src.dtype.itemsize, (src.data.ptr, weight.data.ptr, out.data.ptr))
    ilp, grid, blk = gather_launch(rows, c, vec, ilp, block)
    if nbr == "table":
        fn = _function(f"depthwise_gather<{ctype}, {vec}, {ilp}>", ctype)
        args = (src, weight, neighbour_table(kmap, reverse), out, np.int32(rows), np.int32(k), np.int32(c))
    else:
        ptr, nb = neighbour_list(kmap, reverse)
        fn = _function(f"depthwise_gather_list<{ctype}, {vec}, {ilp}>", ctype)
        args = (src, weight, ptr, nb, out, np.int32(rows), np.int32(c))
    fn(grid, blk, args)
    return out


def forward(feats, weight, kmap, nbr: str = "list", ilp: int = 1, block: int = 256, out=None):
    """``out[o, c] = sum_k feats[nbr[k][o], c] * weight[k, c]``: feats ``[N_in, C]``, weight ``[K, C]`` →
    ``[N_out, C]`` in the features' dtype (float32/float64 accumulation).

    ``nbr``: neighbours from the dense ``[K, N_out]`` table (``"table"``) or the per-row list of present
    ones (``"list"``); ``ilp``: channel vectors per thread; ``block``: threads per block;
    ``out``: optional C-contiguous destination."""
    return _gather(feats, weight, kmap, False, nbr, ilp, block, out)


def dgrad(grad_out, weight, kmap, nbr: str = "list", ilp: int = 1, block: int = 256, out=None):
    """``grad_in[i, c] = sum_k grad_out[rev[k][i], c] * weight[k, c]`` → ``[N_in, C]`` (the forward's
    kernel on the reverse table / list)."""
    return _gather(grad_out, weight, kmap, True, nbr, ilp, block, out)


def wgrad(feats, grad_out, kmap, num_offsets: int, chunk: int = 1024, threads: int = 256, out_dtype=None):
    """``grad_w[k, c] = sum_{(i, o) in pairs_k} feats[i, c] * grad_out[o, c]`` → ``[num_offsets, C]`` in
    ``out_dtype`` (default: the features' dtype; float32 hands over the accumulator unrounded)."""
    import cupy
    feats = cupy.ascontiguousarray(feats)
    grad_out = cupy.ascontiguousarray(grad_out)
    c = feats.shape[1]
    acc_dtype = cupy.float64 if feats.dtype == cupy.float64 else cupy.float32
    gw = cupy.zeros((num_offsets, c), dtype=acc_dtype)
    k = kmap.num_offsets
    counts = np.diff(kmap.offsets_host)
    longest = int(counts.max()) if counts.size else 0
    if longest and c:
        ins, outs, offsets = _csr(kmap)
        ctype = _CTYPE[feats.dtype.name]
        vec = vec_width(c, feats.dtype.itemsize, (feats.data.ptr, grad_out.data.ptr))
        grid, blk, smem = wgrad_launch(longest, k, c, vec, chunk, threads, gw.dtype.itemsize)
        fn = _function(f"depthwise_wgrad<{ctype}, {vec}>", ctype)
        fn(grid, blk, (feats, grad_out, ins, outs, offsets, gw, np.int32(c), np.int32(chunk)), shared_mem=smem)
    out_dtype = cupy.dtype(out_dtype or feats.dtype)
    if gw.dtype == out_dtype:
        return gw
    if gw.dtype != cupy.float32 or out_dtype.itemsize != 2:
        return gw.astype(out_dtype)  # not a float32 accumulator rounded to 16 bits: CuPy's cast will do
    out = cupy.empty(gw.shape, dtype=out_dtype)
    if gw.size:
        ctype = _CTYPE[out_dtype.name]
        _function(f"depthwise_cast<{ctype}>", ctype)(*cast_launch(gw.size), (gw, out, np.int64(gw.size)))
    return out


def _params(direction, problem):
    return list(_WGRAD_PARAMS if direction == "wgrad" else _FWD_PARAMS)


def _available(problem):
    why = gpu_unavailable(problem, "IMPLICIT")
    if why:
        return False, why
    if problem.dtype not in _CTYPE:
        return False, f"dtype {problem.dtype} is not one of {tuple(_CTYPE)}"
    return True, ""


register("depthwise", Algorithm("implicit", forward, dgrad, wgrad, _params, _available))
