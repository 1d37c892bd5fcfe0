"""What a fresh kernel map's first call does on the host (issue 19), on the CPU: plans reused across maps
of one layer signature, the weight-gradient chunks computed without a Python loop, submanifold dgrad on
the forward tables, and k2 s2 maps read in CSR order instead of sorted. The kernels these feed are checked
against the float64 oracle by the GPU tests (tests/test_implicit_gemm.py: every kind and direction)."""
import copy
import types

import numpy as np
import pytest
from reference import random_voxels

import sparsevox as sv
from sparsevox import conv
from sparsevox.algorithms import implicit_gemm as ig
from sparsevox.tuning import registry, tune_cache


def _chunks_by_loop(o, chunk):
    rows = []
    for k in range(len(o) - 1):
        for lo in range(int(o[k]), int(o[k + 1]), chunk):
            rows.append((k, lo, min(lo + chunk, int(o[k + 1]))))
    return np.asarray(rows, dtype=np.int32).reshape(-1, 3)


def test_chunk_ranges_equal_the_loop(rng):
    for _ in range(300):
        counts = rng.integers(0, 60, size=rng.integers(0, 12))
        counts[rng.random(counts.shape) < 0.3] = 0  # empty offsets give no chunk
        o = np.concatenate([[0], np.cumsum(counts)])
        chunk = int(rng.integers(1, 25))
        got = ig.chunk_ranges(o, chunk)
        assert got.dtype == np.int32 and got.shape[1] == 3
        np.testing.assert_array_equal(got, _chunks_by_loop(o, chunk))


def _maps(rng, n=400):
    coords = random_voxels(rng, n, extent=12, batches=2)
    v = sv.Voxels(coords, np.zeros((len(coords), 1), np.float32))
    return v, sv.kernel_map(v, 3), sv.kernel_map(v, 2, 2), sv.kernel_map(v, 3, 2)


def test_one_pair_rows_only_for_the_inputs_of_non_overlapping_strided_maps(rng):
    _, subm, k2s2, k3s2 = _maps(rng)
    assert ig._one_pair_rows(k2s2, reverse=True)
    assert not ig._one_pair_rows(k2s2, reverse=False)  # a coarse site has up to 8 children
    assert not ig._one_pair_rows(k3s2, reverse=True)  # overlapping windows: several parents
    assert not ig._one_pair_rows(subm, reverse=True)
    # what the CSR order relies on: every input row once, grouped by its one offset
    assert k2s2.num_pairs == k2s2.num_in and len(np.unique(k2s2.in_maps)) == k2s2.num_in


def test_mirrored_only_for_submanifold_odd_kernels(rng):
    _, subm, k2s2, _ = _maps(rng)
    assert ig._mirrored(subm) and not ig._mirrored(k2s2)
    # the property the flipped dgrad relies on: pair (k, out m, in j) <=> (K-1-k, out j, in m)
    K, o = subm.num_offsets, subm.offsets_host
    pairs = {(k, int(a), int(b)) for k in range(K)
             for a, b in zip(subm.out_maps[o[k]:o[k + 1]], subm.in_maps[o[k]:o[k + 1]])}
    assert pairs == {(K - 1 - k, b, a) for k, a, b in pairs}


def test_a_map_wrapped_from_bare_arrays_is_never_taken_for_mirrored(rng):
    """``recall`` wraps arrays with the default geometry (submanifold, 1x1x1): the flipped dgrad must not
    run on it (its forward table has num_out rows, the gradient num_in)."""
    from sparsevox.kernel_map import recall
    _, subm, k2s2, _ = _maps(rng)
    for m in (subm, k2s2):
        wrapped = recall(m.in_maps.copy(), m.out_maps.copy(), m.offsets_host, m.num_in, m.num_out)
        assert wrapped is not m and wrapped.kind == "submanifold" and not ig._mirrored(wrapped)
    assert ig._mirrored(subm)


def test_submanifold_dgrad_launch_uses_the_forward_tables_with_the_weight_flipped(monkeypatch):
    asked = []
    monkeypatch.setattr(ig, "_kernel", lambda *a, **k: (types.SimpleNamespace(), 128, 4096))
    monkeypatch.setattr(ig, "slot_table", lambda kmap, rev, sort, part=None: asked.append(("slots", rev)) or (
        types.SimpleNamespace(data=types.SimpleNamespace(ptr=1)), types.SimpleNamespace(data=types.SimpleNamespace(ptr=2))))
    monkeypatch.setattr(ig, "tile_masks", lambda kmap, rev, bm, sort, part=None: asked.append(("masks", rev)) or
                        types.SimpleNamespace(data=types.SimpleNamespace(ptr=3), shape=(4, 1)))
    for kind, ks, flip in (("submanifold", (3, 3, 3), True), ("submanifold", (2, 2, 2), False),
                           ("strided", (3, 3, 3), False)):
        asked.clear()
        kmap = types.SimpleNamespace(num_in=500, num_out=500 if kind == "submanifold" else 90, num_pairs=3000,
                                     num_offsets=int(np.prod(ks)), derived={}, kind=kind, kernel_size=ks,
                                     stride=(1, 1, 1) if kind == "submanifold" else (2, 2, 2), dilation=(1, 1, 1),
                                     out_coords=object())
        prep = ig.prepare("dgrad", "float16", 32, 64, kmap, 0)
        assert prep.flip_b is flip and prep.transpose_b  # the adapters flip and transpose the weight
        assert prep.out_shape == (500, 32)
        assert asked == [("slots", not flip), ("masks", not flip)], kind
        fwd = ig.prepare("fwd", "float16", 64, 32, kmap, 0)
        assert fwd is not prep and not fwd.flip_b and not fwd.transpose_b


def test_plans_are_reused_by_fresh_maps_of_the_same_signature(rng, monkeypatch):
    v, subm, *_ = _maps(rng)
    calls = []
    real = conv.select

    def counting(problem, algo_input, run, oracle=None):
        calls.append(problem)
        return real(problem, algo_input, run, oracle)
    monkeypatch.setattr(conv, "select", counting)
    w = np.zeros((27, 1, 2), np.float32)
    f = np.zeros((v.coords.shape[0], 1), np.float32)
    tune_cache.plans.clear()
    first = conv.plan("conv", "fwd", f, w, subm, "explicit_gemm", None)
    fresh = sv.kernel_map(sv.Voxels(v.coords, f), 3)  # a new map of the same scan: a new training step
    assert fresh is not subm
    assert conv.plan("conv", "fwd", f, w, fresh, "explicit_gemm", None) == first and len(calls) == 1
    # another signature plans anew: other channels, other map sizes
    conv.plan("conv", "fwd", f, np.zeros((27, 1, 3), np.float32), fresh, "explicit_gemm", None)
    assert len(calls) == 2
    # and the memo holds no map
    assert not any(isinstance(x, sv.KernelMap) for key in tune_cache.plans for x in key)
    tune_cache.reset()
    assert not tune_cache.plans
    conv.plan("conv", "fwd", f, w, fresh, "explicit_gemm", None)
    assert len(calls) == 3


def test_plan_memo_sees_a_replaced_registry(rng, monkeypatch):
    v, subm, *_ = _maps(rng)
    w = np.zeros((27, 1, 2), np.float32)
    f = np.zeros((v.coords.shape[0], 1), np.float32)
    conv.plan("conv", "fwd", f, w, subm, "explicit_gemm", None)
    monkeypatch.setitem(registry._REGISTRY, "conv", {})
    with pytest.raises(Exception):  # nothing registered: planning runs again and finds no algorithm
        conv.plan("conv", "fwd", f, w, subm, "explicit_gemm", None)


def test_registry_token_changes_when_an_algorithm_is_replaced(monkeypatch):
    registry.algorithms("conv")
    before = registry.token("conv")
    name, algo = next(iter(registry._REGISTRY["conv"].items()))
    monkeypatch.setitem(registry._REGISTRY["conv"], name, copy.copy(algo))  # same name, another object
    assert registry.token("conv") != before


def test_plan_memo_is_bounded(rng, monkeypatch):
    v, subm, *_ = _maps(rng)
    f = np.zeros((v.coords.shape[0], 1), np.float32)
    monkeypatch.setattr(conv, "PLAN_MEMO_LIMIT", 3)
    tune_cache.plans.clear()
    for c in range(1, 8):
        conv.plan("conv", "fwd", f, np.zeros((27, 1, c), np.float32), subm, "explicit_gemm", None)
        assert len(tune_cache.plans) <= 3


def test_a_process_first_plan_is_memoised_under_the_key_later_calls_use():
    # A fresh interpreter: the backends load during the first plan. The memo key taken before that load
    # named an empty registry, so 2507569 re-planned the first signature and `prepared` found nothing.
    import subprocess
    import sys
    code = """
import numpy as np
import sparsevox as sv
from sparsevox import conv
rng = np.random.default_rng(0)
c = np.unique(rng.integers(0, 6, (60, 3)), axis=0).astype(np.int32); c = np.concatenate([np.zeros((len(c), 1), np.int32), c], 1)
v = sv.Voxels(c, np.ones((len(c), 2), np.float32))
kmap = sv.kernel_map(v, 3)
w = np.ones((27, 2, 3), np.float32)
sv.conv_forward(v.feats, w, kmap, "explicit_gemm")
hit = conv.plan("conv", "fwd", v.feats, w, kmap, "explicit_gemm", None, memo_only=True)
print("HIT" if hit is not None else "MISS")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("HIT"), out.stdout + out.stderr
