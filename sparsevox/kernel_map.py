"""Kernel maps: for each kernel offset, the (input row, output row) pairs it connects, in CSR form.

The builder here is written once against the array module ``xp`` (NumPy on the CPU, CuPy on the GPU):
sorted packed keys and ``searchsorted`` instead of a Python loop over voxels. A GPU backend may register
a faster builder (a hash table) through :data:`BUILDERS`; it must return the same map.

Canonical order: pairs are grouped by offset index ``k`` and, within an offset, sorted by output row.
Output coordinates of strided and generative layers are sorted by (batch, x, y, z).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import geometry
from ._arrays import array_module, to_host


@dataclass
class KernelMap:
    """Pairs of a sparse convolution.

    Attributes:
        in_maps, out_maps: int32 ``[L]`` on the data's device; pair ``j`` adds ``feats[in_maps[j]] @ W[k]``
            into ``out[out_maps[j]]`` for ``offsets[k] <= j < offsets[k+1]``.
        offsets: int32 ``[K + 1]`` on the data's device.
        offsets_host: the same offsets as a NumPy int64 array (sizes of the per-offset GEMMs).
        num_in, num_out: row counts of input and output.
        out_coords: int32 ``[num_out, 4]`` core array (NumPy/CuPy) of the output sites.
    """
    in_maps: object
    out_maps: object
    offsets: object
    offsets_host: np.ndarray
    num_in: int
    num_out: int
    out_coords: object
    kernel_size: tuple = (1, 1, 1)
    stride: tuple = (1, 1, 1)
    dilation: tuple = (1, 1, 1)
    kind: str = "submanifold"
    derived: dict = field(default_factory=dict, repr=False)  # algorithm-specific views (reverse map, masks)

    @property
    def num_offsets(self) -> int:
        return len(self.offsets_host) - 1

    @property
    def num_pairs(self) -> int:
        return int(self.offsets_host[-1])

    def __iter__(self):  # lets ``in_maps, out_maps, offsets = kmap`` work
        return iter((self.in_maps, self.out_maps, self.offsets))


def _lookup(sorted_keys, perm, query_keys, valid, xp):
    """Row index of each query key in a sorted key set, or -1 when absent or not ``valid``."""
    n = sorted_keys.shape[0]
    if n == 0:
        return xp.full(query_keys.shape, -1, dtype=xp.int32)
    pos = xp.searchsorted(sorted_keys, query_keys)
    pos = xp.minimum(pos, n - 1)
    hit = (sorted_keys[pos] == query_keys) & valid
    return xp.where(hit, perm[pos], -1).astype(xp.int32)


def _shifted(coords, off, scale, xp):
    """Coordinates ``scale * c + off`` for every offset: ``[K, N, 4]`` int64 (batch column unchanged)."""
    c = coords.astype(xp.int64)
    out = xp.empty((off.shape[0],) + c.shape, dtype=xp.int64)
    out[:, :, 0] = c[None, :, 0]
    out[:, :, 1:] = c[None, :, 1:] * xp.asarray(scale, dtype=xp.int64) + xp.asarray(off, dtype=xp.int64)[:, None, :]
    return out


def _query(keys_perm, coords_q, xp):
    """Look up ``[K, N, 4]`` query coordinates in a sorted key set → ``[K, N]`` rows or -1."""
    sorted_keys, perm = keys_perm
    flat = coords_q.reshape(-1, 4)
    valid = geometry.in_range_mask(flat, xp)
    safe = xp.where(valid[:, None], flat, 0)
    keys = geometry.pack_keys(safe, xp)
    return _lookup(sorted_keys, perm, keys, valid, xp).reshape(coords_q.shape[:2])


def _sorted(coords, xp):
    keys = geometry.pack_keys(coords, xp)
    perm = xp.argsort(keys)
    return keys[perm], perm.astype(xp.int32)


def _csr(rows_in, rows_out, xp):
    """``[K, N]`` candidate in/out rows (-1 = no pair) → CSR arrays sorted by (k, out)."""
    k_count = rows_in.shape[0]
    hit = (rows_in >= 0) & (rows_out >= 0)
    counts = hit.sum(axis=1)
    offsets = xp.zeros(k_count + 1, dtype=xp.int64)
    offsets[1:] = xp.cumsum(counts)
    k_idx = xp.broadcast_to(xp.arange(k_count)[:, None], rows_in.shape)[hit]
    ins, outs = rows_in[hit], rows_out[hit]
    order = xp.lexsort(xp.stack([outs, k_idx])) if ins.shape[0] else xp.arange(0)
    return ins[order].astype(xp.int32), outs[order].astype(xp.int32), offsets


def build_kernel_map(coords, sorted_in, kernel_size, stride, dilation, transposed, generative,
                     out_coords=None) -> KernelMap:
    """Build the map for core int32 coordinates (NumPy or CuPy). See :func:`sparsevox.kernel_map`."""
    xp = array_module(coords)
    ks = geometry.triple(kernel_size, "kernel_size")
    st = geometry.triple(stride, "stride")
    dl = geometry.triple(dilation, "dilation")
    off = geometry.kernel_offsets(ks, dl)
    n_in = coords.shape[0]
    if generative and not transposed:
        raise ValueError("generative=True is a transposed convolution that creates its output sites; "
                         "pass transposed=True with it")
    if transposed:
        kind = "generative" if generative else "transposed"
        if generative:
            if out_coords is not None:
                raise ValueError("output_voxels must be None when generative=True (the outputs are generated)")
            cand = _shifted(coords, off, st, xp).reshape(-1, 4)
            if cand.shape[0]:
                geometry.check_coord_range(cand, xp, what="generated output coordinates")
            out_coords = geometry.unpack_keys(xp.unique(geometry.pack_keys(cand, xp)), xp)
        elif out_coords is None:
            raise ValueError("a transposed convolution needs output_voxels (usually the finer Voxels saved "
                             "from the matching strided layer), or generative=True")
        # out = s * in + off: look up every (offset, input) candidate among the output sites.
        rows_out = _query(_sorted(out_coords, xp), _shifted(coords, off, st, xp), xp)
        rows_in = xp.broadcast_to(xp.arange(n_in, dtype=xp.int32)[None, :], rows_out.shape)
    else:
        if st == (1, 1, 1) and out_coords is None:
            kind, out_coords = "submanifold", coords
        else:
            kind = "strided"
            if out_coords is None:
                c = coords.astype(xp.int64)
                down = xp.concatenate([c[:, :1], xp.floor_divide(c[:, 1:], xp.asarray(st, dtype=xp.int64))], 1)
                out_coords = geometry.unpack_keys(xp.unique(geometry.pack_keys(down, xp)), xp)
        # in = s * out + off
        rows_in = _query(sorted_in, _shifted(out_coords, off, st, xp), xp)
        rows_out = xp.broadcast_to(xp.arange(out_coords.shape[0], dtype=xp.int32)[None, :], rows_in.shape)
    ins, outs, offsets = _csr(rows_in, rows_out, xp)
    return KernelMap(ins, outs, offsets.astype(xp.int32), to_host(offsets).astype(np.int64), n_in,
                     int(out_coords.shape[0]), xp.ascontiguousarray(out_coords.astype(xp.int32)),
                     ks, st, dl, kind)


# A GPU backend may replace the builder for CuPy arrays: {"cupy": callable with build_kernel_map's signature}.
BUILDERS: dict = {}


def kernel_map(voxels, kernel_size=3, stride=1, dilation=1, transposed=False, generative=False,
               output_voxels=None) -> KernelMap:
    """Build (or fetch from ``voxels``' cache) the kernel map of a sparse convolution.

    Args:
        voxels: input :class:`~sparsevox.Voxels`.
        kernel_size, stride, dilation: int or 3-tuple, each >= 1.
        transposed: upsampling convolution; pairs satisfy ``out = stride * in + offset``.
        generative: with ``transposed``, generate the output sites (every ``stride * in + offset``).
        output_voxels: output sites (``Voxels`` or a ``[M, 4]`` int coords array) for a non-generative
            transposed convolution, or to force the output sites of a strided one.

    Returns a :class:`KernelMap`. Maps are cached on ``voxels`` keyed by the geometry, so layers
    with the same geometry share one map.
    """
    from .voxels import Voxels
    ks = geometry.triple(kernel_size, "kernel_size")
    st = geometry.triple(stride, "stride")
    dl = geometry.triple(dilation, "dilation")
    out_v = None
    if output_voxels is not None:
        out_v = output_voxels if isinstance(output_voxels, Voxels) else Voxels(output_voxels, None)
    key = (ks, st, dl, bool(transposed), bool(generative), None if out_v is None else id(out_v))
    cached = voxels._kmaps.get(key)
    if cached is not None and (out_v is None or cached[1] is out_v):
        return cached[0]
    coords, origin = voxels.core_coords()
    out_coords = None
    if out_v is not None:
        out_coords, out_origin = out_v.core_coords()
        if out_origin.on_gpu != origin.on_gpu:
            raise ValueError("output_voxels must be on the same device as voxels")
    xp = array_module(coords)
    builder = BUILDERS.get("cupy" if xp is not np else "numpy", build_kernel_map)
    kmap = builder(coords, voxels.sorted_keys(), ks, st, dl, transposed, generative, out_coords)
    voxels._kmaps[key] = (kmap, out_v)  # keep out_v alive so its id stays unique
    return kmap
