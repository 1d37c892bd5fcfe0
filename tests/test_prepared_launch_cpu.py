"""The host-side rules of prepared launches and live-map lookups, on the CPU (no kernel runs here)."""
import os
import subprocess
import sys

import numpy as np
import pytest
from reference import random_voxels

import sparsevox as sv
from sparsevox import conv
from sparsevox.implicit_gemm import Launch
from sparsevox.kernel_map import live_map, recall, recall_stats


class _FakeKernel:
    def __init__(self):
        self.calls = []

    def __call__(self, grid, block, args, shared_mem=0):
        self.calls.append((grid, block, args, shared_mem))


def test_launch_fills_the_address_holes_of_every_step():
    k1, k2 = _FakeKernel(), _FakeKernel()
    prep = Launch([(k1, 7, 128, 1024, (None, None, 99, None, np.int32(3))),
                   (k2, 9, 64, 0, (None, None, 98, None, np.int32(4)))], (0, 1, 3), False, (10, 4))
    assert prep.launch(16, 32, 48)
    assert k1.calls == [((7,), (128,), (16, 32, 99, 48, np.int32(3)), 1024)]
    assert k2.calls == [((9,), (64,), (16, 32, 98, 48, np.int32(4)), 0)]
    assert prep.out_shape == (10, 4)


@pytest.mark.parametrize("a,b", [(18, 32), (16, 40), (2, 6)])
def test_vector_launch_refuses_misaligned_inputs(a, b):
    k = _FakeKernel()
    prep = Launch([(k, 1, 32, 0, (None, None, None))], (0, 1, 2), True, (1, 1))
    assert prep.launch(a, b, 64) is False and k.calls == []
    scalar = Launch([(k, 1, 32, 0, (None, None, None))], (0, 1, 2), False, (1, 1))
    assert scalar.launch(a, b, 64) is True and len(k.calls) == 1  # scalar loads take any address


def test_prepared_is_none_on_the_cpu_and_before_any_plan(rng):
    c = random_voxels(rng, 50, extent=5)
    v = sv.Voxels(c, np.zeros((len(c), 4), np.float32))
    kmap = sv.kernel_map(v, 3)
    f = rng.standard_normal((len(c), 4)).astype(np.float32)
    w = rng.standard_normal((27, 4, 3)).astype(np.float32)
    assert conv.prepared("conv", "fwd", f, w, kmap, None) is None  # no plan yet: nothing to hand out
    sv.conv_forward(f, w, kmap)
    assert conv.prepared("conv", "fwd", f, w, kmap, None) is None  # CPU arrays: no GPU launch
    assert conv.prepared("depthwise", "fwd", f, w[:, :, 0], kmap, None) is None
    assert conv.plan("conv", "dgrad", f, w, kmap, None, None, memo_only=True) is None
    conv.remember_prepared(kmap, ("test", 1), "conv", "fwd", f, w, None)
    assert kmap.derived[("test", 1)] is False  # "none for this signature", so adapters do not ask again
    kmap.derived[("test", 1)] = "kept"
    conv.remember_prepared(kmap, ("test", 1), "conv", "fwd", f, w, None)
    assert kmap.derived[("test", 1)] == "kept"  # an existing entry is not recomputed


def test_live_map_by_address_and_empty_maps(rng):
    c = random_voxels(rng, 50, extent=5)
    kmap = sv.kernel_map(sv.Voxels(c, None), 3)
    a, b = kmap.in_maps.ctypes.data, kmap.out_maps.ctypes.data
    hits = recall_stats["hits"]
    assert live_map(a, b, kmap.num_pairs, kmap.num_in, kmap.num_out) is kmap
    assert recall_stats["hits"] == hits + 1
    assert live_map(a, b, kmap.num_pairs, kmap.num_in + 1, kmap.num_out) is None  # other sizes: not this map
    assert live_map(b, a, kmap.num_pairs, kmap.num_in, kmap.num_out) is None
    # empty maps share address 0 whatever their offsets: never matched, always wrapped anew
    assert live_map(0, 0, 0, 5, 5) is None
    empty = recall(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(9, np.int64), 5, 5)
    assert empty.num_offsets == 8 and empty.num_pairs == 0


def test_kmap_items_override_is_range_checked():
    env = dict(os.environ, SPARSEVOX_KMAP_ITEMS="0")
    p = subprocess.run([sys.executable, "-c", "import sparsevox.gpu_kernel_map"], env=env, capture_output=True,
                       text=True)
    assert p.returncode != 0 and "SPARSEVOX_KMAP_ITEMS must be in [1, 16], got 0" in p.stderr
    env["SPARSEVOX_KMAP_ITEMS"] = "4"
    p = subprocess.run([sys.executable, "-c", "import sparsevox.gpu_kernel_map as g; print(g.ITEMS)"], env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "4"
