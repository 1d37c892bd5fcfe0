"""A transposed layer back onto the sites a strided layer came from reuses that strided map, swapped
(issue 19: the MinkUNet's decoder rebuilt four maps per step that its encoder already had)."""
import sys

import numpy as np
import pytest
from reference import random_voxels

import sparsevox as sv

km = sys.modules["sparsevox.kernel_map"]


def _pairs(kmap):
    o = kmap.offsets_host
    i, j = np.asarray(kmap.in_maps), np.asarray(kmap.out_maps)
    return [set(zip(i[o[k]:o[k + 1]].tolist(), j[o[k]:o[k + 1]].tolist())) for k in range(len(o) - 1)]


@pytest.mark.parametrize("ks, st", [(2, 2), (3, 2), ((2, 2, 1), (2, 2, 1))])
def test_twin_equals_a_built_transposed_map(rng, ks, st):
    fine = sv.Voxels(random_voxels(rng, 500, extent=12, batches=2), None)
    down = sv.kernel_map(fine, ks, st)
    coarse = sv.Voxels.from_core_coords(down.out_coords, None, fine.origin)
    builds = []
    real = km.BUILDERS.get("numpy", km.build_kernel_map)
    km.BUILDERS["numpy"] = lambda *a, **k: builds.append(1) or real(*a, **k)
    try:
        up = sv.kernel_map(coarse, ks, st, transposed=True, output_voxels=fine)
    finally:
        km.BUILDERS["numpy"] = real
    assert not builds, "the transposed map was built although its strided twin exists"
    ref = km.build_kernel_map(coarse.core_coords()[0], None, ks, st, 1, True, False, fine.core_coords()[0])
    assert (up.kind, up.num_in, up.num_out) == ("transposed", ref.num_in, ref.num_out)
    assert np.array_equal(up.offsets_host, ref.offsets_host)
    assert _pairs(up) == _pairs(ref)
    assert np.array_equal(up.out_coords, fine.core_coords()[0])
    assert sv.kernel_map(coarse, ks, st, transposed=True, output_voxels=fine) is up  # cached


def test_other_sites_get_their_own_map(rng):
    """Coarse sites that did not come from this strided map (equal values, another array) are built."""
    fine = sv.Voxels(random_voxels(rng, 300, extent=10, batches=1), None)
    down = sv.kernel_map(fine, 2, 2)
    coarse = sv.Voxels(down.out_coords.copy(), None)
    assert km._strided_twin(fine, coarse.core_coords()[0], (2, 2, 2), (2, 2, 2), (1, 1, 1)) is None
    up = sv.kernel_map(coarse, 2, 2, transposed=True, output_voxels=fine)
    assert up.kind == "transposed" and up.num_pairs == down.num_pairs


def test_maps_for_given_sites_go_when_the_sites_do(rng):
    """The cache holds given output sites weakly: maps for sites given as a fresh coords array on every
    call (each a new ``Voxels``) do not pile up on the input, and a map for live sites stays cached."""
    fine = sv.Voxels(random_voxels(rng, 300, extent=10, batches=1), None)
    coarse = sv.strided_output_voxels(fine, 2, 2)
    for _ in range(5):
        sv.kernel_map(coarse, 2, 2, transposed=True, output_voxels=fine.coords.copy())
    given = [k for k in coarse._kmaps if isinstance(k, tuple) and len(k) == 6 and k[5] is not None]
    assert len(given) <= 1, f"{len(given)} maps for dead sites kept"
    up = sv.kernel_map(coarse, 2, 2, transposed=True, output_voxels=fine)
    sv.kernel_map(coarse, 2, 2, transposed=True, output_voxels=fine.coords.copy())
    assert sv.kernel_map(coarse, 2, 2, transposed=True, output_voxels=fine) is up


def test_strided_output_voxels_are_the_strided_layers_sites(rng):
    """``sv.strided_output_voxels``: the strided map's output sites, the same object while it lives, the
    map reused when they are given as ``output_voxels`` (no second build); stride 1 is refused by name."""
    fine = sv.Voxels(random_voxels(rng, 400, extent=12, batches=2), None)
    sites = sv.strided_output_voxels(fine, 2, 2)
    down = sv.kernel_map(fine, 2, 2)
    assert sites.feats is None and sites.core_coords()[0] is down.out_coords
    assert sv.strided_output_voxels(fine, 2, 2) is sites
    assert sv.kernel_map(fine, 2, 2, output_voxels=sites) is down
    with pytest.raises(ValueError, match="stride"):
        sv.strided_output_voxels(fine, 3, 1)


@pytest.mark.gpu
def test_gpu_twin_tables_are_the_built_ones(rng):
    """On the GPU the swapped map's neighbour tables are the twin's, roles swapped; they must equal the
    tables scattered from the swapped map's own pairs, and a convolution through it the built map's."""
    cupy = pytest.importorskip("cupy")
    from sparsevox.algorithms import implicit_gemm as ig
    fine = sv.Voxels(cupy.asarray(random_voxels(rng, 3000, extent=24, batches=2)), None)
    down = sv.kernel_map(fine, 2, 2)
    coarse = sv.Voxels.from_core_coords(down.out_coords, None, fine.origin)
    up = sv.kernel_map(coarse, 2, 2, transposed=True, output_voxels=fine)
    assert up.swapped_from is down
    plain = km.KernelMap(up.in_maps, up.out_maps, up.offsets, up.offsets_host, up.num_in, up.num_out,
                         up.out_coords, up.kernel_size, up.stride, up.dilation, "transposed")
    for reverse in (False, True):
        assert cupy.array_equal(ig.neighbour_table(up, reverse), ig.neighbour_table(plain, reverse)), reverse
    x = cupy.asarray(rng.standard_normal((up.num_in, 16)), dtype=cupy.float32)
    w = cupy.asarray(rng.standard_normal((8, 16, 16)), dtype=cupy.float32)
    a = sv.conv_forward(x, w, up, fwd_algo="implicit_gemm")
    b = sv.conv_forward(x, w, plain, fwd_algo="implicit_gemm")
    assert float(cupy.abs(a - b).max()) == 0.0
