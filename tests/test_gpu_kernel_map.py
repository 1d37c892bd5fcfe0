"""The GPU kernel-map builder (hash table, kernels_cu/kernel_map.cu) equals the NumPy builder exactly.

Two drivers of the same Python builder (:func:`sparsevox.cuda.gpu_kernel_map.build`) and the same CUDA source:
- on the GPU (``@pytest.mark.gpu``): every kind, kernel size, stride, dilation and batch count on random
  inputs, limits, N = 0, duplicates, and the real scans of ``pointcloud_dir()``;
- on the CPU through ``tests/cuda_cpu_emulator.py`` (the kernels compiled as C++, one thread per CUDA
  thread): a smaller set, so the kernels' logic is checked where no GPU is present, including maps of
  many scan tiles (also with look-backs forced across several 32-tile windows), tiles of several rows
  per thread with m below, at and above one tile, and the launch sequence;
- the symmetric SubM path (odd kernel sizes: only offsets before the centre probe, the rest mirror):
  taken when it should be and only then (the launch flag, and a table missing one voxel, which shows
  which lookups really happened), on both drivers.
Both check the kept query table ``KernelMap.dense_nbr`` against the CSR pairs.
"""
import itertools
from pathlib import Path

import numpy as np
import pytest
from conftest import pointcloud_dir
from reference import expected_out_coords, random_voxels

import sparsevox as sv
from sparsevox.cuda import gpu_kernel_map
from sparsevox.geometry import BATCH_MAX, COORD_MAX, COORD_MIN
from sparsevox.kernel_map import build_kernel_map as numpy_builder
from sparsevox.testing import BATCHES, DILATIONS, KERNEL_SIZES, KINDS, STRIDES, kind_args

FIELDS = ("in_maps", "out_maps", "offsets", "offsets_host", "out_coords")


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def assert_same_map(got, want, what=""):
    for f in FIELDS:
        a, b = _host(getattr(got, f)), _host(getattr(want, f))
        assert a.dtype == b.dtype, f"{what} {f}: dtype {a.dtype} != {b.dtype}"
        assert a.shape == b.shape, f"{what} {f}: shape {a.shape} != {b.shape}"
        if not np.array_equal(a, b):
            bad = np.argwhere(a != b)[:5].tolist()
            raise AssertionError(f"{what} {f}: differs at {bad} (of {a.size})")
    for f in ("num_in", "num_out", "kind", "kernel_size", "stride", "dilation"):
        assert getattr(got, f) == getattr(want, f), f"{what} {f}: {getattr(got, f)} != {getattr(want, f)}"


def reference_map(coords, *args, out=None):
    return numpy_builder(coords, sv.Voxels(coords, None).sorted_keys(), *args, out)


def make_coords(rng, kind, stride, batches, n=60, extent=7):
    """(input coords, output coords or None) as NumPy int32; transposed inputs are the coarse level."""
    fine = random_voxels(rng, n * batches, extent=extent, batches=batches)
    if kind == "transposed":
        return expected_out_coords(fine, 2, stride, 1, False, False), fine
    return fine, None


EDGE = np.array([[0, COORD_MAX, COORD_MAX, COORD_MAX], [0, COORD_MAX - 1, COORD_MAX, COORD_MAX],
                 [BATCH_MAX, COORD_MIN, COORD_MIN, COORD_MIN], [BATCH_MAX, COORD_MIN + 1, COORD_MIN, COORD_MIN],
                 [0, COORD_MIN, COORD_MAX, 0],
                 # packs to all ones, the bits of a free hash slot: it has a slot of its own
                 [BATCH_MAX, COORD_MAX, COORD_MAX, COORD_MAX], [BATCH_MAX, COORD_MAX, COORD_MAX, COORD_MAX - 1]],
                np.int32)
EMPTY = np.zeros((0, 4), np.int32)
EDGE_CASES = [  # (coords, kernel_size, stride, dilation, transposed, generative, out)
    (EMPTY, 3, 1, 1, False, False, None), (EMPTY, 3, 2, 1, False, False, None),
    (EMPTY, 2, 2, 1, True, True, None), (EMPTY, 3, 2, 1, True, False, np.array([[0, 1, 1, 1]], np.int32)),
    (np.array([[0, 1, 1, 1]], np.int32), 3, 2, 1, True, False, EMPTY),
    (np.array([[0, 1, 1, 1], [0, 2, 2, 2]], np.int32), 3, 1, 1, False, False, np.array([[0, 1, 1, 1]], np.int32)),
    (EDGE, 3, 1, 1, False, False, None), (EDGE, 3, 2, 1, False, False, None),
    (EDGE, (2, 3, 1), 3, 2, False, False, None),
]


# --- on the CPU, through the emulator -------------------------------------------------------------

EMU_CASES = [("submanifold", 3, 1, 1, 1), ("submanifold", (3, 1, 2), 1, 2, 3), ("submanifold", 2, 1, 1, 1),
             ("strided", 2, 2, 1, 1), ("strided", 3, (1, 2, 3), 2, 3), ("transposed", 2, 2, 1, 1),
             ("transposed", 3, (2, 1, 2), 1, 3), ("generative", 2, 2, 1, 1), ("generative", (3, 1, 3), 2, 2, 3)]


@pytest.mark.parametrize("kind,ks,stride,dilation,batches", EMU_CASES)
def test_emulated_kernels_match_numpy_builder(emulated, rng, kind, ks, stride, dilation, batches):
    s, tr, gen = kind_args(kind, stride)
    coords, out = make_coords(rng, kind, s, batches, n=40, extent=6)
    got = gpu_kernel_map.build(emulated, coords, ks, s, dilation, tr, gen, out)
    assert_same_map(got, reference_map(coords, ks, s, dilation, tr, gen, out=out), kind)


@pytest.mark.parametrize("case", range(len(EDGE_CASES)))
def test_emulated_edges_and_empty(emulated, case):
    coords, ks, s, d, tr, gen, out = EDGE_CASES[case]
    got = gpu_kernel_map.build(emulated, coords, ks, s, d, tr, gen, out)
    assert_same_map(got, reference_map(coords, ks, s, d, tr, gen, out=out), f"edge case {case}")


def assert_raises_on_every_use(kmap, match):
    """A map of unvalidated bad coordinates: built (its kernels queued) without raising, it raises its
    ``ValueError`` on every use of its pairs and stays unusable."""
    assert not kmap.ready
    uses = {"in_maps": lambda: kmap.in_maps, "out_maps": lambda: kmap.out_maps,
            "offsets_host": lambda: kmap.offsets_host, "num_pairs": lambda: kmap.num_pairs,
            "iteration": lambda: tuple(kmap), "wait": kmap.wait}
    for name, use in uses.items():
        with pytest.raises(ValueError, match=match):
            use()
        assert not kmap.ready, f"{name}: a map of bad coordinates became ready"


def test_emulated_errors(emulated):
    dup = np.array([[0, 1, 2, 3], [1, 1, 2, 3], [0, 1, 2, 3], [0, 5, 5, 5]], np.int32)
    assert_raises_on_every_use(gpu_kernel_map.build(emulated, dup, 3, 1, 1, False, False),
                               r"unique.*\[0, 1, 2, 3\]")
    ones = np.array([[BATCH_MAX, COORD_MAX, COORD_MAX, COORD_MAX]] * 2, np.int32)
    assert_raises_on_every_use(gpu_kernel_map.build(emulated, ones, 3, 1, 1, False, False),
                               r"unique.*\[1023, 131071, 131071, 131071\]")
    bad = np.array([[0, COORD_MAX + 1, 0, 0]], np.int32)
    assert_raises_on_every_use(gpu_kernel_map.build(emulated, bad, 3, 1, 1, False, False), "x must be in")
    assert_raises_on_every_use(gpu_kernel_map.build(emulated, bad, 2, 2, 1, False, False), "x must be in")
    far = np.array([[0, COORD_MAX // 2 + 1, 0, 0]], np.int32)
    with pytest.raises(ValueError, match="generated output coordinates"):
        gpu_kernel_map.build(emulated, far, 2, 2, 1, True, True)
    # Argument-kind errors (missing output_voxels, generative without transposed) are checked once in
    # sparsevox.kernel_map() before any builder runs: tests/test_voxels.py covers them.


def test_emulated_real_scan(emulated):
    """The 800-point KITTI test scan at 5 cm (766 voxels): SubM k3, k2 s2 down, up and generative."""
    coords = _scan_coords(_find_scan("kitti_test_000000.bin"))
    assert_same_map(gpu_kernel_map.build(emulated, coords, 3, 1, 1, False, False),
                    reference_map(coords, 3, 1, 1, False, False), "subm k3")
    down = gpu_kernel_map.build(emulated, coords, 2, 2, 1, False, False)
    assert_same_map(down, reference_map(coords, 2, 2, 1, False, False), "down k2")
    coarse = down.out_coords
    assert_same_map(gpu_kernel_map.build(emulated, coarse, 2, 2, 1, True, False, coords),
                    reference_map(coarse, 2, 2, 1, True, False, out=coords), "up k2")
    assert_same_map(gpu_kernel_map.build(emulated, coarse, 2, 2, 1, True, True),
                    reference_map(coarse, 2, 2, 1, True, True), "generative k2")


def csr_table(kmap):
    """``[K, num_out]`` int32 ``nbr[k, out] = in`` (-1 absent) scattered from the CSR arrays."""
    host = np.asarray(kmap.offsets_host)
    nbr = np.full((len(host) - 1, kmap.num_out), -1, np.int32)
    k = np.repeat(np.arange(len(host) - 1), np.diff(host))
    nbr[k, _host(kmap.out_maps)] = _host(kmap.in_maps)
    return nbr


def assert_dense_nbr(kmap, what=""):
    from sparsevox.algorithms.implicit_gemm import neighbour_table
    nbr = kmap.dense_nbr
    assert nbr is not None, f"{what}: the GPU builder must keep its query table"
    h = _host(nbr)
    assert h.dtype == np.int32 and h.shape == (kmap.num_offsets, kmap.num_out), f"{what}: {h.dtype} {h.shape}"
    np.testing.assert_array_equal(h, csr_table(kmap), err_msg=what)
    assert neighbour_table(kmap) is nbr, f"{what}: implicit GEMM must reuse dense_nbr"


@pytest.mark.parametrize("kind,ks,stride,dilation,batches", EMU_CASES)
def test_emulated_dense_nbr_matches_csr(emulated, rng, kind, ks, stride, dilation, batches):
    s, tr, gen = kind_args(kind, stride)
    coords, out = make_coords(rng, kind, s, batches, n=40, extent=6)
    assert_dense_nbr(gpu_kernel_map.build(emulated, coords, ks, s, dilation, tr, gen, out), kind)


@pytest.fixture(scope="module")
def emulated_with():
    """``emulated_with(prefix_every=0, items=ITEMS, probe_items=items, window=0)``: an emulated device
    (``window``: hash lookups with SVX_HASH_WINDOW=window, 0 the source's) whose kernels are built with
    ``SVX_KMAP_PREFIX_EVERY=prefix_every`` (only every n-th tile publishes an inclusive prefix, so
    look-backs sum aggregates across more than one 32-tile window; on the CPU the previous tile is
    otherwise always complete) and ``kmap_probe`` and ``kmap_compact<256, items>`` (tiles of 256 * items rows)."""
    import cuda_cpu_emulator as emu
    ok, reason = emu.available()
    if not ok:
        pytest.skip(f"CUDA CPU emulator unavailable: {reason}")
    devices = {}

    def get(prefix_every=0, items=gpu_kernel_map.ITEMS, probe_items=None, window=0):
        key = (prefix_every, items, probe_items, window)
        if key not in devices:
            devices[key] = emu.EmulatedDevice(prefix_every=prefix_every, items=items,
                                              probe_items=items if probe_items is None else probe_items,
                                              window=window)
        return devices[key]
    return get


MANY_TILE_CASES = [("submanifold", 3, 1, 1), ("submanifold", (3, 1, 2), 1, 2), ("strided", 2, 2, 1),
                   ("transposed", 2, 2, 1)]


@pytest.mark.parametrize("sparse_prefixes", [False, True])
@pytest.mark.parametrize("kind,ks,stride,dilation", MANY_TILE_CASES)
def test_emulated_many_tiles_match_numpy_builder(emulated_with, rng, sparse_prefixes, kind, ks, stride, dilation):
    """Tiles of 256 rows (items=1): more than 3 row tiles per offset and several offsets, so the
    single-pass scan carries across tiles (and, with sparse prefixes, across look-back windows)."""
    dev = emulated_with(prefix_every=40 if sparse_prefixes else 0, items=1)
    s, tr, gen = kind_args(kind, stride)
    coords, out = make_coords(rng, kind, s, 2, n=900, extent=12)
    m = (out if out is not None else coords).shape[0]
    if kind != "strided":
        assert m > 3 * gpu_kernel_map.BLOCK
    got = gpu_kernel_map.build(dev, coords, ks, s, dilation, tr, gen, out)
    assert_same_map(got, reference_map(coords, ks, s, dilation, tr, gen, out=out), f"{kind} many tiles")
    assert_dense_nbr(got, f"{kind} many tiles")


def _slots(coords, capacity):
    """The table slot each voxel's key hashes to (kernels_cu/common/hash.cuh: pack_key, then mix)."""
    from sparsevox.geometry import pack_keys
    k = pack_keys(coords)
    with np.errstate(over="ignore"):
        k ^= k >> np.uint64(30)
        k *= np.uint64(0xBF58476D1CE4E5B9)
        k ^= k >> np.uint64(27)
        k *= np.uint64(0x94D049BB133111EB)
        k ^= k >> np.uint64(31)
    return (k & np.uint64(capacity - 1)).astype(np.int64)


@pytest.mark.parametrize("window", [1, 2, 4])
def test_emulated_probe_chains_cross_windows_and_wrap(emulated_with, window):
    """16 voxels (a 64-slot table): 7 pairs of z-neighbours, each with one voxel hashing to the last
    slots, so insert and lookup chains cross window boundaries and wrap past the last slot; and the
    all-ones key (batch 1023, x = y = z = 131071, its own slot) with its -x neighbour, which looks it up."""
    dev = emulated_with(window=window)
    box = np.stack(np.meshgrid(np.arange(12), np.arange(12), np.arange(12), indexing="ij"), -1).reshape(-1, 3)
    cand = np.concatenate([np.zeros((len(box), 1), int), box], 1).astype(np.int32)
    last = cand[_slots(cand, 64) >= 60]
    last = last[last[:, 3] < 11][:7]
    top = (1023, 131071, 131071, 131071)
    coords = np.concatenate([last, last + np.array([0, 0, 0, 1], np.int32),
                             np.array([top, (1023, 131070, 131071, 131071)], np.int32)])
    assert len(np.unique(coords, axis=0)) == 16 == len(coords)
    (table, mask), dup, bad = gpu_kernel_map.hash_table(dev, coords)
    assert (dup, bad, mask + 1) == (-1, -1, 64)
    occupied = table[:128:2] != np.uint64(2 ** 64 - 1)
    assert occupied[63] and occupied[0], "no chain wrapped past the last slot"
    for ks in (3, (3, 3, 2)):
        got = gpu_kernel_map.build(dev, coords, ks, 1, 1, False, False)
        assert_same_map(got, reference_map(coords, ks, 1, 1, False, False), f"k{ks} window {window}")
        assert_dense_nbr(got, f"k{ks} window {window}")


def test_emulated_look_back_across_windows_within_an_offset(emulated_with, rng):
    """A tile looks back over the earlier tiles of its own offset only (the earlier offsets come from
    their totals): 36 tiles of 256 rows per offset, and no tile but an offset's first publishing a
    prefix, so the last tiles sum aggregates across two 32-tile windows down to their offset's start."""
    dev = emulated_with(prefix_every=1000, items=1)
    coords = random_voxels(rng, 9000, extent=24, batches=2)
    dev.grids.clear()
    dev.launches.clear()
    got = gpu_kernel_map.build(dev, coords, (1, 1, 2), 1, 1, False, False)
    assert dev.grids[dev.launches.index("compact")] == 2 * 36
    assert_same_map(got, reference_map(coords, (1, 1, 2), 1, 1, False, False), "two offsets of 36 tiles")
    assert_dense_nbr(got, "two offsets of 36 tiles")


# (kind, kernel size, output rows m, prefix_every, items, probe items): 2048-row tiles (items 8) with m
# below one tile, exactly one tile, and several tiles with a partial last one (with and without sparse
# prefixes); items = 3 and 5 make the per-tile (item, warp) group count no multiple of 32; the
# production pairing (compact tiles of 4096 rows, probe blocks of 512) over three compact tiles.
BIG_TILE_CASES = [("submanifold", 3, 700, 0, 8, 8), ("submanifold", 3, 2048, 0, 8, 8),
                  ("submanifold", 3, 4500, 0, 8, 8), ("submanifold", 3, 4500, 40, 8, 8),
                  ("transposed", 2, 4500, 0, 8, 8), ("transposed", 3, 4500, 5, 8, 8), ("submanifold", 3, 1700, 7, 3, 3),
                  ("submanifold", (3, 1, 2), 1300, 0, 5, 5),
                  ("submanifold", 3, 9000, 0, gpu_kernel_map.ITEMS, gpu_kernel_map.PROBE_ITEMS),
                  ("transposed", 2, 9000, 0, gpu_kernel_map.ITEMS, gpu_kernel_map.PROBE_ITEMS)]


@pytest.mark.parametrize("kind,ks,m,prefix_every,items,probe_items", BIG_TILE_CASES)
def test_emulated_big_tiles_match_numpy_builder(emulated_with, rng, kind, ks, m, prefix_every, items, probe_items):
    """Tiles of BLOCK * items output rows of one offset: K * ceil(m / (BLOCK * items)) tiles, pairs in
    row order across the items of a thread and the warps of a block; dense inputs (most rows hit)."""
    dev = emulated_with(prefix_every=prefix_every, items=items, probe_items=probe_items)
    rng_coords = random_voxels(rng, m, extent=14 if m < 5000 else 20, batches=2)
    assert rng_coords.shape[0] == m
    if kind == "transposed":  # outputs: the m fine voxels; inputs: their coarse level
        coords, out = expected_out_coords(rng_coords, 2, 2, 1, False, False), rng_coords
        s, tr = 2, True
    else:
        coords, out, s, tr = rng_coords, None, 1, False
    dev.grids.clear()
    dev.launches.clear()
    got = gpu_kernel_map.build(dev, coords, ks, s, 1, tr, False, out)
    num_k = int(np.prod(np.broadcast_to(ks, 3)))
    tile = gpu_kernel_map.BLOCK * items
    assert dev.grids[dev.launches.index("compact")] == num_k * -(-m // tile)
    probed = num_k // 2 + 1 if kind == "submanifold" and all(v % 2 for v in np.broadcast_to(ks, 3)) else num_k
    assert dev.grids[dev.launches.index("probe")] == probed * -(-m // (gpu_kernel_map.BLOCK * probe_items))
    assert_same_map(got, reference_map(coords, ks, s, 1, tr, False, out=out), f"{kind} m={m} items={items}")
    assert_dense_nbr(got, f"{kind} m={m} items={items}")
    assert got.num_pairs >= m  # dense: every output row has a pair (SubM: itself; up k2 s2: its parent)


def test_emulated_no_pairs(emulated):
    """Inputs and outputs present but no pair at all: empty exact copies, offsets all 0."""
    coords = np.array([[0, 1, 1, 1]], np.int32)
    out = np.array([[0, 100, 100, 100], [1, 2, 2, 2]], np.int32)
    got = gpu_kernel_map.build(emulated, coords, 2, 2, 1, True, False, out)
    assert_same_map(got, reference_map(coords, 2, 2, 1, True, False, out=out), "no pairs")
    assert got.num_pairs == 0 and (_host(got.dense_nbr) == -1).all()


def test_emulated_launch_sequence(emulated, rng):
    """A SubM map is three kernels (insert, probe, single-pass scan + compaction): no separate scan
    launch may come back."""
    coords = random_voxels(rng, 300, extent=8, batches=1)
    emulated.launches.clear()
    gpu_kernel_map.build(emulated, coords, 3, 1, 1, False, False)
    assert emulated.launches == ["insert", "probe", "compact"]
    emulated.launches.clear()
    gpu_kernel_map.build(emulated, coords, 2, 2, 1, False, False)
    assert emulated.launches == ["candidate_keys", "unique_heads", "unique_info", "unique_unpack", "insert",
                                 "probe", "compact"]



# --- SubM symmetry: offsets before the centre probe, the centre is the identity, the rest mirror -----

def _symmetric(kind, ks):
    """Whether the builder takes the probe's symmetric path (SubM, every kernel-size axis odd)."""
    return kind == "submanifold" and all(v % 2 for v in np.broadcast_to(ks, 3))


_SYMMETRIC_ARG = 5  # probe's arguments: out_coords, m, nbm, K, transposed, symmetric, ...


def _probe_args(dev):
    return dev.args[dev.launches.index("probe")]


# (kernel size, dilation, batches, voxels, items, prefix_every): several tiles per offset (items 1 or 2:
# 256- or 512-row tiles), so the mirrored rows of cand get scatters from every probe tile of their mirror
SYMMETRIC_CASES = [(3, 1, 2, 1800, 1, 0), (3, 1, 1, 1500, 1, 7), (3, 2, 3, 1200, 2, 0), ((3, 1, 5), 1, 2, 1000, 1, 0),
                   ((3, 1, 5), (2, 1, 3), 2, 1000, 1, 5), ((1, 3, 1), 1, 2, 900, 1, 0), (5, 1, 1, 700, 1, 0),
                   (1, 1, 2, 900, 1, 0), ((1, 1, 3), 3, 1, 600, 1, 0)]


@pytest.mark.parametrize("ks,dilation,batches,n,items,prefix_every", SYMMETRIC_CASES)
def test_emulated_symmetric_subm_matches_numpy_builder(emulated_with, rng, ks, dilation, batches, n, items,
                                                       prefix_every):
    dev = emulated_with(prefix_every=prefix_every, items=items)
    coords = random_voxels(rng, n, extent=11, batches=batches)
    m = coords.shape[0]
    assert m > 2 * gpu_kernel_map.BLOCK * items  # at least 3 tiles per offset
    dev.clear_log()
    got = gpu_kernel_map.build(dev, coords, ks, 1, dilation, False, False)
    args = _probe_args(dev)
    assert args[_SYMMETRIC_ARG] == 1, "SubM of odd kernel sizes must take the symmetric path"
    num_k = args[3]
    nbm = dev.args[dev.launches.index("compact")][1]
    assert dev.grids[dev.launches.index("compact")] == num_k * nbm and nbm >= 3
    assert dev.grids[dev.launches.index("probe")] == (num_k // 2 + 1) * args[2]  # up to the centre
    what = f"symmetric k{ks} d{dilation} items={items}"
    assert_same_map(got, reference_map(coords, ks, 1, dilation, False, False), what)
    assert_dense_nbr(got, what)
    # one memset (uint64 words): the table (2 capacity + 4) and the scan state after it (ticket, tile words,
    # offset totals); the insert kernel sets cand's mirrored rows to -1
    assert dev.fills == [2 * (args[16] + 1) + 4 + 1 + num_k * nbm + num_k]
    assert dev.args[dev.launches.index("insert")][-1] == num_k // 2


SYMMETRIC_SMALL = [  # (coords, kernel size, dilation): no neighbours, one voxel, the all-ones key
    (np.array([[0, 0, 0, 0], [0, 5, 0, 0], [1, 0, 0, 0], [0, 0, 9, 9], [2, -7, 3, 100]], np.int32), 3, 1),
    (np.array([[0, 0, 0, 0], [0, 5, 0, 0], [1, 0, 0, 0], [0, 0, 9, 9], [2, -7, 3, 100]], np.int32), (3, 1, 5), 2),
    (np.array([[3, 1, 2, 3]], np.int32), 3, 1), (np.array([[3, 1, 2, 3]], np.int32), 1, 1),
    (EDGE, 3, 1), (EDGE, (1, 1, 3), 1), (EDGE, 5, 1),
]


@pytest.mark.parametrize("case", range(len(SYMMETRIC_SMALL)))
def test_emulated_symmetric_isolated_voxels(emulated, case):
    coords, ks, d = SYMMETRIC_SMALL[case]
    emulated.clear_log()
    got = gpu_kernel_map.build(emulated, coords, ks, 1, d, False, False)
    assert _probe_args(emulated)[_SYMMETRIC_ARG] == 1
    assert_same_map(got, reference_map(coords, ks, 1, d, False, False), f"isolated case {case}")
    assert_dense_nbr(got, f"isolated case {case}")
    if case < 4:  # no neighbours: the centre pairs only
        assert got.num_pairs == len(coords)


@pytest.mark.parametrize("kind,ks,stride", [("submanifold", 2, 1), ("submanifold", (3, 2, 3), 1),
                                            ("strided", 3, 2), ("transposed", 3, 2), ("generative", 3, 2)])
def test_emulated_other_kinds_keep_probing(emulated, rng, kind, ks, stride):
    """Even kernel sizes, strided, transposed and generative maps probe every offset (flag 0)."""
    s, tr, gen = kind_args(kind, stride)
    coords, out = make_coords(rng, kind, s, 2, n=40, extent=6)
    emulated.clear_log()
    got = gpu_kernel_map.build(emulated, coords, ks, s, 1, tr, gen, out)
    assert _probe_args(emulated)[_SYMMETRIC_ARG] == 0
    assert_same_map(got, reference_map(coords, ks, s, 1, tr, gen, out=out), kind)
    # stride 1 with the outputs given explicitly (even the inputs themselves) is no SubM map: it probes
    emulated.clear_log()
    gpu_kernel_map.build(emulated, coords, 3, 1, 1, False, False, coords.copy())
    assert _probe_args(emulated)[_SYMMETRIC_ARG] == 0


def _delete_voxel(table, mask, want):
    """Delete from host hash ``table`` a voxel v whose slot is followed by a free one (so no probe chain
    breaks) and that has neighbours before and after the centre in ``want`` (the K x m CSR table of the
    SubM k3 map); return v and the dense table the symmetric path must then give. Only probes that look
    v up miss. The probing path would lose every pair with input v. The symmetric path: v is its own
    centre neighbour (not probed); pairs (k < kc, in v) are lost (probed); pairs (k > kc, in v) are kept
    (scattered from v's own probes of offset K-1-k, which find its neighbours); pairs (k > kc, out v)
    are lost instead (their scatters came from the probes that missed v)."""
    kc = want.shape[0] // 2
    slots = table[:2 * (mask + 1)].reshape(-1, 2)
    empty = np.uint64(2 ** 64 - 1)
    rows = [int(slots[s, 1]) for s in np.flatnonzero((slots[:, 0] != empty) & (np.roll(slots[:, 0], -1) == empty))]
    v = max(rows, key=lambda r: int((want == r).sum()))
    assert (want[:kc] == v).any() and (want[kc + 1:] == v).any() and want[kc, v] == v
    slots[np.flatnonzero((slots[:, 0] != empty) & (slots[:, 1] == v))[0], 0] = empty
    expect = want.copy()
    expect[:kc][expect[:kc] == v] = -1
    expect[kc + 1:, v] = -1
    return v, expect


def test_emulated_symmetric_path_skips_the_probes(emulated_with, rng):
    """The centre and the offsets after it are really not probed (see _delete_voxel)."""
    dev = emulated_with(items=1)
    coords = random_voxels(rng, 900, extent=9, batches=1)
    (table, mask), dup, bad = gpu_kernel_map.hash_table(dev, coords)
    assert (dup, bad) == (-1, -1)
    _, expect = _delete_voxel(table, mask, csr_table(reference_map(coords, 3, 1, 1, False, False)))
    dev.clear_log()
    got = _host(gpu_kernel_map.build(dev, coords, 3, 1, 1, False, False, table=(table, mask)).dense_nbr)
    assert _probe_args(dev)[_SYMMETRIC_ARG] == 1
    np.testing.assert_array_equal(got, expect)


def test_emulated_stuck_spin_wait_raises(emulated, rng, monkeypatch):
    """The emulator turns a spin-wait that would not end (here: an offset total one tile ahead) into an
    error instead of a hang."""
    coords = random_voxels(rng, 100, extent=6, batches=1)
    real = emulated.launch

    def launch(name, grid, block, args):
        if name == "compact":  # the state ends with the K offset totals: totals[0] = (1 tile, 0 hits) - 1
            args[5].array().view(np.uint64)[-args[2]] = (1 << 40) - 1
        real(name, grid, block, args)
    monkeypatch.setattr(emulated, "launch", launch)
    with pytest.raises(RuntimeError, match="spin-wait did not end"):
        gpu_kernel_map.build(emulated, coords, 3, 1, 1, False, False)


def test_dropped_pending_result_holds_its_buffers_until_its_event():
    """A map dropped before its first use: the pinned buffer its compact kernel still writes (and the
    device buffer where the device cannot map host memory), the table and the coordinates are held
    until the event after its kernels is done, not handed back to the pools at once."""
    import gc
    import weakref

    from sparsevox import _arrays

    class Event:
        done = False

    class Obj:
        pass
    ev, pinned, device_buf, table = Event(), Obj(), Obj(), Obj()
    refs = [weakref.ref(o) for o in (pinned, device_buf, table)]
    read = gpu_kernel_map._HostRead((pinned, device_buf), ev, None, 0, 3, np.int64)
    read.keep = (table,)
    del read, pinned, device_buf, table
    gc.collect()
    assert all(r() is not None for r in refs)
    ev.done = True
    _arrays.release_held()
    gc.collect()
    assert all(r() is None for r in refs)


# --- Voxels validation through the hash insert, and its table reused by the maps ---------------------

@pytest.fixture
def emulated_voxels(emulated, monkeypatch):
    """``sv.Voxels`` of NumPy coords validated as CuPy ones are: through the emulated hash insert."""
    from sparsevox import voxels
    monkeypatch.setattr(voxels, "_hash_device", lambda c: emulated)
    emulated.clear_log()
    return emulated


def _host_error(coords):
    with pytest.raises(ValueError) as e:
        sv.Voxels(coords, np.zeros((len(coords), 1), np.float32))
    return str(e.value)


VALIDATION_ERRORS = [  # (coords, message pattern)
    (np.array([[0, 1, 2, 3], [1, 1, 2, 3], [0, 1, 2, 3], [0, 5, 5, 5]], np.int32), r"unique.*\[0, 1, 2, 3\]"),
    (np.array([[0, 9, 9, 9], [0, 1, 2, 3], [0, 9, 9, 9], [0, 1, 2, 3], [0, 1, 2, 3]], np.int32),
     r"unique.*\[0, 1, 2, 3\].*\(3 duplicate rows in all\)"),
    (np.array([[BATCH_MAX, COORD_MAX, COORD_MAX, COORD_MAX]] * 2, np.int32), r"unique.*\[1023, 131071, 131071, 131071\]"),
    (np.array([[0, 0, 0, 0], [0, COORD_MAX + 1, 0, 0]], np.int32), r"x must be in \[-131072, 131071\], got range \[0, 131072\]"),
    (np.array([[0, 0, COORD_MIN - 1, 0]], np.int32), r"y must be in .*got range \[-131073, -131073\]"),
    (np.array([[0, 0, 0, COORD_MAX + 1], [0, 0, 0, 5]], np.int32), "z must be in"),
    (np.array([[BATCH_MAX + 1, 0, 0, 0], [3, 0, 0, 0]], np.int32), r"batch index must be in \[0, 1023\], got range \[3, 1024\]"),
    (np.array([[-1, 0, 0, 0]], np.int32), r"batch index .*got range \[-1, -1\]"),
    # out of range and duplicated: the range error comes first, as on the host
    (np.array([[0, 1, 1, 1], [0, 1, 1, 1], [-1, 0, 0, 0]], np.int32), "batch index"),
]


@pytest.mark.parametrize("case", range(len(VALIDATION_ERRORS)))
def test_emulated_validation_errors_match_the_host_messages(emulated, monkeypatch, case):
    coords, pattern = VALIDATION_ERRORS[case]
    want = _host_error(coords)  # NumPy coords: the host checks (sorted keys, min/max)
    from sparsevox import voxels
    monkeypatch.setattr(voxels, "_hash_device", lambda c: emulated)
    emulated.clear_log()
    with pytest.raises(ValueError, match=pattern) as e:
        sv.Voxels(coords, np.zeros((len(coords), 1), np.float32))
    assert str(e.value) == want
    assert emulated.launches == ["insert"]


def test_emulated_hash_table_status(emulated):
    """hash_table itself: a row of a duplicated voxel (whichever insert lost the race, the smallest such)
    and the smallest out-of-range row, -1 for none."""
    c = np.array([[0, 1, 1, 1], [0, 2, 2, 2], [0, 1, 1, 1], [-1, 0, 0, 0], [0, 2, 2, 2], [0, 0, COORD_MAX + 1, 0]],
                 np.int32)
    emulated.clear_log()
    (table, mask), dup, bad = gpu_kernel_map.hash_table(emulated, c)
    assert dup in (0, 1, 2, 4) and bad == 3
    assert emulated.launches == ["insert"] and emulated.fills == [table.size]
    assert table.size == 2 * (mask + 1) + 4  # no scan-state tail: each map brings its own
    _, dup, bad = gpu_kernel_map.hash_table(emulated, EDGE)
    assert (dup, bad) == (-1, -1)


def test_emulated_validation_of_empty_and_valid_voxels(emulated_voxels, rng):
    v = sv.Voxels(EMPTY, np.zeros((0, 2), np.float32))
    assert v._hash is None and emulated_voxels.launches == []
    coords = random_voxels(rng, 300, extent=8, batches=2)
    v = sv.Voxels(coords, np.zeros((len(coords), 2), np.float32))
    assert emulated_voxels.launches == ["insert"] and len(emulated_voxels.fills) == 1
    assert v._hash is not None and v._keys is None, "validation through the table must not sort keys"
    assert v.replace(np.ones((len(coords), 3), np.float32))._hash is v._hash


@pytest.mark.parametrize("kind,ks,stride,dilation,batches", EMU_CASES)
def test_emulated_cached_table_is_reused_by_the_map(emulated_voxels, rng, kind, ks, stride, dilation, batches):
    """A validated Voxels' table serves its maps: no second insert, one memset (the scan state of the
    map), and the same map as a build that inserts the coordinates itself."""
    s, tr, gen = kind_args(kind, stride)
    coords, out = make_coords(rng, kind, s, batches, n=40, extent=6)
    v = sv.Voxels(coords, None)
    dev = emulated_voxels
    fresh_launches = []
    for use_table in (False, True, True):  # twice with the table: its status and the state stay clean
        dev.clear_log()
        got = gpu_kernel_map.build(dev, coords, ks, s, dilation, tr, gen, out, table=v._hash if use_table else None)
        if not use_table:
            want, fresh_launches, fresh_fills = got, list(dev.launches), len(dev.fills)
            continue
        assert_same_map(got, want, f"{kind} with the cached table")
        assert_dense_nbr(got, f"{kind} with the cached table")
        assert "insert" not in dev.launches
        assert dev.launches == [n for n in fresh_launches if n != "insert"]
        # the scan state's memset (with cand's mirrored rows for a symmetric SubM map) replaces the
        # table's, which also resets the state of a fresh build (whose insert sets the mirrored rows)
        assert len(dev.fills) == fresh_fills
    assert_same_map(want, reference_map(coords, ks, s, dilation, tr, gen, out=out), kind)


def test_emulated_cached_table_many_tiles(emulated_with, monkeypatch, rng):
    """Maps of many scan tiles and several offsets from one cached table (each with a fresh ticket and
    tile words), and look-backs across windows."""
    from sparsevox import voxels
    dev = emulated_with(prefix_every=40, items=1)
    monkeypatch.setattr(voxels, "_hash_device", lambda c: dev)
    coords = random_voxels(rng, 1800, extent=12, batches=2)
    v = sv.Voxels(coords, None)
    for ks, s, d in ((3, 1, 1), ((3, 1, 2), 1, 2), (2, 2, 1), (3, 1, 1)):
        dev.clear_log()
        got = gpu_kernel_map.build(dev, coords, ks, s, d, False, False, table=v._hash)
        assert "insert" not in dev.launches
        assert_same_map(got, reference_map(coords, ks, s, d, False, False), f"k{ks} s{s} d{d}")
        assert_dense_nbr(got, f"k{ks} s{s} d{d}")


def test_emulated_kernel_map_passes_the_cached_table(emulated_voxels, monkeypatch, rng):
    """kernel_map() hands a table-taking builder the Voxels' validated table."""
    from sparsevox.kernel_map import BUILDERS
    seen = []

    def builder(coords, sorted_in, ks, st, dl, tr, gen, out, table=None):
        seen.append(table)
        return gpu_kernel_map.build(emulated_voxels, coords, ks, st, dl, tr, gen, out, table)
    builder.needs_sorted_keys = False
    builder.takes_table = True
    monkeypatch.setitem(BUILDERS, "numpy", builder)
    coords = random_voxels(rng, 200, extent=7, batches=1)
    v = sv.Voxels(coords, None)
    emulated_voxels.clear_log()
    got = sv.kernel_map(v, 3)
    assert seen == [v._hash] and emulated_voxels.launches == ["probe", "compact"]
    assert v._keys is None
    assert_same_map(got, reference_map(coords, 3, 1, 1, False, False), "kernel_map() with the cached table")
    unchecked = sv.Voxels(coords, None, check=False)
    sv.kernel_map(unchecked, 3)
    assert seen[-1] is None and "insert" in emulated_voxels.launches


def _emulated_builder(monkeypatch, dev):
    """The GPU builder on the emulated device as kernel_map()'s builder of NumPy coordinates."""
    def builder(coords, sorted_in, ks, st, dl, tr, gen, out, table=None):
        return gpu_kernel_map.build(dev, coords, ks, st, dl, tr, gen, out, table)
    builder.needs_sorted_keys = False
    builder.takes_table = True
    from sparsevox.kernel_map import BUILDERS
    monkeypatch.setitem(BUILDERS, "numpy", builder)


def test_emulated_map_is_pending_until_first_use(emulated, monkeypatch, rng):
    """kernel_map() returns once the kernels are queued: no read of the sizes yet, the map not yet
    findable by its arrays' addresses; the first convolution takes the pairs (exactly the NumPy
    builder's), after which the map is ready, remembered and cached."""
    from sparsevox.kernel_map import live_map
    _emulated_builder(monkeypatch, emulated)
    coords = random_voxels(rng, 300, extent=7, batches=2)
    feats = rng.standard_normal((300, 3))
    v = sv.Voxels(coords, feats, check=False)
    reads = emulated.reads
    kmap = sv.kernel_map(v, 3)
    assert not kmap.ready and emulated.reads == reads + 1
    assert kmap.dense_nbr.shape == (27, 300) and kmap.offsets.shape == (28,) and kmap.num_offsets == 27
    assert "pending" in repr(kmap)
    w = rng.standard_normal((27, 3, 2))
    got = sv.conv_forward(feats, w, kmap)
    assert kmap.ready and sv.kernel_map(v, 3) is kmap
    want = reference_map(coords, 3, 1, 1, False, False)
    assert_same_map(kmap, want, "pending map after first use")
    np.testing.assert_allclose(got, sv.conv_forward(feats, w, want), rtol=1e-12)
    assert live_map(kmap.in_maps.ctypes.data, kmap.out_maps.ctypes.data, kmap.num_pairs, 300, 300) is kmap


def test_emulated_unchecked_duplicates_raise_at_the_first_convolution(emulated, monkeypatch):
    _emulated_builder(monkeypatch, emulated)
    dup = np.array([[0, 1, 2, 3], [1, 1, 2, 3], [0, 1, 2, 3], [0, 5, 5, 5]], np.int32)
    v = sv.Voxels(dup, np.ones((4, 2)), check=False)
    kmap = sv.kernel_map(v, 3)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"unique.*\[0, 1, 2, 3\]"):
            sv.conv_forward(v.feats, np.ones((27, 2, 2)), kmap)
    # the implicit GEMM's tables come from dense_nbr, which exists before the pairs: it waits too
    from sparsevox.algorithms import implicit_gemm
    for reverse in (False, True):
        with pytest.raises(ValueError, match=r"unique.*\[0, 1, 2, 3\]"):
            implicit_gemm.neighbour_table(kmap, reverse)
    assert not kmap.ready


def test_emulated_table_of_other_coordinates_is_refused(emulated, rng):
    coords = random_voxels(rng, 100, extent=7, batches=1)
    table, _, _ = gpu_kernel_map.hash_table(emulated, coords[:10])
    with pytest.raises(ValueError, match="not built for these"):
        gpu_kernel_map.build(emulated, coords, 3, 1, 1, False, False, table=table)

# --- on the GPU ----------------------------------------------------------------------------------

GPU_CASES = [c for c in itertools.product(KINDS, KERNEL_SIZES + [(2, 3, 1)], STRIDES + [(1, 2, 3)], DILATIONS, BATCHES)
             if not (c[0] == "submanifold" and c[2] != 1)]


@pytest.fixture
def cupy():
    return pytest.importorskip("cupy")


@pytest.mark.gpu
@pytest.mark.parametrize("kind,ks,stride", [("submanifold", 3, 1), ("strided", 2, 2), ("transposed", 2, 2)])
def test_gpu_builder_without_mapped_host_memory(cupy, rng, monkeypatch, kind, ks, stride):
    """A device that cannot map pinned host memory: compact writes the info row to a device buffer and
    the map's result copies it to the host; the maps stay exact (forced on this GPU)."""
    dev = gpu_kernel_map._cupy_device()
    monkeypatch.setitem(dev._mapped, cupy.cuda.runtime.getDevice(), False)
    s, tr, gen = kind_args(kind, stride)
    coords, out = make_coords(rng, kind, s, 2)
    got = gpu_kernel_map.build_kernel_map(cupy.asarray(coords), None, ks, s, 1, tr, gen,
                                          None if out is None else cupy.asarray(out))
    assert_same_map(got, reference_map(coords, ks, s, 1, tr, gen, out=out), f"{kind} unmapped")


@pytest.mark.gpu
@pytest.mark.parametrize("kind,ks,stride,dilation,batches", GPU_CASES)
def test_gpu_builder_matches_numpy_builder(cupy, rng, kind, ks, stride, dilation, batches):
    s, tr, gen = kind_args(kind, stride)
    coords, out = make_coords(rng, kind, s, batches)
    got = gpu_kernel_map.build_kernel_map(cupy.asarray(coords), None, ks, s, dilation, tr, gen,
                                          None if out is None else cupy.asarray(out))
    assert isinstance(got.in_maps, cupy.ndarray) and isinstance(got.offsets, cupy.ndarray)
    assert isinstance(got.offsets_host, np.ndarray)
    assert_same_map(got, reference_map(coords, ks, s, dilation, tr, gen, out=out), kind)


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(EDGE_CASES)))
def test_gpu_edges_and_empty(cupy, case):
    coords, ks, s, d, tr, gen, out = EDGE_CASES[case]
    got = gpu_kernel_map.build_kernel_map(cupy.asarray(coords), None, ks, s, d, tr, gen,
                                          None if out is None else cupy.asarray(out))
    assert_same_map(got, reference_map(coords, ks, s, d, tr, gen, out=out), f"edge case {case}")


@pytest.mark.gpu
def test_gpu_errors(cupy):
    dup = cupy.asarray(np.array([[0, 1, 2, 3], [1, 1, 2, 3], [0, 1, 2, 3], [0, 5, 5, 5]], np.int32))
    assert_raises_on_every_use(gpu_kernel_map.build_kernel_map(dup, None, 3, 1, 1, False, False),
                               r"unique.*\[0, 1, 2, 3\]")
    ones = cupy.asarray(np.array([[BATCH_MAX, COORD_MAX, COORD_MAX, COORD_MAX]] * 2, np.int32))
    assert_raises_on_every_use(gpu_kernel_map.build_kernel_map(ones, None, 3, 1, 1, False, False),
                               r"unique.*\[1023, 131071, 131071, 131071\]")
    # through the public API: unchecked Voxels build their map, its first convolution raises
    unchecked = sv.Voxels(dup, cupy.ones((4, 2), cupy.float32), check=False)
    kmap = sv.kernel_map(unchecked, 3)
    with pytest.raises(ValueError, match=r"unique.*\[0, 1, 2, 3\]"):
        sv.conv_forward(unchecked.feats, cupy.ones((27, 2, 2), cupy.float32), kmap)
    far = cupy.asarray(np.array([[0, COORD_MAX // 2 + 1, 0, 0]], np.int32))
    with pytest.raises(ValueError, match="generated output coordinates"):
        gpu_kernel_map.build_kernel_map(far, None, 2, 2, 1, True, True)


@pytest.mark.gpu
def test_gpu_large_random_and_public_api(cupy, rng):
    """200k voxels in 2 batches (many probe collisions); the public kernel_map() on CuPy Voxels uses
    the hash builder and caches its map."""
    coords = random_voxels(rng, 200_000, extent=80, batches=2)
    v = sv.Voxels(cupy.asarray(coords), None)
    got = sv.kernel_map(v, 3)
    from sparsevox.kernel_map import BUILDERS
    assert BUILDERS["cupy"] is gpu_kernel_map.build_kernel_map
    assert sv.kernel_map(v, 3) is got
    assert_same_map(got, reference_map(coords, 3, 1, 1, False, False), "200k subm k3")
    down = sv.kernel_map(v, 2, 2)
    assert_same_map(down, reference_map(coords, 2, 2, 1, False, False), "200k k2 s2")
    unchecked = sv.Voxels(cupy.asarray(coords), None, check=False)
    sv.kernel_map(unchecked, 3)
    assert unchecked._keys is None, "the hash builder must not make kernel_map() sort the keys"


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_dense_nbr_matches_csr(cupy, rng, kind):
    """The kept query table equals the CSR pairs (50k voxels: thousands of tiles in the look-back)."""
    s, tr, gen = kind_args(kind, 2)
    coords, out = make_coords(rng, kind, s, 2, n=25_000, extent=60)
    got = gpu_kernel_map.build_kernel_map(cupy.asarray(coords), None, 3, s, 1, tr, gen,
                                          None if out is None else cupy.asarray(out))
    assert isinstance(got.dense_nbr, cupy.ndarray)
    assert_same_map(got, reference_map(coords, 3, s, 1, tr, gen, out=out), kind)
    assert_dense_nbr(got, kind)


@pytest.mark.gpu
def test_gpu_symmetric_path_skips_the_probes(cupy, rng):
    """On the GPU too, a SubM k3 map probes only the offsets before the centre (see _delete_voxel)."""
    coords = random_voxels(rng, 30_000, extent=40, batches=2)
    c = cupy.asarray(coords)
    (table, mask), dup, bad = gpu_kernel_map.hash_table(gpu_kernel_map._cupy_device(), c)
    assert (dup, bad) == (-1, -1)
    host = table.get()
    _, expect = _delete_voxel(host, mask, csr_table(reference_map(coords, 3, 1, 1, False, False)))
    table[...] = cupy.asarray(host)
    got = gpu_kernel_map.build_kernel_map(c, None, 3, 1, 1, False, False, table=(table, mask))
    np.testing.assert_array_equal(got.dense_nbr.get(), expect)


@pytest.mark.gpu
@pytest.mark.parametrize("ks", [3, 5, (3, 1, 5)])
def test_gpu_symmetric_subm_repeated_builds(cupy, rng, ks):
    """SubM maps of 150k voxels (74 tiles per offset, thousands of blocks in flight: mirror scatters
    from other blocks, offset totals and look-backs waited for), ten builds each with and without a
    prebuilt table, every one exact."""
    coords = random_voxels(rng, 150_000, extent=70, batches=2)
    want = reference_map(coords, ks, 1, 1, False, False)
    c = cupy.asarray(coords)
    table, dup, bad = gpu_kernel_map.hash_table(gpu_kernel_map._cupy_device(), c)
    assert (dup, bad) == (-1, -1)
    for i in range(20):
        got = gpu_kernel_map.build_kernel_map(c, None, ks, 1, 1, False, False, table=table if i % 2 else None)
        assert_same_map(got, want, f"k{ks} build {i}")
        assert_dense_nbr(got, f"k{ks} build {i}")

def _find_scan(name):
    """A real scan from ``pointcloud_dir()`` or, failing that, ../shared/data/pointclouds; else skip."""
    root = Path(__file__).resolve().parents[1]
    for d in (pointcloud_dir(), root.parent / "shared" / "data" / "pointclouds"):
        if d is not None and (d / name).exists():
            return d / name
    pytest.skip(f"real scan {name} not found (.gpudata/pointclouds/ or ../shared/data/pointclouds/)")


def _scan_coords(path):
    cols = 5 if path.name.startswith("nuscenes") else 6 if path.name.startswith(("scannet", "sunrgbd")) else 4
    pts = np.fromfile(path, np.float32).reshape(-1, cols)
    size = 0.02 if path.name.startswith(("scannet", "sunrgbd")) else 0.05
    return np.asarray(sv.Voxels.from_points(pts[:, :3], size).coords)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["semantickitti_000000.bin", "kitti_000008.bin", "scannet_scene0000_00.bin",
                                  "nuscenes_LIDAR_TOP_1532402927647951.bin"])
def test_gpu_real_scans_match_numpy_builder(cupy, name):
    coords = _scan_coords(_find_scan(name))
    c = cupy.asarray(coords)
    for ks, s, dil in ((3, 1, 1), (5, 1, 1), (3, 1, 2), (2, 1, 1)):
        got = gpu_kernel_map.build_kernel_map(c, None, ks, s, dil, False, False)
        assert_same_map(got, reference_map(coords, ks, s, dil, False, False), f"{name} subm k{ks} d{dil}")
    for ks in (2, 3):
        down = gpu_kernel_map.build_kernel_map(c, None, ks, 2, 1, False, False)
        assert_same_map(down, reference_map(coords, ks, 2, 1, False, False), f"{name} down k{ks}")
        coarse = _host(down.out_coords)
        up = gpu_kernel_map.build_kernel_map(down.out_coords, None, ks, 2, 1, True, False, c)
        assert_same_map(up, reference_map(coarse, ks, 2, 1, True, False, out=coords), f"{name} up k{ks}")
        gen = gpu_kernel_map.build_kernel_map(down.out_coords, None, ks, 2, 1, True, True)
        assert_same_map(gen, reference_map(coarse, ks, 2, 1, True, True), f"{name} generative k{ks}")


@pytest.mark.gpu
def test_gpu_map_follows_the_current_stream(cupy, rng):
    """Built on a non-default stream without synchronising the device first: same map."""
    coords = random_voxels(rng, 5000, extent=30, batches=1)
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        got = gpu_kernel_map.build_kernel_map(cupy.asarray(coords), None, 3, 1, 1, False, False)
    s.synchronize()
    assert_same_map(got, reference_map(coords, 3, 1, 1, False, False), "side stream")


@pytest.mark.gpu
def test_gpu_pending_map_used_on_another_stream(cupy, rng):
    """Built on one stream, which then sleeps (~10 ms), first used on another: the exact pairs are
    copied on the build's stream (behind the sleep, where the buffers were written and go back to the
    pool) and the user's stream waits for that copy. Read on the second stream without synchronising,
    the pairs must be the full map (without the wait they would be read before the copy)."""
    coords = random_voxels(rng, 20_000, extent=40, batches=2)
    a, b = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
    c = cupy.asarray(coords)
    cupy.cuda.Device().synchronize()
    with a:
        got = gpu_kernel_map.build_kernel_map(c, None, 3, 1, 1, False, False)
        assert not got.ready
        _sleep(cupy, 20_000_000)
    with b:
        pairs = cupy.stack([got.in_maps, got.out_maps]).get()  # queued on b, after b waits for a
    want = reference_map(coords, 3, 1, 1, False, False)
    np.testing.assert_array_equal(pairs, np.stack([want.in_maps, want.out_maps]))
    assert_same_map(got, want, "used on another stream")


def _sleep(cupy, cycles: int):
    """Hold the current stream for about ``cycles`` clock cycles."""
    k = cupy.RawKernel(r"""extern "C" __global__ void svx_sleep(long long n) {
        long long t0 = clock64(); while (clock64() - t0 < n) {} }""", "svx_sleep")
    k((1,), (1,), (np.int64(cycles),))


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(VALIDATION_ERRORS)))
def test_gpu_validation_errors_match_the_host_messages(cupy, case):
    coords, pattern = VALIDATION_ERRORS[case]
    want = _host_error(coords)
    with pytest.raises(ValueError, match=pattern) as e:
        sv.Voxels(cupy.asarray(coords), cupy.zeros((len(coords), 1), cupy.float32))
    assert str(e.value) == want


@pytest.mark.gpu
def test_gpu_validation_keeps_the_table_for_the_maps(cupy, rng, monkeypatch):
    """CuPy Voxels validate through the hash insert (no sorted keys) and their maps reuse its table:
    no second insert; maps equal those built without it; empty coords need no table."""
    assert sv.Voxels(cupy.zeros((0, 4), cupy.int32), None)._hash is None
    coords = random_voxels(rng, 20_000, extent=40, batches=2)
    v = sv.Voxels(cupy.asarray(coords), None)
    assert v._hash is not None and v._keys is None
    inserts = []
    real_insert = gpu_kernel_map._launch_insert  # every insert launch goes through it
    monkeypatch.setattr(gpu_kernel_map, "_launch_insert", lambda *a, **k: inserts.append(1) or real_insert(*a, **k))
    for args in ((3, 1, 1, False, False), (2, 2, 1, False, False), (3, 1, 2, False, False)):
        got = sv.kernel_map(v, *args[:3])
        assert not inserts, f"{args}: the map inserted the voxels again"
        fresh = gpu_kernel_map.build_kernel_map(cupy.asarray(coords), None, *args)
        assert inserts == [1], "a build without a table inserts (once)"
        assert_same_map(got, fresh, f"{args} cached vs fresh table")
        assert_same_map(got, reference_map(coords, *args), f"{args}")
        assert_dense_nbr(got, f"{args}")
        inserts.clear()
    coarse = sv.Voxels(sv.kernel_map(v, 2, 2).out_coords, None)  # transposed: the coarse table
    inserts.clear()  # the coarse Voxels' own validation inserted once; its map must not insert again
    up = sv.kernel_map(coarse, 2, 2, transposed=True, generative=True)
    assert not inserts
    assert_same_map(up, reference_map(_host(coarse.coords), 2, 2, 1, True, True), "generative from the cached table")


def test_emulated_pending_map_used_by_two_threads(emulated, rng):
    """Two threads taking a new map's pairs at once get the same arrays (one copy, one wait)."""
    import threading
    coords = random_voxels(rng, 400, extent=8, batches=1)
    kmap = gpu_kernel_map.build(emulated, coords, 3, 1, 1, False, False)
    got, start = [], threading.Barrier(2)

    def use():
        start.wait()
        got.append((kmap.in_maps, kmap.out_maps))
    threads = [threading.Thread(target=use) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got[0][0] is got[1][0] and got[0][1] is got[1][1]
    assert_same_map(kmap, reference_map(coords, 3, 1, 1, False, False), "two threads")
