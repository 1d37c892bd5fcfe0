"""Segment reductions in CSR form: the one primitive under pooling, unpooling, global pooling and
devoxelisation, forward and backward.

A :class:`Segments` says, for each destination row ``r``, which source rows it reduces:
``idx[ptr[r]:ptr[r + 1]]`` (entries ``< 0`` are skipped), with an optional weight per entry. Three
reductions run on it, each on the CPU (vectorised NumPy: gathers and ``reduceat``) and on the GPU
(``kernels_cu/pooling.cu``: one thread per (row, channel), every output written once, no atomics):

- :func:`segment_sum`: ``out[r] = sum_j w[j] * src[idx[j]]``
- :func:`segment_max`: ``out[r] = max_j src[idx[j]]`` and ``arg[r]`` = the winning source row per
  channel (ties: the first entry in segment order; NaN: the first NaN wins); empty: ``0`` and ``-1``
- :func:`segment_routed_sum`: ``out[r] = sum_j (arg[idx[j]] == r) * src[idx[j]]``, the max's adjoint
  (run on the transposed segments, it sends each gradient back to the row that won)

The adjoint of a sum is the sum over :meth:`Segments.transpose` (entries grouped by source row instead
of destination row), so backward passes are segment reductions too and need no atomics.

Accumulation is float32, or float64 for float64 data; results are in the data's dtype.
"""
from __future__ import annotations

import numpy as np

from ._arrays import array_module, to_host

STEM = "pooling"
_CTYPE = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double"}
FLOAT_DTYPES = tuple(_CTYPE)
CHUNK = 512  # GPU: segments longer than this (known on the host) are reduced in two passes


def acc_dtype(dtype) -> np.dtype:
    """The accumulator of a feature dtype: float64 for float64, float32 otherwise."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def check_feats(a, name: str, rows: int | None = None) -> None:
    """``ValueError`` unless ``a`` is a 2-D float array (with ``rows`` rows when given)."""
    if a.ndim != 2:
        raise ValueError(f"{name} must have shape [N, C], got {tuple(a.shape)}")
    if a.dtype.name not in FLOAT_DTYPES:
        raise ValueError(f"{name} dtype must be one of {FLOAT_DTYPES}, got {a.dtype.name}")
    if rows is not None and a.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got {a.shape[0]}")


class Segments:
    """CSR segments: destination row ``r`` reduces source rows ``idx[ptr[r]:ptr[r + 1]]``.

    Attributes:
        ptr: int32 ``[rows + 1]``, non-decreasing from 0 to ``L`` (NumPy or CuPy, the data's device).
        idx: int32 ``[L]`` source rows in ``[0, num_src)``, or ``-1`` for an entry to skip.
        weights: float64 ``[L]`` or None (all ones); read by :func:`segment_sum` only.
        num_src: number of source rows.
        ptr_host: optional NumPy copy of ``ptr`` (lets the GPU split long segments without a copy back).
        longest: optional upper bound on a segment's length (host int).
    """

    def __init__(self, ptr, idx, num_src: int, weights=None, ptr_host=None, longest: int | None = None):
        xp = array_module(ptr)
        self.ptr = xp.ascontiguousarray(ptr, dtype=xp.int32)
        self.idx = xp.ascontiguousarray(idx, dtype=xp.int32)
        self.weights = None if weights is None else xp.ascontiguousarray(weights, dtype=xp.float64)
        self.num_src = int(num_src)
        self.ptr_host = None if ptr_host is None else np.asarray(ptr_host, dtype=np.int64)
        self.longest = longest
        self._cast: dict = {}
        self._t = None

    @property
    def rows(self) -> int:
        return int(self.ptr.shape[0]) - 1

    @property
    def xp(self):
        return array_module(self.ptr)

    def weights_as(self, dtype):
        """The weights in ``dtype`` (cached), or None."""
        if self.weights is None:
            return None
        key = np.dtype(dtype).name
        w = self._cast.get(key)
        if w is None:
            w = self._cast[key] = self.xp.ascontiguousarray(self.weights.astype(dtype))
        return w

    def transpose(self) -> "Segments":
        """The adjoint grouping (cached): one segment per source row listing the destination rows that
        read it (ascending), with the same weights; skipped entries are dropped."""
        if self._t is None:
            xp = self.xp
            n = int(self.idx.shape[0])
            row_of = (xp.searchsorted(self.ptr, xp.arange(n, dtype=xp.int32), side="right") - 1).astype(xp.int64)
            keep = self.idx >= 0
            src, dst = self.idx[keep].astype(xp.int64), row_of[keep]
            order = xp.argsort(src * max(self.rows, 1) + dst)
            counts = xp.bincount(src, minlength=self.num_src) if src.shape[0] else xp.zeros(self.num_src, xp.int64)
            ptr = xp.zeros(self.num_src + 1, dtype=xp.int32)
            ptr[1:] = xp.cumsum(counts)
            w = None if self.weights is None else self.weights[keep][order]
            self._t = Segments(ptr, dst[order], self.rows, w)
        return self._t

    def split(self, chunk: int) -> tuple["Segments", "Segments"]:
        """Two passes for long segments (needs ``ptr_host``): pass 1 reduces chunks of at most ``chunk``
        entries of each segment (one row per chunk, weights kept), pass 2 reduces each segment's chunks
        (rows of pass 1, in order, unweighted)."""
        xp = self.xp
        ptr = self.ptr_host
        counts = np.diff(ptr)
        nch = -(-counts // chunk)
        first = np.concatenate([[0], np.cumsum(nch)])
        total = int(first[-1])
        within = np.arange(total) - np.repeat(first[:-1], nch)
        starts = np.repeat(ptr[:-1], nch) + chunk * within
        ptr1 = np.concatenate([starts, ptr[-1:]]).astype(np.int32)
        seg1 = Segments(xp.asarray(ptr1), self.idx, self.num_src, self.weights, ptr1, chunk)
        seg1._cast = self._cast
        seg2 = Segments(xp.asarray(first.astype(np.int32)), xp.arange(total, dtype=xp.int32), total,
                        ptr_host=first, longest=int(nch.max()) if nch.size else 0)
        return seg1, seg2


def batch_segments(batch, num_batches: int, mean: bool = False) -> Segments:
    """Segments grouping rows by batch index: segment ``b`` lists the rows of batch item ``b`` (ascending);
    ``mean``: weights ``1 / count``. ``batch`` int ``[N]`` in ``[0, num_batches)`` (NumPy or CuPy)."""
    xp = array_module(batch)
    b = batch.astype(xp.int64)
    counts = xp.bincount(b, minlength=num_batches) if b.shape[0] else xp.zeros(num_batches, xp.int64)
    counts_h = to_host(counts).astype(np.int64)
    ptr_h = np.concatenate([[0], np.cumsum(counts_h)]).astype(np.int64)
    order = xp.argsort(b * max(int(b.shape[0]), 1) + xp.arange(b.shape[0]))  # unique keys: rows ascend
    w = None
    if mean:
        inv = 1.0 / xp.maximum(counts, 1).astype(xp.float64)
        w = inv[b[order]]
    return Segments(xp.asarray(ptr_h.astype(np.int32)), order, int(b.shape[0]), w, ptr_h,
                    int(counts_h.max()) if counts_h.size else 0)


def gather_segments(rows_idx, num_src: int, weights=None) -> Segments:
    """One entry per destination row: row ``i`` reads source row ``rows_idx[i]`` (``-1``: none)."""
    xp = array_module(rows_idx)
    n = int(rows_idx.shape[0])
    return Segments(xp.arange(n + 1, dtype=xp.int32), rows_idx, num_src, weights, np.arange(n + 1), 1)


# --- the reductions ---------------------------------------------------------------------------------

def segment_sum(src, seg: Segments):
    """``out[r, c] = sum_{j in seg r, idx[j] >= 0} w[j] * src[idx[j], c]`` → ``[rows, C]`` in ``src``'s dtype.

    ``src``: ``[num_src, C]`` float16/bfloat16/float32/float64, NumPy or CuPy on ``seg``'s device."""
    check_feats(src, "src", seg.num_src)
    dev = _device_of(src)
    if dev is None:
        return _np_sum(src, seg)
    if seg.ptr_host is not None and (seg.longest or 0) > CHUNK:
        seg1, seg2 = seg.split(CHUNK)
        part = _dev_sum(dev, src, seg1, acc_dtype(src.dtype))
        return _dev_sum(dev, part, seg2, src.dtype, ctype=_CTYPE[src.dtype.name])
    return _dev_sum(dev, src, seg, src.dtype)


def segment_max(src, seg: Segments):
    """``(out [rows, C] in src's dtype, arg [rows, C] int32)``: the maximum over each segment's rows and
    the source row it came from (ties: first in segment order; NaN propagates, first NaN wins);
    an empty segment gives 0 and -1."""
    check_feats(src, "src", seg.num_src)
    dev = _device_of(src)
    if dev is None:
        return _np_max(src, seg)
    if seg.ptr_host is not None and (seg.longest or 0) > CHUNK:
        seg1, seg2 = seg.split(CHUNK)
        part, parg = _dev_max(dev, src, seg1, acc_dtype(src.dtype))
        return _dev_max(dev, part, seg2, src.dtype, arg_in=parg, ctype=_CTYPE[src.dtype.name])
    return _dev_max(dev, src, seg, src.dtype)


def segment_routed_sum(src, arg, seg: Segments):
    """``out[r, c] = sum_{j in seg r} (arg[idx[j], c] == r) * src[idx[j], c]`` → ``[rows, C]``.

    ``arg``: int32 ``[num_src, C]``. With ``seg`` the transpose of a max's segments, ``src`` its output
    gradient and ``arg`` its argmax, this is the max's input gradient. Weights are not read."""
    check_feats(src, "src", seg.num_src)
    if tuple(arg.shape) != tuple(src.shape):
        raise ValueError(f"arg must have shape {tuple(src.shape)}, got {tuple(arg.shape)}")
    dev = _device_of(src)
    if dev is None:
        return _np_routed(src, arg, seg)
    return _dev_routed(dev, src, arg, seg)


# --- NumPy -----------------------------------------------------------------------------------------

def _np_prepare(src, seg: Segments):
    ptr = np.asarray(seg.ptr, dtype=np.int64)
    idx = np.asarray(seg.idx, dtype=np.int64)
    counts = np.diff(ptr)
    valid = idx >= 0
    vals = src[np.where(valid, idx, 0)].astype(acc_dtype(src.dtype)) if src.shape[0] else \
        np.zeros((idx.shape[0], src.shape[1]), acc_dtype(src.dtype))
    return ptr, idx, counts, valid, vals


def _np_reduce(ufunc, vals, ptr, counts, rows, fill):
    out = np.full((rows, vals.shape[1]), fill, dtype=vals.dtype)
    nz = counts > 0
    if nz.any() and vals.shape[1]:
        out[nz] = ufunc.reduceat(vals, ptr[:-1][nz], axis=0)
    return out


def _np_sum(src, seg):
    ptr, idx, counts, valid, vals = _np_prepare(src, seg)
    if seg.weights is not None:
        vals *= np.asarray(seg.weights, dtype=vals.dtype)[:, None]
    vals[~valid] = 0
    return _np_reduce(np.add, vals, ptr, counts, seg.rows, 0).astype(src.dtype)


def _np_max(src, seg):
    ptr, idx, counts, valid, vals = _np_prepare(src, seg)
    vals[~valid] = -np.inf
    out = _np_reduce(np.maximum, vals, ptr, counts, seg.rows, 0)
    seg_of = np.repeat(np.arange(seg.rows), counts)
    ref = out[seg_of]
    eq = valid[:, None] & ((vals == ref) | (np.isnan(vals) & np.isnan(ref)))
    big = idx.shape[0]
    first = _np_reduce(np.minimum, np.where(eq, np.arange(big)[:, None], big), ptr, counts, seg.rows, big)
    has = first < big
    arg = np.where(has, idx[np.minimum(first, max(big - 1, 0))] if big else -1, -1).astype(np.int32)
    out[~has] = 0  # empty segments, or only skipped entries
    return out.astype(src.dtype), arg


def _np_routed(src, arg, seg):
    ptr, idx, counts, valid, vals = _np_prepare(src, seg)
    seg_of = np.repeat(np.arange(seg.rows), counts)
    won = np.asarray(arg)[np.where(valid, idx, 0)] == seg_of[:, None]
    vals = np.where(valid[:, None] & won, vals, 0)
    return _np_reduce(np.add, vals, ptr, counts, seg.rows, 0).astype(src.dtype)


# --- GPU -------------------------------------------------------------------------------------------

def _name_expressions(ctype: str) -> tuple[str, ...]:
    """Every kernel instantiated for one feature type (one NVRTC compile per dtype and device)."""
    names = [f"segment_sum<{ctype}, {ctype}>", f"segment_max<{ctype}, {ctype}>", f"segment_routed_sum<{ctype}>"]
    acc = "double" if ctype == "double" else "float"
    if acc != ctype:  # the two passes of long segments: partials in the accumulator type
        names += [f"segment_sum<{ctype}, {acc}>", f"segment_sum<{acc}, {ctype}>",
                  f"segment_max<{ctype}, {acc}>", f"segment_max<{acc}, {ctype}>"]
    return tuple(names)


class CupyDevice:
    """What the GPU path needs: the array module and compiled kernels (tests swap in an emulator)."""

    def __init__(self):
        import cupy
        self.xp = cupy
        self._fns: dict = {}

    def kernel(self, expr: str, ctype: str):
        """Kernel ``expr`` of the module compiled for feature type ``ctype`` on the current device."""
        key = (self.xp.cuda.Device().id, expr)
        fn = self._fns.get(key)
        if fn is None:
            from .cuda.cuda_loader import get_function
            fn = self._fns[key] = get_function(STEM, expr, _name_expressions(ctype))
        return fn


_cupy_device = None


def _device_of(a):
    """None for NumPy arrays (the vectorised NumPy path), else the device object running the kernels."""
    global _cupy_device
    if array_module(a) is np:
        return None
    if _cupy_device is None:
        _cupy_device = CupyDevice()
    return _cupy_device


def launch_geometry(rows: int, c: int) -> tuple[tuple, tuple]:
    """``(grid, block)``: blocks of 256 threads, ``bx`` consecutive channels (the power of two >= C, at
    most 32) times ``256 // bx`` rows; rows on grid x, channel blocks on grid y."""
    bx = 1
    while bx < min(c, 32):
        bx *= 2
    by = 256 // bx
    return (-(-rows // by), -(-c // bx)), (bx, by)


def _dev_sum(dev, src, seg, out_dtype, ctype=None):
    xp = dev.xp
    src = xp.ascontiguousarray(src)
    rows, c = seg.rows, int(src.shape[1])
    out = xp.empty((rows, c), dtype=out_dtype)
    if rows == 0 or c == 0:
        return out
    ci, co = _CTYPE[src.dtype.name], _CTYPE[np.dtype(out_dtype).name]
    w = seg.weights_as(acc_dtype(src.dtype))
    grid, block = launch_geometry(rows, c)
    fn = dev.kernel(f"segment_sum<{ci}, {co}>", ctype or ci)
    fn(grid, block, (src, seg.ptr, seg.idx, seg.ptr if w is None else w, np.int32(w is not None), out,
                     np.int32(rows), np.int32(c)))
    return out


def _dev_max(dev, src, seg, out_dtype, arg_in=None, ctype=None):
    xp = dev.xp
    src = xp.ascontiguousarray(src)
    rows, c = seg.rows, int(src.shape[1])
    out = xp.empty((rows, c), dtype=out_dtype)
    arg = xp.empty((rows, c), dtype=xp.int32)
    if rows == 0 or c == 0:
        return out, arg
    ci, co = _CTYPE[src.dtype.name], _CTYPE[np.dtype(out_dtype).name]
    grid, block = launch_geometry(rows, c)
    fn = dev.kernel(f"segment_max<{ci}, {co}>", ctype or ci)
    a_in = seg.ptr if arg_in is None else xp.ascontiguousarray(arg_in, dtype=xp.int32)
    fn(grid, block, (src, seg.ptr, seg.idx, a_in, np.int32(arg_in is not None), out, arg, np.int32(rows), np.int32(c)))
    return out, arg


def _dev_routed(dev, src, arg, seg):
    xp = dev.xp
    src = xp.ascontiguousarray(src)
    arg = xp.ascontiguousarray(arg, dtype=xp.int32)
    rows, c = seg.rows, int(src.shape[1])
    out = xp.empty((rows, c), dtype=src.dtype)
    if rows == 0 or c == 0:
        return out
    ct = _CTYPE[src.dtype.name]
    grid, block = launch_geometry(rows, c)
    dev.kernel(f"segment_routed_sum<{ct}>", ct)(grid, block, (src, arg, seg.ptr, seg.idx, out, np.int32(rows), np.int32(c)))
    return out
