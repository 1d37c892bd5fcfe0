"""IMPLICIT_GEMM kernels against the float64 dense oracle: every kind x dtype x direction, odd channels.

Kernel-level calls get NaN-poisoned output buffers so an element the kernel forgets shows up.
"""
import numpy as np
import pytest
from gpu_cases import host, np_dtype, quantised_case, to_gpu
from reference import TOL, dense_conv, dense_conv_grads, random_voxels, rel_err

import sparsevox as sv
from sparsevox.testing import DTYPES, KINDS

# C_in -> C_out: odd, tiny, vector-friendly and multi-tile channel counts on both sides.
CHANNELS = {3: 17, 17: 3, 32: 32, 130: 130}


def _poisoned(shape, dtype):
    import cupy
    return cupy.full(shape, np.nan, dtype=dtype)


def _check_all_directions(rng, case, dtype, fwd_p=None, wgrad_p=None):
    from sparsevox.algorithms import implicit_gemm as ig
    kmap, c = case["kmap"], case
    c_in, c_out = c["weight"].shape[1:]
    out = _poisoned((kmap.num_out, c_out), dtype)
    ig.forward(c["x"], c["w"], kmap, out=out, **(fwd_p or {}))
    ref = dense_conv(c["coords"], c["feats"], c["weight"], c["ks"], c["s"], 1, c["tr"], c["out_coords"])
    err = rel_err(host(out), ref)
    assert err < TOL[dtype], f"forward rel err {err:.3g} ({fwd_p})"

    g = rng.standard_normal((kmap.num_out, c_out)).astype(np_dtype(dtype)).astype(np.float64)
    rgf, rgw = dense_conv_grads(c["coords"], c["feats"], c["weight"], g, c["ks"], c["s"], 1, c["tr"],
                                c["out_coords"])
    gpu_g = to_gpu(g, dtype)
    gf = _poisoned((kmap.num_in, c_in), dtype)
    ig.dgrad(gpu_g, c["w"], kmap, out=gf, **(fwd_p or {}))
    err = rel_err(host(gf), rgf)
    assert err < TOL[dtype], f"dgrad rel err {err:.3g} ({fwd_p})"

    gw = ig.wgrad(c["x"], gpu_g, kmap, kmap.num_offsets, **(wgrad_p or {}))
    assert gw.dtype == c["x"].dtype and gw.shape == c["weight"].shape
    err = rel_err(host(gw), rgw)
    assert err < TOL[dtype], f"wgrad rel err {err:.3g} ({wgrad_p})"


@pytest.mark.gpu
@pytest.mark.parametrize("c_in", sorted(CHANNELS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_dtype_direction_matches_oracle(rng, kind, dtype, c_in):
    case = quantised_case(rng, kind, c_in, CHANNELS[c_in], dtype)
    _check_all_directions(rng, case, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_k2s2_maps_in_csr_order_match_oracle(rng, dtype):
    """A k2 s2 map's input rows have one pair each, so its dgrad and its swapped transposed twin's forward
    read the rows in CSR order (no sort): every direction of both against the oracle (NaN-poisoned
    outputs), and the shared table: a permutation of the rows, one neighbour per row, offsets in order."""
    import cupy
    from sparsevox.algorithms import implicit_gemm as ig
    fine_c = random_voxels(rng, 900, extent=12, batches=2)
    fine = sv.Voxels(cupy.asarray(fine_c), None)
    down = sv.kernel_map(fine, 2, 2)
    coarse = sv.Voxels.from_core_coords(down.out_coords, None, fine.origin)
    up = sv.kernel_map(coarse, 2, 2, transposed=True, output_voxels=fine)
    assert up.swapped_from is down and ig._one_pair_rows(down, True)
    q = np_dtype(dtype)
    for kmap, coords, tr, c_in, c_out in ((down, fine_c, False, 17, 3), (up, cupy.asnumpy(down.out_coords), True, 3, 17)):
        feats = rng.standard_normal((len(coords), c_in)).astype(q).astype(np.float64)
        weight = (rng.standard_normal((8, c_in, c_out)) / np.sqrt(c_in * 4)).astype(q).astype(np.float64)
        case = dict(coords=coords, feats=feats, weight=weight, kmap=kmap, s=2, tr=tr, ks=2,
                    out_coords=cupy.asnumpy(kmap.out_coords), x=to_gpu(feats, dtype), w=to_gpu(weight, dtype))
        _check_all_directions(rng, case, dtype)
    slots, nbr_sorted = (a.get() for a in ig.slot_table(down, True, True))
    assert ig.slot_table(up, False, True)[1] is ig.slot_table(down, True, True)[1]  # one table for both
    nbr = _csr_table(down, True)
    np.testing.assert_array_equal(np.sort(slots), np.arange(down.num_in))
    np.testing.assert_array_equal(nbr_sorted, nbr[:, slots])
    assert ((nbr_sorted >= 0).sum(axis=0) == 1).all()
    assert (np.diff(np.argmax(nbr_sorted >= 0, axis=0)) >= 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_every_tile_and_split_matches_oracle(rng, dtype, sorted_rows):
    """All parameter combinations the autotuner may pick (with sorted rows: splits too), on a scene with
    many tiles and chunks."""
    from sparsevox.algorithms import implicit_gemm as ig
    case = quantised_case(rng, "submanifold", 128, 128, dtype, n=3000, extent=18)
    fwd = ig.fwd_params(dtype, 128)
    wg = ig.wgrad_params(dtype, 128, 128)
    for i in range(max(len(fwd), len(wg))):
        fp = dict(fwd[i % len(fwd)], sort_rows=i % 2 == 0, stage_nbr=i % 3 == 0)
        _check_all_directions(rng, case, dtype, fp, wg[i % len(wg)])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("split", [2, 3])
def test_mask_split_matches_oracle(rng, kind, dtype, split):
    """Offsets in 2 or 3 passes, each sorted by its own bitmask, later passes adding into the
    NaN-poisoned output the first pass wrote: forward and dgrad against the oracle, odd channels."""
    case = quantised_case(rng, kind, 17, 130, dtype)
    _check_all_directions(rng, case, dtype, {"mask_split": split, "sort_rows": True})


def test_mask_split_argument_range():
    from types import SimpleNamespace

    from sparsevox.algorithms import implicit_gemm as ig
    with pytest.raises(ValueError, match="mask_split must be in"):
        ig._check_split(0, SimpleNamespace(num_offsets=27))
    with pytest.raises(ValueError, match="mask_split must be in"):
        ig._check_split(28, SimpleNamespace(num_offsets=27))
    assert ig._check_split(2, SimpleNamespace(num_offsets=27)) == 2


def test_mask_split_candidates(sorted_rows):
    from sparsevox.algorithms import implicit_gemm as ig
    assert [p.get("mask_split", 1) for p in ig.fwd_params("float16", 64, 27)].count(2) > 0
    assert all("mask_split" not in p for p in ig.fwd_params("float16", 64, 8))
    assert {p.get("mask_split", 1) for p in ig.fwd_params("float16", 64, 27)} == {1, 2}
    assert {p.get("mask_split", 1) for p in ig.fwd_params("float16", 128, 27)} == {1, 2}
    assert {p.get("mask_split", 1) for p in ig.fwd_params("float32", 128, 27)} == {1, 2, 3}


def test_no_mask_split_candidates_on_unsorted_rows():
    """A split's passes pay only through their own slot sorts: without sorting (the float16 default) the
    tuner is not offered them; float32 still sorts by default and keeps them."""
    from sparsevox import config
    from sparsevox.algorithms import implicit_gemm as ig
    before = config.sort_rows()
    try:
        config.sort_rows("auto")
        assert all("mask_split" not in p for p in ig.fwd_params("float16", 128, 27))
        assert {p.get("mask_split", 1) for p in ig.fwd_params("float32", 128, 27)} == {1, 2, 3}
        config.sort_rows(False)
        assert all("mask_split" not in p for p in ig.fwd_params("float32", 128, 27))
    finally:
        config.sort_rows(before)


@pytest.fixture
def sorted_rows():
    from sparsevox import config
    before = config.sort_rows()
    config.sort_rows(True)
    yield
    config.sort_rows(before)


@pytest.mark.gpu
@pytest.mark.parametrize("stage_nbr", [False, True])
def test_kernel_size_5_uses_several_mask_words(rng, stage_nbr):
    case = quantised_case(rng, "submanifold", 32, 16, "float16", n=600, extent=9, ks=5)  # K = 125 > 32
    _check_all_directions(rng, case, "float16", {"stage_nbr": stage_nbr})


@pytest.mark.gpu
def test_public_api_autotunes_implicit_gemm(rng):
    import cupy
    case = quantised_case(rng, "submanifold", 32, 64, "float16")
    out = sv.conv_forward(case["x"], case["w"], case["kmap"], fwd_algo="implicit_gemm")
    c = case
    ref = dense_conv(c["coords"], c["feats"], c["weight"], c["ks"], c["s"], 1, c["tr"], c["out_coords"])
    assert rel_err(host(out), ref) < TOL["float16"]
    g = cupy.asarray(rng.standard_normal(out.shape)).astype(out.dtype)
    gf, gw = sv.conv_backward(g, case["x"], case["w"], case["kmap"], bwd_algo="implicit_gemm")
    rgf, rgw = dense_conv_grads(case["coords"], case["feats"], case["weight"], host(g), 3, 1, 1, False,
                                case["out_coords"])
    assert rel_err(host(gf), rgf) < TOL["float16"]
    assert rel_err(host(gw), rgw) < TOL["float16"]


def test_unavailable_on_cpu_problem():
    from sparsevox.tuning.problem import Problem
    from sparsevox.tuning.registry import algorithms
    algo = algorithms("conv")["implicit_gemm"]
    ok, why = algo.available(Problem("conv", "fwd", "cpu", "float32", 10, 10, 4, 4, 27, (1, 1, 1), "submanifold"))
    assert not ok and "GPU" in why


def test_mask_key_weights_put_the_rarest_offsets_first():
    from types import SimpleNamespace

    from sparsevox.algorithms import implicit_gemm as ig
    km = SimpleNamespace(offsets_host=np.cumsum([0, 5, 1, 4, 0, 20]))  # pair counts 5, 1, 4, 0, 20
    assert ig.mask_key_weights(km, 0, 5).tolist() == [2, 8, 4, 0, 1]  # no pairs: no bit
    assert ig.mask_key_weights(km, 1, 4).tolist() == [2, 1, 0]  # a part ranks its own offsets
    assert ig.mask_key_weights(km, 0, 2).tolist() == [1, 2]
    assert ig.mask_key_weights(SimpleNamespace(offsets_host=np.zeros(4, np.int64)), 0, 3).tolist() == [0, 0, 0]
    ties = SimpleNamespace(offsets_host=np.cumsum([0, 3, 3, 3]))
    assert ig.mask_key_weights(ties, 0, 3).tolist() == [4, 2, 1]  # equal counts: offset order
    k5 = SimpleNamespace(offsets_host=np.cumsum(np.r_[0, np.arange(125, 0, -1)]))  # rarest: the last
    w = ig.mask_key_weights(k5, 0, 125)
    assert (w > 0).sum() == 63 and (w[:62] == 0).all() and w[-1] == 2 ** 62 and w[62] == 1
    assert len(set(w[w > 0].tolist())) == 63  # one bit each: keys stay exact in int64


def test_mask_key_bits_are_the_stable_argsort_ranks(rng):
    """``mask_key_bits`` against its definition in NumPy (a stable argsort of the pair counts, zero counts
    dropped, the 63 rarest kept), on random counts with zeros and ties, K up to 125, whole and parts."""
    from types import SimpleNamespace

    from sparsevox.algorithms import implicit_gemm as ig
    for _ in range(200):
        k = int(rng.choice([8, 27, 125]))
        counts = rng.integers(0, 4, k) * rng.integers(0, 3, k)  # zeros and many ties
        km = SimpleNamespace(offsets_host=np.cumsum(np.r_[0, counts]).astype(np.int64), num_offsets=k)
        k0 = int(rng.integers(0, k))
        k1 = int(rng.integers(k0 + 1, k + 1))
        part = counts[k0:k1]
        rank = [j for j in np.argsort(part, kind="stable") if part[j] > 0][:63]
        want = np.full(k1 - k0, -1)
        want[rank] = np.arange(len(rank) - 1, -1, -1)
        bit, used = ig.mask_key_bits(km, k0, k1)
        assert bit == want.tolist() and used == len(rank)


def _csr_table(kmap, reverse):
    """``[K, rows]`` host neighbour table scattered from the CSR pairs (the reference)."""
    ins, outs, o = kmap.in_maps.get(), kmap.out_maps.get(), np.asarray(kmap.offsets_host)
    rows = kmap.num_in if reverse else kmap.num_out
    t = np.full((kmap.num_offsets, rows), -1, np.int32)
    for k in range(kmap.num_offsets):
        dst, src = (ins, outs) if reverse else (outs, ins)
        t[k, dst[o[k]:o[k + 1]]] = src[o[k]:o[k + 1]]
    return t


@pytest.mark.gpu
@pytest.mark.parametrize("kind,ks", [("submanifold", 3), ("submanifold", 5), ("submanifold", 2), ("strided", 3),
                                     ("transposed", 3), ("generative", 3)])
def test_slot_tables_and_tile_masks_match_the_host(rng, kind, ks):
    """The device-made slot tables (keys, stable sort, gather) and tile masks against NumPy, forward and
    reverse, whole and split into parts (k5: 125 offsets, 64-bit keys, 4 mask words), several tile
    heights; the reverse SubM table (the forward one mirrored) against a scatter of the CSR pairs."""
    from sparsevox.algorithms import implicit_gemm as ig
    case = quantised_case(rng, kind, 4, 4, "float32", n=900, extent=9, ks=ks)
    kmap = case["kmap"]
    k_count = kmap.num_offsets
    for reverse in (False, True):
        nbr = ig.neighbour_table(kmap, reverse).get()
        np.testing.assert_array_equal(nbr, _csr_table(kmap, reverse))
        for part in (None, (0, k_count // 2), (k_count // 2, k_count)):
            k0, k1 = part or (0, k_count)
            slots, nbr_sorted = (a.get() for a in ig.slot_table(kmap, reverse, True, part))
            w = ig.mask_key_weights(kmap, k0, k1)
            keys = [int(sum(int(w[k - k0]) for k in range(k0, k1) if nbr[k, r] >= 0)) for r in range(nbr.shape[1])]
            np.testing.assert_array_equal(slots, np.array(sorted(range(len(keys)), key=lambda r: keys[r])))
            # a part's own offsets only: the parts of a split share one array (implicit_gemm._part_rows)
            np.testing.assert_array_equal(nbr_sorted[k0:k1], nbr[k0:k1][:, slots])
            for bm in (16, 64, 128):
                got = ig.tile_masks(kmap, reverse, bm, True, part).get()
                tiles = -(-nbr.shape[1] // bm)
                want = np.zeros((tiles, -(-k_count // 32)), np.uint32)
                for t in range(tiles):
                    for k in range(k0, k1):
                        if (nbr_sorted[k, t * bm:(t + 1) * bm] >= 0).any():
                            want[t, k // 32] |= np.uint32(1 << (k % 32))
                np.testing.assert_array_equal(got, want, err_msg=f"reverse={reverse} part={part} bm={bm}")


def _holds(kmap, mem) -> bool:
    """Whether ``kmap`` (its ``dense_nbr``, ``offsets`` or anything under ``derived``, prepared launches
    included) holds an array in the allocation ``mem``."""
    from sparsevox.algorithms import implicit_gemm as ig
    todo = [kmap.dense_nbr, kmap.offsets, *kmap.derived.values()]
    while todo:
        v = todo.pop()
        if hasattr(v, "data") and hasattr(v.data, "mem") and v.data.mem is mem:
            return True
        if isinstance(v, (tuple, list)):
            todo += list(v)
        elif isinstance(v, ig.Launch):
            todo += list(v.keep)
    return False


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["submanifold", "strided", "twin"])
def test_sorted_launches_drop_the_unsorted_table_and_splits_share_one(rng, kind):
    """Float32 sorted launches of mask splits 1, 2, 3, 1 on one map, every direction against the oracle:
    after the first the map holds nothing of the builder's neighbour table (``dense_nbr`` None, offsets
    moved out of its allocation), no unsorted table stays cached (each later split rebuilds it from the
    sorted tables and drops it), the parts of a split gather into one array, and the table made again
    equals the CSR's. ``twin``: a transposed map swapped from its strided twin (its tables are the
    twin's)."""
    import cupy
    from sparsevox.algorithms import implicit_gemm as ig
    if kind == "twin":
        fine_c = random_voxels(rng, 1500, extent=14, batches=2)
        fine = sv.Voxels(cupy.asarray(fine_c), None)
        down = sv.kernel_map(fine, 3, 2)
        coarse = sv.Voxels.from_core_coords(down.out_coords, None, fine.origin)
        kmap = sv.kernel_map(coarse, 3, 2, transposed=True, output_voxels=fine)
        assert kmap.swapped_from is down
        coords = cupy.asnumpy(down.out_coords)
        feats = rng.standard_normal((len(coords), 32)).astype(np.float32).astype(np.float64)
        weight = (rng.standard_normal((27, 32, 32)) / np.sqrt(128)).astype(np.float32).astype(np.float64)
        case = dict(coords=coords, feats=feats, weight=weight, kmap=kmap, s=2, tr=True, ks=3,
                    out_coords=cupy.asnumpy(kmap.out_coords), x=to_gpu(feats, "float32"), w=to_gpu(weight, "float32"))
        built = down
    else:
        case = quantised_case(rng, kind, 32, 32, "float32", n=3000, extent=18)
        kmap = built = case["kmap"]
    dense_mem = built.dense_nbr.data.mem
    assert built.offsets.data.mem is dense_mem  # one allocation (gpu_kernel_map._pairs)
    for i, split in enumerate((1, 2, 3, 1)):
        _check_all_directions(rng, case, "float32", {"mask_split": split, "sort_rows": True})
        assert built.dense_nbr is None and not _holds(built, dense_mem) and not _holds(kmap, dense_mem), split
        assert "implicit_gemm.nbr" not in built.derived and "implicit_gemm.nbr_rev" not in built.derived, split
        np.testing.assert_array_equal(built.offsets.get(), built.offsets_host)
        if split > 1:
            for reverse in (False, True):
                if kind == "submanifold" and reverse:
                    continue  # its dgrad runs on the forward tables
                prep = ig.prepare("dgrad" if reverse else "fwd", "float32", 32, 32, kmap, cupy.cuda.Device().id,
                                  mask_split=split, sort_rows=True)
                assert all(prep.keep[0] is prep.keep[3 * h] for h in range(split)), (split, reverse)
    for reverse in (False, True):
        np.testing.assert_array_equal(ig.neighbour_table(built, reverse).get(), _csr_table(built, reverse))


@pytest.mark.gpu
def test_an_unsorted_launch_keeps_the_table_it_reads(rng):
    """Unsorted rows (the float16 default) read the unsorted table itself: sorted launches on the same map
    leave it in place, and both stay right; and after a sorted launch dropped it, an unsorted one rebuilds
    it (from the sorted table) exactly."""
    case = quantised_case(rng, "submanifold", 32, 32, "float32", n=3000, extent=18)
    kmap = case["kmap"]
    dense = kmap.dense_nbr
    _check_all_directions(rng, case, "float32", {"sort_rows": False})
    _check_all_directions(rng, case, "float32", {"sort_rows": True, "mask_split": 2})
    assert kmap.dense_nbr is dense
    _check_all_directions(rng, case, "float32", {"sort_rows": False})

    case = quantised_case(rng, "submanifold", 32, 32, "float32", n=3000, extent=18)
    kmap = case["kmap"]
    _check_all_directions(rng, case, "float32", {"sort_rows": True})
    assert kmap.dense_nbr is None
    _check_all_directions(rng, case, "float32", {"sort_rows": False})
    np.testing.assert_array_equal(kmap.derived["implicit_gemm.nbr"].get(), _csr_table(kmap, False))


@pytest.mark.gpu
def test_a_fresh_maps_slot_tables_and_tile_masks_do_not_wait_for_the_device(rng):
    """Made behind ~0.5 s of queued device work, a fresh map's sorted slot tables (both directions) and
    tile masks leave it pending: the host queues them without waiting (Thrust's argsort used to)."""
    import cupy
    from gpu_cases import queue_sleep

    from sparsevox.algorithms import implicit_gemm as ig
    warm = quantised_case(rng, "submanifold", 4, 4, "float16", n=800, extent=12)["kmap"]
    ig.tile_masks(warm, False, 64, True), ig.tile_masks(warm, True, 64, True)  # compile the kernels
    kmap = quantised_case(rng, "submanifold", 4, 4, "float16", n=3000, extent=18)["kmap"].wait()
    stream = cupy.cuda.get_current_stream()
    stream.synchronize()
    queue_sleep(500_000_000)
    for reverse in (False, True):
        ig.slot_table(kmap, reverse, True), ig.tile_masks(kmap, reverse, 64, True)
    assert not stream.done, "making the slot tables waited for the device"


@pytest.mark.gpu
def test_slots_are_sorted_by_the_rarest_first_bitmask(rng):
    """The forward slot order: rows ascending by their neighbour bitmask read with the rarest offsets as
    the most significant bits, ties in row order, a permutation of the rows (and the slot-ordered
    neighbour table its columns)."""
    from sparsevox.algorithms import implicit_gemm as ig
    case = quantised_case(rng, "submanifold", 16, 16, "float16", n=3000, extent=18)
    kmap = case["kmap"]
    slots, nbr_sorted = (a.get() for a in ig.slot_table(kmap, False, True))  # int32, as stored
    nbr = ig.neighbour_table(kmap).get()
    assert sorted(slots.tolist()) == list(range(kmap.num_out))
    assert (nbr_sorted == nbr[:, slots]).all()
    w = ig.mask_key_weights(kmap, 0, kmap.num_offsets)
    keys = ((nbr >= 0).astype(np.int64) * w[:, None]).sum(0)[slots]
    assert (np.diff(keys) >= 0).all()
    same = np.diff(keys) == 0
    assert (np.diff(slots)[same] > 0).all()
    counts = np.diff(kmap.offsets_host)
    with_pairs = np.flatnonzero(counts)
    assert w[with_pairs[np.argmin(counts[with_pairs])]] == w.max() and (w[counts == 0] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("c_in", sorted(CHANNELS))
@pytest.mark.parametrize("kind", KINDS)
def test_tf32x3_matches_oracle(rng, kind, c_in):
    """float32 on tensor cores (3xTF32), every direction, odd and multi-tile channels, NaN-poisoned
    outputs, at the float32 tolerance (one TF32 product alone would miss it by ~100x)."""
    case = quantised_case(rng, kind, c_in, CHANNELS[c_in], "float32")
    _check_all_directions(rng, case, "float32", {"tf32x3": True}, {"tf32x3": True})


@pytest.mark.gpu
def test_tf32x3_is_more_accurate_than_one_tf32_product(rng):
    """The split must carry the low bits: on data with full float32 mantissas the 3xTF32 forward's error
    against float64 is within a few float32 roundings, far below a single TF32 product's (2^-11)."""
    case = quantised_case(rng, "submanifold", 64, 64, "float32", n=2000, extent=14)
    from sparsevox.algorithms import implicit_gemm as ig
    out = ig.forward(case["x"], case["w"], case["kmap"], tf32x3=True)
    c = case
    ref = dense_conv(c["coords"], c["feats"], c["weight"], c["ks"], c["s"], 1, c["tr"], c["out_coords"])
    assert rel_err(host(out), ref) < 2.0 ** -18


def test_tf32x3_is_float32_only():
    from sparsevox.algorithms import implicit_gemm as ig
    for dt in ("float16", "bfloat16", "float64"):
        with pytest.raises(ValueError, match="tf32x3 applies to float32 only"):
            ig.check_tf32x3(True, dt)
    assert ig.check_tf32x3(True, "float32") is True and ig.check_tf32x3(False, "float16") is False
    with pytest.raises(ValueError, match="gemm_block_size\\) must be one of .* with tf32x3"):
        ig._tile("float32", 64, 32, 32, None, True)  # (32, 32) is a SIMT tile only


def test_tf32x3_candidates_only_for_float32():
    from sparsevox.algorithms import implicit_gemm as ig
    for dt in ("float16", "bfloat16", "float64"):
        assert not any(p.get("tf32x3") for p in ig.fwd_params(dt, 128, 27) + ig.wgrad_params(dt, 128, 128))
    fwd = [p for p in ig.fwd_params("float32", 128, 27) if p.get("tf32x3")]
    assert {(p["fwd_block_size"], p["gemm_block_size"]) for p in fwd} == \
        {t for t in ig.TF32X3_TILES if t[1] <= 128} and not any("mask_split" in p for p in fwd)
    assert any(p.get("tf32x3") for p in ig.wgrad_params("float32", 128, 128))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,params", [("float16", {}), ("float32", {"tf32x3": True})])
def test_misaligned_out_is_a_value_error(rng, dtype, params):
    """The tensor-core epilogues store column pairs (half2, float2): an ``out`` view one element off an
    aligned address is refused instead of faulting."""
    import cupy
    from sparsevox.algorithms import implicit_gemm as ig
    case = quantised_case(rng, "submanifold", 16, 16, dtype, n=200)
    buf = cupy.empty(case["kmap"].num_out * 16 + 1, dtype=np_dtype(dtype))
    out = buf[1:].reshape(case["kmap"].num_out, 16)
    with pytest.raises(ValueError, match="out must be aligned to"):
        ig.forward(case["x"], case["w"], case["kmap"], out=out, **params)
