"""sparsevox.compat.spconv beyond the layers: ``install()`` (``import spconv`` for code that cannot be edited),
``utils.PointToVoxel``, ``functional.sparse_add``, ``spconv.core``'s enums and ``constants``. Against spconv
2.3.8 itself where its CPU wheel is installed (CI installs it), else against references written here."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch not installed")
import sparsevox.compat.spconv as CMP  # noqa: E402
from sparsevox.compat.spconv import functional as CF  # noqa: E402
from sparsevox.compat.spconv.utils import PointToVoxel, gather_features_by_pc_voxel_id  # noqa: E402


def _real(module: str):
    return pytest.importorskip(module, reason="spconv not installed (CI installs its CPU wheel)")


def _run(code: str) -> str:
    """``code`` in a fresh interpreter (``install`` changes ``sys.modules`` for good); its stdout."""
    got = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr[-3000:]
    return got.stdout


# --- install ------------------------------------------------------------------------------------------------

def test_install_answers_the_detection_code_of_mmdet3d_openpcdet_and_centerpoint():
    out = _run("""
        import importlib.util
        import sparsevox.compat.spconv as compat
        root = compat.install()
        assert compat.install() is root  # again: a no-op
        # mmdetection3d's gate (mmdet3d/models/layers/spconv/__init__.py)
        import spconv
        assert hasattr(spconv, '__version__') and spconv.__version__ >= '2.0.0'
        # OpenPCDet's pcdet/utils/spconv_utils.py
        assert float(spconv.__version__[2:]) >= 2.2
        spconv.constants.SPCONV_USE_DIRECT_TABLE = False
        import spconv.pytorch as spconv_p
        assert spconv_p is compat and spconv.pytorch is compat and spconv.SPCONV_VERSION_NUMBERS == [2, 3, 8]
        # CenterPoint's det3d/models/__init__.py
        assert importlib.util.find_spec("spconv") is not None
        from spconv.pytorch import SparseConvTensor, SubMConv3d, ops, functional
        from spconv.pytorch.conv import SparseConvolution
        from spconv.pytorch.modules import SparseModule
        from spconv.pytorch.utils import PointToVoxel
        from spconv.pytorch.constants import PYTORCH_VERSION
        from spconv.core import ConvAlgo, AlgoHint
        import spconv.pytorch.tables, spconv.pytorch.identity, spconv.pytorch.pool
        assert SparseConvTensor is compat.SparseConvTensor and ConvAlgo is compat.ConvAlgo
        assert SparseConvolution is compat.SparseConvolution and AlgoHint.BackwardWeight.value == 4
        assert isinstance(PYTORCH_VERSION, list) and all(isinstance(v, int) for v in PYTORCH_VERSION)
        # what has no counterpart imports, and raises naming the feature when used
        for stmt in ("from spconv.pytorch.hash import HashTable", "from spconv.utils import Point2VoxelCPU3d",
                     "from spconv.pytorch.spatial import RemoveDuplicate", "import spconv.pytorch.quantization as q; q.Q"):
            try:
                exec(stmt)
            except NotImplementedError as e:
                assert "not supported by sparsevox.compat.spconv" in str(e), e
            else:
                raise AssertionError(stmt)
        import spconv.utils
        assert not hasattr(spconv.utils, "__no_such__")  # private names stay AttributeErrors
        print("ok")
    """)
    assert out.strip() == "ok"


def test_install_refuses_to_mix_with_an_imported_spconv():
    out = _run("""
        import sys, types
        sys.modules["spconv"] = types.ModuleType("spconv")  # stands for a real spconv imported earlier
        import sparsevox.compat.spconv as compat
        try:
            compat.install()
        except RuntimeError as e:
            assert "already imported" in str(e)
        else:
            raise AssertionError("no error")
        sys.modules["spconv.pytorch"] = types.ModuleType("spconv.pytorch")
        root = compat.install(replace=True)
        import spconv, spconv.pytorch
        assert spconv is root and spconv.pytorch is compat
        print("ok")
    """)
    assert out.strip() == "ok"


def test_a_model_written_against_spconv_runs_after_install(rng):
    """Model code that imports spconv (not edited) runs on compat after ``install()``, with a state dict."""
    out = _run("""
        import torch
        import sparsevox.compat.spconv as compat
        compat.install()
        import spconv.pytorch as spconv
        from spconv.pytorch import functional as Fsp
        net = spconv.SparseSequential(spconv.SubMConv3d(3, 8, 3, indice_key="s"), torch.nn.ReLU(),
                                      spconv.SparseConv3d(8, 8, 3, 2, 1, indice_key="d"),
                                      spconv.SparseInverseConv3d(8, 4, 3, indice_key="d"))
        idx = torch.tensor([[0, 1, 1, 1], [0, 2, 2, 3], [1, 4, 0, 2], [1, 4, 1, 2]], dtype=torch.int32)
        x = spconv.SparseConvTensor(torch.randn(4, 3), idx, [6, 6, 6], 2)
        y = net(x)
        z = Fsp.sparse_add(y, y)
        assert torch.allclose(z.features, 2 * y.features) and z.indices.shape == (4, 4)
        net.load_state_dict(net.state_dict())
        print("ok")
    """)
    assert out.strip() == "ok"


# --- PointToVoxel -------------------------------------------------------------------------------------------

def _points(rng, n=6000, extent=(40.0, 40.0, 3.0), dtype=torch.float32):
    xyz = (rng.random((n, 3)) * 2 - 1) * np.asarray(extent)
    return torch.from_numpy(np.concatenate([xyz, rng.random((n, 1))], 1)).to(dtype)


def _loop_voxelise(pc, vsize, lo, grid, max_voxels, max_points, empty_mean):
    """spconv's CPU voxeliser (csrc/sparse/pointops.py ``point_to_voxel_static_template``) as a loop, with
    each voxel's own mean."""
    pc = pc.numpy()
    nd = len(vsize)
    ids, voxels, coords, nums, pid = {}, [], [], [], np.full(len(pc), -1, np.int64)
    for i, p in enumerate(pc):
        c = tuple(int(np.floor((p[nd - 1 - j] - lo[j]) / vsize[j])) for j in range(nd))  # z, y, x
        if any(v < 0 or v >= g for v, g in zip(c, grid)):
            continue
        v = ids.get(c)
        if v is None:
            if len(ids) >= max_voxels:
                continue
            v = ids[c] = len(ids)
            voxels.append(np.zeros((max_points, pc.shape[1]), np.float32))
            coords.append(c)
            nums.append(0)
        pid[i] = v
        if nums[v] < max_points:
            voxels[v][nums[v]] = p
            nums[v] += 1
    if empty_mean:
        for v, n in enumerate(nums):
            voxels[v][n:] = voxels[v][:n].mean(0)
    m = len(ids)
    return (np.stack(voxels) if m else np.zeros((0, max_points, pc.shape[1]), np.float32),
            np.asarray(coords, np.int32).reshape(m, nd), np.asarray(nums, np.int32), pid)


@pytest.mark.parametrize("empty_mean", [False, True])
@pytest.mark.parametrize("geo", [([0.4, 0.4, 0.2], [-30, -30, -2, 30, 30, 2], 20000, 5),  # many voxels
                                 ([10.0, 10.0, 3.0], [-40, -40, -3, 40, 40, 3], 50, 12)],  # full voxels, the cap
                         ids=["fine", "coarse-capped"])
def test_point_to_voxel_equals_the_loop_reference(rng, geo, empty_mean):
    vsize, rng_xyz, max_voxels, max_points = geo
    pc = _points(rng, 3000)
    p2v = PointToVoxel(vsize, rng_xyz, 4, max_voxels, max_points)
    got = p2v.generate_voxel_with_id(pc, empty_mean=empty_mean)
    ref = _loop_voxelise(pc, p2v.vsize, p2v.coors_range[:3], p2v.grid_size, max_voxels, max_points, empty_mean)
    assert [t.dtype for t in got] == [torch.float32, torch.int32, torch.int32, torch.int64]
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g.numpy(), r, rtol=1e-6, atol=1e-6)
    assert [t.shape for t in p2v(pc)] == [t.shape for t in got[:3]]
    if geo[2] == 50:
        assert len(got[0]) == 50 and (got[2] == max_points).any() and (got[3] == -1).any()  # both caps bite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("geo", [([0.5, 0.5, 0.2], [-30, -30, -2, 30, 30, 2], 5000, 5),
                                 ([2.0, 2.0, 1.0], [-40, -40, -3, 40, 40, 3], 300, 8),
                                 ([0.2, 0.2], [-20, -20, 20, 20], 100000, 3)], ids=["capped", "coarse", "2d"])
def test_point_to_voxel_equals_spconvs(rng, geo, dtype):
    """Bit for bit spconv 2.3.8's CPU voxeliser: voxels, indices, counts and every point's voxel id."""
    real = _real("spconv.pytorch.utils")
    vsize, rng_xyz, max_voxels, max_points = geo
    pc = _points(rng, 8000, dtype=dtype)
    nf = 4
    if len(vsize) == 2:
        pc = pc[:, [0, 1, 3]]
        nf = 3
    want = real.PointToVoxel(vsize, rng_xyz, nf, max_voxels, max_points).generate_voxel_with_id(pc)
    got = PointToVoxel(vsize, rng_xyz, nf, max_voxels, max_points).generate_voxel_with_id(pc)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


def test_gather_features_by_pc_voxel_id():
    feats = torch.arange(6.0).reshape(3, 2)
    ids = torch.tensor([2, -1, 0, 0])
    assert torch.equal(gather_features_by_pc_voxel_id(feats, ids), torch.tensor([[4.0, 5], [0, 0], [0, 1], [0, 1]]))
    assert gather_features_by_pc_voxel_id(feats, ids, invalid_value=-7)[1].tolist() == [-7, -7]


@pytest.mark.parametrize("args, match", [
    (([0.5, 0.5], [-1, -1, -1, 1, 1, 1], 4, 10, 5), "coors_range_xyz must have 2 \\* 2"),
    (([0.5, 0, 0.5], [-1, -1, -1, 1, 1, 1], 4, 10, 5), "vsize_xyz must be > 0"),
    (([0.5, 0.5, 0.5], [1, -1, -1, -1, 1, 1], 4, 10, 5), "maxes must exceed"),
    (([0.5, 0.5, 0.5], [-1, -1, -1, 1, 1, 1], 2, 10, 5), "num_point_features must be an integer >= 3"),
    (([0.5, 0.5, 0.5], [-1, -1, -1, 1, 1, 1], 4, 0, 5), "max_num_voxels must be an integer >= 1"),
    (([0.5, 0.5, 0.5], [-1, -1, -1, 1, 1, 1], 4, 10, 0), "max_num_points_per_voxel must be an integer >= 1"),
])
def test_point_to_voxel_refuses_bad_arguments_by_name(args, match):
    with pytest.raises(ValueError, match=match):
        PointToVoxel(*args)


def test_point_to_voxel_refuses_bad_points():
    p2v = PointToVoxel([1, 1, 1], [0, 0, 0, 4, 4, 4], 4, 10, 2)
    with pytest.raises(ValueError, match="num_point_features=4"):
        p2v(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="float32 or float64"):
        p2v(torch.zeros(5, 4, dtype=torch.int32))
    voxels, indices, num = p2v(torch.zeros(0, 4))
    assert voxels.shape == (0, 2, 4) and indices.shape == (0, 3) and num.shape == (0,)


# --- sparse_add ---------------------------------------------------------------------------------------------

def _tensor(sp, rng, n, shape=(8, 8, 8), batches=2, c=4, dtype=torch.float64, rows=None):
    vol = int(np.prod(shape))
    if rows is None:
        flat = rng.choice(batches * vol, n, replace=False)
        b, r = np.divmod(flat, vol)
        rows = torch.from_numpy(np.stack([b, *np.unravel_index(r, shape)], 1).astype(np.int32))
    feats = torch.from_numpy(rng.standard_normal((len(rows), c))).to(dtype)
    return sp.SparseConvTensor(feats, rows, list(shape), batches)


def _by_site(t):
    return {tuple(r): f for r, f in zip(t.indices.tolist(), t.features.detach().tolist())}


def test_sparse_add_sums_every_site_and_differentiates(rng):
    a, b, c = (_tensor(CMP, rng, n) for n in (90, 60, 30))
    for t in (a, b, c):
        t.features.requires_grad_()
    s = CF.sparse_add(a, b, c)
    want = {}
    for t in (a, b, c):
        for k, f in _by_site(t).items():
            want[k] = np.asarray(want.get(k, 0)) + np.asarray(f)
    got = _by_site(s)
    assert sorted(got) == sorted(want) and s.indices.dtype == torch.int32
    assert all(np.allclose(got[k], want[k], rtol=0, atol=1e-12) for k in want)
    keys = [tuple(r) for r in s.indices.tolist()]
    assert keys == sorted(keys) and s.indice_dict == {}  # no operand holds every site: sorted, no pair records
    w = torch.from_numpy(rng.standard_normal(s.features.shape))
    (s.features * w).sum().backward()
    row = {k: i for i, k in enumerate(keys)}
    for t in (a, b, c):  # d(sum)/d(operand row) = the weight row of its site
        idx = [row[tuple(r)] for r in t.indices.tolist()]
        assert torch.equal(t.features.grad, w[idx])


def test_sparse_add_keeps_the_largest_operands_rows_and_maps_when_it_holds_every_site(rng):
    big = _tensor(CMP, rng, 120)
    conv = CMP.SubMConv3d(4, 4, 3, indice_key="k").double()
    big = conv(big)
    sub = _tensor(CMP, rng, 0, rows=big.indices[torch.from_numpy(rng.permutation(120)[:40])])
    s = CF.sparse_add(sub, big)
    assert s.indices is big.indices and s.indice_dict is big.indice_dict
    got, want = _by_site(s), _by_site(big)
    for k, f in _by_site(sub).items():
        want[k] = np.asarray(want[k]) + np.asarray(f)
    assert all(np.allclose(got[k], want[k], atol=1e-12) for k in want)
    # the kept maps fit the result's rows: a SubM layer reusing "k" equals one building its own map
    again = conv(s)
    fresh = CMP.SubMConv3d(4, 4, 3).double()
    fresh.load_state_dict(conv.state_dict())
    assert torch.allclose(again.features, fresh(CMP.SparseConvTensor(s.features, s.indices, s.spatial_shape, 2)).features)


def test_sparse_add_refuses_mismatched_operands(rng):
    a = _tensor(CMP, rng, 10)
    with pytest.raises(ValueError, match="operand 1 has spatial_shape"):
        CF.sparse_add(a, _tensor(CMP, rng, 10, shape=(8, 8, 9)))
    with pytest.raises(ValueError, match="3 channels; operand 0 has"):
        CF.sparse_add(a, _tensor(CMP, rng, 10, c=3))
    with pytest.raises(ValueError, match="at least one"):
        CF.sparse_add()
    with pytest.raises(ValueError, match="operand 1 must be a SparseConvTensor"):
        CF.sparse_add(a, a.features)


@pytest.mark.parametrize("subset", [False, True])
def test_sparse_add_equals_spconvs(rng, subset):
    real = _real("spconv.pytorch")
    from spconv.pytorch import functional as RF
    a = _tensor(CMP, rng, 100)
    rows_b = a.indices[torch.from_numpy(rng.permutation(100)[:30])] if subset else None
    b = _tensor(CMP, rng, 60, rows=rows_b)
    got = CF.sparse_add(a, b)
    want = RF.sparse_add(*(real.SparseConvTensor(t.features, t.indices, t.spatial_shape, t.batch_size) for t in (a, b)))
    assert sorted(_by_site(got)) == sorted(_by_site(want))
    g, w = _by_site(got), _by_site(want)
    assert all(np.allclose(g[k], w[k], atol=1e-12) for k in w)
    if not subset:  # then both sort the rows
        assert torch.equal(got.indices, want.indices)


def test_no_grid_is_an_empty_tensor_as_in_spconv():
    """spconv stores ``torch.Tensor()`` for a tensor made without a grid (model code tests ``grid.numel()``)."""
    x = CMP.SparseConvTensor(torch.ones(1, 2), torch.zeros(1, 4, dtype=torch.int32), [2, 2, 2], 1)
    assert isinstance(x.grid, torch.Tensor) and x.grid.numel() == 0
    assert x.replace_feature(torch.ones(1, 3)).grid is x.grid
    grid = torch.zeros(5)
    assert CMP.SparseConvTensor(torch.ones(1, 2), torch.zeros(1, 4, dtype=torch.int32), [2, 2, 2], 1, grid).grid is grid


def test_point_to_voxel_grid_rounds_halves_away_from_zero_in_float32():
    """spconv's grid size is std::round of a float32 quotient: a 1.25 m range of 0.5 m voxels has 3 cells
    (Python's round(2.5) is 2)."""
    assert PointToVoxel([0.5] * 3, [0, 0, 0, 1.25, 1.25, 1.25], 4, 10, 1).grid_size == [3, 3, 3]
    assert PointToVoxel([0.1] * 3, [0, 0, 0, 0.25, 0.25, 0.25], 4, 10, 1).grid_size == [3, 3, 3]
    assert PointToVoxel([0.2, 0.1, 0.05], [-1, -2, -3, 1, 2, 3], 4, 10, 1).grid_size == [120, 40, 10]  # z, y, x


def test_placeholder_modules_raise_only_for_spconvs_names():
    """After install(): spconv 2.3.8's names in modules compat lacks raise NotImplementedError; any other
    name is an AttributeError (an ImportError for ``from ... import``), as spconv gives for spconv-1 names,
    so fallbacks written for them still work, and hasattr answers."""
    out = _run("""
        import sparsevox.compat.spconv as compat
        compat.install()
        import spconv.utils, spconv.pytorch.hash
        try:
            from spconv.utils import VoxelGeneratorV2  # a spconv 1.x name
        except ImportError:
            pass
        assert not hasattr(spconv.utils, "VoxelGenerator") and spconv.utils.CPU_ONLY_BUILD is False
        for mod, name in ((spconv.utils, "Point2VoxelGPU3d"), (spconv.utils, "rbbox_iou"),
                          (spconv.pytorch.hash, "HashTable")):
            try:
                getattr(mod, name)
            except NotImplementedError as e:
                assert name in str(e)
            else:
                raise AssertionError(name)
        print("ok")
    """)
    assert out.strip() == "ok"
