"""The sparse tensor: ``Voxels(coords, feats)``."""
from __future__ import annotations

import numpy as np

from . import geometry
from ._arrays import Origin, array_module, from_core, library_of, to_core, to_host

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _dtype_name(a) -> str:
    return str(getattr(a, "dtype", "")).replace("torch.", "")


def _hash_device(c):
    """The device operations with which validation checks core coords ``c`` through the GPU kernel-map
    builder's hash insert (:func:`sparsevox.cuda.gpu_kernel_map.hash_table`), or None for NumPy coords
    (host checks on sorted keys). Tests return an emulated device here to run that path on the CPU."""
    if array_module(c) is np:
        return None
    from .cuda import gpu_kernel_map
    return gpu_kernel_map._cupy_device()


def _check_coords(c, xp, voxels) -> None:
    """Range, then uniqueness through the sorted keys (``voxels.sorted_keys()`` when given, so they are
    cached; else computed here)."""
    geometry.check_coord_range(c, xp)
    if voxels is not None:
        keys, _ = voxels.sorted_keys()
    else:
        keys = xp.sort(geometry.pack_keys(c, xp))
    _check_unique(keys, xp)


def _check_unique(keys, xp) -> None:
    """``ValueError`` naming a repeated voxel of the sorted packed ``keys``."""
    if keys.shape[0] > 1:
        dup = keys[1:] == keys[:-1]
        if bool(dup.any()):
            i = int(to_host(xp.nonzero(dup)[0][:1])[0])
            row = to_host(geometry.unpack_keys(keys[i:i + 1], xp))[0].tolist()
            raise ValueError(f"coords must be unique per batch; (batch, x, y, z) = {row} occurs "
                             f"more than once ({int(dup.sum())} duplicate rows in all)")


class Voxels:
    """A batch of sparse voxel grids.

    Args:
        coords: integer array ``[N, 4]``, columns ``(batch, x, y, z)``. Batch in ``[0, 1023]``; x, y, z in
            ``[-131072, 131071]`` (18 bits each, so they pack into one 64-bit key). Unique per batch.
        feats: float array ``[N, C]`` (float16, bfloat16, float32 or float64), row ``i`` belongs to
            ``coords[i]``.

    Both may come from NumPy, CuPy, PyTorch or JAX (anything DLPack speaks) and must live on the same
    device. ``coords``/``feats`` are kept as given, so framework autograd flows through ``feats``.
    Kernel maps built for this geometry are cached on the object (:func:`sparsevox.kernel_map`).
    ``check=False`` skips validating ``coords`` here (shape, dtype, range, uniqueness), for coordinates the
    caller knows are valid; invalid ones still raise the ``ValueError`` when the geometry is first used (a
    kernel map, pooling): on the GPU the map builder's hash checks them, on the CPU the sorted keys do.

    Example:
        >>> v = Voxels(np.array([[0, 0, 0, 0], [0, 1, 0, 0]]), np.ones((2, 8), np.float32))
        >>> v.num_voxels, v.num_channels
        (2, 8)
    """

    def __init__(self, coords, feats, *, check: bool = True):
        if check:  # nested lists (a quick script's input) as NumPy arrays: the library of a list is NumPy's
            # (not with check=False: pytree unflattening builds Voxels of whatever leaves a tree map made)
            coords = np.asarray(coords) if isinstance(coords, (list, tuple)) else coords
            feats = np.asarray(feats) if isinstance(feats, (list, tuple)) else feats
        self.coords = coords
        self.feats = feats
        self._kmaps: dict = {}
        self._core = None  # (core coords int32, origin)
        self._keys = None  # (sorted keys, permutation) built on first use
        self._rows_sorted = False  # rows known to be in key order (outputs of a strided/generative map)
        self._hash = None  # (table, mask): the GPU hash table of the coords, kept by validation for maps
        self._unchecked = not check  # NumPy coords not yet validated: sorted_keys() checks them
        if check:
            self._validate()

    # -- validation -------------------------------------------------------------------------
    def _validate(self) -> None:
        c, origin = self.core_coords()
        if c.ndim != 2 or c.shape[1] != 4:
            raise ValueError(f"coords must have shape [N, 4] (batch, x, y, z), got {tuple(c.shape)}")
        f = self.feats
        if f is not None:
            if len(f.shape) != 2:
                raise ValueError(f"feats must have shape [N, C], got {tuple(f.shape)}")
            if f.shape[0] != c.shape[0]:
                raise ValueError(f"feats has {f.shape[0]} rows but coords has {c.shape[0]}; they must match")
            if _dtype_name(f) not in _FLOAT_DTYPES:
                raise ValueError(f"feats dtype must be one of {_FLOAT_DTYPES}, got {_dtype_name(f)}")
            if library_of(f) != origin.lib:
                raise ValueError(f"coords ({origin.lib}) and feats ({library_of(f)}) must come from one library")
        if c.shape[0] == 0:
            return  # nothing to range-check or compare
        dev = _hash_device(c)
        if dev is not None:
            # GPU: the kernel-map builder's hash insert checks range and uniqueness in one kernel and
            # one 16-byte read; its table is kept for the maps of these voxels (kernel_map()).
            from .cuda import gpu_kernel_map
            table, dup_row, bad_row = gpu_kernel_map.hash_table(dev, c)
            if dup_row == -1 and bad_row == -1:
                self._hash = table
                return
            # error path only: the host checks name the offending voxels exactly as for NumPy coords
            _check_coords(dev.to_host(c), np, None)
            gpu_kernel_map._raise_table_status(dev, c, dup_row, bad_row)  # not reached
            return
        _check_coords(c, array_module(c), self)

    # -- core views ---------------------------------------------------------------------------
    def core_coords(self):
        """``(coords, origin)``: int32 coordinates as a NumPy or CuPy array, and the caller's origin."""
        if self._core is None:
            c, origin = to_core(self.coords)
            if c.dtype.kind not in "iu":
                raise ValueError(f"coords must be an integer array, got dtype {c.dtype}")
            xp = array_module(c)
            if c.ndim == 2 and c.dtype != xp.int32:
                if c.shape[0] and (int(c.max()) > np.iinfo(np.int32).max or int(c.min()) < np.iinfo(np.int32).min):
                    raise ValueError("coords do not fit in int32")
                c = c.astype(xp.int32)
            self._core = (xp.ascontiguousarray(c), origin)
        return self._core

    def sorted_keys(self):
        """``(keys, perm)``: packed keys sorted ascending and the row order that sorts them."""
        if self._keys is None:
            c, _ = self.core_coords()
            xp = array_module(c)
            if self._unchecked and xp is np:  # check=False: the CPU builders and pooling read these keys, and
                self._unchecked = False       # packing wraps out-of-range values: check the coords (their
                try:                          # uniqueness check sorts the keys); the feats are not asked for
                    if c.ndim != 2 or c.shape[1] != 4:
                        raise ValueError(f"coords must have shape [N, 4] (batch, x, y, z), got {tuple(c.shape)}")
                    _check_coords(c, xp, self)
                except ValueError:
                    self._unchecked, self._keys = True, None  # every later use raises it again
                    raise
                return self._keys
            keys = geometry.pack_keys(c, xp)
            if self._rows_sorted:
                self._keys = (keys, xp.arange(c.shape[0], dtype=xp.int32))
            else:
                perm = xp.argsort(keys, kind="stable") if xp is np else xp.argsort(keys)
                self._keys = (keys[perm], perm.astype(xp.int32))
        return self._keys

    @property
    def origin(self) -> Origin:
        return self.core_coords()[1]

    @property
    def num_voxels(self) -> int:
        return int(self.coords.shape[0])

    @property
    def num_channels(self) -> int:
        return int(self.feats.shape[1])

    def replace(self, feats) -> "Voxels":
        """Same geometry (and cached kernel maps), new features."""
        if feats.shape[0] != self.num_voxels:
            raise ValueError(f"feats must have {self.num_voxels} rows, got {feats.shape[0]}")
        out = Voxels(self.coords, feats, check=False)
        out._kmaps, out._core, out._keys, out._rows_sorted = self._kmaps, self._core, self._keys, self._rows_sorted
        out._unchecked = self._unchecked
        out._hash = self._hash
        return out

    @classmethod
    def from_core_coords(cls, coords, feats, origin: Origin, sorted_rows: bool = True) -> "Voxels":
        """Wrap core int32 coords (sorted by key when ``sorted_rows``) and caller-library feats."""
        out = cls(from_core(coords, origin), feats, check=False)
        out._core, out._unchecked = (coords, origin), False  # sparsevox made them
        out._rows_sorted = sorted_rows  # sorted_keys() then skips the argsort (and runs only if asked:
        return out                      # the GPU builder never asks, and packing costs ~14 launches)

    # -- batches, and combining features of one geometry --------------------------------------
    @property
    def batch_size(self) -> int:
        """Largest batch index + 1 (0 when there are no voxels): the B of ``global_pool``/``to_dense``."""
        c, _ = self.core_coords()
        return int(c[:, 0].max()) + 1 if c.shape[0] else 0

    def batch_index(self):
        """int32 ``[N]``: the batch index of each row, in the caller's array library."""
        c, origin = self.core_coords()
        return from_core(array_module(c).ascontiguousarray(c[:, 0]), origin)

    def batch_offsets(self):
        """int64 ``[B + 1]`` in the caller's library: the rows of batch item ``b`` are
        ``offsets[b]:offsets[b + 1]`` (empty for an item with no voxels). Needs rows sorted by batch
        index (true of every ``Voxels`` sparsevox makes: ``from_points``, strided layers, pooling);
        ``ValueError`` otherwise (use :meth:`batch_index` then)."""
        c, origin = self.core_coords()
        xp = array_module(c)
        b = c[:, 0].astype(xp.int64)
        if b.shape[0] > 1 and bool((b[1:] < b[:-1]).any()):
            raise ValueError("batch_offsets needs rows sorted by batch index; these are not "
                             "(use batch_index() for unsorted rows)")
        n_b = self.batch_size
        off = xp.searchsorted(b, xp.arange(n_b + 1, dtype=xp.int64), side="left").astype(xp.int64)
        return from_core(off, origin)

    def same_geometry(self, other: "Voxels", what: str = "voxels") -> None:
        """``ValueError`` naming the difference unless ``other`` has the same coords, row for row (the
        same coords object, or equal values)."""
        if not isinstance(other, Voxels):
            raise ValueError(f"{what}: expected sparsevox.Voxels, got {type(other).__name__}")
        if other.coords is self.coords or (self._core is not None and other._core is self._core):
            return
        a, oa = self.core_coords()
        b, ob = other.core_coords()
        if oa.on_gpu != ob.on_gpu or oa.lib != ob.lib:
            raise ValueError(f"{what}: one geometry needs one library and device, got {oa.lib} "
                             f"({'GPU' if oa.on_gpu else 'CPU'}) and {ob.lib} ({'GPU' if ob.on_gpu else 'CPU'})")
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"{what}: different geometry: {a.shape[0]} voxels vs {b.shape[0]}")
        xp = array_module(a)
        diff = (a != b).any(axis=1)
        if bool(diff.any()):
            i = int(to_host(xp.nonzero(diff)[0][:1])[0])
            raise ValueError(f"{what}: different geometry: row {i} is {to_host(a[i]).tolist()} vs "
                             f"{to_host(b[i]).tolist()} ({int(diff.sum())} rows differ; the rows must "
                             f"match one to one, in the same order)")

    @staticmethod
    def cat(*voxels: "Voxels") -> "Voxels":
        """Concatenate features along channels: ``Voxels`` with feats ``[N, C_1 + ... + C_k]`` on the
        first one's geometry. All must share one geometry (same coords row for row) and one feats dtype,
        else ``ValueError``. Uses the caller's library (differentiable in torch and JAX)."""
        if len(voxels) == 1 and isinstance(voxels[0], (list, tuple)):
            voxels = tuple(voxels[0])
        if not voxels:
            raise ValueError("Voxels.cat needs at least one Voxels")
        first = voxels[0]
        for i, v in enumerate(voxels[1:], 1):
            first.same_geometry(v, f"Voxels.cat argument {i}")
        feats = [v.feats for v in voxels]
        dts = {_dtype_name(f) for f in feats}
        if len(dts) > 1:
            raise ValueError(f"Voxels.cat: feats dtypes differ ({sorted(dts)}); cast them to one first")
        return first.replace(_concat_channels(feats, first.origin.lib))

    def __add__(self, other):
        """Element-wise sum of the features of two ``Voxels`` of one geometry (a residual connection)."""
        if not isinstance(other, Voxels):
            return NotImplemented
        self.same_geometry(other, "Voxels + Voxels")
        if tuple(self.feats.shape) != tuple(other.feats.shape):
            raise ValueError(f"Voxels + Voxels: feats shapes differ: {tuple(self.feats.shape)} vs "
                             f"{tuple(other.feats.shape)}")
        if _dtype_name(self.feats) != _dtype_name(other.feats):
            raise ValueError(f"Voxels + Voxels: feats dtypes differ: {_dtype_name(self.feats)} vs "
                             f"{_dtype_name(other.feats)}")
        return self.replace(self.feats + other.feats)

    def __repr__(self) -> str:
        f = self.feats
        return (f"Voxels(num_voxels={self.num_voxels}, channels={None if f is None else f.shape[1]}, "
                f"dtype={_dtype_name(f) if f is not None else None}, lib={self.origin.lib})")

    # -- construction from points -------------------------------------------------------------
    @classmethod
    def from_points(cls, points, voxel_size, batch=None, reduction: str = "mean", features=None) -> "Voxels":
        """Voxelise a point cloud.

        Args:
            points: float array ``[P, 3 + F]``: x, y, z and F feature columns (F may be 0).
            voxel_size: float or 3 floats, > 0; voxel coordinates are ``floor(xyz / voxel_size)``.
            batch: optional int array ``[P]`` of batch indices in ``[0, 1023]`` (default all 0).
            reduction: how features of the points in one voxel combine: ``"mean"``, ``"max"`` or ``"sum"``.
            features: optional ``[P, F]`` features used instead of ``points[:, 3:]``. When there are no
                feature columns at all, each voxel gets one feature: its point count (for "sum") or 1.

        Returns ``Voxels`` with coords sorted by (batch, x, y, z), in the caller's array library.
        """
        if reduction not in ("mean", "max", "sum"):
            raise ValueError(f"reduction must be 'mean', 'max' or 'sum', got {reduction!r}")
        p, origin = to_core(points)
        xp = array_module(p)
        if p.ndim != 2 or p.shape[1] < 3:
            raise ValueError(f"points must have shape [P, 3 + F], got {tuple(p.shape)}")
        size = geometry.voxel_size3(voxel_size)
        xyz = p[:, :3].astype(xp.float64)
        if not bool(xp.isfinite(xyz).all()):
            raise ValueError("points: x, y, z must be finite (found NaN or inf)")
        feats = p[:, 3:] if features is None else to_core(features)[0]
        if feats.ndim != 2 or feats.shape[0] != p.shape[0]:
            raise ValueError(f"features must have shape [P={p.shape[0]}, F], got {tuple(feats.shape)}")
        if batch is not None:
            b = to_core(batch)[0]
            if b.ndim == 0 and b.dtype.kind in "iu":  # one batch index for every point
                b = xp.full(p.shape[0], int(b), dtype=b.dtype)
                batch = b
            if b.ndim != 1 or b.shape[0] != p.shape[0] or b.dtype.kind not in "iu":
                raise ValueError(f"batch must be an integer array of shape [P={p.shape[0]}], got {b.dtype} "
                                 f"{tuple(b.shape)}")
        if feats.shape[1] == 0:
            feats = xp.ones((p.shape[0], 1), dtype=xp.float32)
        n = p.shape[0]
        coords = xp.empty((n, 4), dtype=xp.int64)
        coords[:, 0] = 0 if batch is None else to_core(batch)[0].astype(xp.int64)
        coords[:, 1:] = xp.floor(xyz / xp.asarray(size)).astype(xp.int64)
        geometry.check_coord_range(coords, xp, what="voxel coordinates of points")
        keys = geometry.pack_keys(coords, xp)
        ukeys, inverse = xp.unique(keys, return_inverse=True)
        inverse = inverse.reshape(-1)
        m = ukeys.shape[0]
        acc_dtype = xp.float64 if feats.dtype == xp.float64 else xp.float32
        f = feats.astype(acc_dtype)
        scatter = _scatter_ops(xp)
        if reduction == "max":
            out = xp.full((m, f.shape[1]), -xp.inf, dtype=acc_dtype)
            scatter["max"](out, inverse, f)
        else:
            out = xp.zeros((m, f.shape[1]), dtype=acc_dtype)
            scatter["add"](out, inverse, f)
            if reduction == "mean":
                counts = xp.zeros(m, dtype=acc_dtype)
                scatter["add"](counts, inverse, xp.ones(n, dtype=acc_dtype))
                out /= counts[:, None]
        out = out.astype(feats.dtype) if feats.dtype.kind == "f" else out
        ucoords = geometry.unpack_keys(ukeys, xp)
        v = cls(from_core(ucoords, origin), from_core(out, origin), check=False)
        v._unchecked = False  # range-checked above, unique by construction
        return v


def _concat_channels(feats, lib: str):
    """``feats`` (arrays of one library) joined along axis 1 by that library (so autograd sees it)."""
    if lib == "torch":
        import torch
        return torch.cat(feats, dim=1)
    if lib == "jax":
        import jax.numpy as jnp
        return jnp.concatenate(feats, axis=1)
    if lib == "cupy":
        from ._arrays import import_cupy
        cp = import_cupy()
        if feats[0].dtype.itemsize == 2:  # move 16-bit floats as bits: not every CuPy copies bfloat16
            return cp.concatenate([f.view(cp.uint16) for f in feats], axis=1).view(feats[0].dtype)
        return cp.concatenate(feats, axis=1)
    return np.concatenate(feats, axis=1)


def _scatter_ops(xp):
    if xp is np:
        return {"add": np.add.at, "max": np.maximum.at}
    import cupyx
    return {"add": cupyx.scatter_add, "max": cupyx.scatter_max}
