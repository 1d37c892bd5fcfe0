"""Pooling of sparse voxels: local max / average pooling, global pooling and unpooling.

Local pooling uses the kernel map of the strided convolution of the same geometry
(:func:`sparsevox.kernel_map`), so its output sites and rows are exactly those of
``spatially_sparse_conv(voxels, w, kernel_size, stride)`` and skip connections line up. Its pairs,
regrouped by output row (inputs ascending), are the :class:`~sparsevox.segments.Segments` of the
reduction; regrouped by input row, those of the backward pass (no atomics on the GPU).

The ``*_forward`` / ``*_backward`` functions work on core arrays (NumPy or CuPy, on the current CUDA
device and stream); the framework adapters wrap exactly these. The public functions take and return
:class:`~sparsevox.Voxels` / arrays of the caller's library.
"""
from __future__ import annotations

from . import geometry
from ._arrays import array_module, from_core, on_caller_stream, to_core, to_host
from .conv import output_voxels_of
from .kernel_map import KernelMap, kernel_map
from .segments import (Segments, batch_segments, check_feats, gather_segments, segment_max, segment_routed_sum,
                       segment_sum)
from .voxels import Voxels

GLOBAL_MODES = ("avg", "max", "sum")


class PoolMap:
    """The reduction of one pooling geometry.

    Attributes:
        fwd: :class:`Segments` by output row: the active input rows under each output's window
            (ascending), weights ``1 / count`` (read by the average only).
        num_in, num_out: input and output row counts.
        counts: int32 ``[num_out]`` number of active inputs per output (0: the output is 0).
    The backward grouping (by input row) is ``fwd.transpose()``, built on first use and cached.
    """

    def __init__(self, fwd: Segments, num_in: int, num_out: int, counts):
        self.fwd, self.num_in, self.num_out, self.counts = fwd, num_in, num_out, counts

    @property
    def rev(self) -> Segments:
        return self.fwd.transpose()

    def __repr__(self) -> str:
        return f"PoolMap(num_in={self.num_in}, num_out={self.num_out}, pairs={int(self.fwd.idx.shape[0])})"


def pool_map(kmap: KernelMap) -> PoolMap:
    """The :class:`PoolMap` of a (strided or submanifold) kernel map, cached in ``kmap.derived``."""
    got = kmap.derived.get("pool.map")
    if got is not None:
        return got
    ins, outs = kmap.in_maps, kmap.out_maps
    xp = array_module(ins)
    n_in, n_out = kmap.num_in, kmap.num_out
    order = xp.argsort(outs.astype(xp.int64) * max(n_in, 1) + ins.astype(xp.int64))  # (out, in): unique pairs
    outs_s, ins_s = outs[order], ins[order]
    counts = xp.bincount(outs_s, minlength=n_out) if outs_s.shape[0] else xp.zeros(n_out, xp.int64)
    ptr = xp.zeros(n_out + 1, dtype=xp.int32)
    ptr[1:] = xp.cumsum(counts)
    inv = 1.0 / xp.maximum(counts, 1).astype(xp.float64)
    got = PoolMap(Segments(ptr, ins_s, n_in, inv[outs_s], longest=kmap.num_offsets), n_in, n_out,
                  counts.astype(xp.int32))
    kmap.derived["pool.map"] = got
    return got


# --- core forward / backward ---------------------------------------------------------------------

def max_pool_forward(feats, pmap: PoolMap):
    """``(out [num_out, C], argmax [num_out, C] int32)`` from feats ``[num_in, C]`` (float16, bfloat16,
    float32, float64; NumPy or CuPy): ``out[o, c] = max feats[i, c]`` over the active inputs ``i`` of
    output ``o``; ``argmax[o, c]`` is that input row (ties: the lowest row; NaN propagates, the lowest
    NaN row wins). An output with no active input gives 0 and argmax -1. ``out`` has feats' dtype."""
    check_feats(feats, "feats", pmap.num_in)
    return segment_max(feats, pmap.fwd)


def max_pool_backward(grad_out, argmax, pmap: PoolMap):
    """``grad_in [num_in, C]`` (grad_out's dtype): ``grad_in[i, c] = sum_o (argmax[o, c] == i) *
    grad_out[o, c]``. ``grad_out`` ``[num_out, C]``, ``argmax`` int32 ``[num_out, C]`` from the forward."""
    check_feats(grad_out, "grad_out", pmap.num_out)
    return segment_routed_sum(grad_out, argmax, pmap.rev)


def avg_pool_forward(feats, pmap: PoolMap):
    """``out [num_out, C]``: the mean of feats ``[num_in, C]`` over each output's active inputs (0 for
    none), accumulated in float32 (float64 for float64), returned in feats' dtype."""
    check_feats(feats, "feats", pmap.num_in)
    return segment_sum(feats, pmap.fwd)


def avg_pool_backward(grad_out, pmap: PoolMap):
    """``grad_in [num_in, C]``: ``grad_in[i] = sum over outputs o reading i of grad_out[o] / count[o]``."""
    check_feats(grad_out, "grad_out", pmap.num_out)
    return segment_sum(grad_out, pmap.rev)


def global_pool_forward(feats, batch, num_batches: int, mode: str = "avg"):
    """``(out [num_batches, C], argmax)``: per batch item the mean / max / sum of its rows of feats
    ``[N, C]``; ``batch`` int ``[N]`` in ``[0, num_batches)``. An item with no rows gives zeros.
    ``argmax`` int32 ``[num_batches, C]`` (the winning row, lowest on ties, -1 for an empty item) for
    ``"max"``, else None."""
    _check_mode(mode)
    check_feats(feats, "feats")
    _check_batch(batch, feats.shape[0], num_batches)
    seg = batch_segments(batch, num_batches, mean=(mode == "avg"))
    if mode == "max":
        return segment_max(feats, seg)
    return segment_sum(feats, seg), None


def global_pool_backward(grad_out, batch, mode: str = "avg", argmax=None):
    """``grad_in [N, C]``: ``grad_out[batch[i]]`` (sum), divided by that item's row count (avg), or
    routed to the argmax row only (max; ``argmax`` from the forward is required)."""
    _check_mode(mode)
    check_feats(grad_out, "grad_out")
    n, b = int(batch.shape[0]), int(grad_out.shape[0])
    _check_batch(batch, n, b)
    xp = array_module(batch)
    bi = batch.astype(xp.int32)
    if mode == "max":
        if argmax is None:
            raise ValueError("global_pool_backward(mode='max') needs the argmax of the forward")
        return segment_routed_sum(grad_out, argmax, gather_segments(bi, b))
    w = None
    if mode == "avg":
        counts = xp.bincount(bi, minlength=b) if n else xp.zeros(b, xp.int64)
        w = (1.0 / xp.maximum(counts, 1).astype(xp.float64))[bi]
    return segment_sum(grad_out, gather_segments(bi, b, w))


def unpool_forward(feats, parent):
    """``out [N_fine, C]``: ``out[i] = feats[parent[i]]``; ``parent`` int32 ``[N_fine]`` coarse rows."""
    check_feats(feats, "feats")
    return segment_sum(feats, gather_segments(parent, int(feats.shape[0])))


def unpool_backward(grad_out, parent, num_coarse: int):
    """``grad_coarse [num_coarse, C]``: the sum of ``grad_out`` over each coarse row's children."""
    check_feats(grad_out, "grad_out", int(parent.shape[0]))
    return segment_sum(grad_out, gather_segments(parent, int(num_coarse)).transpose())


# --- public ops -------------------------------------------------------------------------------------

def _adapter(lib: str, name: str, feats=None):
    """The framework adapter's differentiable version of ``name``, when the adapter has one (else None:
    the core computes the values in the caller's library). A torch tensor that requires grad and has no
    adapter function to carry it is a ``NotImplementedError``, never a silently detached result."""
    if lib not in ("torch", "jax"):
        return None
    import importlib
    try:
        mod = importlib.import_module(f"sparsevox.adapters.{lib}")
    except ImportError:
        mod = None
    fn = getattr(mod, name, None)
    if fn is None and getattr(feats, "requires_grad", False):
        raise NotImplementedError(f"sparsevox.adapters.{lib} has no differentiable {name} yet; "
                                  f"call it on detached features, or wrap {name}_forward/_backward")
    return fn


def _pool_geometry(kernel_size, stride):
    ks = geometry.triple(kernel_size, "kernel_size")
    st = ks if stride is None else geometry.triple(stride, "stride")
    return ks, st


def _pool(voxels, kernel_size, stride, op: str):
    if not isinstance(voxels, Voxels):
        raise ValueError(f"voxels must be a sparsevox.Voxels, got {type(voxels).__name__}")
    ks, st = _pool_geometry(kernel_size, stride)
    fn = _adapter(voxels.origin.lib, op, voxels.feats)
    if fn is not None:
        return fn(voxels, kernel_size, stride)
    kmap = kernel_map(voxels, ks, st)
    feats, origin = to_core(voxels.feats)
    with on_caller_stream(origin):
        pmap = pool_map(kmap)
        out = max_pool_forward(feats, pmap)[0] if op == "max_pool" else avg_pool_forward(feats, pmap)
    return output_voxels_of(voxels, kmap, from_core(out, origin))


def max_pool(voxels, kernel_size=2, stride=None) -> Voxels:
    """Max pooling: each output site takes the channel-wise maximum over the active inputs of its window.

    Args:
        voxels: :class:`~sparsevox.Voxels` with feats ``[N, C]``.
        kernel_size: int or 3-tuple, each >= 1.
        stride: int or 3-tuple, each >= 1; default ``kernel_size`` (as PyTorch).

    The output sites and their row order are those of
    ``spatially_sparse_conv(voxels, w, kernel_size, stride)`` (``unique(floor(c / stride))`` per batch
    for stride > 1, the input sites for stride 1), from the same cached kernel map; the window of output
    ``o`` is the inputs ``stride * o + offset_k``. An output whose window holds no active input is 0
    (possible only when ``kernel_size`` does not cover ``stride``, e.g. 1 with stride 2).
    Gradient: to the winning input (ties: the lowest input row).

    Example:
        >>> out = sv.max_pool(v, 2)   # 2x2x2 windows, stride 2
    """
    return _pool(voxels, kernel_size, stride, "max_pool")


def avg_pool(voxels, kernel_size=2, stride=None) -> Voxels:
    """Average pooling: the mean over the active inputs of each window (not over the window's volume).
    Same arguments, output sites and rows as :func:`max_pool`; gradient ``grad_out[o] / count[o]`` to
    each active input of the window."""
    return _pool(voxels, kernel_size, stride, "avg_pool")


def _check_mode(mode) -> None:
    if mode not in GLOBAL_MODES:
        raise ValueError(f"mode must be one of {GLOBAL_MODES}, got {mode!r}")


def _check_batch(batch, n: int, num_batches: int) -> None:
    if batch.ndim != 1 or int(batch.shape[0]) != n:
        raise ValueError(f"batch must have shape [{n}], got {tuple(batch.shape)}")
    if batch.dtype.kind not in "iu":
        raise ValueError(f"batch must be an integer array, got dtype {batch.dtype}")
    if n:
        lo, hi = int(batch.min()), int(batch.max())
        if lo < 0 or hi >= num_batches:
            raise ValueError(f"batch indices must be in [0, {num_batches - 1}], got range [{lo}, {hi}]")


def global_pool(voxels, mode: str = "avg"):
    """Pool every batch item to one vector: ``[B, C]`` in the caller's library and feats' dtype.

    Args:
        voxels: :class:`~sparsevox.Voxels`.
        mode: ``"avg"`` (mean over the item's voxels), ``"max"`` or ``"sum"``.

    ``B`` is the largest batch index + 1 (``voxels.batch_size``); an item with no voxels gives zeros.
    """
    if not isinstance(voxels, Voxels):
        raise ValueError(f"voxels must be a sparsevox.Voxels, got {type(voxels).__name__}")
    _check_mode(mode)
    fn = _adapter(voxels.origin.lib, "global_pool", voxels.feats)
    if fn is not None:
        return fn(voxels, mode)
    c, _ = voxels.core_coords()
    feats, origin = to_core(voxels.feats)
    with on_caller_stream(origin):
        out, _ = global_pool_forward(feats, c[:, 0], voxels.batch_size, mode)
    return from_core(out, origin)


def parent_rows(coarse: Voxels, fine: Voxels, stride=2):
    """int32 ``[N_fine]`` (core array): the row of each fine voxel's parent ``floor(c / stride)`` in
    ``coarse``. ``ValueError`` naming the first fine voxel whose parent is not there."""
    st = geometry.triple(stride, "stride")
    fc, fo = fine.core_coords()
    cc, co = coarse.core_coords()
    if fo.on_gpu != co.on_gpu:
        raise ValueError("coarse and fine must be on the same device")
    xp = array_module(fc)
    p = fc.astype(xp.int64)
    p[:, 1:] = xp.floor_divide(p[:, 1:], xp.asarray(st, dtype=xp.int64))
    rows = lookup_rows(coarse, p)
    missing = rows < 0
    if bool(missing.any()):
        i = int(to_host(xp.nonzero(missing)[0][:1])[0])
        raise ValueError(f"unpool: fine voxel {to_host(fc[i]).tolist()} has no parent "
                         f"{to_host(p[i]).tolist()} in coarse (stride {st}); {int(missing.sum())} fine "
                         f"voxels lack one. coarse must hold floor(c / stride) of every fine voxel")
    return rows


def lookup_rows(voxels: Voxels, coords):
    """Row of each int ``[M, 4]`` coordinate (core array) among ``voxels``, or -1 when absent (also for
    coordinates outside the packable range)."""
    xp = array_module(coords)
    keys, perm = voxels.sorted_keys()
    n = int(keys.shape[0])
    if n == 0 or coords.shape[0] == 0:
        return xp.full(coords.shape[0], -1, dtype=xp.int32)
    ok = geometry.in_range_mask(coords, xp)
    q = geometry.pack_keys(xp.where(ok[:, None], coords, 0), xp)
    pos = xp.minimum(xp.searchsorted(keys, q), n - 1)
    hit = ok & (keys[pos] == q)
    return xp.where(hit, perm[pos], -1).astype(xp.int32)


def unpool(coarse, fine, stride=2) -> Voxels:
    """Copy each coarse voxel's features to its children: ``Voxels`` on ``fine``'s sites and rows.

    Args:
        coarse: :class:`~sparsevox.Voxels` with feats ``[M, C]`` (e.g. the output of a stride-``s`` layer).
        fine: :class:`~sparsevox.Voxels` (feats unused, may be None), e.g. that layer's input.
        stride: int or 3-tuple, each >= 1 (default 2): the parent of fine voxel ``c`` is
            ``(batch, floor(x / s), floor(y / s), floor(z / s))``. It is not inferred (a sparse level
            need not show its stride); pass the stride of the layer that made ``coarse``.

    Every parent must exist in ``coarse``, else ``ValueError``. The result shares ``fine``'s coords and
    cached kernel maps. Gradient: each coarse row gets the sum over its children.
    """
    if not isinstance(coarse, Voxels) or not isinstance(fine, Voxels):
        raise ValueError("coarse and fine must be sparsevox.Voxels")
    geometry.triple(stride, "stride")
    fn = _adapter(coarse.origin.lib, "unpool", coarse.feats)
    if fn is not None:
        return fn(coarse, fine, stride)
    feats, origin = to_core(coarse.feats)
    with on_caller_stream(origin):
        out = unpool_forward(feats, parent_rows(coarse, fine, stride))
    return fine.replace(from_core(out, origin))
