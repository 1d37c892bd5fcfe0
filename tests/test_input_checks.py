"""Bad input to the core and the torch adapter raises a ValueError naming the argument and what it accepts,
never an error from deep inside or a silently wrong result (found by a new-user audit, 2026-12-05)."""
import numpy as np
import pytest

import sparsevox as sv
from sparsevox.geometry import positive_int, triple, voxel_size3

W27 = np.ones((27, 1, 1), np.float32)


# --- Voxels(check=False) on the CPU: validated where the geometry is first used --------------------------

@pytest.mark.parametrize("coords, match", [
    ([[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]], "unique per batch"),
    ([[0, 0, 0, 0], [2000, 0, 0, 0], [0, 1, 1, 1]], "batch index must be in"),
    ([[0, 200000, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]], "x must be in"),
    ([[0, 0, 0], [0, 1, 0], [1, 1, 1]], "shape \\[N, 4\\]"),
], ids=["duplicate", "batch", "range", "shape"])
def test_unchecked_voxels_raise_at_first_use_on_the_cpu(coords, match):
    """Before: the duplicate convolved as one summed site, batch 2000 pooled as batch 976 (packing wrapped),
    x = 200000 convolved to 0, a 3-column array raised an IndexError. Every later use raises again."""
    v = sv.Voxels(np.array(coords, np.int32), np.ones((3, 1), np.float32), check=False)
    for use in (lambda: sv.spatially_sparse_conv(v, W27, 3), lambda: sv.max_pool(v, 2),
                lambda: sv.kernel_map(v, 3)):
        with pytest.raises(ValueError, match=match):
            use()


def test_unchecked_valid_voxels_convolve_as_checked_ones(rng):
    c = np.unique(rng.integers(0, 6, (80, 4)), axis=0).astype(np.int32)
    c[:, 0] %= 2
    c = np.unique(c, axis=0)
    f = rng.standard_normal((len(c), 2)).astype(np.float32)
    w = rng.standard_normal((27, 2, 3)).astype(np.float32)
    a = sv.spatially_sparse_conv(sv.Voxels(c, f), w).feats
    b = sv.spatially_sparse_conv(sv.Voxels(c, f, check=False), w).feats
    np.testing.assert_array_equal(a, b)


def test_lists_are_numpy_arrays():
    v = sv.Voxels([[0, 0, 0, 0], [0, 1, 0, 0]], [[1.0], [2.0]])
    assert isinstance(v.coords, np.ndarray) and v.feats.dtype == np.float64
    np.testing.assert_array_equal(sv.spatially_sparse_conv(v, np.ones((27, 1, 1))).feats, [[3.0], [3.0]])


# --- kernel maps as bare arrays ----------------------------------------------------------------------------

def _map(rng):
    c = np.unique(rng.integers(0, 5, (60, 4)), axis=0).astype(np.int32)
    c[:, 0] = 0
    c = np.unique(c, axis=0)
    v = sv.Voxels(c, np.ones((len(c), 2), np.float32))
    km = sv.kernel_map(v, 3)
    return v, km


@pytest.mark.parametrize("edit, match", [
    (lambda i, o, n: (i + n, o), "in_maps must hold rows in \\[0, num_in"),
    (lambda i, o, n: (i, o - 1), "out_maps must hold rows in \\[0, num_out"),
    (lambda i, o, n: (i.astype(np.float32), o), "in_maps must be a 1-D integer array"),
    (lambda i, o, n: (i, o[:-1]), "one length"),
], ids=["in-range", "out-range", "dtype", "length"])
def test_tuple_maps_are_range_checked(rng, edit, match):
    """Before: an IndexError from inside the explicit GEMM (a GPU kernel would read out of bounds)."""
    v, km = _map(rng)
    i, o = edit(km.in_maps.copy(), km.out_maps.copy(), km.num_in)
    with pytest.raises(ValueError, match=match):
        sv.spatially_sparse_depthwise_conv(np.ones((km.num_in, 2), np.float32), np.ones((27, 2), np.float32),
                                           (i, o, km.offsets_host.copy()), km.num_out)


def test_torch_conv_tensors_checks_the_map_too(rng):
    torch = pytest.importorskip("torch", reason="torch not installed")
    from sparsevox.adapters import torch as svt
    _, km = _map(rng)
    i, o, off = svt.kernel_map_tensors(km)
    f, w = torch.ones(km.num_in, 2), torch.ones(27, 2, 3)
    with pytest.raises(ValueError, match="in_maps must hold rows"):
        svt.conv_tensors(f, w, i.clone() + km.num_in, o.clone(), off.clone(), km.num_out)


# --- argument values ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [(3.7, 3, 3), "333", 3.0, (3, 3), True, (True, 1, 1), None, [1, 2, 3, 4]])
def test_triple_refuses_what_it_would_truncate(value):
    with pytest.raises(ValueError, match="kernel_size must be an int or a 3-tuple of ints"):
        triple(value, "kernel_size")


def test_triple_takes_integers_of_every_kind():
    assert triple(np.int64(2), "k") == (2, 2, 2) and triple((np.int32(1), 2, 3), "k") == (1, 2, 3)
    assert triple(np.array([1, 2, 3]), "k") == (1, 2, 3) and triple([2, 2, 2], "k") == (2, 2, 2)
    torch = pytest.importorskip("torch", reason="torch not installed")
    assert triple(torch.tensor(3), "k") == (3, 3, 3)


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "4", None])
def test_positive_int(value):
    with pytest.raises(ValueError, match="channels must be an integer >= 1"):
        positive_int(value, "channels")
    assert positive_int(np.int16(4), "channels") == 4


@pytest.mark.parametrize("value", [(0.1, 0.1), "0.1", 0, -1.0, float("nan"), (0.1, 0.1, float("inf"))])
def test_voxel_size3(value):
    with pytest.raises(ValueError, match="voxel_size must be"):
        voxel_size3(value)


@pytest.mark.parametrize("kw, match", [
    (dict(features=np.ones(10)), "features must have shape \\[P=10, F\\]"),
    (dict(batch=np.zeros(3, int)), "batch must be an integer array of shape \\[P=10\\]"),
    (dict(batch=np.zeros(10)), "batch must be an integer array"),
    (dict(voxel_size=(0.1, 0.1)), "voxel_size must be a float or 3 floats"),
    (dict(voxel_size="0.1"), "voxel_size must be a float or 3 floats"),
])
def test_from_points_names_its_bad_arguments(rng, kw, match):
    args = dict(voxel_size=0.1)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        sv.Voxels.from_points(rng.random((10, 4)), **args)


def test_to_dense_refuses_a_fractional_shape(rng):
    v = sv.Voxels(np.array([[0, 1, 1, 1]], np.int32), np.ones((1, 2), np.float32))
    with pytest.raises(ValueError, match="spatial_shape must be 3 ints >= 1"):
        sv.to_dense(v, (8.5, 6, 6))
    assert sv.to_dense(v, (np.int64(4), 4, 4)).shape == (1, 2, 4, 4, 4)


def test_core_functions_name_arrays_of_another_library(rng):
    torch = pytest.importorskip("torch", reason="torch not installed")
    v, km = _map(rng)
    with pytest.raises(ValueError, match="features must be a NumPy or CuPy array here"):
        sv.conv_forward(torch.ones(km.num_in, 2), np.ones((27, 2, 2), np.float32), km)
    with pytest.raises(ValueError, match="voxels must be a sparsevox.Voxels, got ndarray"):
        sv.spatially_sparse_conv(np.ones((3, 4)), np.ones((27, 4, 4)))
    with pytest.raises(ValueError, match="voxels must be a sparsevox.Voxels"):
        sv.kernel_map(np.ones((3, 4)), 3)


def test_numpy_conv_checks_its_backward_algorithm_name(rng):
    v, _ = _map(rng)
    with pytest.raises(ValueError, match="bwd_algo: unknown algorithm 'bogus'"):
        sv.spatially_sparse_conv(v, np.ones((27, 2, 2), np.float32), bwd_algo="bogus")


# --- the torch adapter ---------------------------------------------------------------------------------------

def test_torch_layers_check_their_arguments_when_made():
    pytest.importorskip("torch", reason="torch not installed")
    from sparsevox.adapters import torch as svt
    cases = [(lambda: svt.SpatiallySparseConv(2.5, 8), "in_channels must be an integer >= 1"),
             (lambda: svt.SpatiallySparseConv(4, 0), "out_channels must be an integer >= 1"),
             (lambda: svt.SpatiallySparseConv(4, 8, kernel_size=(3.7, 3, 3)), "kernel_size must be an int"),
             (lambda: svt.SpatiallySparseConv(4, 8, fwd_algo="bogus"), "fwd_algo: unknown algorithm 'bogus'"),
             (lambda: svt.SpatiallySparseConv(4, 8, bwd_algo="bogus"), "bwd_algo: unknown algorithm 'bogus'"),
             (lambda: svt.SpatiallySparseDepthwiseConv(0), "channels must be an integer >= 1"),
             (lambda: svt.InstanceNorm(2.5), "num_features must be an integer >= 1"),
             (lambda: svt.MinkUNet(4, 0), "num_classes must be an integer >= 1"),
             (lambda: svt.MinkUNet(0, 5), "in_channels must be an integer >= 1"),
             (lambda: svt.MinkUNet(4, 5, widths=(8,) * 8 + (2.5,)), "widths must be 9 positive"),
             (lambda: svt.MinkUNet(4, 5, blocks=0), "blocks must be an int >= 1")]
    for make, match in cases:
        with pytest.raises(ValueError, match=match):
            make()
    svt.SpatiallySparseConv(4, 8, fwd_algo="implicit_gemm", bwd_algo=["explicit_gemm", "implicit_gemm"])


def test_torch_adapter_names_a_weight_of_another_library(rng):
    torch = pytest.importorskip("torch", reason="torch not installed")
    from sparsevox.adapters import torch as svt
    v = sv.Voxels(torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0]]), torch.ones(2, 4))
    for w in (np.ones((27, 4, 4), np.float32), np.ones((1, 4, 4), np.float32)):
        with pytest.raises(ValueError, match="weight must be a torch.Tensor .*numpy.ndarray"):
            sv.spatially_sparse_conv(v, w, 3 if w.shape[0] == 27 else 1)
    with pytest.raises(ValueError, match="MinkUNet takes sparsevox.Voxels"):
        svt.MinkUNet(4, 5, widths=(4,) * 9, blocks=1)(torch.ones(3, 4))


def test_unchecked_output_voxels_are_checked_too():
    v = sv.Voxels(np.array([[0, 0, 0, 0], [0, 2, 2, 2]], np.int32), np.ones((2, 1), np.float32))
    bad = sv.Voxels(np.array([[0, 0, 0, 0], [0, 0, 0, 0], [0, 200000, 0, 0]], np.int32), None, check=False)
    with pytest.raises(ValueError, match="unique per batch|x must be in"):
        sv.kernel_map(v, 2, 2, transposed=True, output_voxels=bad)


def test_unchecked_voxels_check_only_their_coords():
    """The deferred check is of the coords (as promised): feats of another dtype or none are not its business."""
    c = np.array([[0, 0, 0, 0], [0, 1, 0, 0]], np.int32)
    v = sv.Voxels(c, np.array([[1], [2]], np.int64), check=False)  # e.g. integer labels riding along
    assert sv.kernel_map(v, 3).num_pairs == 4


def test_from_points_takes_one_batch_index_for_all_points(rng):
    p = rng.random((10, 3))
    v = sv.Voxels.from_points(p, 0.5, batch=np.int64(3))
    assert (np.asarray(v.coords)[:, 0] == 3).all()


def test_jax_tree_maps_over_voxels_keep_their_leaves():
    """Pytree unflattening builds Voxels with check=False: leaves a tree map made (tuples of shapes) stay as
    they are (converting lists and tuples is for a user's own Voxels(list, list))."""
    jax = pytest.importorskip("jax", reason="jax not installed")
    import jax.numpy as jnp
    pytest.importorskip("sparsevox.adapters.jax")
    v = sv.Voxels(jnp.asarray([[0, 0, 0, 0], [0, 1, 0, 0]]), jnp.ones((2, 3)))
    shapes = jax.tree.map(lambda x: x.shape, v)
    assert shapes.coords == (2, 4) and shapes.feats == (2, 3)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), v).feats[0] == (2, 3)
