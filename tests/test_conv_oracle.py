"""Every kind × kernel size × stride × dilation × batches against the float64 dense oracle (NumPy backend)."""
import itertools

import numpy as np
import pytest
from reference import TOL, dense_conv, dense_conv_grads, expected_out_coords, random_voxels, rel_err

import sparsevox as sv
from sparsevox.testing import BATCHES, DILATIONS, KERNEL_SIZES, KINDS, STRIDES, kind_args

CASES = [c for c in itertools.product(KINDS, KERNEL_SIZES, STRIDES, DILATIONS, BATCHES)
         if not (c[0] == "submanifold" and c[2] == 2)]


def make_case(rng, kind, ks, stride, dilation, batches, c_in=5, c_out=4, dtype=np.float64):
    """Input voxels, the output_voxels argument, and the (stride, transposed, generative) flags."""
    s, transposed, generative = kind_args(kind, stride)
    fine = random_voxels(rng, 70 * batches, extent=7, batches=batches)
    output = None
    if kind == "transposed":  # upsample the coarse level back onto the fine sites
        output = sv.Voxels(fine, None)
        coords = expected_out_coords(fine, 2, s, 1, False, False)
    else:
        coords = fine
    feats = rng.standard_normal((len(coords), c_in)).astype(dtype)
    k = int(np.prod(np.broadcast_to(ks, 3)))
    weight = rng.standard_normal((k, c_in, c_out)).astype(dtype)
    return sv.Voxels(coords, feats), weight, output, (s, transposed, generative)


@pytest.mark.parametrize("kind,ks,stride,dilation,batches", CASES)
def test_forward_and_grads_match_dense_oracle(rng, kind, ks, stride, dilation, batches):
    v, w, output, (s, tr, gen) = make_case(rng, kind, ks, stride, dilation, batches)
    kmap = sv.kernel_map(v, ks, s, dilation, tr, gen, output)
    out_coords = kmap.out_coords
    if kind != "transposed":
        np.testing.assert_array_equal(out_coords, expected_out_coords(v.coords, ks, s, dilation, tr, gen))
    out = sv.conv_forward(v.feats, w, kmap)
    ref = dense_conv(v.coords, v.feats, w, ks, s, dilation, tr, out_coords)
    assert out.shape == ref.shape and rel_err(out, ref) < TOL["float64"]
    g = rng.standard_normal(out.shape)
    gf, gw = sv.conv_backward(g, v.feats, w, kmap)
    rgf, rgw = dense_conv_grads(v.coords, v.feats, w, g, ks, s, dilation, tr, out_coords)
    assert rel_err(gf, rgf) < TOL["float64"]
    assert rel_err(gw, rgw) < TOL["float64"]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("kind", KINDS)
def test_dtypes_within_tolerance(rng, kind, dtype):
    import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy; installed with jax)
    np_dtype = np.dtype(dtype)
    v64, w64, output, (s, tr, gen) = make_case(rng, kind, 3, 2, 1, 2, c_in=16, c_out=8)
    v = v64.replace(v64.feats.astype(np_dtype))
    w = w64.astype(np_dtype)
    kmap = sv.kernel_map(v, 3, s, 1, tr, gen, output)
    out = sv.conv_forward(v.feats, w, kmap)
    assert out.dtype == np_dtype
    ref = dense_conv(v.coords, v.feats.astype(np.float64), w.astype(np.float64), 3, s, 1, tr, kmap.out_coords)
    assert rel_err(out.astype(np.float64), ref) < TOL[dtype]
    g = rng.standard_normal(out.shape).astype(np_dtype)
    gf, gw = sv.conv_backward(g, v.feats, w, kmap)
    assert gf.dtype == np_dtype and gw.dtype == np_dtype
    rgf, rgw = dense_conv_grads(v.coords, v.feats.astype(np.float64), w.astype(np.float64),
                                g.astype(np.float64), 3, s, 1, tr, kmap.out_coords)
    assert rel_err(gf.astype(np.float64), rgf) < TOL[dtype]
    assert rel_err(gw.astype(np.float64), rgw) < TOL[dtype]


def test_public_api_strided_then_transposed_roundtrip(rng):
    fine = sv.Voxels(random_voxels(rng, 200, extent=10, batches=2), rng.standard_normal((200, 3)))
    fine = sv.Voxels(fine.coords, rng.standard_normal((fine.num_voxels, 3)))
    w_down = rng.standard_normal((8, 3, 6))
    down = sv.spatially_sparse_conv(fine, w_down, kernel_size=2, stride=2)
    np.testing.assert_array_equal(down.coords, expected_out_coords(fine.coords, 2, 2, 1, False, False))
    w_up = rng.standard_normal((8, 6, 2))
    up = sv.spatially_sparse_conv(down, w_up, kernel_size=2, stride=2, transposed=True, output_voxels=fine)
    assert up.coords is fine.coords and up.feats.shape == (fine.num_voxels, 2)
    ref = dense_conv(down.coords, down.feats, w_up, 2, 2, 1, True, fine.coords)
    assert rel_err(up.feats, ref) < 1e-12
    # output_voxels may also be a plain coords array
    up2 = sv.spatially_sparse_conv(down, w_up, kernel_size=2, stride=2, transposed=True, output_voxels=fine.coords)
    np.testing.assert_allclose(up2.feats, up.feats)


def test_kernel_map_is_cached_and_shared(rng):
    v = sv.Voxels(random_voxels(rng, 100), rng.standard_normal((100, 4)))
    m1 = sv.kernel_map(v, 3)
    assert sv.kernel_map(v, 3) is m1
    assert sv.kernel_map(v, 3, dilation=2) is not m1
    out = sv.spatially_sparse_conv(v, rng.standard_normal((27, 4, 4)))
    assert sv.kernel_map(out, 3) is m1  # submanifold output shares the geometry and its maps


def test_kernel_map_csr_layout(rng):
    v = sv.Voxels(random_voxels(rng, 80), rng.standard_normal((80, 2)))
    m = sv.kernel_map(v, 3)
    assert m.in_maps.dtype == np.int32 and m.out_maps.dtype == np.int32 and m.offsets.dtype == np.int32
    assert m.offsets.shape == (28,) and m.offsets[0] == 0 and m.offsets[-1] == len(m.in_maps)
    centre = 13  # offset (0, 0, 0): every voxel pairs with itself
    s, e = m.offsets[centre], m.offsets[centre + 1]
    np.testing.assert_array_equal(m.in_maps[s:e], np.arange(80))
    for k in range(27):  # canonical order: sorted by output row within an offset
        assert np.all(np.diff(m.out_maps[m.offsets[k]:m.offsets[k + 1]]) > 0)
    in_maps, out_maps, offsets = m
    assert in_maps is m.in_maps


def test_empty_input():
    v = sv.Voxels(np.zeros((0, 4), np.int32), np.zeros((0, 3), np.float32))
    w = np.ones((27, 3, 2), np.float32)
    out = sv.spatially_sparse_conv(v, w)
    assert out.feats.shape == (0, 2)
    down = sv.spatially_sparse_conv(v, np.ones((8, 3, 2), np.float32), kernel_size=2, stride=2)
    assert down.feats.shape == (0, 2) and down.coords.shape == (0, 4)
    gen = sv.spatially_sparse_conv(v, np.ones((8, 3, 2), np.float32), kernel_size=2, stride=2,
                                   transposed=True, generative=True)
    assert gen.feats.shape == (0, 2)
    gf, gw = sv.conv_backward(np.zeros((0, 2), np.float32), v.feats, w, sv.kernel_map(v, 3))
    assert gf.shape == (0, 3) and np.all(gw == 0)


def test_nan_propagates_only_to_neighbours(rng):
    coords = np.array([[0, 0, 0, 0], [0, 1, 0, 0], [0, 5, 5, 5]], np.int32)
    feats = np.ones((3, 2))
    feats[0, 0] = np.nan
    out = sv.spatially_sparse_conv(sv.Voxels(coords, feats), np.ones((27, 2, 2)))
    assert np.isnan(out.feats[0]).all() and np.isnan(out.feats[1]).all()
    assert np.isfinite(out.feats[2]).all()
