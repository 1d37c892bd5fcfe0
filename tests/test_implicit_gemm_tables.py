"""Which [K, rows] int32 tables IMPLICIT_GEMM keeps on a kernel map (issue 19, memory), on the CPU.

The Python that makes and drops the tables (``neighbour_table``, ``slot_table``, ``tile_masks``,
``prepare``) runs here on NumPy: maps from the GPU builder through the CUDA CPU emulator (so ``dense_nbr``
and ``offsets`` share one allocation, as on the GPU), NumPy standing in for CuPy, and the slot-table kernels
and the forward kernel as NumPy loops with the semantics of ``kernels_cu/slot_table.cu`` and
``igemm_fwd`` (a launch reads ``nbr[k, slot]`` only for the offsets of its tile's mask). New allocations
are poisoned with an index no table holds, so a row read that no kernel wrote fails. The GPU tests in
tests/test_implicit_gemm.py run the real kernels on the same rules against the float64 oracle.

- one ``[K, rows]`` array for all parts of a mask split (the parts hold disjoint offsets);
- a sorted launch drops the unsorted table (the builder's ``dense_nbr``, its allocation freed with it),
  unless an unsorted launch reads it; a later table rebuilds it from the sorted tables, exactly.
"""
import gc
import sys
import types
import weakref

import numpy as np
import pytest
from reference import random_voxels

from sparsevox.algorithms import implicit_gemm as ig
from sparsevox.cuda import gpu_kernel_map
from sparsevox.kernel_map import _swapped

BM = 32  # rows per tile of the launches prepared here


class _Dev(np.ndarray):
    """A NumPy array with CuPy's ``.data.ptr`` (what the launches record)."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


def _dev(a):
    return np.asarray(a).view(_Dev)


def _fake_cupy():
    m = types.ModuleType("cupy")
    m.int32, m.uint32, m.uint64 = np.int32, np.uint32, np.uint64

    def empty(shape, dtype=np.float64):
        a = np.empty(shape, dtype)
        a.reshape(-1).view(np.uint8).fill(0x7F)  # int32 0x7F7F7F7F: an index past any row
        return _dev(a)
    m.empty = empty
    m.full = lambda shape, value, dtype=None: _dev(np.full(shape, value, dtype))
    m.arange = lambda *a, **k: _dev(np.arange(*a, **k))
    m.repeat = lambda a, r: _dev(np.repeat(a, r))
    m.ascontiguousarray = lambda a, dtype=None: _dev(np.ascontiguousarray(a, dtype))
    return m


def _matrix(a, k_count, rows):
    """A kernel's view of the address ``a``: ``[k_count, rows]`` int32 from its first element."""
    flat = a.reshape(-1)
    assert np.shares_memory(flat, a) and flat.flags.c_contiguous
    return flat[:k_count * rows].reshape(k_count, rows)


def _slot_kernel(name, wide=False):
    def keys(grid, block, args, shared_mem=0):
        nbr, rows, k_count, bit_of, out = args
        t = _matrix(nbr, int(k_count), int(rows))
        key = np.zeros(int(rows), np.uint64)
        for k, b in enumerate(bit_of.tolist()):
            if b >= 0:
                key |= (t[k] >= 0).astype(np.uint64) << np.uint64(b)
        out[:] = key

    def gather(grid, block, args, shared_mem=0):
        nbr, order, rows, k_count, out = args
        _matrix(out, int(k_count), int(rows))[:] = _matrix(nbr, int(k_count), int(rows))[:, order]

    def masks(grid, block, args, shared_mem=0):
        nbr, rows, k_count, k0, k1, bm, words, m = args
        t = _matrix(nbr, int(k_count), int(rows))
        m[:] = 0
        for tile in range(m.shape[0]):
            for k in range(int(k0), int(k1)):
                if (t[k, tile * int(bm):(tile + 1) * int(bm)] >= 0).any():
                    m[tile, k // 32] |= np.uint32(1 << (k % 32))

    def csr(grid, block, args, shared_mem=0):
        offsets, k_count, partner, rows, out = args
        o = np.asarray(offsets)
        t = _matrix(out, int(k_count), int(rows))
        t[:] = -1
        for s in range(int(rows)):
            k = int(np.searchsorted(o[1:], s, side="right"))
            t[k, s] = partner[s]
    return {"keys": keys, "gather": gather, "masks": masks, "csr": csr}[name]


@pytest.fixture
def np_tables(monkeypatch):
    """NumPy in place of CuPy for the table code of implicit_gemm, and the kernels it launches."""
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy())
    monkeypatch.setattr(ig, "_slot_kernel", _slot_kernel)
    monkeypatch.setattr(ig, "_upload", lambda host: (_dev(host.copy()), None))
    monkeypatch.setattr(ig, "radix_sort", types.SimpleNamespace(
        argsort=lambda keys, bits: _dev(np.argsort(keys, kind="stable").astype(np.int32))))
    monkeypatch.setattr(ig, "_kernel", lambda *a, **k: (types.SimpleNamespace(), 128, 4096))


def _build(emulated, coords, ks=3, stride=1, out=None):
    """A map of the GPU builder on the emulator, its device arrays seen as :class:`_Dev`."""
    kmap = gpu_kernel_map.build(emulated, coords, ks, stride, 1, False, False, out).wait()
    kmap.dense_nbr, kmap.offsets = kmap.dense_nbr.view(_Dev), kmap.offsets.view(_Dev)
    kmap._in_maps, kmap._out_maps = _dev(kmap._in_maps), _dev(kmap._out_maps)
    return kmap


def _csr_table(kmap, reverse=False):
    """The unsorted table scattered from the CSR pairs (the reference)."""
    ins, outs, o = np.asarray(kmap.in_maps), np.asarray(kmap.out_maps), np.asarray(kmap.offsets_host)
    t = np.full((kmap.num_offsets, kmap.num_in if reverse else kmap.num_out), -1, np.int32)
    for k in range(kmap.num_offsets):
        dst, src = (ins, outs) if reverse else (outs, ins)
        t[k, dst[o[k]:o[k + 1]]] = src[o[k]:o[k + 1]]
    return t


def _owner(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _big_tables(kmap, rows):
    """The distinct allocations of at least ``K * rows`` int32 that the map holds (its ``dense_nbr`` and
    everything under ``derived``, prepared launches included): what the tables cost."""
    found, todo = {}, [kmap.dense_nbr, *kmap.derived.values()]
    while todo:
        v = todo.pop()
        if isinstance(v, np.ndarray):
            o = _owner(v)
            if o.nbytes >= kmap.num_offsets * rows * 4:
                found[id(o)] = o
        elif isinstance(v, (tuple, list)):
            todo += list(v)
        elif isinstance(v, ig.Launch):
            todo += list(v.keep)
    return list(found.values())


def _run(prep, x, w):
    """The prepared forward launch on NumPy with igemm_fwd's semantics (float64)."""
    n_rows, c_out = prep.out_shape
    out = np.full((n_rows, c_out), np.nan)
    for (fn, grid, block, smem, args), i in zip(prep.steps, range(0, len(prep.keep), 3)):
        nbr, masks, slots = prep.keep[i:i + 3]
        bm = BM
        acc = np.zeros((n_rows, c_out))
        for s in range(n_rows):
            bits = masks[s // bm]
            for k in range(w.shape[0]):
                if bits[k // 32] >> np.uint32(k % 32) & 1:
                    j = int(nbr[k, s])
                    assert j < x.shape[0], f"slot {s} offset {k}: a row no kernel wrote ({j})"
                    if j >= 0:
                        acc[s] += x[j] @ w[k]
        rows = np.arange(n_rows) if slots is None else np.asarray(slots)  # None: the identity order
        out[rows] = acc + out[rows] if args[11] else acc
    return out


def _reference(kmap, x, w):
    o, ins, outs = kmap.offsets_host, np.asarray(kmap.in_maps), np.asarray(kmap.out_maps)
    out = np.zeros((kmap.num_out, w.shape[2]))
    for k in range(kmap.num_offsets):
        np.add.at(out, outs[o[k]:o[k + 1]], x[ins[o[k]:o[k + 1]]] @ w[k])
    return out


def _check_slot_entries(kmap, reverse=False):
    """Every cached sorted slot table: a permutation of the rows, and its offsets' rows the unsorted
    table's in that order."""
    want = _csr_table(kmap, reverse)
    prefix = ig._slots_prefix(reverse, True)
    seen = 0
    for key, got in list(kmap.derived.items()):
        if isinstance(key, str) and key.startswith(prefix):
            order, table = got
            k0, k1 = (int(v) for v in key[len(prefix):].split("."))
            np.testing.assert_array_equal(np.sort(order), np.arange(want.shape[1]))
            np.testing.assert_array_equal(table[k0:k1], want[k0:k1][:, order], err_msg=key)
            seen += 1
    return seen


def _fwd(kmap, rng, c=4, split=1, dtype="float32", sort_rows=True):
    """Prepare a forward launch; run it on NumPy and check it against the CSR reference."""
    prep = ig.prepare("fwd", dtype, c, c, kmap, 0, mask_split=split, sort_rows=sort_rows, fwd_block_size=BM,
                      gemm_block_size=32)
    x = rng.standard_normal((kmap.num_in, c))
    w = rng.standard_normal((kmap.num_offsets, c, c))
    np.testing.assert_allclose(_run(prep, x, w), _reference(kmap, x, w), rtol=1e-12, atol=1e-12)
    return prep


def test_the_parts_of_a_mask_split_share_one_table(emulated, np_tables, rng):
    """Both parts of a split in one [K, rows] array (their rows k0..k1 each); a three-part split on the same
    map overlaps those ranges and gets a second one; the whole table its own. Before: one per part."""
    kmap = _build(emulated, random_voxels(rng, 700, extent=9, batches=2))
    rows = kmap.num_out
    two = _fwd(kmap, rng, split=2)
    assert two.keep[0] is two.keep[3], "the two parts gather into one array"
    assert len(_big_tables(kmap, rows)) == 1, "the unsorted table went, the parts share one array"
    three = _fwd(kmap, rng, split=3)
    assert three.keep[0] is three.keep[3] is three.keep[6] and three.keep[0] is not two.keep[0]
    whole = _fwd(kmap, rng, split=1)
    assert whole.keep[0] is not two.keep[0] and whole.keep[0] is not three.keep[0]
    assert len(_big_tables(kmap, rows)) == 3  # was 7: the unsorted table, the whole one, 2 + 3 parts
    assert _check_slot_entries(kmap) == 6
    x, w = rng.standard_normal((rows, 4)), rng.standard_normal((27, 4, 4))
    for prep in (two, three, whole):  # no later table wrote over an earlier launch's rows
        np.testing.assert_allclose(_run(prep, x, w), _reference(kmap, x, w), rtol=1e-12, atol=1e-12)


def test_a_sorted_launch_frees_the_builders_table(emulated, np_tables, rng):
    """After a sorted launch the map holds no unsorted table: ``dense_nbr`` is None and its allocation
    (which ``offsets`` shared) is freed; offsets, pairs and later launches are unchanged."""
    kmap = _build(emulated, random_voxels(rng, 600, extent=9, batches=2))
    rows, offsets = kmap.num_out, np.array(kmap.offsets)
    owner = weakref.ref(_owner(kmap.dense_nbr))
    assert _owner(kmap.offsets) is owner()  # one allocation: what the release has to undo
    _fwd(kmap, rng, split=1)
    assert kmap.dense_nbr is None and "implicit_gemm.nbr" not in kmap.derived
    np.testing.assert_array_equal(kmap.offsets, offsets)
    gc.collect()
    assert owner() is None, "the builder's allocation is still held"
    assert len(_big_tables(kmap, rows)) == 1
    # another split needs the unsorted table: rebuilt from the whole sorted one, used, dropped again
    _fwd(kmap, rng, split=2)
    assert kmap.dense_nbr is None and "implicit_gemm.nbr" not in kmap.derived
    assert len(_big_tables(kmap, rows)) == 2
    assert _check_slot_entries(kmap) == 3
    # and from the two parts alone (no whole table cached)
    kmap.derived.pop(ig._slots_prefix(False, True) + f"0.{kmap.num_offsets}")
    np.testing.assert_array_equal(ig.neighbour_table(kmap), _csr_table(kmap))


def test_an_unsorted_launch_keeps_the_table_it_reads(emulated, np_tables, rng):
    """Unsorted rows (the float16 default) read the unsorted table itself: a sorted launch on the same map
    must leave it, in either order, and the launches stay right."""
    kmap = _build(emulated, random_voxels(rng, 500, extent=9, batches=2))
    dense = kmap.dense_nbr
    unsorted = _fwd(kmap, rng, dtype="float16", sort_rows=False)
    assert unsorted.keep[0] is dense
    _fwd(kmap, rng, split=2)
    assert kmap.dense_nbr is dense
    _fwd(kmap, rng, dtype="float16", sort_rows=False)

    other = _build(emulated, random_voxels(rng, 500, extent=9, batches=2))
    _fwd(other, rng, split=1)  # drops it
    assert other.dense_nbr is None
    again = _fwd(other, rng, dtype="float16", sort_rows=False)  # rebuilt, and kept for this launch
    np.testing.assert_array_equal(again.keep[0], _csr_table(other))
    _fwd(other, rng, split=3)
    assert other.derived["implicit_gemm.nbr"] is again.keep[0]


def test_reverse_and_twin_tables_are_dropped_too(emulated, np_tables, rng):
    """A strided map's sorted dgrad drops the reverse table scattered from the CSR; its swapped transposed
    twin's sorted forward drops the reverse table in the twin, and its dgrad (the twin's forward) the
    builder's table."""
    fine = random_voxels(rng, 700, extent=10, batches=2)
    k3s2 = _build(emulated, fine, 3, 2)
    ig.prepare("dgrad", "float32", 4, 4, k3s2, 0, mask_split=2, sort_rows=True)
    assert "implicit_gemm.nbr_rev" not in k3s2.derived and _check_slot_entries(k3s2, True) == 2
    assert k3s2.dense_nbr is not None  # the forward table: no forward launch yet

    down = _build(emulated, fine, 3, 2)
    up = _swapped(down, fine, (3, 3, 3), (2, 2, 2), (1, 1, 1))
    owner = weakref.ref(_owner(down.dense_nbr))
    assert _owner(up.offsets) is owner()  # the twin's offsets, in the builder's allocation
    ig.prepare("fwd", "float32", 4, 4, up, 0, sort_rows=True)
    assert "implicit_gemm.nbr_rev" not in down.derived and _check_slot_entries(down, True) == 1
    ig.prepare("dgrad", "float32", 4, 4, up, 0, mask_split=2, sort_rows=True)
    assert down.dense_nbr is None and _check_slot_entries(down) == 2
    assert up.offsets is down.offsets  # moved out with the twin's
    gc.collect()
    assert owner() is None, "the builder's allocation is still held"
    np.testing.assert_array_equal(ig.neighbour_table(up, True), _csr_table(down))
