"""IMPLICIT_GEMM on CuPy: fused gather-GEMM-scatter kernels from ``kernels_cu/implicit_gemm.cu``.

forward: output-stationary; a CTA owns ``fwd_block_size`` output rows x ``gemm_block_size`` output
channels, reads input rows through a dense neighbour table ``nbr[k, out] = in`` (-1 absent), skips the
offsets no row of its tile has (a per-tile bitmask) and writes each output once (no atomics).
dgrad: the same kernel on the reverse table ``nbr_rev[k, in] = out`` with ``W[k]^T``.
wgrad: ``dW[k] = X[in_k]^T @ dY[out_k]`` over chunks of pairs (split-K), float32 (float64) atomics.

float16/bfloat16 run on tensor cores (mma.sync m16n8k16, float32 accumulation); float32 and float64
run an exact SIMT path in their own precision, and float32 also 3xTF32 on tensor cores (``tf32x3``: each
operand split into two TF32 parts, three m16n8k8 MMAs, ~2^-21 relative per product: within the float32
bound of the autotuner's check, which judges it like any other float32 candidate; an infinite input
gives NaN where the SIMT path gives an infinity: Inf times the other operand's zero small part). Derived tables are cached in ``kmap.derived`` under
``implicit_gemm.*`` keys; compiled kernels are cached per (dtype, tile, vector) instantiation.

Registered as IMPLICIT_GEMM (conv), GPU only. Search space (the reference guide's names): forward and
dgrad over ``fwd_block_size`` (rows per CTA) x ``gemm_block_size`` (output channels per CTA), x
``mask_split`` in {1, 2} for kernels of 16+ offsets (also 3 for float32/float64 from 128 channels);
wgrad over ``gemm_block_size`` (square weight tile) x ``split_k_factor`` (CTAs per multiprocessor the
pairs are split into); for float32 also the ``tf32x3`` tiles. At most 20 forward/dgrad and 14 wgrad
combinations.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math

import numpy as np

from ..cuda import radix_sort
from ..cuda.cuda_loader import as_driver_kernel, driver_kernel, get_function
from ..tuning.registry import Algorithm, gpu_unavailable, register

log = logging.getLogger("sparsevox.implicit_gemm")

_CTYPE = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double"}
_SIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
_SMEM_SMALL = 64 * 1024  # up to here a tile gets 4 stages (deep prefetch of the gathered rows)
_SMEM_LIMIT = 160 * 1024  # pipeline shared memory per block we allow (the H100 gives 227 KB)
_DYN_SET: dict = {}  # id(kernel) -> dynamic shared memory limit already set
_NBR_SMEM = 64 * 1024  # at most this much for the staged neighbour rows of a tile (K * BM int32)

# (BM, BN) -> (WM, WN) warp tiles, or (WM, WN, STAGES) where a pipeline depth other than _stages()'s
# measured faster. Tensor-core tiles need WM % 16 == 0, WN % 16 == 0; SIMT tiles need WM % 4 == 0,
# WN % 8 == 0. Large tiles (64 x 64 warp tiles, 8 warps) cut the L2 -> shared traffic of W[k], which
# every (row tile, offset) reloads: flops per byte = BM*BN/(BM+BN). (128, 32) was added for C = 32 (the
# autotuner tries it for every tensor-core layer, dgrad included): C=32 iterations are issue-bound (~200 instructions per warp per offset around 4 MMAs), and 128 rows share
# one iteration's overhead (H100 sweep 2026-11-25: LiDAR-like C=32 49.1 -> 45.5 us, 3 stages).
TC_TILES = {(32, 32): (16, 16), (64, 32): (32, 16), (128, 32): (32, 32, 3), (64, 64): (32, 32),
            (128, 64): (64, 32), (64, 128): (32, 64), (128, 128): (64, 32), (256, 128): (64, 64),
            (128, 256): (64, 64)}
SIMT_TILES = {(32, 32): (16, 16), (64, 32): (32, 16), (64, 64): (32, 32), (128, 64): (64, 32),
              (64, 128): (32, 64)}
# 3xTF32 (float32 on tensor cores, three TF32 MMAs per product; kernels_cu/common/mma.cuh split_tf32):
# tensor-core warp tiles, float32 shared memory (BK 16).
TF32X3_TILES = {(64, 32): (32, 16), (64, 64): (32, 32), (128, 64): (64, 32), (64, 128): (32, 64),
                (128, 128): (64, 32)}
WGRAD_TILES = (32, 64, 128)  # square C_in x C_out tiles of the weight gradient
SPLIT_FACTORS = (1, 2, 4, 8)  # wgrad CTAs per multiprocessor (split-K over pairs)


def is_tc(dtype_name: str) -> bool:
    return dtype_name in ("float16", "bfloat16")


def tiles_for(dtype_name: str, tf32x3: bool = False) -> dict:
    if tf32x3:
        return TF32X3_TILES
    return TC_TILES if is_tc(dtype_name) else SIMT_TILES


def check_tf32x3(tf32x3, dtype_name: str) -> bool:
    """``tf32x3`` as a bool; a ValueError unless it is off or the dtype is float32 (the 3xTF32 kernels
    split float32 operands; the half types run one MMA already and float64 has no such split)."""
    if tf32x3 and dtype_name != "float32":
        raise ValueError(f"tf32x3 applies to float32 only, got dtype {dtype_name}")
    return bool(tf32x3)


def _bk(dtype_name: str) -> int:
    """Reduction step per pipeline stage: 64 bytes of a row for half types, less for wide dtypes."""
    return {"float64": 8, "float32": 16}.get(dtype_name, 32)


def _smem_per_stage(dtype_name, bm, bn, bk, a_kmajor) -> int:
    pad = 16 // _SIZE[dtype_name]
    per = ((bk * (bm + pad)) if a_kmajor else (bm * (bk + pad))) + bk * (bn + pad)
    return per * _SIZE[dtype_name]


def _stages(dtype_name, bm, bn, bk, a_kmajor) -> int:
    per = _smem_per_stage(dtype_name, bm, bn, bk, a_kmajor)
    if 4 * per <= _SMEM_SMALL:
        return 4
    for s in (3, 2):
        if s * per <= _SMEM_LIMIT:
            return s
    raise ValueError(f"tile {bm}x{bn} does not fit in shared memory for {dtype_name}")


@functools.lru_cache(maxsize=None)
def _kernel(kind: str, dtype_name: str, bm: int, bn: int, vec: bool, device_id: int, variant=None, tf32x3=False):
    """The compiled instantiation (cached; ``device_id`` keys the per-device module). ``tf32x3``: the
    float32 tensor-core kernel (:func:`check_tf32x3`; tensor-core warp tiles).

    ``variant``: ``(WM, WN, STAGES)`` or ``(WM, WN, STAGES, BK)`` overriding the tables (benchmark sweeps
    only; not searched).
    """
    bk = _bk(dtype_name)
    tc = is_tc(dtype_name) or check_tf32x3(tf32x3, dtype_name)
    if variant is not None:
        wm, wn, stages = (int(v) for v in variant[:3])
        bk = int(variant[3]) if len(variant) > 3 else bk
        step = 16 if tc else 4
        if bm % wm or bn % wn or wm % step or wn % (16 if tc else 8) or \
                not 1 <= (bm // wm) * (bn // wn) <= 16 or stages < 2 or bk % (16 if is_tc(dtype_name) else 8 if tc else 4):
            raise ValueError(f"variant (WM, WN, STAGES[, BK]) = {variant} does not tile {bm}x{bn} for {dtype_name}")
    else:
        spec = tiles_for(dtype_name, tf32x3)[(bm, bn)] if kind == "fwd" else \
            (16, 16) if bm == 32 else (32, 32) if bm == 64 else (64, 32)
        wm, wn = spec[:2]
        stages = spec[2] if len(spec) > 2 else _stages(dtype_name, bm, bn, bk, kind == "wgrad")
    name = (f"svx_igemm::igemm_{kind}<{_CTYPE[dtype_name]},{bm},{bn},{bk},{wm},{wn},{stages},"
            f"{'true' if vec else 'false'},{'true' if tc else 'false'}>")
    fn = get_function("implicit_gemm", name, name_expressions=(name,))
    threads = (bm // wm) * (bn // wn) * 32
    smem = stages * _smem_per_stage(dtype_name, bm, bn, bk, kind == "wgrad")
    if smem > 48 * 1024:
        fn.max_dynamic_shared_size_bytes = smem
        _DYN_SET[id(fn)] = smem
    return fn, threads, smem


def _dtype_name(a) -> str:
    return a.dtype.name


def _aligned(*arrays) -> bool:
    return all(a.data.ptr % 16 == 0 for a in arrays)


def _vec_ok(dtype_name, c_a, c_b, *arrays) -> bool:
    e = 16 // _SIZE[dtype_name]
    return c_a % e == 0 and c_b % e == 0 and _aligned(*arrays)


# ---- derived maps (cached on the kernel map) ------------------------------------------------------

def neighbour_table(kmap, reverse: bool = False):
    """``[K, rows]`` int32: ``nbr[k, out] = in`` (forward) or ``nbr[k, in] = out`` (reverse), -1 absent.

    The forward table is the map's ``dense_nbr`` when its builder made one (the GPU hash builder's query
    table); otherwise, and for the reverse table, it is scattered from the CSR map once and cached. After
    :func:`_release_unsorted` dropped it, it is made again when asked for: from the cached sorted slot
    tables when they cover every offset (columns put back in row order), else from the CSR map."""
    # A pending GPU map's dense_nbr exists before its pairs: wait, so that unvalidated bad coordinates
    # raise here too (paths that never read the CSR arrays would otherwise use a wrong table).
    kmap.wait()
    twin = getattr(kmap, "swapped_from", None)
    if twin is not None:  # a transposed map made from its strided twin: the tables swap roles too
        return neighbour_table(twin, not reverse)
    dense = getattr(kmap, "dense_nbr", None)
    if not reverse and dense is not None:
        return dense
    import cupy
    key = _unsorted_key(reverse)
    t = kmap.derived.get(key)
    if t is None and dense is not None and _mirrored(kmap):
        # submanifold, odd kernel sizes: pair (k, out m, in j) <=> (K-1-k, out j, in m), so the reverse
        # table is the forward one with its offsets reversed (one copy instead of a scatter of the CSR)
        t = kmap.derived[key] = cupy.ascontiguousarray(dense[::-1])
    if t is None:
        t = _unsorted_from_slots(kmap, reverse)
        if t is not None:
            kmap.derived[key] = t
    if t is None:
        k_count = kmap.num_offsets
        rows = kmap.num_in if reverse else kmap.num_out
        t = cupy.full((k_count, rows), -1, dtype=cupy.int32)
        if kmap.num_pairs:
            counts = np.diff(kmap.offsets_host).tolist()
            kidx = cupy.repeat(cupy.arange(k_count, dtype=cupy.int32), counts)
            dst, src = (kmap.in_maps, kmap.out_maps) if reverse else (kmap.out_maps, kmap.in_maps)
            t[kidx, dst] = src
        kmap.derived[key] = t
    return t


def _unsorted_key(reverse: bool) -> str:
    return "implicit_gemm.nbr_rev" if reverse else "implicit_gemm.nbr"


def _slots_prefix(reverse: bool, sort_rows: bool) -> str:
    """The start of the ``kmap.derived`` keys of :func:`slot_table`'s tables (``...{k0}.{k1}`` follows)."""
    return f"implicit_gemm.slots{'_rev' if reverse else ''}.{int(sort_rows)}."


def _unsorted_from_slots(kmap, reverse: bool):
    """The unsorted table made again from cached sorted slot tables whose offset ranges cover ``[0, K)``
    (the whole table, or every part of a split; rows ``k0..k1`` of a part's table are in its slot order),
    or None. One scatter per table, nothing waits: cheaper than the scatter of the CSR map, which a later
    layer of another mask split would otherwise pay after :func:`_release_unsorted`."""
    import cupy
    prefix = _slots_prefix(reverse, True)
    longest = {}  # k0 -> (k1, (row_of_slot, table)): the widest cached range starting at each offset
    for key, got in tuple(kmap.derived.items()):
        if isinstance(key, str) and key.startswith(prefix):
            k0, k1 = (int(v) for v in key[len(prefix):].split("."))
            if k1 > longest.get(k0, (k0,))[0]:
                longest[k0] = (k1, got)
    pieces, k = [], 0
    while k < kmap.num_offsets:  # every split's parts are made together, so a walk from 0 ends at K
        if k not in longest:
            return None
        k1, got = longest[k]
        pieces.append((k, k1, got))
        k = k1
    if not pieces:
        return None
    t = cupy.empty(pieces[0][2][1].shape, dtype=cupy.int32)
    for k0, k1, (order, table) in pieces:
        t[k0:k1, order] = table[k0:k1]  # slot s of the part holds row order[s]
    return t


def _release_unsorted(kmap, reverse: bool) -> None:
    """Drop the unsorted ``[K, rows]`` table of one direction once the launch just prepared has its slot
    tables, unless a cached slot table is that table (unsorted rows, the float16 default: its launches
    read it). Sorted launches (float32, float64) read only their sorted copies, so holding the unsorted
    one too cost 108 bytes per row at K = 27 (SemanticKITTI level 0: 18.9 MiB). A later table that needs
    it makes it again (:func:`neighbour_table`). Nothing else reads it: the other algorithms, pooling,
    depthwise and the adapters read the CSR arrays (depthwise keeps its own copy of the offsets);
    prepared launches keep the arrays they point to. The dropped arrays are held until the work queued
    on the current stream is done."""
    twin = getattr(kmap, "swapped_from", None)
    if twin is not None:  # as neighbour_table: the twin holds the tables
        _release_unsorted(twin, not reverse)
        return
    key = _unsorted_key(reverse)
    dense = None if reverse else getattr(kmap, "dense_nbr", None)
    table = dense if dense is not None else kmap.derived.get(key)
    if table is None:
        return
    prefixes = (_slots_prefix(reverse, False), _slots_prefix(reverse, True))
    if any(isinstance(k, str) and k.startswith(prefixes) and v[1] is table for k, v in tuple(kmap.derived.items())):
        return
    kmap.derived.pop(key, None)
    dropped = [table]
    if dense is not None:
        kmap.dense_nbr = None
        # the GPU builder's offsets are a view into dense_nbr's allocation (gpu_kernel_map._pairs): a
        # copy of their K + 1 words lets that allocation go (views taken earlier still hold it)
        dropped.append(kmap.offsets)
        kmap.offsets = _copy_on_its_device(kmap.offsets)
        for swapped in tuple(kmap.derived.get("swapped_to", ())):  # transposed maps made from this one
            swapped.offsets = kmap.offsets
    _hold_until_queued_work_is_done(dropped)


def _hold_until_queued_work_is_done(arrays) -> None:
    """Keep ``arrays`` alive until the work queued so far on the current stream is done: a pool hands
    freed memory to later allocations of the stream it was allocated on, which need not be this one (a
    map built on one stream and first used on another), while kernels queued here may still read it."""
    if not arrays or not type(arrays[0]).__module__.startswith("cupy"):
        return  # host arrays (NumPy stand-ins in the CPU tests): nothing is queued
    import cupy

    from .._arrays import hold_until_done
    with arrays[0].device:
        event = cupy.cuda.Event(block=False, disable_timing=True)
        event.record(cupy.cuda.get_current_stream())
    hold_until_done(event, tuple(arrays))


def _mirrored(kmap) -> bool:
    """Whether offset K-1-k of the map is offset k reversed with in and out swapped (SubM, odd sizes).
    Only for maps a builder made (they have output sites): a map wrapped from bare arrays (``recall``)
    carries the default geometry, not its own, and must not be taken for a mirrored one."""
    return (kmap.kind == "submanifold" and getattr(kmap, "out_coords", None) is not None
            and kmap.num_in == kmap.num_out and all(v % 2 == 1 for v in kmap.kernel_size)
            and kmap.num_offsets == math.prod(kmap.kernel_size))


def _copy_on_its_device(a):
    """A copy of ``a`` on the device that holds it (CuPy copies onto the current one); NumPy as is."""
    dev = getattr(a, "device", None)
    with dev if hasattr(dev, "__enter__") else contextlib.nullcontext():
        return a.copy()


def _part(k_count: int, split: int, h: int) -> tuple[int, int]:
    """Offsets ``[k0, k1)`` of part ``h`` when the K offsets are split into ``split`` contiguous parts."""
    return h * k_count // split, (h + 1) * k_count // split


def slot_table(kmap, reverse: bool, sort_rows: bool, part: tuple | None = None):
    """``(row_of_slot int32 [rows], nbr in slot order [K, rows])``; ``row_of_slot`` is None for the
    identity order (unsorted rows: slot i is row i).

    ``sort_rows``: slots ordered by each row's neighbour bitmask (stable), so a tile's rows share
    offsets and the tile skips more of them (spconv's MaskImplicitGemm idea); else identity order.
    The bitmask is read with the rarest offsets (fewest pairs) most significant: each of them then
    forms one run of slots, and the frequent ones, split into many runs, are active in most tiles anyway.
    Measured on the scans (rows per active tile offset that have it, 128-row tiles): LiDAR-like 0.42 ->
    0.48, SemanticKITTI 0.46 -> 0.54, ScanNet 0.39 -> 0.40, against offset order (first offset most
    significant).
    ``part``: ``(k0, k1)``, sort by the bits of these offsets only (one pass of a mask split). A sorted
    part's table holds its slot order in rows ``k0..k1`` only: the parts of a split share one ``[K, rows]``
    array (:func:`_part_rows`), and its other rows belong to the other parts.
    On the device: the keys (``kernels_cu/slot_table.cu``, 32-bit when at most 32 offsets carry a bit),
    a stable radix sort (:mod:`sparsevox.cuda.radix_sort`, three launches per eight key bits), the gathered
    table (with the int32 slot order); nothing waits for the device.
    """
    import cupy
    twin = getattr(kmap, "swapped_from", None)
    if twin is not None:  # a transposed map made from its strided twin: share the twin's tables
        kmap.wait()
        return slot_table(twin, not reverse, sort_rows, part)
    k0, k1 = part if part is not None else (0, kmap.num_offsets)
    sort_rows = _csr_ordered(kmap, reverse, sort_rows, k0, k1)
    key = _slots_prefix(reverse, sort_rows) + f"{k0}.{k1}"
    t = kmap.derived.get(key)
    if t is None and sort_rows and (k0, k1) == (0, kmap.num_offsets) and _one_pair_rows(kmap, reverse):
        t = kmap.derived[key] = _csr_slots(kmap)
    if t is None:
        nbr = neighbour_table(kmap, reverse)
        k_count, rows = nbr.shape
        if sort_rows and rows > 1 and k_count:
            part_bits, key_bits = mask_key_bits(kmap, k0, k1)
            bit_of = np.array([-1] * k0 + part_bits + [-1] * (k_count - k1), dtype=np.int32)
            wide = key_bits > 32
            keys = cupy.empty(rows, dtype=cupy.uint64 if wide else cupy.uint32)
            grid = (-(-rows // _SLOT_BLOCK),)
            bits, _staging = _upload(bit_of)  # dropped at return: held until the copy has run
            _slot_kernel("keys", wide)(grid, (_SLOT_BLOCK,), (nbr, np.int32(rows), np.int32(k_count), bits, keys))
            order = radix_sort.argsort(keys, key_bits)  # stable (ties keep row order), no host wait
            out = _part_rows(kmap, reverse, k0, k1, rows)
            # only this part's rows: a launch reads the offsets of its tile masks, all in [k0, k1)
            _slot_kernel("gather")(grid, (_SLOT_BLOCK,), (nbr[k0:k1], order, np.int32(rows), np.int32(k1 - k0),
                                                          out[k0:k1]))
            t = (order, out)
        else:  # identity order: the kernel reads no order array (one launch fewer per fresh map)
            t = (None, nbr)
        kmap.derived[key] = t
    return t


_SLOT_BLOCK = 256


def _part_rows(kmap, reverse: bool, k0: int, k1: int, rows: int):
    """The ``[K, rows]`` int32 array that the sorted table of offsets ``[k0, k1)`` is gathered into: the
    first one cached on the map whose rows ``k0..k1`` no other table uses, else a new one. The parts of a
    mask split have disjoint offsets, so a split costs one array (and an int32 order per part) instead of
    one per part: SemanticKITTI level 0, 18.9 MiB per part saved. Splits of other counts on the same map
    overlap the first one's ranges and get another array; the whole table (``[0, K)``) gets its own."""
    import cupy
    arrays = kmap.derived.setdefault(f"implicit_gemm.part_rows{'_rev' if reverse else ''}", [])
    for table, taken in arrays:
        if all(k1 <= a or b <= k0 for a, b in taken):
            taken.append((k0, k1))
            return table
    table = cupy.empty((kmap.num_offsets, rows), dtype=cupy.int32)
    arrays.append((table, [(k0, k1)]))
    return table


def _csr_ordered(kmap, reverse: bool, sort_rows: bool, k0: int, k1: int) -> bool:
    """``sort_rows``, or True for a whole table of :func:`_one_pair_rows` rows: sorted or not, those come
    from the CSR in one launch (the unsorted identity order would need the reverse table scattered from
    the CSR, which costs more host time and synchronised 13 times per float16 step, GPU run 9622c1e),
    under one cache key, so float16 and float32 layers on one map share the table and its tile masks."""
    return bool(sort_rows) or ((k0, k1) == (0, kmap.num_offsets) and _one_pair_rows(kmap, reverse))


def _one_pair_rows(kmap, reverse: bool) -> bool:
    """Whether every row of the table (reverse: the input rows) has exactly one pair: the input rows of a
    strided map whose windows do not overlap (kernel size = stride, no dilation: k2 s2), with every
    input inside some output site. The CSR order then already groups the rows by their one offset,
    which is what the bitmask sort would do."""
    if not reverse or kmap.kind != "strided" or tuple(kmap.kernel_size) != tuple(kmap.stride):
        return False
    return all(d == 1 for d in kmap.dilation) and kmap.num_pairs == kmap.num_in


def _csr_slots(kmap):
    """The reverse slot table of a map with :func:`_one_pair_rows`: slot ``s`` is input row ``in_maps[s]``,
    its only neighbour ``out_maps[s]`` at the offset whose pair range holds ``s``. One launch, no sort."""
    import cupy
    k_count, rows = kmap.num_offsets, kmap.num_in
    out = cupy.empty((k_count, rows), dtype=cupy.int32)
    if rows:
        grid = (-(-rows // _SLOT_BLOCK),)
        _slot_kernel("csr")(grid, (_SLOT_BLOCK,), (kmap.offsets, np.int32(k_count), kmap.out_maps, np.int32(rows),
                                                   out))
    return kmap.in_maps, out


def _upload(host: np.ndarray):
    """``(device copy of small host, guard)``: the copy is queued on the current stream from pinned
    memory, so the host does not wait for the work queued before it (``cupy.asarray`` of pageable memory
    does); the guard (:class:`sparsevox._arrays.Hold`) keeps the pinned buffer until the copy has run,
    whenever it is dropped."""
    import cupy

    from .._arrays import Hold
    rt = cupy.cuda.runtime
    stream = cupy.cuda.get_current_stream()
    mem = cupy.cuda.alloc_pinned_memory(max(1, host.nbytes))
    np.frombuffer(mem, host.dtype, host.size)[:] = host.ravel()
    out = cupy.empty(host.shape, dtype=host.dtype)
    rt.memcpyAsync(out.data.ptr, mem.ptr, host.nbytes, rt.memcpyHostToDevice, stream.ptr)
    event = cupy.cuda.Event(block=False, disable_timing=True)
    event.record(stream)
    return out, Hold(event, mem)


def slot_kernel_name(name: str, wide: bool = False) -> str:
    """The instantiation of ``kernels_cu/slot_table.cu`` that :func:`_slot_kernel` launches for ``name``."""
    names = {"keys": f"slot_keys<{'unsigned long long' if wide else 'unsigned int'}, {_SLOT_BLOCK}>",
             "gather": f"gather_slots<{_SLOT_BLOCK}>", "masks": f"tile_masks<{_MASK_BLOCK}>",
             "csr": f"csr_slots<{_SLOT_BLOCK}>", "chunks": f"wgrad_chunks<{_SLOT_BLOCK}>"}
    return names[name]


def _slot_kernel(name: str, wide: bool = False):
    """A kernel of ``kernels_cu/slot_table.cu`` on the current device (``keys``: 64-bit keys if ``wide``)."""
    return driver_kernel("slot_table", slot_kernel_name(name, wide), _SLOT_NAMES)


_MASK_BLOCK = 128
_SLOT_NAMES = (f"slot_keys<unsigned int, {_SLOT_BLOCK}>", f"slot_keys<unsigned long long, {_SLOT_BLOCK}>",
               f"gather_slots<{_SLOT_BLOCK}>", f"tile_masks<{_MASK_BLOCK}>", f"csr_slots<{_SLOT_BLOCK}>",
               f"wgrad_chunks<{_SLOT_BLOCK}>")


def mask_key_bits(kmap, k0: int, k1: int) -> tuple[list, int]:
    """``(bit, key_bits)``: ``bit[k - k0]`` is the bit of offset ``k`` in the slot sort key, or -1: bits by
    rank of pair count, the rarest offset highest (ties by offset), none for offsets without pairs (their
    bit is never set) or past the 63 rarest of the others; ``key_bits`` = how many bits are used. Plain
    Python over the K counts (the NumPy form cost ~35 µs per slot table)."""
    o = np.asarray(kmap.offsets_host).tolist()
    counts = [o[k + 1] - o[k] for k in range(k0, k1)]
    rarest = sorted((c, k) for k, c in enumerate(counts) if c > 0)[:63]
    bit = [-1] * (k1 - k0)
    for i, (_, k) in enumerate(rarest):
        bit[k] = len(rarest) - 1 - i
    return bit, len(rarest)


def mask_key_weights(kmap, k0: int, k1: int) -> np.ndarray:
    """int64 ``[k1 - k0]``: the weight of each offset's bit in the slot sort key (:func:`mask_key_bits`),
    ``2 ** bit``, zero for an offset without a bit."""
    bit, _ = mask_key_bits(kmap, k0, k1)
    return np.array([1 << b if b >= 0 else 0 for b in bit], dtype=np.int64)


def tile_masks(kmap, reverse: bool, bm: int, sort_rows: bool, part: tuple | None = None):
    """``[tiles, words]`` uint32: bit k set when some row of the ``bm``-slot tile has offset k (only
    offsets in ``part = (k0, k1)`` when given). One launch (``kernels_cu/slot_table.cu``)."""
    import cupy
    twin = getattr(kmap, "swapped_from", None)
    if twin is not None:  # as slot_table
        return tile_masks(twin, not reverse, bm, sort_rows, part)
    k0, k1 = part if part is not None else (0, kmap.num_offsets)
    sort_rows = _csr_ordered(kmap, reverse, sort_rows, k0, k1)
    key = f"implicit_gemm.mask{'_rev' if reverse else ''}.{bm}.{int(sort_rows)}.{k0}.{k1}"
    m = kmap.derived.get(key)
    if m is None:
        _, nbr = slot_table(kmap, reverse, sort_rows, part)
        k_count, rows = nbr.shape
        tiles = max(1, -(-rows // bm))
        words = max(1, -(-k_count // 32))
        m = cupy.empty((tiles, words), dtype=cupy.uint32)
        _slot_kernel("masks")((tiles,), (_MASK_BLOCK,), (nbr, np.int32(rows), np.int32(k_count), np.int32(k0),
                                                         np.int32(k1), np.int32(bm), np.int32(words), m),
                              shared_mem=4 * words)
        kmap.derived[key] = m
    return m


def wgrad_chunks(kmap, chunk: int):
    """``([n_chunks, 3] int32 (k, lo, hi) on the device, n_chunks)``: pair ranges of one offset each
    (:func:`chunk_ranges`). Made on the device from the map's offsets by one launch
    (``kernels_cu/slot_table.cu``: wgrad_chunks); the host only counts the rows (it has the offsets). The
    NumPy table and its pinned upload cost ~75 µs of host time per fresh map (1.4 ms over 18 in a float16
    training step, H200, db9c14c) and one of the step's copies."""
    import cupy
    key = f"implicit_gemm.chunks.{chunk}"
    c = kmap.derived.get(key)
    if c is None:
        n = chunk_count(kmap.offsets_host, chunk)
        dev = cupy.empty((n, 3), dtype=cupy.int32)
        if n:
            _slot_kernel("chunks")((1,), (_SLOT_BLOCK,), (kmap.offsets, np.int32(kmap.num_offsets), np.int32(chunk),
                                                       dev))
        c = (dev, n)
        kmap.derived[key] = c
    return c


def chunk_count(offsets, chunk: int) -> int:
    """How many rows :func:`chunk_ranges` has: plain Python over the K counts (host offsets)."""
    o = offsets.tolist() if hasattr(offsets, "tolist") else list(offsets)
    chunk = int(chunk)
    return sum(-(-(b - a) // chunk) for a, b in zip(o, o[1:]))


def chunk_ranges(offsets, chunk: int) -> np.ndarray:
    """int32 ``[n, 3]`` rows ``(k, lo, hi)``: each offset's pair range ``[offsets[k], offsets[k+1])`` cut
    into pieces of at most ``chunk`` pairs, in offset order (empty offsets give no row)."""
    o = np.asarray(offsets, dtype=np.int64)
    counts = np.diff(o)
    pieces = -(-counts // int(chunk))
    total = int(pieces.sum())
    ks = np.repeat(np.arange(len(counts), dtype=np.int64), pieces)
    start = np.cumsum(pieces) - pieces  # first piece of each offset
    lo = o[:-1][ks] + (np.arange(total, dtype=np.int64) - start[ks]) * int(chunk)
    hi = np.minimum(lo + int(chunk), o[1:][ks])
    return np.stack([ks, lo, hi], axis=1).astype(np.int32).reshape(-1, 3)


# ---- default parameters -----------------------------------------------------------------------------

def _pow2ceil(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def default_fwd_tile(dtype_name: str, c_out: int) -> tuple[int, int]:
    bn = min(128 if is_tc(dtype_name) else 64, max(32, _pow2ceil(c_out)))
    return (64, bn)


@functools.lru_cache(maxsize=None)
def _sm_count(device_id: int) -> int:
    import cupy
    return int(cupy.cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"])


# ---- the three directions ---------------------------------------------------------------------------

class Launch:
    """IMPLICIT_GEMM kernel launches with every argument fixed except the two input addresses, the
    output address and the stream.

    The CuPy functions below run through it; framework adapters keep one per call signature
    (:func:`sparsevox.conv.prepared`) and launch from raw tensor addresses on later calls, which skips
    wrapping each tensor as a CuPy array and the per-call planning (~10 µs per array, measured).

    What the caller provides: ``a``, ``b`` C-contiguous inputs of the call's dtype (fwd: feats
    ``[N_in, C_in]`` and weight ``[K, C_in, C_out]``; dgrad: grad_out ``[N_out, C_out]`` and the weight
    with its last two axes swapped, ``[K, C_out, C_in]`` (``transpose_b``), and for a submanifold map
    with odd kernel sizes (``flip_b``) also its offsets reversed, ``W[K-1-k]^T``, because that dgrad runs
    on the forward tables; wgrad: feats and grad_out),
    and ``out`` of ``out_shape``: the data dtype, or for wgrad the zero-filled ``acc_dtype`` accumulator
    (float32; float64 for float64 data) that the caller casts back.

    ``steps``: ``(kernel, grid, block, shared bytes, args)`` run in order (a mask split is two passes,
    the second adding into the first's output); ``holes``: where ``a``, ``b``, ``out`` go in ``args``.
    ``device_id``: the device the kernels are loaded on (the driver path launches their handles there;
    None: the current device at the first such launch).
    """
    __slots__ = ("steps", "holes", "vec", "out_shape", "acc_dtype", "transpose_b", "flip_b", "keep", "device_id",
                 "fusable", "_packed")

    def __init__(self, steps, holes, vec, out_shape, acc_dtype=None, transpose_b=False, keep=(), device_id=None,
                 flip_b=False, fusable=False):
        self.steps = [(fn, grid, block, smem, tuple(args)) for fn, grid, block, smem, args in steps]
        self.holes, self.vec, self.out_shape = holes, vec, tuple(out_shape)
        self.acc_dtype, self.transpose_b, self.flip_b, self.keep = acc_dtype, transpose_b, flip_b, keep
        self.device_id = device_id
        self.fusable = fusable  # a forward whose last step takes an epilogue (:data:`EPILOGUE_ARGS`)
        self._packed = None  # the driver path's argument blocks, built on its first launch

    def launch(self, a: int, b: int, out: int, stream: int | None = None, epilogue: tuple | None = None) -> bool:
        """Launch with device addresses ``a``, ``b``, ``out``. Returns False, launching nothing, when the
        kernel uses 16-byte vector loads and ``a`` or ``b`` is not 16-byte aligned.

        ``stream``: a raw ``cudaStream_t`` to launch on through the CUDA driver, with the arguments packed
        once per kernel (:func:`_launch_driver`); the current device must be ``device_id``. None: through CuPy, on CuPy's
        current stream.
        ``epilogue``: on a ``fusable`` Launch, the values of the forward kernel's last :data:`EPILOGUE_ARGS`
        arguments for its last step (:func:`epilogue_args`): the inference BatchNorm, residual add and ReLU
        applied at the store. ValueError on a Launch that is not fusable."""
        if epilogue is not None and not self.fusable:
            raise ValueError("epilogue given to a Launch that takes none (only an IMPLICIT_GEMM forward does)")
        if self.vec and (a | b) & 15:
            return False
        if stream is not None:
            _launch_driver(self, a, b, out, stream, epilogue)
            return True
        i, j, k = self.holes
        last = len(self.steps) - 1
        for s, (fn, grid, block, smem, template) in enumerate(self.steps):
            args = list(template)
            args[i], args[j], args[k] = a, b, out
            if epilogue is not None and s == last:
                args[-EPILOGUE_ARGS:] = epilogue
            fn((grid,), (block,), tuple(args), shared_mem=smem)
        return True

    def raw_steps(self) -> list[tuple]:
        """``(CUfunction address, grid, block, shared bytes, args)`` of each step, the functions loaded
        on ``device_id``, ``args`` with None at the holes: for launchers outside CuPy (the XLA FFI
        table, :mod:`sparsevox.cuda.ffi_lib`). Valid while this Launch (and its map) lives."""
        import cupy
        dev = self.device_id if self.device_id is not None else cupy.cuda.runtime.getDevice()
        with cupy.cuda.Device(dev):
            return [(int(fn.kernel.ptr), max(1, int(grid)), max(1, int(block)), int(smem), args)
                    for fn, grid, block, smem, args in self.steps]


# --- the driver path of Launch.launch -----------------------------------------------------------
# CuPy's RawKernel call costs 5-8 µs of host time (measured on the H100 host): it converts every
# argument to a fresh C box, looks the stream up and checks the context on each call. A kernel's
# arguments have the same kinds at every launch, so each kernel function has one parameter buffer layout
# (:class:`sparsevox.cuda.cuda_loader.DriverKernel`, shared by every Launch of it on a device): a call
# packs its values with one struct.pack_into and hands the buffer to cuLaunchKernel. A fresh map's Launch
# thus packs nothing new (per-Launch ctypes boxes cost ~50 µs of host time per layer of a fresh scan, 7b3ec93).

def _launch_driver(prep: Launch, a: int, b: int, out: int, stream: int, epilogue: tuple | None = None) -> None:
    packed = prep._packed
    if packed is None:
        import cupy
        dev = prep.device_id if prep.device_id is not None else cupy.cuda.runtime.getDevice()
        packed = prep._packed = [(as_driver_kernel(fn, dev), (max(1, int(grid)),), (max(1, int(block)),), int(smem),
                                  list(args)) for fn, grid, block, smem, args in prep.steps]
    i, j, k = prep.holes
    last = len(packed) - 1
    for s, (kernel, grid, block, smem, template) in enumerate(packed):
        values = template.copy()
        values[i], values[j], values[k] = a, b, out
        if epilogue is not None and s == last:
            values[-EPILOGUE_ARGS:] = epilogue
        kernel(grid, block, values, smem, stream)


# igemm_fwd's trailing epilogue arguments (kernels_cu/implicit_gemm.cu: epilogue): BatchNorm mean, var,
# weight, bias (float32 addresses or 0), residual (an address of the output's dtype and shape, or 0), eps,
# ReLU. NO_EPILOGUE is what every launch passes unless a fused call replaces the last step's.
EPILOGUE_ARGS = 7
NO_EPILOGUE = (0, 0, 0, 0, 0, np.float64(0), np.int32(0))


def epilogue_args(mean: int = 0, var: int = 0, weight: int = 0, bias: int = 0, residual: int = 0, eps: float = 0.0,
                  relu: bool = False) -> tuple:
    """The values of :data:`EPILOGUE_ARGS` for :meth:`Launch.launch`: ``act((y - mean) / sqrt(var + eps) * weight
    + bias + residual)`` applied to the output ``y`` at its store. Addresses of float32 ``[C_out]`` statistics
    (mean 0: no BatchNorm; weight/bias 0: no affine part) and of a residual like the output (0: none)."""
    if bool(mean) != bool(var):
        raise ValueError("mean and var must be given together (both addresses, or both 0)")
    if (weight or bias) and not mean:
        raise ValueError("weight and bias need mean and var (the BatchNorm's affine part)")
    return (int(mean), int(var), int(weight), int(bias), int(residual), np.float64(eps), np.int32(bool(relu)))


def _prepare_gather_gemm(dt, c_a, c_b, kmap, reverse, n_rows, bm, bn, sort_rows, stage_nbr, vec, device_id,
                         variant=None, mask_split=1, flip_b=False, tf32x3=False) -> Launch:
    """The :class:`Launch` of ``out[row] = sum_k src[nbr[k, row]] @ weight_kcn[k]`` (cached on the map).

    ``mask_split``: run the offsets in that many contiguous parts, each with slots sorted by its own
    offsets' bitmask (fewer tile rows without a neighbour at an active offset), the later parts adding
    into the output (spconv's split mask). ``flip_b``: marks the Launch of a mirrored dgrad (see
    :class:`Launch`); the launch itself is the forward one."""
    key = ("implicit_gemm.launch", dt, c_a, c_b, reverse, n_rows, bm, bn, bool(sort_rows), bool(stage_nbr), vec,
           device_id, variant, mask_split, flip_b, bool(tf32x3))
    prep = kmap.derived.get(key)
    if prep is not None:
        return prep
    fn, threads, smem0 = _kernel("fwd", dt, bm, bn, vec, device_id, variant, bool(tf32x3))
    k_count = kmap.num_offsets
    # Stage the tile's neighbour rows (K x BM int32) in shared memory when they fit.
    k_cap = k_count if stage_nbr and k_count * (bm + 1) * 4 <= _NBR_SMEM else 0
    smem = smem0 + k_cap * (bm + 1) * 4
    if smem > 48 * 1024 and _DYN_SET.get(id(fn), 0) < smem:  # raise the opt-in limit once per size
        fn.max_dynamic_shared_size_bytes = smem
        _DYN_SET[id(fn)] = smem
    grid = (-(-n_rows // bm)) * (-(-c_b // bn))
    steps, keep = [], []
    for h in range(mask_split):
        part = _part(k_count, mask_split, h) if mask_split > 1 else None
        slots, nbr = slot_table(kmap, reverse, sort_rows, part)
        masks = tile_masks(kmap, reverse, bm, sort_rows, part)
        steps.append((fn, grid, threads, smem,
                      (None, None, nbr.data.ptr, masks.data.ptr, 0 if slots is None else slots.data.ptr, None, np.int32(n_rows),
                       np.int32(c_a), np.int32(c_b), np.int32(masks.shape[1]), np.int32(k_cap), np.int32(h > 0))
                      + NO_EPILOGUE))
        keep += [nbr, masks, slots]
    if sort_rows:  # unsorted rows (the float16 default) read the unsorted table itself: nothing to drop
        _release_unsorted(kmap, reverse)  # the steps hold their sorted tables; the unsorted one may be unused
    prep = Launch(steps, (0, 1, 5), vec, (n_rows, c_b), transpose_b=reverse or flip_b, keep=tuple(keep),
                  device_id=device_id, flip_b=flip_b, fusable=not (reverse or flip_b))
    kmap.derived[key] = prep
    return prep


def _gather_gemm(src, weight_kcn, kmap, reverse, n_rows, bm, bn, sort_rows, stage_nbr=False, out=None,
                 variant=None, mask_split=1, flip_b=False, tf32x3=False):
    """``out[row] = sum_k src[nbr[k, row]] @ weight_kcn[k]``; weight ``[K, C_a, C_b]`` contiguous.

    ``out`` (optional, ``[n_rows, C_b]`` contiguous, src dtype) is fully overwritten.
    """
    import cupy
    dt = _dtype_name(src)
    c_a, c_b = int(weight_kcn.shape[1]), int(weight_kcn.shape[2])
    if out is None:
        out = cupy.empty((n_rows, c_b), dtype=src.dtype)
    elif tuple(out.shape) != (n_rows, c_b) or out.dtype != src.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {src.dtype} array of shape {(n_rows, c_b)}")
    elif (is_tc(dt) or tf32x3) and out.data.ptr % (2 * out.itemsize):
        # the tensor-core epilogues store two adjacent columns at once (half2, float2)
        raise ValueError(f"out must be aligned to {2 * out.itemsize} bytes (two elements), got address "
                         f"{out.data.ptr:#x}")
    if n_rows == 0 or c_b == 0:
        return out
    if c_a == 0:
        out.fill(0)
        return out
    vec = _vec_ok(dt, c_a, c_b, src, weight_kcn)
    prep = _prepare_gather_gemm(dt, c_a, c_b, kmap, reverse, n_rows, bm, bn, _sorted(sort_rows, dt), stage_nbr, vec,
                                src.device.id, variant, _check_split(mask_split, kmap), flip_b, tf32x3)
    prep.launch(src.data.ptr, weight_kcn.data.ptr, out.data.ptr)
    return out


def _sorted(sort_rows, dtype_name: str) -> bool:
    """``sort_rows`` as given, or when None the process-wide choice for the dtype (:mod:`sparsevox.config`)."""
    if sort_rows is None:
        from ..config import sort_rows as policy
        return bool(policy(dtype_name=dtype_name))
    return bool(sort_rows)


def _check_split(mask_split, kmap) -> int:
    m = int(mask_split)
    if not 1 <= m <= max(1, kmap.num_offsets):
        raise ValueError(f"mask_split must be in [1, K={kmap.num_offsets}], got {mask_split}")
    return m


def forward(feats, weight, kmap, fwd_block_size=None, gemm_block_size=None, sort_rows=None, stage_nbr=False,
            out=None, variant=None, mask_split=1, tf32x3=False):
    """``out [num_out, C_out] = sum_k gather(feats, in_k) @ weight[k]`` scattered to ``out_k``.

    ``sort_rows``: process output rows grouped by neighbour bitmask (fewer skipped-offset misses); None:
    :func:`sparsevox.config.sort_rows` for the dtype.
    ``stage_nbr``: stage the tile's neighbour rows in shared memory once and let warps skip offsets
    their slice lacks (measured v3: no gain on the H100, the extra shared memory costs occupancy; off).
    ``out``: optional preallocated result (every element is written; tests pass it poisoned).
    ``variant``: ``(WM, WN, STAGES[, BK])`` override for benchmark sweeps.
    ``mask_split``: 1 or 2 (searched): the offsets in that many passes, each sorted by its own bitmask.
    ``tf32x3``: float32 on tensor cores, three TF32 products per float32 one (searched for float32).
    """
    import cupy
    feats = cupy.ascontiguousarray(feats)
    weight = cupy.ascontiguousarray(weight)
    bm, bn = _tile(_dtype_name(feats), int(weight.shape[2]), fwd_block_size, gemm_block_size, variant, tf32x3)
    return _gather_gemm(feats, weight, kmap, False, kmap.num_out, bm, bn, sort_rows, stage_nbr, out, variant,
                        mask_split, tf32x3=tf32x3)


def dgrad(grad_out, weight, kmap, fwd_block_size=None, gemm_block_size=None, sort_rows=None, stage_nbr=False,
          out=None, mask_split=1, tf32x3=False):
    """``grad_feats [num_in, C_in]``: the forward kernel on the reverse map with ``weight[k]^T``.

    A submanifold map with odd kernel sizes is its own reverse with the offsets flipped (pair ``(k, out
    m, in j)`` is pair ``(K-1-k, out j, in m)``), so its dgrad is the forward kernel on the forward
    tables with ``weight[K-1-k]^T``: no reverse table, slot sort or tile masks of its own."""
    import cupy
    grad_out = cupy.ascontiguousarray(grad_out)
    flip = _mirrored(kmap)
    wt = cupy.ascontiguousarray((weight[::-1] if flip else weight).transpose(0, 2, 1))
    bm, bn = _tile(_dtype_name(grad_out), int(weight.shape[1]), fwd_block_size, gemm_block_size, None, tf32x3)
    return _gather_gemm(grad_out, wt, kmap, not flip, kmap.num_in, bm, bn, sort_rows, stage_nbr, out,
                        mask_split=mask_split, flip_b=flip, tf32x3=tf32x3)


def _tile(dt, c_out, bm, bn, variant=None, tf32x3=False):
    tiles = tiles_for(dt, check_tf32x3(tf32x3, dt))
    dbm, dbn = default_fwd_tile(dt, c_out)
    if (dbm, dbn) not in tiles:
        dbm, dbn = 64, 64
    bm, bn = int(bm or dbm), int(bn or dbn)
    if variant is None and (bm, bn) not in tiles:
        raise ValueError(f"(fwd_block_size, gemm_block_size) must be one of {sorted(tiles)} "
                         f"for {dt}{' with tf32x3' if tf32x3 else ''}, got {(bm, bn)}")
    return bm, bn


def _wgrad_setup(dt, c_in, c_out, num_pairs, device_id, gemm_block_size, split_k_factor, tf32x3=False):
    """``(tile, chunk)`` of the weight-gradient kernel, validating its parameters."""
    tc = is_tc(dt) or check_tf32x3(tf32x3, dt)
    t = int(gemm_block_size or min(128 if tc else 64, max(32, _pow2ceil(max(c_in, c_out)))))
    if t not in WGRAD_TILES or (not tc and t > 64):
        raise ValueError(f"gemm_block_size for wgrad must be one of {WGRAD_TILES} (SIMT: <= 64), got {t}")
    split = int(split_k_factor or 2)
    if split < 1:
        raise ValueError(f"split_k_factor must be >= 1, got {split}")
    bk = _bk(dt)
    tiles = (-(-c_in // t)) * (-(-c_out // t))
    want = split * _sm_count(device_id)  # CTAs wanted in flight
    chunk = max(bk, -(-num_pairs * tiles // want))
    return t, -(-chunk // bk) * bk


def _prepare_wgrad(dt, c_in, c_out, kmap, num_offsets, t, chunk, vec, device_id, tf32x3=False) -> Launch:
    key = ("implicit_gemm.wgrad_launch", dt, c_in, c_out, num_offsets, t, chunk, vec, device_id, bool(tf32x3))
    prep = kmap.derived.get(key)
    if prep is not None:
        return prep
    chunks, n_chunks = wgrad_chunks(kmap, chunk)
    fn, threads, smem = _kernel("wgrad", dt, t, t, vec, device_id, None, bool(tf32x3))
    tiles = (-(-c_in // t)) * (-(-c_out // t))
    args = (None, None, kmap.in_maps.data.ptr, kmap.out_maps.data.ptr, chunks.data.ptr, None, np.int32(c_in),
            np.int32(c_out))
    prep = Launch([(fn, n_chunks * tiles, threads, smem, args)], (0, 1, 5), vec, (num_offsets, c_in, c_out),
                  acc_dtype="float64" if dt == "float64" else "float32", keep=(chunks, kmap.in_maps, kmap.out_maps),
                  device_id=device_id)
    kmap.derived[key] = prep
    return prep


def wgrad(feats, grad_out, kmap, num_offsets, gemm_block_size=None, split_k_factor=None, tf32x3=False,
          out_dtype=None):
    """``grad_weight [K, C_in, C_out]``, ``grad_weight[k] = feats[in_k]^T @ grad_out[out_k]``, in ``out_dtype``
    (default: the features' dtype; float32 for 16-bit features hands over the accumulator itself)."""
    import cupy
    feats = cupy.ascontiguousarray(feats)
    grad_out = cupy.ascontiguousarray(grad_out)
    dt = _dtype_name(feats)
    c_in, c_out = int(feats.shape[1]), int(grad_out.shape[1])
    acc_dt = cupy.float64 if dt == "float64" else cupy.float32
    acc = cupy.zeros((num_offsets, c_in, c_out), dtype=acc_dt)
    out_dtype = cupy.dtype(out_dtype or feats.dtype)
    if kmap.num_pairs == 0 or c_in == 0 or c_out == 0:
        return acc.astype(out_dtype, copy=False)
    t, chunk = _wgrad_setup(dt, c_in, c_out, kmap.num_pairs, feats.device.id, gemm_block_size, split_k_factor,
                            tf32x3)
    vec = _vec_ok(dt, c_in, c_out, feats, grad_out)
    _prepare_wgrad(dt, c_in, c_out, kmap, num_offsets, t, chunk, vec, feats.device.id, tf32x3).launch(
        feats.data.ptr, grad_out.data.ptr, acc.data.ptr)
    return acc.astype(out_dtype, copy=False)


def prepare(direction, dtype_name, c_in, c_out, kmap, device_id, **params) -> Launch | None:
    """The :class:`Launch` that ``forward``/``dgrad``/``wgrad`` run for a layer of this dtype and
    channel counts with 16-byte aligned inputs (vector loads when the channel counts allow them), or
    None for an empty problem (the CuPy functions handle those). ``params`` as chosen by the plan."""
    if not (c_in and c_out and kmap.num_in and kmap.num_out and kmap.num_pairs):
        return None
    e = 16 // _SIZE[dtype_name]
    vec = c_in % e == 0 and c_out % e == 0
    tf32x3 = check_tf32x3(params.get("tf32x3", False), dtype_name)
    if direction == "wgrad":
        t, chunk = _wgrad_setup(dtype_name, c_in, c_out, kmap.num_pairs, device_id,
                                params.get("gemm_block_size"), params.get("split_k_factor"), tf32x3)
        return _prepare_wgrad(dtype_name, c_in, c_out, kmap, kmap.num_offsets, t, chunk, vec, device_id, tf32x3)
    sort_rows, stage_nbr = _sorted(params.get("sort_rows"), dtype_name), params.get("stage_nbr", False)
    split = _check_split(params.get("mask_split", 1), kmap)
    if direction == "fwd":
        bm, bn = _tile(dtype_name, c_out, params.get("fwd_block_size"), params.get("gemm_block_size"), None, tf32x3)
        return _prepare_gather_gemm(dtype_name, c_in, c_out, kmap, False, kmap.num_out, bm, bn, sort_rows,
                                    stage_nbr, vec, device_id, None, split, False, tf32x3)
    if direction == "dgrad":
        bm, bn = _tile(dtype_name, c_in, params.get("fwd_block_size"), params.get("gemm_block_size"), None, tf32x3)
        flip = _mirrored(kmap)
        return _prepare_gather_gemm(dtype_name, c_out, c_in, kmap, not flip, kmap.num_in, bm, bn, sort_rows,
                                    stage_nbr, vec, device_id, None, split, flip, tf32x3)
    raise ValueError(f"direction must be 'fwd', 'dgrad' or 'wgrad', got {direction!r}")


MASK_SPLIT_MIN_K = 16  # kernels with at least this many offsets also try the two-pass mask split
# ... and the exact SIMT kernels (float32/float64) from this many output channels a three-pass one:
# it pays where the FMAs it saves dominate (H100 run 59d516e: float32 C=256 fwd 2.41 -> 2.28 ms), never
# on tensor cores, which are not MMA-bound (float16 C=256: 0.62 vs 0.55 ms; never picked).
MASK_SPLIT_3_MIN_C = 128


def fwd_params(dtype_name: str, c_out: int, num_offsets: int = 27) -> list[dict]:
    cap = max(32, _pow2ceil(c_out))
    tiles = [{"fwd_block_size": bm, "gemm_block_size": bn} for (bm, bn) in sorted(tiles_for(dtype_name)) if bn <= cap]
    tf32 = [{"fwd_block_size": bm, "gemm_block_size": bn, "tf32x3": True} for (bm, bn) in sorted(TF32X3_TILES)
            if bn <= cap] if _tf32x3_offered(dtype_name) else []
    if num_offsets < MASK_SPLIT_MIN_K or not _sorted(None, dtype_name):
        return tiles + tf32  # a split's passes pay only through their own slot sorts
    splits = (2, 3) if c_out >= MASK_SPLIT_3_MIN_C and not is_tc(dtype_name) else (2,)
    return tiles + [dict(t, mask_split=s) for s in splits for t in tiles] + tf32


def _tf32x3_offered(dtype_name: str) -> bool:
    from ..config import allow_tf32x3
    return dtype_name == "float32" and allow_tf32x3()


def wgrad_params(dtype_name: str, c_in: int, c_out: int) -> list[dict]:
    cap = max(32, _pow2ceil(max(c_in, c_out)))
    sizes = [t for t in WGRAD_TILES if t <= cap and (is_tc(dtype_name) or t <= 64)][-2:]
    out = [{"gemm_block_size": t, "split_k_factor": s} for t in sizes for s in SPLIT_FACTORS]
    if _tf32x3_offered(dtype_name):  # 3xTF32 on tensor cores, tiles as the half types'
        sizes = [t for t in WGRAD_TILES if t <= cap][-2:]
        out += [{"gemm_block_size": t, "split_k_factor": s, "tf32x3": True} for t in sizes for s in (1, 2, 4)]
    return out


# ---- registration -------------------------------------------------------------------------------------
_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _params(direction, problem):
    if direction == "fwd":
        return fwd_params(problem.dtype, problem.c_out, problem.num_offsets)
    if direction == "dgrad":
        return fwd_params(problem.dtype, problem.c_in, problem.num_offsets)
    if direction == "wgrad":
        return wgrad_params(problem.dtype, problem.c_in, problem.c_out)
    raise ValueError(f"direction must be 'fwd', 'dgrad' or 'wgrad', got {direction!r}")


def _roundings(direction, params) -> int:
    """A mask split's later passes add into the output its earlier passes rounded to the output dtype:
    ``mask_split`` roundings per element in forward and dgrad (wgrad accumulates in float32 atomics)."""
    return 1 if direction == "wgrad" else int(params.get("mask_split", 1))


def _available(problem):
    why = gpu_unavailable(problem, "implicit_gemm")
    if why:
        return False, why
    from ..cuda.gpu_info import compute_capability
    if problem.dtype not in _DTYPES:
        return False, f"implicit_gemm supports {_DTYPES}, not {problem.dtype}"
    import cupy
    if compute_capability(cupy.cuda.Device().id) < (8, 0):
        return False, "implicit_gemm needs compute capability 8.0 or newer (mma.sync, cp.async)"
    return True, ""


def _scratch(direction, problem, params) -> int:
    """Device bytes beyond inputs and output: none for forward and dgrad (one kernel writes the output);
    the weight gradient's float32 accumulator for 16-bit data (float32 and float64 accumulate in place)."""
    if direction != "wgrad" or problem.dtype not in ("float16", "bfloat16"):
        return 0
    return 4 * problem.num_offsets * problem.c_in * problem.c_out


register("conv", Algorithm("implicit_gemm", forward, dgrad, wgrad, _params, _available, prepare, _roundings,
                           _scratch))
