"""The real ``kernels_cu/slot_table.cu`` kernels on the CPU (:mod:`slot_table_cpu_emulator`) against NumPy:
the slot keys, the gathered table, the tile masks, the CSR slots and the weight gradient's chunk table
(made on the device since the chunk kernel landed; before, NumPy on the host and a pinned upload per fresh
map). Outputs are poisoned so an element no thread writes shows. The GPU tests run the same kernels
through the convolutions against the float64 oracle."""
import sys
import types

import numpy as np
import pytest

from sparsevox.algorithms import implicit_gemm as ig

emu = pytest.importorskip("slot_table_cpu_emulator")

POISON = -0x2A2A2A2B


@pytest.fixture(scope="module", autouse=True)
def _built():
    try:
        emu.library()
    except Exception as e:  # noqa: BLE001  (no g++ with C++20 here: say so)
        pytest.skip(f"slot-table CPU emulator unavailable: {e}")


def _table(rng, k, rows, p=0.4):
    t = rng.integers(0, 1000, (k, rows)).astype(np.int32)
    t[rng.random((k, rows)) > p] = -1
    return t


def _run(name, grid, block, args, smem=0, wide=False):
    emu.kernel(ig.slot_kernel_name(name, wide))((grid,), (block,), args, smem)


@pytest.mark.parametrize("wide", [False, True])
def test_slot_keys(rng, wide):
    k, rows = (40, 300) if wide else (27, 300)
    t = _table(rng, k, rows)
    bit_of = rng.permutation(np.r_[np.arange(k - 3), [-1, -1, -1]]).astype(np.int32)
    keys = np.full(rows, 0xABABABAB, np.uint64 if wide else np.uint32)
    _run("keys", -(-rows // ig._SLOT_BLOCK), ig._SLOT_BLOCK, (t, np.int32(rows), np.int32(k), bit_of, keys), wide=wide)
    want = np.zeros(rows, np.uint64)
    for kk, b in enumerate(bit_of):
        if b >= 0:
            want |= (t[kk] >= 0).astype(np.uint64) << np.uint64(b)
    np.testing.assert_array_equal(keys.astype(np.uint64), want)


def test_gather_slots(rng):
    k, rows = 8, 517
    t = _table(rng, k, rows)
    order = rng.permutation(rows).astype(np.int32)
    out = np.full((k, rows), POISON, np.int32)
    _run("gather", -(-rows // ig._SLOT_BLOCK), ig._SLOT_BLOCK, (t, order, np.int32(rows), np.int32(k), out))
    np.testing.assert_array_equal(out, t[:, order])


@pytest.mark.parametrize("k0, k1", [(0, 40), (13, 37)])
def test_tile_masks(rng, k0, k1):
    k, rows, bm = 40, 333, 32  # two mask words; the last tile is partial
    t = _table(rng, k, rows, p=0.02)
    tiles, words = -(-rows // bm), 2
    m = np.full((tiles, words), 0xDEADBEEF, np.uint32)
    _run("masks", tiles, ig._MASK_BLOCK, (t, np.int32(rows), np.int32(k), np.int32(k0), np.int32(k1), np.int32(bm),
                                          np.int32(words), m), smem=4 * words)
    want = np.zeros((tiles, words), np.uint32)
    for tile in range(tiles):
        for kk in range(k0, k1):
            if (t[kk, tile * bm:(tile + 1) * bm] >= 0).any():
                want[tile, kk // 32] |= np.uint32(1 << (kk % 32))
    np.testing.assert_array_equal(m, want)


def test_csr_slots(rng):
    counts = rng.integers(0, 40, 8)
    offsets = np.r_[0, np.cumsum(counts)].astype(np.int32)
    rows = int(offsets[-1])
    partner = rng.integers(0, 99, rows).astype(np.int32)
    out = np.full((8, rows), POISON, np.int32)
    _run("csr", -(-rows // ig._SLOT_BLOCK), ig._SLOT_BLOCK, (offsets, np.int32(8), partner, np.int32(rows), out))
    want = np.full((8, rows), -1, np.int32)
    for kk in range(8):
        want[kk, offsets[kk]:offsets[kk + 1]] = partner[offsets[kk]:offsets[kk + 1]]
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("k", [1, 8, 27, 343])  # 343 > the block's 256 threads: some threads take two offsets
def test_wgrad_chunks_equal_chunk_ranges(rng, k):
    for _ in range(3):
        counts = rng.integers(0, 60, k)
        counts[rng.random(k) < 0.3] = 0  # empty offsets give no row
        offsets = np.r_[0, np.cumsum(counts)].astype(np.int32)
        chunk = int(rng.integers(1, 50))
        n = ig.chunk_count(offsets, chunk)
        want = ig.chunk_ranges(offsets, chunk)
        assert n == want.shape[0]
        out = np.full((n + 2, 3), POISON, np.int32)  # two rows past the table: nothing may write there
        _run("chunks", 1, ig._SLOT_BLOCK, (offsets, np.int32(k), np.int32(chunk), out))
        np.testing.assert_array_equal(out[:n], want)
        assert (out[n:] == POISON).all()


def test_a_maps_chunk_table_is_made_on_the_device_once(rng, monkeypatch):
    """``wgrad_chunks(kmap, chunk)``: the kernel's table (no host table, no upload), cached per chunk size."""
    fake = types.ModuleType("cupy")
    fake.int32 = np.int32
    fake.empty = lambda shape, dtype=None: np.full(shape, POISON, dtype)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    launches = []

    def kernel(name, wide=False):
        run = emu.kernel(ig.slot_kernel_name(name, wide))
        return lambda *a, **kw: launches.append(name) or run(*a, **kw)
    monkeypatch.setattr(ig, "_slot_kernel", kernel)
    monkeypatch.setattr(ig, "_upload", lambda host: pytest.fail("the chunk table was uploaded from the host"))
    counts = rng.integers(0, 90, 27)
    offsets = np.r_[0, np.cumsum(counts)].astype(np.int32)
    kmap = types.SimpleNamespace(derived={}, offsets=offsets, offsets_host=offsets.astype(np.int64), num_offsets=27)
    table, n = ig.wgrad_chunks(kmap, 16)
    np.testing.assert_array_equal(table, ig.chunk_ranges(offsets, 16))
    assert n == table.shape[0] and launches == ["chunks"]
    assert ig.wgrad_chunks(kmap, 16)[0] is table and launches == ["chunks"]
    assert ig.wgrad_chunks(kmap, 32)[1] == ig.chunk_ranges(offsets, 32).shape[0] and len(launches) == 2
    empty = types.SimpleNamespace(derived={}, offsets=np.zeros(28, np.int32), offsets_host=np.zeros(28, np.int64),
                                  num_offsets=27)
    assert ig.wgrad_chunks(empty, 16)[1] == 0 and len(launches) == 2  # no rows: nothing to launch
