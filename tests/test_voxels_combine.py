"""``Voxels.cat``, ``Voxels + Voxels`` and the batch accessors: one geometry or a ``ValueError`` naming
the difference; results in the caller's library (torch keeps autograd through them)."""
import re

import numpy as np
import pytest
from reference import random_voxels

import sparsevox as sv


def test_cat_and_add_on_one_geometry(rng):
    coords = random_voxels(rng, 50, batches=2)
    a = sv.Voxels(coords, rng.standard_normal((len(coords), 3)))
    b = a.replace(rng.standard_normal((len(coords), 2)))  # same coords object
    c = sv.Voxels(coords.copy(), rng.standard_normal((len(coords), 3)))  # equal coords, another array
    cat = sv.Voxels.cat(a, b, c)
    np.testing.assert_array_equal(cat.feats, np.concatenate([a.feats, b.feats, c.feats], 1))
    assert cat.coords is a.coords and cat._kmaps is a._kmaps
    assert sv.Voxels.cat([a, b]).num_channels == 5
    s = a + c
    np.testing.assert_array_equal(s.feats, a.feats + c.feats)
    assert s.coords is a.coords


def test_mismatched_geometry_names_the_difference(rng):
    coords = random_voxels(rng, 30)
    a = sv.Voxels(coords, np.ones((30, 2)))
    with pytest.raises(ValueError, match="different geometry: 30 voxels vs 29"):
        sv.Voxels.cat(a, sv.Voxels(coords[:-1], np.ones((29, 2))))
    moved = coords.copy()
    moved[[3, 7]] = moved[[7, 3]]  # same sites, other row order
    want = re.escape(f"row 3 is {coords[3].tolist()} vs {coords[7].tolist()} (2 rows differ")
    with pytest.raises(ValueError, match=want):
        a + sv.Voxels(moved, np.ones((30, 2)))
    with pytest.raises(ValueError, match=r"feats shapes differ: \(30, 2\) vs \(30, 3\)"):
        a + a.replace(np.ones((30, 3)))
    with pytest.raises(ValueError, match="dtypes differ"):
        sv.Voxels.cat(a, a.replace(np.ones((30, 2), np.float32)))
    with pytest.raises(ValueError, match="at least one"):
        sv.Voxels.cat()
    with pytest.raises(TypeError):
        a + 1.0


def test_batch_accessors(rng):
    coords = random_voxels(rng, 60, batches=4)
    coords = coords[coords[:, 0] != 2]
    order = np.lexsort(coords.T[::-1])
    v = sv.Voxels(coords[order], np.zeros((len(coords), 1)))
    assert v.batch_size == 4
    np.testing.assert_array_equal(v.batch_index(), coords[order, 0])
    off = v.batch_offsets()
    assert off.shape == (5,) and off[0] == 0 and off[-1] == len(coords) and off[2] == off[3]
    for b in range(4):
        assert (coords[order][off[b]:off[b + 1], 0] == b).all()
    shuffled = sv.Voxels(coords, np.zeros((len(coords), 1)))
    if (np.diff(coords[:, 0]) < 0).any():
        with pytest.raises(ValueError, match="sorted by batch"):
            shuffled.batch_offsets()
    empty = sv.Voxels(np.zeros((0, 4), np.int32), np.zeros((0, 1)))
    assert empty.batch_size == 0 and empty.batch_offsets().tolist() == [0]


def test_torch_keeps_autograd_through_cat_and_add(rng):
    torch = pytest.importorskip("torch")
    coords = torch.as_tensor(random_voxels(rng, 20))
    fa = torch.randn(len(coords), 2, requires_grad=True)
    fb = torch.randn(len(coords), 2, requires_grad=True)
    a, b = sv.Voxels(coords, fa), sv.Voxels(coords, fb)
    out = sv.Voxels.cat(a + b, b).feats.sum()
    out.backward()
    assert torch.equal(fa.grad, torch.ones_like(fa)) and torch.equal(fb.grad, 2 * torch.ones_like(fb))
    assert isinstance(a.batch_index(), torch.Tensor) and isinstance(a.batch_offsets(), torch.Tensor)
