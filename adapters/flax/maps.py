"""Kernel maps of one level (one set of sites) as a pytree, built outside ``jit`` for a whole network.

Kernel maps decide output shapes, so they are built from concrete ``Voxels`` outside ``jit`` and
passed into the jitted step. A network needs several maps per level (SubM k3, the 1×1 skips, the
strided map down, the transposed map up), and its normalisations need the batch column. A
:class:`LevelMaps` holds all of them for one set of sites; every convolution module finds its own map
in it by its geometry (:attr:`~sparsevox.adapters.flax.SparseConv.map_key`)::

    maps = level_maps(voxels, block)          # outside jit: every map any conv in `block` needs
    out = nnx.jit(lambda m, f, maps: m(f, maps))(block, voxels.feats, maps)
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

import sparsevox as sv
from sparsevox.adapters import jax as svj
from sparsevox.kernel_map import KernelMap
from sparsevox.voxels import Voxels

__all__ = ["LevelMaps", "level_maps", "map_key", "coarser"]


def map_key(kernel_size, stride, dilation, transposed: bool, generative: bool) -> str:
    """The name of a geometry in :attr:`LevelMaps.maps`: ``"k3"`` (SubM k3), ``"k1"``, ``"k2_s2"``,
    ``"k2_s2_transposed"``, ``"k3x1x3_d2"``, ``"k2_s2_generative"``; arguments are 3-tuples."""
    def part(prefix, t):
        return prefix + (str(t[0]) if len(set(t)) == 1 else "x".join(str(v) for v in t))
    key = part("k", kernel_size)
    if tuple(stride) != (1, 1, 1):
        key += "_" + part("s", stride)
    if tuple(dilation) != (1, 1, 1):
        key += "_" + part("d", dilation)
    if generative:
        key += "_generative"
    elif transposed:
        key += "_transposed"
    return key


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LevelMaps:
    """The kernel maps whose input is one set of sites, and those sites' batch column, as a pytree.

    Attributes:
        maps: ``{map_key: JaxKernelMap}``, e.g. ``{"k3": ..., "k1": ..., "k2_s2": ...}``; a transposed
            map here goes from these sites to one finer set (the one it was built for).
        batch: int32 ``[N]``, the batch index of every site (coords column 0), for
            :class:`~sparsevox.adapters.flax.InstanceNorm`; -1 on padding rows.
        valid: None, or (bucketed maps, ``level_maps(..., bucket=True)``) an int32 scalar: the number of
            real sites; rows from there to ``num_sites`` (the bucket) are padding, which the
            convolutions skip and write as zeros and :class:`~sparsevox.adapters.flax.BatchNorm` leaves
            out of its statistics. Pad the features with :meth:`pad` and leave the padding rows out of
            the loss with :meth:`mask`.
    """
    maps: dict
    batch: jax.Array
    valid: "jax.Array | None" = None

    @property
    def num_sites(self) -> int:
        return int(self.batch.shape[0])

    def mask(self) -> jax.Array:
        """bool ``[num_sites]``: True on the real sites (all of them for unbucketed maps)."""
        return self.batch >= 0

    def pad(self, x) -> jax.Array:
        """``x`` ``[n, ...]`` (n = the real site count) padded with zero rows to ``[num_sites, ...]``."""
        extra = self.num_sites - x.shape[0]
        if extra < 0:
            raise ValueError(f"x has {x.shape[0]} rows, more than these maps' {self.num_sites} sites")
        return jax.numpy.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1))

    def __getitem__(self, key: str) -> svj.JaxKernelMap:
        try:
            return self.maps[key]
        except KeyError:
            raise ValueError(f"these LevelMaps hold no {key!r} map (they hold {sorted(self.maps)}): build them "
                             f"outside jit with level_maps(voxels, module) or the model's kernel_maps(voxels), "
                             f"from the module that is called with them") from None


def _batch_column(voxels: Voxels) -> jax.Array:
    coords = voxels.coords
    if isinstance(coords, jax.Array):
        return coords[:, 0].astype(np.int32)
    return svj._to_jax(coords)[:, 0].astype(np.int32)  # NumPy copied onto the default device, CuPy zero-copy


def _check_concrete(voxels) -> None:
    if not isinstance(voxels, Voxels) or isinstance(voxels.coords, jax.core.Tracer):
        raise ValueError(f"kernel maps are built from concrete Voxels outside jit (they decide shapes), got "
                         f"{type(voxels).__name__}" + (" with traced coords" if isinstance(voxels, Voxels) else ""))


def level_maps(voxels: Voxels, *modules, output_voxels: Voxels | None = None, bucket: bool = False) -> LevelMaps:
    """Every kernel map that the convolutions inside ``modules`` need on ``voxels`` (call outside ``jit``).

    A module "needs a map" when it has a ``map_key`` and a ``kernel_map(voxels, output_voxels)`` method
    (:class:`~sparsevox.adapters.flax.SparseConv`, :class:`~sparsevox.adapters.flax.SparseDepthwiseConv`);
    layers of one geometry share one map. Maps are cached on ``voxels`` (by the core), so calling this
    again for the same ``voxels`` rebuilds nothing.

    Args:
        voxels: the input sites of those convolutions (``feats`` may be None).
        modules: Flax modules (searched recursively) or single convolution layers.
        output_voxels: the finer sites of the non-generative transposed convolutions among them.
        bucket: round every row and pair count up to a bucket (:func:`sparsevox.adapters.jax.bucket_rows`),
            so scans of similar size share one compiled step: the features must then be padded to
            ``num_sites`` rows (:meth:`LevelMaps.pad`) and the loss masked (:meth:`LevelMaps.mask`).
            Convolutions and batch norms handle the padding (a biased convolution's padding rows hold its
            bias: mask whatever you reduce over rows), as do local and global pooling. Keep the
            returned maps alive while jitted code uses them (they hold the core maps).

    Returns a :class:`LevelMaps`. A transposed layer without ``output_voxels`` is a ``ValueError``.
    """
    _check_concrete(voxels)
    maps = {}
    for module in modules:
        for _, sub in nnx.iter_modules(module) if isinstance(module, nnx.Module) else [((), module)]:
            key = getattr(sub, "map_key", None)
            if key is None or key in maps:
                continue
            if sub.transposed and not sub.generative and output_voxels is None:
                raise ValueError(f"a transposed convolution ({key}) needs output_voxels= (the finer sites it "
                                 f"writes to) to build its kernel map")
            maps[key] = sub.kernel_map(voxels, output_voxels if sub.transposed else None)
    if not bucket:
        return LevelMaps(maps, _batch_column(voxels))
    for key, m in maps.items():
        core = m._core
        maps[key] = svj.JaxKernelMap.bucketed_from_core(core, svj.bucket_rows(core.num_in),
                                                        svj.bucket_rows(core.num_out))
    n = voxels.num_voxels
    batch = jax.numpy.pad(_batch_column(voxels), (0, svj.bucket_rows(n) - n), constant_values=-1)
    return LevelMaps(maps, batch, jax.numpy.asarray(np.int32(n)))


def coarser(voxels: Voxels, kernel_size=2, stride=2) -> Voxels:
    """The output sites of a strided convolution of ``voxels`` (``unique(floor(c / stride))`` per batch
    for ``kernel_size == stride``), without features. Kept with the strided map cached on ``voxels``, so
    asking again returns the same ``Voxels`` and the maps cached on it (nothing is rebuilt)."""
    _check_concrete(voxels)
    core: KernelMap = sv.kernel_map(voxels, kernel_size, stride)
    out = core.derived.get("flax.coarser")
    if out is None:
        out = core.derived["flax.coarser"] = Voxels.from_core_coords(core.out_coords, None, voxels.origin)
    return out
