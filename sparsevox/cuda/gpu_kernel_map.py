"""Kernel maps on the GPU: a hash table of the input voxels, queried once per (offset, output row).

Registered as ``kernel_map.BUILDERS["cupy"]`` when imported (``kernel_map.kernel_map`` imports this
module the first time it sees CuPy coordinates). It returns exactly the map of the NumPy builder
(:func:`sparsevox.kernel_map.build_kernel_map`): the same output sites in the same order and the same
pairs in the canonical order (by offset ``k``, then by output row).

How (kernels in ``kernels_cu/kernel_map.cu``, table in ``kernels_cu/common/hash.cuh``):

1. Output sites: submanifold reuses the input rows; strided outputs are the sorted unique keys of
   ``floor(c / s)``; generated outputs the sorted unique keys of ``s * c + off_k`` (GPU sort).
2. The input voxels go into an open-addressing table (packed 64-bit keys, value = row). A key seen
   twice is a duplicate voxel: ``ValueError`` naming it.
3. ``kmap_probe`` looks up every (k, output row m) and writes ``cand[k, m]`` = the input row or -1
   (kept as :attr:`KernelMap.dense_nbr`, the forward neighbour table of the implicit GEMM).
   Non-transposed: ``in = s * out + off_k``; transposed: ``out = s * in + off_k``, so
   ``in = (out - off_k) / s`` where every axis divides exactly — a gather from the output side, hence
   the canonical order for free. Submanifold maps of odd kernel sizes (every axis) probe only the
   offsets before the centre: offsets are symmetric (``off_{K-1-k} = -off_k``, the centre is 0), so
   pair ``(k, out m, in j)`` exists iff ``(K-1-k, out j, in m)`` does; a probe of ``k < K // 2`` also
   scatters ``cand[K-1-k, j] = m`` for its hits, and the centre row is ``cand[k, m] = m``: 13 probes
   per row instead of 27 for k3, and the same map. cand's mirrored rows must start at -1: the insert
   kernel sets them (with a prebuilt table, the memset of the map's own scan state covers them).
4. ``kmap_compact`` makes the CSR pairs in one pass over tiles of (k, 4096 output rows: 256 threads x
   ``ITEMS`` = 16 rows each; a tile never straddles two offsets), taken in canonical order by an atomic
   ticket. Each tile publishes its hit count at once (its tile word, and added to its offset's total),
   finds its base as the totals of the earlier offsets plus a decoupled look-back over the earlier
   tiles of its own offset, and writes its pairs at their final positions (ranked in row order) in
   upper-bound buffers (``K * M`` each), plus ``offsets`` and the info row (sizes and status words),
   which it stores straight into pinned host memory (mapped into the device's address space). The ticket,
   tile words and totals share the table's allocation, so the table's memset resets them; with a
   prebuilt table (below) they follow ``offsets`` in the map's own allocation (symmetric SubM, reset by
   the memset of cand's mirrored rows) or get a small allocation of their own, memset per map. (Probe and
   compaction in one kernel took 52-54 µs for SemanticKITTI: tiles after the centre spin-waited for
   the mirror scatters, and every tile's warps waited behind its look-back.)
5. No synchronisation: the map is returned pending (:attr:`KernelMap.ready` False), with an event after
   its kernels. Its first use (:meth:`KernelMap.wait`, which every read of the CSR arrays calls) waits
   for that event, reads the info row from the pinned buffer, raises the
   insert's status (duplicate or out-of-range voxel of unvalidated coordinates), and moves the first
   ``offsets[K]`` pairs of both buffers into one exact-size allocation (``in_maps`` then ``out_maps``)
   with one 2-D device-to-device copy on the build's stream; the upper-bound buffers then go back to
   CuPy's pool. ``offsets`` and ``dense_nbr`` are device views (consumers call ``wait`` before using
   them, so bad coordinates raise). So a map build costs its launches on the host, and the device time
   of its kernels, which overlaps the host's next work. Until then a map holds its upper-bound buffers
   (8 K M bytes); the table and coordinates its kernels read are held until they are done even when
   the map is dropped first (:func:`sparsevox._arrays.hold_until_done`).
   Parts of the allocations are passed to the kernels as raw addresses (a CuPy slice costs µs of host
   time; a map used about ten).

Per map: one memset, three kernels (insert, probe, compact) and no copy (the K + 3 int64 info row is
written by compact into pinned host memory); at first use one 2-D device-to-device copy; strided and
generative layers add one synchronous device→host copy for the number of output sites. Work runs on
CuPy's current device and stream (see :func:`sparsevox._arrays.on_caller_stream`).

Validation of CuPy ``Voxels`` (:func:`hash_table`) is step 2 alone: one memset, the insert kernel and
one 16-byte device→host read of its two status words (duplicate row, out-of-range row). The table is
kept on the ``Voxels`` and handed back here as ``table=(table, mask)``, so a map of those voxels skips
its own insert: one memset (the scan state; symmetric SubM: with cand's mirrored rows), probe, compact,
then as above.

Set ``SPARSEVOX_GPU_KERNEL_MAP=generic`` to keep the xp-generic builder on CuPy instead (debugging).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading

import numpy as np

from .. import geometry
from . import driver
from .._arrays import hold_until_done, on_device, release_held
from ..kernel_map import BUILDERS, KernelMap
from ..kernel_map import build_kernel_map as _generic_builder

log = logging.getLogger("sparsevox.gpu_kernel_map")

BLOCK = 256  # threads per block of the per-row kernels


def _items(var: str, default: int) -> int:
    value = int(os.environ.get(var, default))
    if not 1 <= value <= 16:
        raise ValueError(f"{var} must be in [1, 16], got {value}")
    return value


# Output rows per thread of a kmap_compact tile (BLOCK * ITEMS rows per tile) and of a kmap_probe block
# (BLOCK * PROBE_ITEMS rows). Read once at import; SPARSEVOX_KMAP_ITEMS and SPARSEVOX_KMAP_PROBE_ITEMS
# (1-16) override them for benchmark sweeps (benchmarks/probes/map_build_sweep.py).
# Measured (SemanticKITTI, H200, map_build_sweep): compact 8.9 µs with 16 items, 10.5 with 8; probe 1-2
# items about equal, 4 and 8 slower (fewer lookups in flight per SM).
ITEMS = _items("SPARSEVOX_KMAP_ITEMS", 16)
PROBE_ITEMS = _items("SPARSEVOX_KMAP_PROBE_ITEMS", 2)
_KERNELS = ("insert", "probe", "compact", "candidate_keys", "unique_heads", "unique_info", "unique_unpack")
_TILED = ("probe", "compact")  # templates also on ITEMS


def kernel_name(name: str, block: int, items: int = ITEMS) -> str:
    """The template instantiation of kernel ``name``: ``kmap_<name><block>``, and for probe and compact
    ``kmap_<name><block, items>``."""
    return f"kmap_{name}<{block}, {items}>" if name in _TILED else f"kmap_{name}<{block}>"


NAME_EXPRESSIONS = tuple(kernel_name(k, BLOCK, PROBE_ITEMS if k == "probe" else ITEMS) for k in _KERNELS)
_INT32_MAX = 2 ** 31 - 1
_EMPTY = -1  # an all-ones status word read as int64
_MAX_PITCH = 2 ** 31 - 1  # cudaDeviceProp.memPitch: the largest pitch cudaMemcpy2D accepts


class CupyDevice:
    """The few device operations the builder needs, on CuPy (tests drive the same builder through a
    NumPy twin that runs the CUDA source on the CPU)."""

    tile_items = ITEMS  # rows per thread of a compact tile (the builder sizes its grid by it)
    probe_items = PROBE_ITEMS  # rows per thread of a probe block

    def __init__(self):
        import cupy
        self.xp = cupy
        self._fns: dict = {}
        self._mapped: dict = {}  # device id -> whether kernels can write pinned host memory directly

    def launch(self, name: str, grid: int, block: int, args: tuple) -> None:
        """Launch kernel ``name`` on the current device and stream, through the driver with a parameter
        buffer kept per kernel (:class:`sparsevox.cuda.driver.Args`: each kernel is launched from one place,
        with the same argument kinds every time)."""
        cupy = self.xp
        dev = cupy.cuda.runtime.getDevice()
        packed = self._fns.get((dev, name, block))
        if packed is None:
            from .cuda_loader import get_function
            items = self.probe_items if name == "probe" else self.tile_items
            fn = get_function("kernel_map", kernel_name(name, block, items), NAME_EXPRESSIONS)
            packed = self._fns[(dev, name, block)] = driver.Args(int(fn.kernel.ptr), args)
        packed.launch(grid, block, cupy.cuda.get_current_stream().ptr, args)

    def fill_ones(self, a, start: int = 0, count: int | None = None) -> None:
        """Set every byte of ``a[start:start + count]`` (1-D; default: to the end) to 0xFF on the current
        stream (EMPTY keys, -1 int32)."""
        cupy = self.xp
        count = a.size - start if count is None else count
        cupy.cuda.runtime.memsetAsync(a.data.ptr + start * a.itemsize, 0xFF, count * a.itemsize,
                                      cupy.cuda.get_current_stream().ptr)

    # The builder addresses parts of its few allocations by offset: a CuPy slice or view costs several
    # µs of host time each (about ten per map), a raw address nothing.
    @staticmethod
    def ptr(a, start: int = 0):
        """Kernel argument: the address of element ``start`` of 1-D ``a``."""
        return a.data.ptr + start * a.itemsize

    def view(self, a, start: int, shape: tuple, dtype):
        """An array of ``shape`` and ``dtype`` on ``a``'s memory from element ``start`` (no copy)."""
        return self.xp.ndarray(shape, dtype=dtype, memptr=a.data + start * a.itemsize)

    def to_host(self, a) -> np.ndarray:
        return a.get()

    def host_buffer(self, nbytes: int):
        """``(address, handle)``: where kernels write ``nbytes`` of results for the host, and the handle
        :meth:`host_result` takes. Pinned host memory, written directly: with unified addressing,
        memory from cudaHostAlloc is mapped into every device's address space at the same address, and
        a kernel storing its few result words there spares a device-to-host copy (whose host call cost
        as much as a launch). A device that cannot map host memory gets a device buffer instead, copied
        into the pinned one by :meth:`host_result`."""
        cupy = self.xp
        mem = cupy.cuda.alloc_pinned_memory(nbytes)
        if self._maps_host():
            return mem.ptr, (mem, None)
        buf = cupy.empty(nbytes, dtype=cupy.uint8)
        return buf.data.ptr, (mem, buf)

    def _maps_host(self) -> bool:
        rt = self.xp.cuda.runtime
        dev = rt.getDevice()
        got = self._mapped.get(dev)
        if got is None:
            got = self._mapped[dev] = bool(rt.deviceGetAttribute(rt.cudaDevAttrUnifiedAddressing, dev)
                                           and rt.deviceGetAttribute(rt.cudaDevAttrCanMapHostMemory, dev))
        return got

    def host_result(self, handle, count: int, dtype) -> "_HostRead":
        """Handle on ``count`` values of ``dtype`` that the kernels queued so far on the current stream
        write at :meth:`host_buffer`'s address (copied to the host first where that is a device buffer):
        an event recorded now; ``.wait()`` gives them as a NumPy array once it is done."""
        cupy = self.xp
        rt = cupy.cuda.runtime
        mem, buf = handle
        stream = cupy.cuda.get_current_stream()
        if buf is not None:
            rt.memcpyAsync(mem.ptr, buf.data.ptr, count * np.dtype(dtype).itemsize, rt.memcpyDeviceToHost,
                           stream.ptr)
        event = cupy.cuda.Event(block=False, disable_timing=True)
        event.record(stream)
        release_held()  # (after the event: nothing the device waits for)
        return _HostRead((mem, buf), event, stream, rt.getDevice(), count, dtype)

    def copy_pairs(self, src, stride: int, n: int, read: "_HostRead | None" = None):
        """``(src[:n], src[stride:stride + n])`` (1-D ``src``) as new exact-size arrays: one allocation
        (the second starting 256-byte aligned, as a separate allocation would), one 2-D device-to-device
        copy (two 1-D copies where ``stride`` exceeds the largest pitch cudaMemcpy2D takes).

        With ``read`` (the map's :meth:`host_result` handle) the copy runs on ``read``'s stream and device,
        where ``src`` was written and will go back to the pool, and the caller's current stream waits for
        it; without, on the current stream."""
        if read is None:
            return self._copy_pairs(src, stride, n)
        cupy = self.xp
        with on_device(read.device):
            caller = cupy.cuda.get_current_stream()
            with read.stream:
                got = self._copy_pairs(src, stride, n)
            if caller.ptr != read.stream.ptr and n:
                caller.wait_event(read.stream.record())
        return got

    def _copy_pairs(self, src, stride: int, n: int):
        cupy = self.xp
        rt = cupy.cuda.runtime
        w = src.itemsize
        pad = -(-n * w // 256) * 256 // w  # the second array's start, in elements
        out = cupy.empty(pad + n, dtype=src.dtype)
        if n:
            stream = cupy.cuda.get_current_stream().ptr
            if stride * w <= _MAX_PITCH:
                rt.memcpy2DAsync(out.data.ptr, pad * w, src.data.ptr, stride * w, n * w, 2,
                                 rt.memcpyDeviceToDevice, stream)
            else:
                for dst, at in ((0, 0), (pad, stride)):
                    rt.memcpyAsync(self.ptr(out, dst), self.ptr(src, at), n * w, rt.memcpyDeviceToDevice, stream)
        return self.view(out, 0, (n,), src.dtype), self.view(out, pad, (n,), src.dtype)


class _HostRead:
    """Values kernels in flight write into pinned host memory (:meth:`CupyDevice.host_result`): ``mem``
    (the pinned buffer, and the device one where the device cannot map it), the event after those
    kernels, the stream and device they were queued on, and ``keep``: objects the queued kernels still
    use (a shared hash table, the coordinates), held with the buffers until the event is done when the
    read is dropped first (a map dropped unused must not make the host wait)."""
    __slots__ = ("mem", "event", "stream", "device", "size", "dtype", "keep")

    def __init__(self, mem, event, stream, device: int, size: int, dtype):
        self.mem, self.event, self.stream, self.device, self.size, self.dtype = mem, event, stream, device, size, dtype
        self.keep = ()

    def wait(self) -> np.ndarray:
        self.event.synchronize()
        return np.frombuffer(self.mem[0], self.dtype, self.size).copy()

    def __del__(self):
        if self.event is not None:
            hold_until_done(self.event, (self.mem, self.keep))


_device = None


def _cupy_device() -> CupyDevice:
    global _device
    if _device is None:
        _device = CupyDevice()
    return _device


def _blocks(n: int, block: int = BLOCK) -> int:
    return (n + block - 1) // block


@functools.lru_cache(maxsize=256)
def _geometry_args(st, ks, dl) -> tuple:
    """The nine int32 kernel arguments of a geometry (tuples; made once per geometry)."""
    return tuple(np.int32(v) for v in (*st, *ks, *dl))


def _as_int32_rows(xp, a):
    """``a`` as a C-contiguous int32 array (itself when it already is one: the common case)."""
    if a.dtype == xp.int32 and a.flags.c_contiguous:
        return a
    return xp.ascontiguousarray(a, dtype=xp.int32)


def _check_int32(count: int, what: str) -> None:
    if count > _INT32_MAX:
        raise ValueError(f"{what} ({count}) exceeds 2^31 - 1; KernelMap stores int32 indices "
                         f"(split the batch or reduce the kernel size)")


def _unique_outputs(dev, coords, mode: int, st, ks, dl, num_k: int):
    """Sorted unique output sites ``[U, 4]`` int32: mode 0 ``floor(c / s)``, mode 1 ``s * c + off_k``."""
    xp = dev.xp
    n = coords.shape[0]
    count = n * (num_k if mode == 1 else 1)
    _check_int32(count, "the number of candidate output sites")
    keys = xp.empty(count, dtype=xp.uint64)
    status = xp.empty(2, dtype=xp.uint64)
    dev.fill_ones(status)
    dev.launch("candidate_keys", _blocks(count), BLOCK,
               (coords, np.int32(n), np.int32(count), np.int32(mode), *_geometry_args(st, ks, dl), keys, status))
    keys = xp.sort(keys)
    heads = xp.empty(count, dtype=xp.int32)
    dev.launch("unique_heads", _blocks(count), BLOCK, (keys, np.int32(count), heads))
    pos = xp.cumsum(heads, dtype=xp.int32)
    info = xp.empty(2, dtype=xp.int64)
    dev.launch("unique_info", 1, BLOCK, (pos, np.int32(count), status, info))
    unique, bad = (int(v) for v in dev.to_host(info))
    if bad != _EMPTY:
        if mode == 0:  # floor(c / s) of an unpackable input row
            _raise_table_status(dev, coords, _EMPTY, bad)
        _raise_generated_range(dev, coords, st, ks, dl)
    out = xp.empty((unique, 4), dtype=xp.int32)
    dev.launch("unique_unpack", _blocks(count), BLOCK, (keys, heads, pos, np.int32(count), out))
    return out


def _raise_generated_range(dev, coords, st, ks, dl):
    """Slow path, only on error: the NumPy builder's message for out-of-range generated sites."""
    xp = dev.xp
    off = geometry.kernel_offsets(ks, dl)
    c = coords.astype(xp.int64)
    k = off.shape[0]
    cand = xp.concatenate([xp.broadcast_to(c[None, :, :1], (k,) + c[:, :1].shape),
                           c[None, :, 1:] * xp.asarray(st) + xp.asarray(off)[:, None, :]], 2).reshape(-1, 4)
    geometry.check_coord_range(cand, xp, what="generated output coordinates")
    raise ValueError("generated output coordinates leave the packable range")  # not reached


def _capacity(n: int) -> int:
    """Slots of the hash table of ``n`` voxels: a power of two >= 4n (load factor <= 1/4). Most lookups
    miss and walk to the next free slot; >= 2n (SemanticKITTI: load 0.35) made the slowest lane of a
    warp take 3.6 probe steps on average (2-slot windows, simulated) instead of 2.1, and the whole build
    55-63 µs of device time instead of 48-50 (H200). Costs 64-128 bytes per voxel while the table lives
    (a validated ``Voxels`` keeps it)."""
    return 1 << max(6, (4 * n - 1).bit_length())


def _new_table(dev, n: int, extra: int = 0, fill: bool = True):
    """An empty hash table for ``n`` voxels, ``(table, mask)``: ``2 * cap + 4 + extra`` words (slots, the
    all-ones key's slot, the two status words, then ``extra`` words of the caller), all set to all ones
    by one memset (``fill=False``: the caller queues that memset, before any kernel uses the table)."""
    cap = _capacity(n)
    table = dev.xp.empty(2 * cap + 4 + extra, dtype=dev.xp.uint64)
    if fill:
        dev.fill_ones(table)
    return table, cap - 1


def _launch_insert(dev, coords, table, mask: int, clear=None, clear_rows: int = 0) -> None:
    """Insert ``coords`` into ``table`` (value = row). ``clear`` (an address) and ``clear_rows``: the same
    kernel sets ``clear_rows`` rows of N int32 there to -1."""
    n = coords.shape[0]
    dev.launch("insert", _blocks(n), BLOCK, (coords, np.int32(n), table, np.uint64(mask),
                                             dev.ptr(table) if clear is None else clear, np.int32(clear_rows)))


def _insert(dev, coords):
    """Hash table of ``coords`` (value = row): ``(table, mask)``, see :func:`_new_table`."""
    table, mask = _new_table(dev, coords.shape[0])
    _launch_insert(dev, coords, table, mask)
    return table, mask


def _status_at(mask: int) -> int:
    """Index in the table of the insert's two status words (duplicate row, out-of-range row), after
    the 2 * capacity slot words and the all-ones key's slot."""
    return 2 * (mask + 1) + 2


def hash_table(dev, coords):
    """Insert ``coords`` (``[N, 4]`` int32, N > 0) into a table for later maps and read its status.

    Returns ``((table, mask), dup_row, bad_row)``: a row of a duplicated voxel (the smallest row whose
    insert found its key present: which copy loses is up to the scheduling) and the smallest row
    outside the packable range, each -1 when there is none. One
    memset, one kernel, one device→host read of 16 bytes (which also waits for the insert, so the
    table may be used on any stream afterwards). The table is only valid when both rows are -1.
    CuPy: on the device of ``coords`` and CuPy's current stream."""
    xp = dev.xp
    with (xp.cuda.Device(coords.device.id) if hasattr(xp, "cuda") else contextlib.nullcontext()):
        coords = _as_int32_rows(xp, coords)
        table, mask = _insert(dev, coords)
        status = dev.view(table, _status_at(mask), (2,), np.int64)
        dup_row, bad_row = (int(v) for v in dev.to_host(status))
    return (table, mask), dup_row, bad_row


def _raise_table_status(dev, coords, dup_row: int, bad_row: int):
    if bad_row != _EMPTY:
        geometry.check_coord_range(coords, dev.xp)
        raise ValueError(f"coords: row {bad_row} is outside the packable range")  # not reached
    if dup_row != _EMPTY:
        row = dev.to_host(coords[dup_row]).tolist()
        raise ValueError(f"coords must be unique per batch; (batch, x, y, z) = {row} occurs more than once")


def _pairs(dev, coords, out_coords, st, ks, dl, transposed: bool, table=None, symmetric: bool = False):
    """``(pending, offsets, dense_nbr)``: the kernels queued, ``pending`` the map's :class:`_PendingPairs`
    (its CSR arrays, in the canonical order, once the kernels are done).

    ``symmetric``: a submanifold map of odd kernel sizes (``out_coords`` is ``coords``, stride 1, not
    transposed), whose offsets after the centre are filled from the probes of their mirror offsets."""
    xp = dev.xp
    num_k = ks[0] * ks[1] * ks[2]
    m = out_coords.shape[0]
    km = num_k * m
    _check_int32(km, "offsets x output sites")
    nbm = _blocks(m, BLOCK * dev.tile_items)  # tiles per offset (a tile never spans two offsets)
    tiles = num_k * nbm
    # The scan state of compact: the ticket, one word per tile, one total per offset; all ones on entry.
    words = 1 + tiles + num_k
    half = num_k // 2 if symmetric else 0  # the mirrored offsets K - half .. K - 1 of cand
    if table is not None:
        table, mask = table
        if mask + 1 != _capacity(coords.shape[0]) or table.shape[0] < 2 * (mask + 1) + 4:
            raise ValueError(f"the prebuilt hash table (capacity {mask + 1}) was not built for these "
                             f"{coords.shape[0]} coordinates")
    # Everything is allocated and every argument made first, then the device work is queued in one run:
    # the device waits for the host between two operations, and with the allocations between them it
    # idled ~20 µs per build (map_build_timeline). Kept with the map: cand (the dense neighbour table)
    # and offsets, one allocation. Temporary: the upper-bound pair buffers, another; the pinned buffer
    # the info row goes to.
    n = coords.shape[0]
    insert = table is None
    if insert:
        # The state in the tail of the new table: its one memset resets it. cand's mirrored rows
        # (symmetric) must start at -1 (only hits are scattered into them): the insert kernel sets them.
        table, mask = _new_table(dev, n, words, fill=False)
        keep = xp.empty(km + num_k + 1, dtype=xp.int32)
        state = dev.ptr(table, _status_at(mask) + 2)
        reset = (table, 0)
    elif symmetric:
        # A prebuilt table is shared by every map of these voxels: a state of this map's own, after
        # offsets in the same allocation (8-byte aligned), reset by one memset together with cand's
        # mirrored rows and offsets (rewritten by the kernel); the state's few words stay with the map.
        head = km + num_k + 1 + (km + num_k + 1) % 2
        keep = xp.empty(head + 2 * words, dtype=xp.int32)
        state = dev.ptr(keep, head)
        reset = (keep, (num_k - half) * m)
    else:  # a prebuilt table: a fresh state of this map's own
        keep = xp.empty(km + num_k + 1, dtype=xp.int32)
        # Held by name until the launch: the kernel gets only its address, and a dropped array's memory
        # goes back to the pool at once (the next allocation could take it).
        state_words = xp.empty(words, dtype=xp.uint64)
        state = dev.ptr(state_words)
        reset = (state_words, 0)
    # keep = [cand (K x m) | offsets (K + 1) | ...]; scratch = [in_buf (K m) | out_buf (K m)]
    scratch = xp.empty(2 * km, dtype=xp.int32)
    info, host = dev.host_buffer((num_k + 3) * 8)  # the info row: compact writes it there directly
    probed = num_k // 2 + 1 if symmetric else num_k  # offsets kmap_probe writes (symmetric: to the centre)
    nbp = _blocks(m, BLOCK * dev.probe_items)  # probe blocks per offset
    cand = dev.ptr(keep)
    probe_args = (out_coords, np.int32(m), np.int32(nbp), np.int32(num_k), np.int32(transposed),
                  np.int32(symmetric), *_geometry_args(st, ks, dl), table, np.uint64(mask), cand)
    compact_args = (np.int32(m), np.int32(nbm), np.int32(num_k), cand, dev.ptr(table, _status_at(mask)), state,
                    dev.ptr(scratch), dev.ptr(scratch, km), dev.ptr(keep, km), info)
    dev.fill_ones(*reset)
    if insert:
        _launch_insert(dev, coords, table, mask, dev.ptr(keep, (num_k - half) * m), half)
    dev.launch("probe", probed * nbp, BLOCK, probe_args)
    dev.launch("compact", tiles, BLOCK, compact_args)
    # No synchronisation here: the map takes the sizes and status words, and its exact-size pairs, when
    # first used (KernelMap.wait).
    read = dev.host_result(host, num_k + 3, np.int64)
    read.keep = (table, coords, out_coords)  # used by the queued kernels, whoever drops them first
    offsets, dense_nbr = dev.view(keep, km, (num_k + 1,), np.int32), dev.view(keep, 0, (num_k, m), np.int32)
    return _PendingPairs(dev, coords, scratch, km, num_k, read), offsets, dense_nbr


class _PendingPairs:
    """``KernelMap``'s ``pending``: waits for the info row, raises the insert's status (duplicate or
    out-of-range voxel), copies the first ``offsets[K]`` pairs of the upper-bound buffers into one
    exact-size allocation (and lets the buffers go). Returns ``(in_maps, out_maps, offsets_host)``, the
    same arrays to every caller (a lock: two threads may use a new map at once)."""
    __slots__ = ("dev", "coords", "scratch", "km", "num_k", "read", "host", "result", "lock")

    def __init__(self, dev, coords, scratch, km: int, num_k: int, read):
        """``scratch`` starts with the two upper-bound pair buffers of ``km`` int32 each."""
        self.dev, self.coords, self.scratch, self.km, self.num_k = dev, coords, scratch, km, num_k
        self.read, self.host, self.result, self.lock = read, None, None, threading.Lock()

    def __call__(self):
        with self.lock:
            if self.result is None:
                if self.host is None:
                    self.host = self.read.wait()
                    self.read.keep = ()  # the kernels are done with the table and coordinates
                host, num_k = self.host, self.num_k
                if host[num_k + 1] != _EMPTY or host[num_k + 2] != _EMPTY:
                    self.scratch = None  # a map that can only raise keeps no upper-bound buffers
                _raise_table_status(self.dev, self.coords, int(host[num_k + 1]), int(host[num_k + 2]))
                offsets_host = host[:num_k + 1].astype(np.int64)
                pairs = self.dev.copy_pairs(self.scratch, self.km, int(offsets_host[-1]), self.read)
                self.result = (*pairs, offsets_host)
                self.scratch = self.coords = None
            return self.result


def build(dev, coords, kernel_size, stride, dilation, transposed, generative, out_coords=None,
          table=None) -> KernelMap:
    """The builder on device operations ``dev`` (:class:`CupyDevice` or a test twin).

    ``table``: ``(table, mask)`` of :func:`hash_table` for these ``coords`` (rows in the same order,
    status clean), used instead of inserting them again."""
    xp = dev.xp
    ks = geometry.triple(kernel_size, "kernel_size")
    st = geometry.triple(stride, "stride")
    dl = geometry.triple(dilation, "dilation")
    num_k = ks[0] * ks[1] * ks[2]
    coords = _as_int32_rows(xp, coords)
    n_in = coords.shape[0]
    if transposed:
        kind = "generative" if generative else "transposed"
        if generative:
            out_coords = (_unique_outputs(dev, coords, 1, st, ks, dl, num_k) if n_in
                          else xp.empty((0, 4), dtype=xp.int32))
    elif st == (1, 1, 1) and out_coords is None:
        kind, out_coords = "submanifold", coords
    else:
        kind = "strided"
        if out_coords is None:
            out_coords = (_unique_outputs(dev, coords, 0, st, ks, dl, num_k) if n_in
                          else xp.empty((0, 4), dtype=xp.int32))
    out_coords = _as_int32_rows(xp, out_coords)
    m = out_coords.shape[0]
    if n_in and m:
        # SubM of odd kernel sizes: offsets mirror each other about the centre (0), so half the probes do
        symmetric = kind == "submanifold" and all(v % 2 == 1 for v in ks)
        pending, offsets, dense_nbr = _pairs(dev, coords, out_coords, st, ks, dl, bool(transposed), table,
                                             symmetric)
        return KernelMap(None, None, offsets, None, n_in, m, out_coords, ks, st, dl, kind, dense_nbr=dense_nbr,
                         pending=pending)
    return KernelMap(xp.empty(0, dtype=xp.int32), xp.empty(0, dtype=xp.int32), xp.zeros(num_k + 1, dtype=xp.int32),
                     np.zeros(num_k + 1, dtype=np.int64), n_in, m, out_coords, ks, st, dl, kind)


def build_kernel_map(coords, sorted_in, kernel_size, stride, dilation, transposed, generative,
                     out_coords=None, table=None) -> KernelMap:
    """GPU twin of :func:`sparsevox.kernel_map.build_kernel_map` for CuPy int32 coordinates.

    ``sorted_in`` (the NumPy builder's sorted keys) is not used: the hash table replaces it.
    ``table``: the input voxels' table from :func:`hash_table` (kept by ``Voxels`` validation), or None.
    Runs on the device of ``coords`` and CuPy's current stream.
    """
    dev = _cupy_device()
    with on_device(coords.device.id):
        return build(dev, coords, kernel_size, stride, dilation, transposed, generative, out_coords, table)


build_kernel_map.needs_sorted_keys = False  # kernel_map() then skips Voxels.sorted_keys() (an argsort)
build_kernel_map.takes_table = True  # kernel_map() passes the Voxels' validated hash table

if os.environ.get("SPARSEVOX_GPU_KERNEL_MAP", "hash").lower() != "generic":
    BUILDERS["cupy"] = build_kernel_map
else:  # keep the xp-generic builder; remember the choice so kernel_map() stops importing us
    BUILDERS["cupy"] = _generic_builder
    log.info("SPARSEVOX_GPU_KERNEL_MAP=generic: GPU kernel maps use the xp-generic builder")
