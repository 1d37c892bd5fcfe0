"""Kernel maps: for each kernel offset, the (input row, output row) pairs it connects, in CSR form.

The builder here is written once against the array module ``xp`` (NumPy on the CPU, CuPy on the GPU):
sorted packed keys and ``searchsorted`` instead of a Python loop over voxels. A GPU backend may register
a faster builder (a hash table) through :data:`BUILDERS`; it must return the same map.

Canonical order: pairs are grouped by offset index ``k`` and, within an offset, sorted by output row.
Output coordinates of strided and generative layers are sorted by (batch, x, y, z).
"""
from __future__ import annotations

import weakref

import numpy as np

from . import geometry
from ._arrays import array_module, data_ptr, to_host
from .map_plan import _RUN as _PLAN_RUN


class KernelMap:
    """Pairs of a sparse convolution.

    Attributes:
        in_maps, out_maps: int32 ``[L]`` on the data's device; pair ``j`` adds ``feats[in_maps[j]] @ W[k]``
            into ``out[out_maps[j]]`` for ``offsets[k] <= j < offsets[k+1]``.
        offsets: int32 ``[K + 1]`` on the data's device.
        offsets_host: the same offsets as a NumPy int64 array (sizes of the per-offset GEMMs).
        num_in, num_out: row counts of input and output.
        out_coords: int32 ``[num_out, 4]`` core array (NumPy/CuPy) of the output sites.
        dense_nbr: optional int32 ``[K, num_out]`` on the data's device, ``dense_nbr[k, out]`` = the
            input row paired with ``out`` by offset ``k``, or -1 (the GPU builder's query table, reused
            as the implicit GEMM's forward neighbour table); None when the builder did not make it, and
            once the implicit GEMM has dropped it (its launches on the map read sorted copies only: then
            ``offsets``, which shared its allocation, is replaced by a copy).

    A GPU map is returned as soon as its kernels are queued (``ready`` False): the pair count is on the
    device until something needs it. The first read of ``in_maps``, ``out_maps``, ``offsets_host`` or
    ``num_pairs`` (every convolution reads them), or :meth:`wait`, waits for the kernels and takes the
    pairs into exact-size arrays. That is also where coordinates that skipped validation
    (``Voxels(..., check=False)``) raise their ``ValueError`` (duplicate or out-of-range voxel), on
    every use of the map until then, never a silently wrong convolution. ``offsets``, ``dense_nbr``,
    ``out_coords`` and the sizes are usable at once.
    """

    def __init__(self, in_maps, out_maps, offsets, offsets_host, num_in: int, num_out: int, out_coords,
                 kernel_size: tuple = (1, 1, 1), stride: tuple = (1, 1, 1), dilation: tuple = (1, 1, 1),
                 kind: str = "submanifold", dense_nbr=None, derived: dict | None = None, pending=None):
        self._in_maps, self._out_maps, self._offsets_host = in_maps, out_maps, offsets_host
        # pending(): (in_maps, out_maps, offsets_host) once the builder's kernels are done; raises the
        # ValueError of bad coordinates (and stays pending, so every later use raises it too)
        self._pending = pending
        self.offsets, self.num_in, self.num_out, self.out_coords = offsets, num_in, num_out, out_coords
        self.kernel_size, self.stride, self.dilation, self.kind = kernel_size, stride, dilation, kind
        self.dense_nbr = dense_nbr
        self.derived = {} if derived is None else derived  # algorithm-specific views (reverse map, masks)

    @property
    def ready(self) -> bool:
        """Whether the CSR arrays exist (False for a GPU map whose kernels may still be running)."""
        return self._pending is None

    def wait(self) -> "KernelMap":
        """Wait for an asynchronously built map and take its pairs (a no-op once ready); returns self.

        Raises ``ValueError`` for duplicate or out-of-range voxels among unvalidated coordinates."""
        pending = self._pending
        if pending is not None:
            self._in_maps, self._out_maps, self._offsets_host = pending()
            self._pending = None
            _remember(self)
        return self

    @property
    def in_maps(self):
        return self.wait()._in_maps if self._pending is not None else self._in_maps

    @property
    def out_maps(self):
        return self.wait()._out_maps if self._pending is not None else self._out_maps

    @property
    def offsets_host(self) -> np.ndarray:
        return self.wait()._offsets_host if self._pending is not None else self._offsets_host

    @property
    def num_offsets(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def num_pairs(self) -> int:
        return int(self.offsets_host[-1])

    def __iter__(self):  # lets ``in_maps, out_maps, offsets = kmap`` work
        return iter((self.in_maps, self.out_maps, self.offsets))

    def __repr__(self) -> str:
        pairs = self.num_pairs if self.ready else "pending"
        return (f"KernelMap(kind={self.kind!r}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"dilation={self.dilation}, num_in={self.num_in}, num_out={self.num_out}, pairs={pairs})")


def _lookup(sorted_keys, perm, query_keys, valid, xp):
    """Row index of each query key in a sorted key set, or -1 when absent or not ``valid``."""
    n = sorted_keys.shape[0]
    if n == 0:
        return xp.full(query_keys.shape, -1, dtype=xp.int32)
    pos = xp.searchsorted(sorted_keys, query_keys)
    pos = xp.minimum(pos, n - 1)
    hit = (sorted_keys[pos] == query_keys) & valid
    return xp.where(hit, perm[pos], -1).astype(xp.int32)


def _linear_keys(coords, xp):
    """Packed keys of int64 ``[N, 4]`` rows computed as a linear form (mod 2^64).

    The key is linear in the coordinates, so ``key(c + off) = key(c) + key_delta(off)`` exactly for
    every pair that lands in range; out-of-range rows are masked by the caller."""
    c = coords.astype(xp.int64)
    bits = geometry.COORD_BITS
    key = c[:, 0] << (3 * bits)
    for axis, shift in ((1, 2 * bits), (2, bits), (3, 0)):
        key = key + ((c[:, axis] - geometry.COORD_MIN) << shift)
    return key.view(xp.uint64)


def _query(keys_perm, base, off, xp):
    """Rows of ``base + off_k`` (base int64 ``[N, 4]``, off ``[K, 3]``) in a sorted key set → ``[K, N]``, -1 if absent."""
    sorted_keys, perm = keys_perm
    bits = geometry.COORD_BITS
    off = np.asarray(off, dtype=np.int64)
    delta = (off[:, 0] << (2 * bits)) + (off[:, 1] << bits) + off[:, 2]
    keys = _linear_keys(base, xp)[None, :] + xp.asarray(delta.view(np.uint64))[:, None]
    valid = xp.ones(keys.shape, dtype=bool)
    if base.shape[0]:
        lo, hi = to_host(base[:, 1:].min(axis=0)), to_host(base[:, 1:].max(axis=0))
        for a in range(3):  # only axes whose shifted range can leave the packable box need a mask
            if lo[a] + off[:, a].min() < geometry.COORD_MIN or hi[a] + off[:, a].max() > geometry.COORD_MAX:
                v = base[None, :, a + 1] + xp.asarray(off[:, a])[:, None]
                valid &= (v >= geometry.COORD_MIN) & (v <= geometry.COORD_MAX)
    return _lookup(sorted_keys, perm, keys, valid, xp)


def _scaled(coords, stride, xp):
    """``[N, 4]`` int64 rows with x, y, z multiplied by the stride."""
    c = coords.astype(xp.int64)
    if tuple(stride) != (1, 1, 1):
        c[:, 1:] *= xp.asarray(stride, dtype=xp.int64)
    return c


def _sorted(coords, xp):
    keys = geometry.pack_keys(coords, xp)
    perm = xp.argsort(keys)
    return keys[perm], perm.astype(xp.int32)


def _csr(rows_in, rows_out, xp, out_sorted):
    """``[K, N]`` candidate in/out rows (-1 = no pair) → CSR arrays sorted by (k, out).

    ``out_sorted``: rows_out already increases along each k row (row-major selection keeps it)."""
    k_count = rows_in.shape[0]
    hit = (rows_in >= 0) & (rows_out >= 0)
    counts = hit.sum(axis=1)
    offsets = xp.zeros(k_count + 1, dtype=xp.int64)
    offsets[1:] = xp.cumsum(counts)
    k_idx = None if out_sorted else xp.broadcast_to(xp.arange(k_count)[:, None], rows_in.shape)[hit]
    ins, outs = rows_in[hit], rows_out[hit]
    if not out_sorted and ins.shape[0]:
        order = xp.lexsort(xp.stack([outs, k_idx]))
        ins, outs = ins[order], outs[order]
    return ins.astype(xp.int32), outs.astype(xp.int32), offsets


def check_kind(transposed: bool, generative: bool, has_output: bool) -> None:
    """The argument rules every builder relies on (checked once, in :func:`kernel_map`)."""
    if generative and not transposed:
        raise ValueError("generative=True is a transposed convolution that creates its output sites; "
                         "pass transposed=True with it")
    if generative and has_output:
        raise ValueError("output_voxels must be None when generative=True (the outputs are generated)")
    if transposed and not generative and not has_output:
        raise ValueError("a transposed convolution needs output_voxels (usually the finer Voxels saved "
                         "from the matching strided layer), or generative=True")


def build_kernel_map(coords, sorted_in, kernel_size, stride, dilation, transposed, generative,
                     out_coords=None) -> KernelMap:
    """Build the map for core int32 coordinates (NumPy or CuPy), arguments already checked by
    :func:`check_kind`. See :func:`sparsevox.kernel_map`."""
    xp = array_module(coords)
    ks = geometry.triple(kernel_size, "kernel_size")
    st = geometry.triple(stride, "stride")
    dl = geometry.triple(dilation, "dilation")
    off = geometry.kernel_offsets(ks, dl)
    n_in = coords.shape[0]
    if transposed:
        kind = "generative" if generative else "transposed"
        if generative:
            c = coords.astype(xp.int64)
            cand = xp.concatenate([xp.broadcast_to(c[None, :, :1], (len(off),) + c[:, :1].shape),
                                   c[None, :, 1:] * xp.asarray(st) + xp.asarray(off)[:, None, :]], 2).reshape(-1, 4)
            if cand.shape[0]:
                geometry.check_coord_range(cand, xp, what="generated output coordinates")
            out_coords = geometry.unpack_keys(xp.unique(geometry.pack_keys(cand, xp)), xp)
        # out = s * in + off: look up every (offset, input) candidate among the output sites.
        rows_out = _query(_sorted(out_coords, xp), _scaled(coords, st, xp), off, xp)
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
        rows_in = _query(sorted_in, _scaled(out_coords, st, xp), off, xp)
        rows_out = xp.broadcast_to(xp.arange(out_coords.shape[0], dtype=xp.int32)[None, :], rows_in.shape)
    ins, outs, offsets = _csr(rows_in, rows_out, xp, out_sorted=not transposed)
    return KernelMap(ins, outs, offsets.astype(xp.int32), to_host(offsets).astype(np.int64), n_in,
                     int(out_coords.shape[0]), xp.ascontiguousarray(out_coords.astype(xp.int32)),
                     ks, st, dl, kind)


def _strided_twin(out_v, coords, ks, st, dl):
    """The strided map from ``out_v``'s sites (cached on it) whose output sites are ``coords`` (the same
    array: the coarse level that map made), or None. A transposed layer back onto ``out_v`` has exactly
    its pairs, input and output swapped, at the same offsets: ``fine = s * coarse + offset_k`` both ways."""
    if out_v is None:
        return None
    entry = out_v._kmaps.get((ks, st, dl, False, False, None))
    if entry is None or entry[0].out_coords is not coords or entry[0].kind != "strided":
        return None
    return entry[0]


def _swapped(twin: KernelMap, out_coords, ks, st, dl) -> KernelMap:
    """The transposed map of a strided ``twin`` without a build: its arrays, input and output swapped
    (pending while the twin is: the twin's first use waits, and raises what it raises). ``out_coords``:
    the twin's input sites."""
    pending = None if twin.ready else (lambda: (twin.out_maps, twin.in_maps, twin.offsets_host))
    kmap = KernelMap(twin._out_maps, twin._in_maps, twin.offsets, twin._offsets_host, twin.num_out, twin.num_in,
                     out_coords, ks, st, dl, "transposed", pending=pending)
    kmap.swapped_from = twin  # algorithms share derived tables: this map's forward one is the twin's reverse
    # and the twin can find it (weakly) when it replaces the offsets they share (implicit_gemm._release_unsorted)
    twin.derived.setdefault("swapped_to", weakref.WeakSet()).add(kmap)
    if kmap.ready:
        _remember(kmap)
    return kmap


# Maps handed to a framework travel as bare arrays; this table finds the KernelMap object again (with
# its algorithm-derived caches) from the arrays' addresses, as long as the map is alive.
_live: "weakref.WeakValueDictionary[tuple, KernelMap]" = weakref.WeakValueDictionary()


def _remember(kmap: KernelMap) -> None:
    _live[(data_ptr(kmap.in_maps), data_ptr(kmap.out_maps), kmap.in_maps.shape[0])] = kmap


# How often recall() found the live map, and how often it had to wrap the arrays in a new KernelMap
# (whose derived tables are then rebuilt: a miss on every call means a framework copies the map).
recall_stats = {"hits": 0, "misses": 0}


def live_map(in_ptr: int, out_ptr: int, length: int, num_in: int, num_out: int) -> KernelMap | None:
    """The live :class:`KernelMap` whose index arrays start at these device (or host) addresses, or None.

    Empty maps are never matched: their arrays share address 0 whatever their offsets."""
    if length == 0:
        return None
    kmap = _live.get((in_ptr, out_ptr, length))
    if kmap is not None and kmap.num_in == num_in and kmap.num_out == num_out:
        recall_stats["hits"] += 1
        return kmap
    return None


def recall(in_maps, out_maps, offsets_host, num_in: int, num_out: int) -> KernelMap:
    """The live :class:`KernelMap` whose arrays these are, or a new one wrapping them (core arrays)."""
    kmap = live_map(data_ptr(in_maps), data_ptr(out_maps), in_maps.shape[0], num_in, num_out)
    if kmap is not None:
        return kmap
    recall_stats["misses"] += 1
    xp = array_module(in_maps)
    host = np.asarray(offsets_host, dtype=np.int64)
    if host.ndim != 1 or host.shape[0] < 1 or host[0] != 0 or np.any(np.diff(host) < 0) \
            or host[-1] != in_maps.shape[0]:
        raise ValueError("kernel map offsets must be non-decreasing from 0 to len(in_maps)")
    _check_pairs(in_maps, out_maps, num_in, num_out, xp)
    return KernelMap(in_maps, out_maps, xp.asarray(host.astype(np.int32)), host, num_in, num_out, None)


def _check_pairs(in_maps, out_maps, num_in: int, num_out: int, xp) -> None:
    """A map given as bare arrays (not made by sparsevox): 1-D integer arrays of one length whose rows lie in
    ``[0, num_in)`` / ``[0, num_out)`` (else the kernels would read or write outside the features). One
    reduction and, on the GPU, one read of the device, paid only when a map is wrapped anew."""
    for name, a in (("in_maps", in_maps), ("out_maps", out_maps)):
        if a.ndim != 1 or a.dtype.kind not in "iu":
            raise ValueError(f"{name} must be a 1-D integer array, got shape {tuple(a.shape)} and dtype {a.dtype}")
    if in_maps.shape[0] != out_maps.shape[0]:
        raise ValueError(f"in_maps and out_maps must have one length, got {in_maps.shape[0]} and {out_maps.shape[0]}")
    if int(num_in) < 0 or int(num_out) < 0:
        raise ValueError(f"num_in and num_out must be >= 0, got {num_in} and {num_out}")
    if in_maps.shape[0] == 0:
        return
    lo_in, hi_in, lo_out, hi_out = (int(v) for v in to_host(xp.stack(
        [in_maps.min(), in_maps.max(), out_maps.min(), out_maps.max()]).astype(xp.int64)))
    if lo_in < 0 or hi_in >= num_in:
        raise ValueError(f"in_maps must hold rows in [0, num_in={num_in}), got values in [{lo_in}, {hi_in}]")
    if lo_out < 0 or hi_out >= num_out:
        raise ValueError(f"out_maps must hold rows in [0, num_out={num_out}), got values in [{lo_out}, {hi_out}]")


# A GPU backend may replace the builder for CuPy arrays: {"cupy": callable with build_kernel_map's signature}.
BUILDERS: dict = {}


def kernel_map(voxels, kernel_size=3, stride=1, dilation=1, transposed=False, generative=False,
               output_voxels=None) -> KernelMap:
    run = _PLAN_RUN.get()  # inside a MapPlan's forward (sparsevox.map_plan): it builds ahead and records
    if run is not None and output_voxels is None and not transposed and not generative:
        return run.kernel_map(voxels, kernel_size, stride, dilation)
    return _kernel_map(voxels, kernel_size, stride, dilation, transposed, generative, output_voxels)


def _kernel_map(voxels, kernel_size=3, stride=1, dilation=1, transposed=False, generative=False,
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
    # A layer passes the same arguments on every call: find its map by them as given, before normalising
    # them (~3 µs), under a key of their values and geometry types (3.0 == 3 and True == 1, but triple()
    # rejects floats and bools). Aliases live in the same dict as the maps, so they share its lifetime.
    raw = None
    if output_voxels is None:
        raw = (kernel_size, stride, dilation, transposed, generative,
               type(kernel_size), type(stride), type(dilation))
        try:
            cached = voxels._kmaps.get(raw)
        except TypeError:  # an unhashable argument (a list): the normalised key only
            cached = raw = None
        except AttributeError:  # not a Voxels: the check below names it
            cached = None
        if cached is not None:
            return cached[0]
    from .voxels import Voxels  # (an import statement costs ~1.5 µs per call: only past the cache)
    if not isinstance(voxels, Voxels):
        raise ValueError(f"voxels must be a sparsevox.Voxels, got {type(voxels).__name__}")
    ks = geometry.triple(kernel_size, "kernel_size")
    st = geometry.triple(stride, "stride")
    dl = geometry.triple(dilation, "dilation")
    check_kind(transposed, generative, output_voxels is not None)
    out_v = None
    if output_voxels is not None:
        out_v = output_voxels if isinstance(output_voxels, Voxels) else Voxels(output_voxels, None)
        if out_v._unchecked and array_module(out_v.core_coords()[0]) is np:
            out_v.sorted_keys()  # check=False output sites on the CPU: checked as the input's are (raises)
    # Entries for given output sites hold them weakly and check identity (a dead one's id may come back):
    # a strong reference made a cycle (fine level -> strided map's coarse sites -> transposed map -> fine
    # level) that only the cyclic GC frees, holding a step's maps in GPU memory until it runs.
    key = (ks, st, dl, bool(transposed), bool(generative), None if out_v is None else id(out_v))
    cached = voxels._kmaps.get(key)
    if cached is not None and (out_v is None or cached[1]() is out_v):
        if raw is not None:
            voxels._kmaps[raw] = cached
        return cached[0]
    coords, origin = voxels.core_coords()
    twin = _strided_twin(out_v, coords, ks, st, dl) if transposed and not generative else None
    if twin is not None:
        kmap = _swapped(twin, out_v.core_coords()[0], ks, st, dl)
        _drop_dead(voxels._kmaps)
        voxels._kmaps[key] = (kmap, weakref.ref(out_v))
        return kmap
    out_coords = None
    if out_v is not None:
        out_coords, out_origin = out_v.core_coords()
        if out_origin.on_gpu != origin.on_gpu:
            raise ValueError("output_voxels must be on the same device as voxels")
    xp = array_module(coords)
    if xp is not np and "cupy" not in BUILDERS:
        from .cuda import gpu_kernel_map  # noqa: F401  (registers the hash-table builder as BUILDERS["cupy"])
    builder = BUILDERS.get("cupy" if xp is not np else "numpy", build_kernel_map)
    # a builder that does not read the sorted keys (the GPU hash table) spares their argsort
    sorted_in = voxels.sorted_keys() if getattr(builder, "needs_sorted_keys", True) else None
    # a builder that takes a hash table (the GPU one) reuses the one Voxels validation built
    extra = {"table": getattr(voxels, "_hash", None)} if getattr(builder, "takes_table", False) else {}
    kmap = builder(coords, sorted_in, ks, st, dl, transposed, generative, out_coords, **extra)
    if kmap.ready:  # a pending map remembers itself once its arrays exist
        _remember(kmap)
    if out_v is not None:
        _drop_dead(voxels._kmaps)
    voxels._kmaps[key] = (kmap, None if out_v is None else weakref.ref(out_v))
    if raw is not None:
        voxels._kmaps[raw] = voxels._kmaps[key]
    return kmap


kernel_map.__doc__ = _kernel_map.__doc__


def _drop_dead(kmaps: dict) -> None:
    """Drop the entries of a ``Voxels``' map cache whose given output sites have died (their maps with
    them): a layer given new sites every call (a coords array) would otherwise grow the cache until the
    input ``Voxels`` dies. Called before each insertion of such an entry (the dicts hold ~10 entries)."""
    refs = ((k, v[1] if isinstance(v, tuple) else v) for k, v in kmaps.items())
    dead = [k for k, ref in refs if ref is not None and ref() is None]
    for k in dead:
        del kmaps[k]


def strided_output_voxels(voxels, kernel_size=2, stride=2, dilation=1):
    """The output sites of the strided map ``kernel_map(voxels, kernel_size, stride, dilation)`` (built
    now unless cached) as feature-less ``Voxels`` in ``voxels``' array library, ``[M, 4]`` coords.

    The map is also cached as the one for those sites given as ``output_voxels``, so the strided layer
    called with or without ``output_voxels=`` the result reuses it, its output shares the result's cached
    maps (while the result lives), and
    the transposed layer back onto ``voxels`` is the map swapped. A network can so build every level's
    maps before its first layer (``MinkUNet.build_maps``): the host then waits for each map's pair counts
    while the device has only map work queued, not in the middle of the layers, where each wait drained
    the convolutions queued before it. The caller keeps the result alive (the cache holds it weakly);
    while it lives, later calls return the same object."""
    from .voxels import Voxels
    kmap = kernel_map(voxels, kernel_size, stride, dilation)
    if kmap.kind != "strided":
        raise ValueError(f"stride must make a strided map (some stride > 1), got stride={stride}")
    ks, st, dl = (geometry.triple(a, n) for a, n in ((kernel_size, "kernel_size"), (stride, "stride"),
                                                       (dilation, "dilation")))
    memo = voxels._kmaps.get(("sites", ks, st, dl))  # the same sites (and their maps) while they live
    out = memo() if memo is not None else None
    if out is None:
        _drop_dead(voxels._kmaps)
        out = Voxels.from_core_coords(kmap.out_coords, None, voxels.core_coords()[1])
        voxels._kmaps[(ks, st, dl, False, False, id(out))] = (kmap, weakref.ref(out))
        voxels._kmaps[("sites", ks, st, dl)] = weakref.ref(out)
        kmap.derived["sites"] = weakref.ref(out)  # the strided layer's output shares them (output_voxels_of)
    return out
