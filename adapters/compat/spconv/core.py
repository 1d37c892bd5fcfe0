"""spconv's ``SparseConvTensor`` (``spconv/pytorch/core.py`` of spconv 2.3.8) and the pair records its
``indice_dict`` holds, on sparsevox geometry.

A ``SparseConvTensor`` carries, besides spconv's fields, a private handle on its sparsevox geometry
(a coordinates-only :class:`sparsevox.Voxels` of its indices, where the kernel maps of its SubM layers
are cached); ``replace_feature`` and ``shadow_copy`` hand it on, and it is dropped when ``indices`` is
replaced (it is checked against the indices object on every use).
"""
from __future__ import annotations

import enum
import operator

import numpy as np
import torch

from .maps import version

__all__ = ["SparseConvTensor", "IndiceData", "ImplicitGemmIndiceData", "ConvAlgo", "AlgoHint", "expand_nd",
           "scatter_nd"]


class ConvAlgo(enum.Enum):
    """spconv's algorithm names (``spconv.core.ConvAlgo``). Accepted by the layers and recorded, not
    acted on: sparsevox picks its own algorithm (``SPARSEVOX_FWD_ALGO_MODE``, the autotuner)."""
    Native = 0
    MaskImplicitGemm = 1
    MaskSplitImplicitGemm = 2


class AlgoHint(enum.Enum):
    """spconv's tuning hints (``spconv.core.AlgoHint``, its spelling kept): importable, not acted on."""
    NoHint = 0b000
    Fowrard = 0b001
    BackwardInput = 0b010
    BackwardWeight = 0b100


def expand_nd(ndim: int, val) -> list[int]:
    """An int or a sequence of ``ndim`` ints as a list of ``ndim`` ints (spconv's ``expand_nd``)."""
    res = [val] * ndim if isinstance(val, (int, np.integer)) else list(val)
    if len(res) != ndim:
        raise ValueError(f"expected an int or {ndim} ints, got {val!r}")
    return [int(v) for v in res]


def _int_value(v) -> int | None:
    """``v`` as an int when it holds one: an int, a NumPy or torch integer scalar, or an integral float such as
    the 3.0 of ``(3.0, 3, 3)`` (which spconv's ``int(v)`` takes); None for 3.7, a bool, a string."""
    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, (float, np.floating)):
        return int(v) if float(v).is_integer() else None
    try:
        return operator.index(v)
    except TypeError:
        return None


def checked_int(name: str, val, low: int = 1) -> int:
    """``val`` as an int ``>= low``, else ``ValueError`` naming ``name`` (2.5 is refused, not truncated)."""
    v = _int_value(val)
    if v is None or v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {val!r}")
    return v


def checked_nd(name: str, ndim: int, val, low: int | None = None) -> list[int]:
    """``val`` (one integer for every axis, or ``ndim`` of them) as ``ndim`` ints, each ``>= low`` (None: any
    integer), else ``ValueError`` naming ``name``: the layers' check of their sizes, where :func:`expand_nd`
    (spconv's) would truncate 3.7 to 3 and let 0 through to a division by zero."""
    one = _int_value(val)
    if one is not None:
        vals = [one] * ndim
    elif isinstance(val, (str, bytes)) or not hasattr(val, "__iter__"):
        vals = []
    else:
        vals = [_int_value(v) for v in val]
    if len(vals) != ndim or None in vals:
        what = "an integer" if low is None else f"an integer >= {low}"
        raise ValueError(f"{name} must be {what} or {ndim} such integers (one per axis), got {val!r}")
    if low is not None and min(vals) < low:
        raise ValueError(f"{name} must be >= {low} per axis, got {val!r}")
    return vals


class IndiceData:
    """What a layer stores under its ``indice_key`` (spconv's ``IndiceData`` / ``ImplicitGemmIndiceData``):
    ``indices`` / ``spatial_shape`` of its input, ``out_indices`` / ``out_spatial_shape`` of its output,
    ``is_subm``, ``ksize``, ``stride``, ``padding``, ``dilation`` and ``algo`` as spconv names them.
    Instead of spconv's pair tensors it holds the sparsevox kernel map (``kmap``, a
    :class:`sparsevox.KernelMap`, rows of ``indices`` → rows of ``out_indices``) and the geometry of both
    sides (``in_geom``, ``out_geom``)."""

    def __init__(self, out_indices, indices, kmap, spatial_shape, out_spatial_shape, is_subm, algo, ksize, stride,
                 dilation, padding, in_geom=None, out_geom=None):
        self.out_indices, self.indices, self.kmap = out_indices, indices, kmap
        self.spatial_shape, self.out_spatial_shape, self.is_subm = spatial_shape, out_spatial_shape, is_subm
        self.algo, self.ksize, self.stride, self.dilation, self.padding = algo, ksize, stride, dilation, padding
        self.in_geom, self.out_geom = in_geom, out_geom
        self.voxel_num = None
        # the indices' versions as the geometries were made (a later in-place edit must not reuse them)
        self.in_version, self.out_version = version(indices), version(out_indices)

    # spconv's pair tensors, made from the kernel map when first read (FLOP counters and saliency code read
    # them; the layers never do): int32, -1 where an offset has no pair
    def _pairs(self):
        from sparsevox.adapters.torch.functional import kernel_map_tensors
        i, o, off = kernel_map_tensors(self.kmap)
        counts = (off[1:] - off[:-1]).to(i.device)  # K values: the only copy to the device
        k = torch.repeat_interleave(torch.arange(len(counts), device=i.device), counts, output_size=len(i))
        return i.long(), o.long(), k, counts

    def _table(self, forward: bool) -> torch.Tensor:
        """``[K, N]`` int32, -1 where offset ``k`` pairs nothing with row ``r`` of the output (``forward``:
        N_out rows holding input rows) or of the input (N_in rows holding output rows)."""
        i, o, k, counts = self._pairs()
        rows, vals, n = (o, i, self.kmap.num_out) if forward else (i, o, self.kmap.num_in)
        out = torch.full((len(counts), n), -1, dtype=torch.int32, device=i.device)
        out[k, rows] = vals.int()
        return out

    @property
    def pair_fwd(self) -> torch.Tensor:
        """``[K, N_out]``: the input row paired with output row ``o`` at offset ``k``, or -1."""
        return self._table(True)

    @property
    def pair_bwd(self) -> torch.Tensor:
        """``[K, N_in]``: the output row paired with input row ``i`` at offset ``k``, or -1."""
        return self._table(False)

    @property
    def indice_pair_num(self) -> torch.Tensor:
        """``[K]``: the number of pairs at each offset (from the map's host offsets; no pair is read)."""
        counts = torch.from_numpy(np.diff(self.kmap.offsets_host)).int()
        return counts.to(self.indices.device)

    @property
    def indice_pairs(self) -> torch.Tensor:
        """``[2, K, N_in]``: at offset ``k`` the first ``indice_pair_num[k]`` (input row, output row) pairs, then
        -1 (spconv's native layout)."""
        i, o, k, counts = self._pairs()
        out = torch.full((2, len(counts), self.kmap.num_in), -1, dtype=torch.int32, device=i.device)
        pos = torch.arange(len(i), device=i.device) - (torch.cumsum(counts, 0) - counts)[k]
        out[0, k, pos] = i.int()
        out[1, k, pos] = o.int()
        return out

    def __repr__(self):
        return (f"IndiceData(is_subm={self.is_subm}, ksize={self.ksize}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, {len(self.indices)} -> "
                f"{len(self.out_indices)} sites)")


ImplicitGemmIndiceData = IndiceData


def scatter_nd(indices, updates, shape):
    """``zeros(shape)`` with ``updates`` written at ``indices`` (spconv's ``scatter_nd``; no repeats)."""
    ret = torch.zeros(*shape, dtype=updates.dtype, device=updates.device)
    ndim = indices.shape[-1]
    output_shape = list(indices.shape[:-1]) + list(shape[ndim:])
    flat = indices.view(-1, ndim)
    ret[tuple(flat[:, i] for i in range(ndim))] = updates.view(*output_shape)
    return ret


class SparseConvTensor:
    """A batch of sparse grids in spconv's form.

    Args:
        features: ``[N, C]`` float tensor.
        indices: int32 ``[N, ndim + 1]``, column 0 the batch index, then the spatial coordinates in
            ``[0, spatial_shape)`` (ndim 1, 2 or 3), unique.
        spatial_shape: ``ndim`` ints.
        batch_size: B > 0.
        grid, voxel_num, permanent_thrust_allocator, force_algo: accepted and kept (spconv's performance
            hints and TensorRT fields; nothing here uses them).
        indice_dict: the pair records of earlier layers (``{indice_key: IndiceData}``).
        benchmark, enable_timer: spconv's profiling, not supported (``NotImplementedError``).

    ``features`` cannot be assigned (``x = x.replace_feature(f)``, as in spconv).
    """

    def __init__(self, features, indices, spatial_shape, batch_size, grid=None, voxel_num=None, indice_dict=None,
                 benchmark=False, permanent_thrust_allocator=False, enable_timer=False, force_algo=None):
        if features.ndim != 2 or indices.ndim != 2:
            raise ValueError(f"features must be [N, C] and indices [N, ndim + 1], got {tuple(features.shape)} and "
                             f"{tuple(indices.shape)}")
        ndim = indices.shape[1] - 1
        if len(spatial_shape) != ndim:
            raise ValueError(f"spatial shape must equal to ndim: {list(spatial_shape)} for indices with {ndim} "
                             f"spatial columns")
        if indices.dtype != torch.int32:
            raise ValueError(f"indices must be int32 (spconv only supports int32), got {indices.dtype}")
        if int(batch_size) <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if benchmark:
            raise NotImplementedError("SparseConvTensor(benchmark=True): spconv's per-layer benchmark records are "
                                      "not supported by sparsevox.compat.spconv")
        if enable_timer:
            raise NotImplementedError("SparseConvTensor(enable_timer=True): spconv's CUDA kernel timer is not "
                                      "supported by sparsevox.compat.spconv")
        self._features = features
        self.indices = indices
        self.spatial_shape = [int(v) for v in spatial_shape]
        self.batch_size = batch_size
        self.indice_dict = {} if indice_dict is None else indice_dict
        # spconv stores an empty tensor for "no grid" (code tests x.grid.numel(), not None)
        self.grid, self.voxel_num = (torch.Tensor() if grid is None else grid), voxel_num
        self.benchmark, self.benchmark_record = False, {}
        self.thrust_allocator = None
        self._timer = None
        self.force_algo = force_algo
        self.int8_scale = None
        self._sv_geom = None  # (indices object, sparsevox Voxels of it)
        self._sv_run = None  # the map-plan run of the forward this tensor belongs to (maps.planned)

    def __repr__(self):
        return f"SparseConvTensor[shape={self._features.shape}]"

    @property
    def features(self):
        return self._features

    @features.setter
    def features(self, val):
        raise ValueError("you can't set feature directly, use 'x = x.replace_feature(your_new_feature)' to generate "
                         "new SparseConvTensor instead.")

    @property
    def is_quantized(self):
        return self.features.dtype == torch.qint8

    def q_scale(self):
        raise NotImplementedError("quantized (int8) SparseConvTensor: not supported by sparsevox.compat.spconv")

    def dequantize(self):
        raise NotImplementedError("quantized (int8) SparseConvTensor: not supported by sparsevox.compat.spconv")

    def _copy(self, features, indice_dict):
        # every member but the two, without __init__'s checks: a copy per layer is host time on the
        # host-bound float16 step, and the members were checked when ``self`` was made
        out = object.__new__(SparseConvTensor)
        out.__dict__.update(self.__dict__)
        out._features, out.indice_dict = features, indice_dict
        out.spatial_shape = list(self.spatial_shape)  # its own list, as __init__ made
        return out

    def replace_feature(self, feature):
        """A tensor with the same indices, spatial shape and ``indice_dict`` (the same dict object, as in
        spconv) and new features ``[N, C]`` (checked as spconv's constructor checks them: two dimensions)."""
        if feature.ndim != 2:
            raise ValueError(f"features must be [N, C], got {tuple(feature.shape)}")
        return self._copy(feature, self.indice_dict)

    def shadow_copy(self) -> "SparseConvTensor":
        """A new tensor with every member unchanged."""
        return self._copy(self.features, self.indice_dict)

    def select_by_index(self, valid_indices):
        """The rows ``valid_indices``; the pair records are cleared (they describe other indices)."""
        out = self._copy(self.features[valid_indices], {})
        out.indices = self.indices[valid_indices]
        return out

    def minus(self):
        return self.replace_feature(-self.features)

    @classmethod
    def from_dense(cls, x: torch.Tensor):
        """A tensor of the sites of a channels-last dense tensor ``[B, *spatial, C]`` that are nonzero in
        any channel (``x.to_sparse(x.ndim - 1)``, sorted)."""
        x_sp = x.to_sparse(x.ndim - 1)
        indices = x_sp.indices().permute(1, 0).contiguous().int()
        return cls(x_sp.values(), indices, x_sp.shape[1:-1], x_sp.shape[0])

    @property
    def spatial_size(self):
        return np.prod(self.spatial_shape)

    def find_indice_pair(self, key):
        if key is None:
            return None
        return self.indice_dict.get(key)

    def dense(self, channels_first: bool = True):
        """``[B, C, *spatial_shape]`` (``channels_first``) or ``[B, *spatial_shape, C]``, zeros where no
        site is active. Differentiable.

        Raises ``ValueError`` when an index lies outside ``[0, batch_size)`` (column 0) or ``[0,
        spatial_shape)`` (one reduction of the indices, one read of the device). Duplicate sites are not
        checked, as in spconv: the dense tensor holds one of their rows (which one is unspecified: a scatter
        without accumulation), not their sum."""
        indices = self.indices.to(self.features.device).long()
        bounds = [int(self.batch_size)] + [int(n) for n in self.spatial_shape]
        if indices.shape[0]:
            # torch would raise an IndexError for a large index and wrap a negative one round silently
            lo, hi = torch.stack(torch.aminmax(indices, dim=0)).tolist()
            if min(lo) < 0 or any(h >= n for h, n in zip(hi, bounds)):
                raise ValueError(f"indices must lie in [0, batch_size) in column 0 and in [0, spatial_shape) in the "
                                 f"others: batch_size {bounds[0]}, spatial_shape {bounds[1:]}, got indices per "
                                 f"column from {lo} to {hi}")
        shape = bounds + [self.features.shape[1]]
        res = scatter_nd(indices, self.features, shape)
        if not channels_first:
            return res
        ndim = len(self.spatial_shape)
        perm = list(range(ndim + 1))
        perm.insert(1, ndim + 1)
        return res.permute(*perm).contiguous()

    def __add__(self, other):
        return self.replace_feature(self.features + (other if isinstance(other, torch.Tensor) else other.features))

    def __radd__(self, other):
        return self.replace_feature(self.features + (other if isinstance(other, torch.Tensor) else other.features))

    def __iadd__(self, other):
        self._features += other if isinstance(other, torch.Tensor) else other.features
        return self
