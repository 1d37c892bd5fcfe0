"""spconv's layer geometry as sparsevox kernel maps.

spconv 2.3.8 pairs input site ``i`` with output site ``o`` through kernel offset ``r`` (per axis,
``0 <= r < k``; the flattened offset index is lexicographic, last axis fastest, as sparsevox's)
(``ConvOutLocIter`` in ``spconv/csrc/sparse/indices.py``):

- regular convolution and pooling: ``i = o * s - p + r * d`` with ``0 <= o < out_shape``,
  ``out_shape = (in + 2p - d(k-1) - 1) // s + 1``; the output sites are every ``o`` so reached;
- transposed convolution: ``o = i * s - p + r * d`` with ``0 <= o < out_shape``,
  ``out_shape = (in - 1) * s - 2p + k + output_padding``;
- SubM (odd ``k`` only): ``i = o - (k // 2) * d + r * d`` on the input sites (stride and padding ignored).

sparsevox's maps pair ``i = s * o + off_r`` (strided) and ``o = s * i + off_r`` (transposed), with
``off_r = (r - c) * d``, ``c = (k - 1) // 2`` for odd and ``0`` for even ``k``, and the same offset index
``r``. So SubM is sparsevox's submanifold map as it is, and with the per-axis shift ``t = p - c * d``
spconv's regular pairs are sparsevox's strided pairs on the input coordinates moved by ``t``, and its
transposed pairs sparsevox's transposed pairs onto the output coordinates moved by ``t``. The output sites
(spconv's rule, inside the output spatial shape) are computed here with torch on the indices' device; the
pairs come from the core builder (the GPU hash-table builder for CUDA tensors), handed the output sites.

1D and 2D tensors are embedded in 3D: coordinates get trailing zero columns, and the kernel, stride,
padding and dilation of the missing axes are 1, 1, 0 and 1.
"""
from __future__ import annotations

import contextlib
import os
import weakref

import torch

import sparsevox as sv
from sparsevox import map_plan
from sparsevox.kernel_map import KernelMap, _swapped

__all__ = ["auto_plan", "planned", "rows4", "user_rows", "lift", "geometry", "conv_output_size",
           "deconv_output_size", "out_rows", "subm_map", "strided_map", "transposed_map", "inverse_map"]


PLAN_ENV = "SPARSEVOX_COMPAT_PLAN"


def _plan_from_env() -> bool:
    raw = os.environ.get(PLAN_ENV, "1").strip().lower()
    if raw not in ("0", "1", "true", "false", "yes", "no", ""):
        raise ValueError(f"{PLAN_ENV} must be 0 or 1, got {raw!r}")
    return raw not in ("0", "false", "no")


_auto = {"on": _plan_from_env()}


def auto_plan(enabled: bool | None = None) -> bool:
    """Whether compat plans each model's kernel maps by itself (default on; ``SPARSEVOX_COMPAT_PLAN=0`` turns
    it off), after setting it when ``enabled`` is given. Raises ``ValueError`` for a non-bool ``enabled``.

    A spconv model cannot be wrapped for the user (the import line is all that changes), so the plan rides
    on the tensors: the first layer that builds a map for a ``SparseConvTensor`` the user made starts a
    :class:`sparsevox.map_plan.MapPlan` run kept on that layer; the tensors the forward derives from it carry
    the run. The first forward records which maps are asked for; each later one (a new scan) builds all of
    them at its first map request, while the device has only map work queued, as native
    ``MinkUNet.build_maps`` and ``plan_maps`` do. Without it each strided layer's wait for its output size
    came behind the convolutions already queued, draining the device once per level. Results are the
    same either way; inside an explicit ``plan_maps`` scope that plan is used instead."""
    if enabled is not None:
        if not isinstance(enabled, bool):
            raise ValueError(f"enabled must be True or False, got {enabled!r}")
        _auto["on"] = enabled
    return _auto["on"]


@contextlib.contextmanager
def planned(layer, x):
    """Inside: the kernel-map requests of ``layer`` (a module) on the tensor ``x`` go through the map plan
    run of ``x``'s forward (:func:`auto_plan`), started here when ``x`` has none (a tensor the user made)."""
    if not _auto["on"] or map_plan.current() is not None:  # off, or an explicit plan_maps scope sees them
        yield
        return
    run = getattr(x, "_sv_run", None)  # (a subclass that skipped __init__ has none)
    if run is None:
        plan = layer.__dict__.get("_sv_auto_plan")
        if plan is None:
            plan = layer.__dict__["_sv_auto_plan"] = map_plan.MapPlan()
        run = x._sv_run = plan.open_run()  # (set before the layer copies x: its output carries the run)
    with map_plan.active(run):
        yield


def rows4(indices: torch.Tensor) -> torch.Tensor:
    """int32 ``[N, 4]`` (batch, x, y, z): the indices of a 1D/2D/3D tensor with zero columns appended."""
    nd = indices.shape[1] - 1
    if nd == 3:
        return indices.contiguous()
    if nd in (1, 2):
        return torch.cat([indices, indices.new_zeros(indices.shape[0], 3 - nd)], 1)
    raise NotImplementedError(f"{nd}D sparse tensors: sparsevox.compat.spconv supports 1D, 2D and 3D (sparsevox is a "
                              f"3D library)")


def user_rows(rows: torch.Tensor, nd: int) -> torch.Tensor:
    """The ``[N, nd + 1]`` indices of ``[N, 4]`` rows."""
    return rows if nd == 3 else rows[:, :nd + 1].contiguous()


def lift(vals, fill: int) -> tuple[int, int, int]:
    """``nd`` per-axis values as three (the missing axes get ``fill``)."""
    if len(vals) == 3:  # (the common case without a generator: called per layer on the host-bound step)
        return int(vals[0]), int(vals[1]), int(vals[2])
    return tuple(int(v) for v in vals) + (fill,) * (3 - len(vals))


def version(t) -> int | None:
    """``t``'s version counter (bumped by in-place writes), or None for an inference tensor (which has none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def geometry_entry(indices, voxels, built_at=...) -> tuple:
    """What a ``SparseConvTensor`` keeps as ``_sv_geom``: its indices object, their sparsevox ``Voxels`` and
    the indices' version when that geometry was made (``built_at``; default: now), so an in-place edit of
    the indices (``x.indices[:, 1:] *= 2``) is not served the old geometry's maps."""
    return indices, voxels, version(indices) if built_at is ... else built_at


def geometry(x) -> sv.Voxels:
    """The coordinates-only :class:`sparsevox.Voxels` of a ``SparseConvTensor``'s indices, kept on the tensor
    (and handed on by ``replace_feature``/``shadow_copy``), so layers on the same indices share kernel maps.
    Made and validated (unique sites, coordinate range) on first use for an indices object, and again after
    an in-place write to it."""
    g = x._sv_geom
    if g is not None and g[0] is x.indices and g[2] == version(x.indices):
        return g[1]
    rows = rows4(x.indices)
    # Whether every site lies inside the tensor's grid (the strided layers' check, _tiles_grid): queued
    # before the validation, whose one read of the device it then shares, instead of a read of its own
    # at the first strided layer, which drained the convolutions queued before it.
    bounds = torch.aminmax(rows[:, 1:].long(), dim=0) if rows.shape[0] else None
    v = sv.Voxels(rows, None)
    if bounds is not None and len(x.spatial_shape) == x.indices.shape[1] - 1:
        shape = lift(x.spatial_shape, 1)
        v.__dict__.setdefault("_compat_in_grid", {})[shape] = _inside(*bounds, shape)
    x._sv_geom = geometry_entry(x.indices, v)
    return v


def conv_output_size(shape, ksize, stride, padding, dilation) -> list[int]:
    """spconv's ``get_conv_output_size``: ``(in + 2p - d(k-1) - 1) // s + 1`` per axis."""
    return [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in zip(shape, ksize, stride, padding, dilation)]


def deconv_output_size(shape, ksize, stride, padding, output_padding) -> list[int]:
    """spconv's ``get_deconv_output_size``: ``(in - 1) * s - 2p + k + output_padding`` (no dilation)."""
    return [(n - 1) * s - 2 * p + k + o for n, k, s, p, o in zip(shape, ksize, stride, padding, output_padding)]


def check_output_size(out_shape, in_shape) -> None:
    if any(v <= 0 for v in out_shape):
        raise ValueError(f"your out spatial shape {list(out_shape)} reach zero!!! input shape: {list(in_shape)} "
                         f"(spconv's message: the kernel, stride, padding and dilation leave no output site)")


def out_rows(rows, ksize, stride, padding, dilation, out_shape, transposed: bool) -> torch.Tensor:
    """int32 ``[M, 4]`` output sites of spconv's regular (``transposed=False``) or transposed
    convolution of the ``[N, 4]`` input sites ``rows``, sorted by (batch, x, y, z); all arguments 3-tuples."""
    b = rows[:, 0].long()
    per_axis = []
    for a in range(3):
        x = rows[:, a + 1].long()[None, :]
        r = torch.arange(ksize[a], device=rows.device)[:, None]
        s, p, d, n = stride[a], padding[a], dilation[a], out_shape[a]
        if transposed:
            o = x * s - p + r * d
            ok = (o >= 0) & (o < n)
        else:
            num = x + p - r * d
            o = torch.div(num, s, rounding_mode="floor")
            ok = (num >= 0) & (num - o * s == 0) & (o < n)
        per_axis.append((o, ok))
    (ox, okx), (oy, oky), (oz, okz) = per_axis
    nx, ny, nz = (int(v) for v in out_shape)
    key = ((b * nx + ox[:, None, None, :]) * ny + oy[None, :, None, :]) * nz + oz[None, None, :, :]
    ok = okx[:, None, None, :] & oky[None, :, None, :] & okz[None, None, :, :]
    keys = torch.unique(key[ok])
    z = keys % nz
    keys = keys // nz
    y = keys % ny
    keys = keys // ny
    return torch.stack([keys // nx, keys % nx, y, z], 1).int()


def _shift(ksize, padding, dilation) -> tuple[int, int, int]:
    """``t = p - c * d`` per axis (``c`` the centre index of sparsevox's offsets: ``(k - 1) // 2`` for odd k)."""
    return tuple(p - ((k - 1) // 2 if k % 2 else 0) * d for k, p, d in zip(ksize, padding, dilation))


def _moved(rows, t):
    """``rows`` with ``t`` added to the spatial columns. Column by column with Python scalars: a
    ``torch.tensor(t, device=cuda)`` operand is a copy from pageable host memory, which waits for the stream."""
    out = rows.clone()
    for a, v in enumerate(t):
        if v:
            out[:, a + 1] += v
    return out


def subm_map(geom: sv.Voxels, ksize, dilation) -> KernelMap:
    """The SubM map (cached on ``geom``): rows of ``geom`` to themselves."""
    if any(k % 2 == 0 for k in ksize):
        raise ValueError(f"subm only support odd ksize (spconv's rule), got kernel_size {list(ksize)}")
    return sv.kernel_map(geom, ksize, 1, dilation)


def strided_map(geom: sv.Voxels, ksize, stride, padding, dilation, out_shape, in_shape=None):
    """``(kmap, out_rows [M, 4], out_geom)`` of spconv's regular convolution (or pooling) of ``geom``.

    With windows that tile the grid (kernel = stride, even, no padding or dilation) and every input extent
    ``in_shape`` a multiple of the stride, spconv's output sites are exactly ``floor(in / s)`` of every
    input inside the grid: then sparsevox's own strided map is the map (built on the device, cached on
    ``geom``, its transposed twin found by the decoder) once the inputs are checked to lie in the grid."""
    if in_shape is not None and _tiles_grid(geom, ksize, stride, padding, dilation, in_shape):
        kmap = sv.kernel_map(geom, ksize, stride, dilation)
        # sorted (batch, x, y, z); the same sites object while it lives, so maps a plan built on it are found
        out_geom = sv.strided_output_voxels(geom, ksize, stride, dilation)
        # floor(c / s) of sites inside a grid whose extents the stride divides lie inside the output grid
        # (in / s): the next strided layer's check needs no read of the device (each read drained the
        # convolutions queued before it, once per level of a UNet)
        out_geom.__dict__.setdefault("_compat_in_grid", {})[tuple(int(n) for n in out_shape)] = True
        return kmap, out_geom.coords, out_geom
    rows = geom.coords
    outs = out_rows(rows, ksize, stride, padding, dilation, out_shape, False)
    out_geom = sv.Voxels(outs, None, check=False)  # unique by construction
    t = _shift(ksize, padding, dilation)
    src = geom if t == (0, 0, 0) else sv.Voxels(_moved(rows, t), None, check=False)
    return sv.kernel_map(src, ksize, stride, dilation, output_voxels=out_geom), outs, out_geom


def _tiles_grid(geom: sv.Voxels, ksize, stride, padding, dilation, in_shape) -> bool:
    # even kernels only: sparsevox centres an odd kernel's offsets (i = s*o + r - (k-1)/2) where spconv
    # does not (i = s*o + r), so an odd kernel = stride takes the shifted path (k3 s3 was wrong here)
    if tuple(ksize) != tuple(stride) or any(k % 2 for k in ksize) or any(padding) or any(d != 1 for d in dilation) \
            or any(int(n) % s for n, s in zip(in_shape, stride)):
        return False
    checks = geom.__dict__.setdefault("_compat_in_grid", {})  # per geometry and grid
    shape = tuple(int(n) for n in in_shape)
    ok = checks.get(shape)
    if ok is None:
        rows = geom.coords
        if rows.shape[0] == 0:
            ok = True
        else:  # one reduction and one read of the device
            ok = _inside(*torch.aminmax(rows[:, 1:].long(), dim=0), shape)
        checks[shape] = ok
    return ok


def _inside(lo, hi, shape) -> bool:
    """Whether per-axis coordinate bounds ``lo``, ``hi`` lie in ``[0, shape)``: one read of the device, the
    comparison on the host (a ``torch.tensor(shape, device=cuda)`` to compare with on the device was a
    second wait: its copy from pageable memory synchronises the stream; f9d08e8's step profile counted
    compat's two extra synchronisations per step)."""
    (lo_h, hi_h) = torch.stack((lo, hi)).tolist()
    return all(a >= 0 for a in lo_h) and all(b < n for b, n in zip(hi_h, shape))


def transposed_map(geom: sv.Voxels, ksize, stride, padding, dilation, out_shape):
    """``(kmap, out_rows [M, 4], out_geom)`` of spconv's transposed convolution of ``geom``."""
    outs = out_rows(geom.coords, ksize, stride, padding, dilation, out_shape, True)
    out_geom = sv.Voxels(outs, None, check=False)
    t = _shift(ksize, padding, dilation)
    dst = out_geom if t == (0, 0, 0) else sv.Voxels(_moved(outs, t), None, check=False)
    return sv.kernel_map(geom, ksize, stride, dilation, transposed=True, output_voxels=dst), outs, out_geom


def inverse_map(kmap: KernelMap) -> KernelMap:
    """The map of an inverse convolution: ``kmap``'s pairs with input and output swapped (same offset
    index: spconv's ``pair_fwd = datas.pair_bwd``), cached on ``kmap`` while it is alive. The arrays are
    ``kmap``'s own, and so are the implicit GEMM's tables (the swapped map's forward table is ``kmap``'s
    reverse one, which a k2 s2 map reads in CSR order without a sort), as for sparsevox's own transposed twins.

    The cache is a weak reference: the inverse holds ``kmap`` (``swapped_from``), so a strong one made a
    cycle, and every step's maps waited for the cycle collector (with CuPy's PythonFunctionAllocator they
    were never given back to torch: compat's peaks were ~300 MiB above native at c4684e4)."""
    ref = kmap.derived.get("compat.spconv.inverse")
    inv = None if ref is None else ref()
    if inv is None:
        inv = _swapped(kmap, None, kmap.kernel_size, kmap.stride, kmap.dilation)
        kmap.derived["compat.spconv.inverse"] = weakref.ref(inv)
    return inv
