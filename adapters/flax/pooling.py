"""Flax NNX pooling modules with the torch adapter's names (:mod:`sparsevox.adapters.torch.layers`):
:class:`MaxPool3d`, :class:`AvgPool3d`, :class:`GlobalPool`, :class:`Unpool`. Thin wrappers over
:mod:`sparsevox.adapters.jax`; their geometry (kernel maps, batch column, parent rows) is built outside
``jit`` like the convolutions'::

    pool = MaxPool3d(2)
    maps = level_maps(voxels, pool)                    # outside jit: the k2 s2 map, as a k2 s2 conv's
    coarse_feats = nnx.jit(lambda p, x, m: p(x, m))(pool, voxels.feats, maps)   # [N_coarse, C]

Local pooling's output sites are those of the strided convolution of the same geometry (it shares that
map), so skips line up. Bucketed maps (``level_maps(..., bucket=True)``) work: padding rows pool to zeros
and take no gradient.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from sparsevox.adapters import jax as svj
from sparsevox.geometry import triple
from sparsevox.pooling import GLOBAL_MODES, _pool_geometry

from .conv import _positive
from .maps import LevelMaps, map_key

__all__ = ["MaxPool3d", "AvgPool3d", "GlobalPool", "Unpool"]


class _Pool3d(nnx.Module):
    takes_maps = True
    transposed = generative = False  # what level_maps asks of a module with a map
    dilation = (1, 1, 1)
    _fn = None

    def __init__(self, kernel_size=2, stride=None):
        self.kernel_size, self.stride = _pool_geometry(kernel_size, stride)

    @property
    def map_key(self) -> str:
        """This pooling's geometry as a key of :attr:`LevelMaps.maps` (``"k2_s2"``: the strided
        convolution's, whose map it shares)."""
        return map_key(self.kernel_size, self.stride, self.dilation, False, False)

    def kernel_map(self, voxels, output_voxels=None) -> svj.JaxKernelMap:
        """The pooling map for ``voxels`` (outside ``jit``; ``output_voxels`` is not used)."""
        return svj.pool_kernel_map(voxels, self.kernel_size, self.stride)

    def __call__(self, x, maps):
        """``x`` ``[N, C]`` and this level's :class:`LevelMaps` (or the :class:`JaxKernelMap` of
        :meth:`kernel_map`) -> ``[N_out, C]`` on the strided convolution's output sites."""
        kmap = maps[self.map_key] if isinstance(maps, LevelMaps) else maps
        if not isinstance(kmap, svj.JaxKernelMap):
            raise ValueError(f"{type(self).__name__} needs LevelMaps or a JaxKernelMap (built outside jit), got "
                             f"{type(maps).__name__}")
        return type(self)._fn(x, kmap)


class MaxPool3d(_Pool3d):
    """Sparse max pooling ``[N, C] -> [N_out, C]``: each output the channel-wise maximum over the active
    inputs of its window (``stride`` default ``kernel_size``). Gradient to the winning input (ties: the
    lowest row)."""
    _fn = staticmethod(svj.max_pool_features)


class AvgPool3d(_Pool3d):
    """Sparse average pooling: the mean over the *active* inputs of each window; as :class:`MaxPool3d`."""
    _fn = staticmethod(svj.avg_pool_features)


class GlobalPool(nnx.Module):
    """Pool each batch item to one vector: ``[N, C] -> [num_batches, C]`` (an item with no voxels gives
    zeros). ``mode``: ``"avg"``, ``"max"`` or ``"sum"``. The output's row count must be static under
    ``jit``: give ``num_batches`` here or at the call. Padding rows of bucketed maps (batch -1) count for
    no item.

    ``__call__(x, maps, num_batches=None)``: ``maps`` the level's :class:`LevelMaps` (its batch column)
    or the int ``[N]`` batch index of every row."""

    takes_maps = True

    def __init__(self, mode: str = "avg", num_batches: int | None = None):
        if mode not in GLOBAL_MODES:
            raise ValueError(f"mode must be one of {GLOBAL_MODES}, got {mode!r}")
        self.mode = mode
        self.num_batches = None if num_batches is None else _positive(num_batches, "num_batches")

    def __call__(self, x, maps, num_batches: int | None = None):
        b = num_batches if num_batches is not None else self.num_batches
        if b is None:
            raise ValueError("GlobalPool needs num_batches (the output's row count, static under jit): "
                             "GlobalPool(mode, num_batches=B) or call(x, maps, num_batches=B)")
        b = _positive(b, "num_batches")  # b + 1 below would pass the adapter's check for b = 0
        batch = maps.batch if isinstance(maps, LevelMaps) else jnp.asarray(maps)
        # padding rows (batch -1) go to one extra item, dropped: they change no real item's value or count;
        # an index >= num_batches goes past it, so the range check still refuses it
        batch = jnp.where(batch == -1, b, jnp.where(batch >= b, b + 1, batch))
        return svj.global_pool_features(x, batch, int(b) + 1, self.mode)[:b]


class Unpool(nnx.Module):
    """Nearest-neighbour unpooling ``[M, C] -> [N_fine, C]``: each fine voxel takes its parent's features
    (``floor(c / stride)`` in the coarse sites). ``__call__(x, parent)``, ``parent`` from
    :meth:`parents` (outside ``jit``). Gradient: each coarse row gets the sum over its children.
    Exact (unbucketed) fine sites only."""

    def __init__(self, stride=2):
        self.stride = triple(stride, "stride")

    def parents(self, coarse, fine):
        """int32 ``[N_fine]``: the row in ``coarse`` of each fine voxel's parent (``ValueError`` naming a fine
        voxel whose parent is missing)."""
        return svj.unpool_parents(coarse, fine, self.stride)

    def __call__(self, x, parent):
        return svj.unpool_features(x, parent)
