"""The spconv compat layer plans each model's kernel maps by itself (adapters/compat/spconv/maps.py,
``auto_plan``): a model run unchanged builds all its maps at its first map request from the second forward
on, as ``plan_maps`` does, with the same outputs; on the CPU backend."""
import copy
import importlib
import subprocess
import sys

import pytest
from reference import random_voxels
from test_map_plan import built  # noqa: F401 -- the fixture: maps the NumPy builder makes

torch = pytest.importorskip("torch", reason="torch not installed")
spconv = pytest.importorskip("sparsevox.compat.spconv")
svt = pytest.importorskip("sparsevox.adapters.torch")
map_plan = importlib.import_module("sparsevox.map_plan")
maps = importlib.import_module("sparsevox.compat.spconv.maps")


@pytest.fixture
def auto_on():
    before = maps.auto_plan()
    maps.auto_plan(True)
    yield
    maps.auto_plan(before)


def _tensor(rng, n=600, extent=16):
    c = random_voxels(rng, n, extent=extent, batches=2)
    c[:, 1:] += 8  # inside [0, 32) for the spconv-style grid
    return spconv.SparseConvTensor(torch.randn(len(c), 4, dtype=torch.float64), torch.from_numpy(c).int(),
                                   [32, 32, 32], 2)


def _net():
    """SubM, k2 s2 (a grid the stride divides), SubM, a max pool k2 s2, SubM: five maps per scan."""
    return spconv.SparseSequential(
        spconv.SubMConv3d(4, 8, 3, bias=False, indice_key="s0"),
        spconv.SparseConv3d(8, 8, 2, 2, bias=False, indice_key="d1"),
        spconv.SubMConv3d(8, 8, 3, bias=False, indice_key="s1"),
        spconv.SparseMaxPool3d(2, 2),
        spconv.SubMConv3d(8, 8, 3, bias=False, indice_key="s2"),
    ).double()


def _unplanned(net, x):
    """``net`` on a copy of ``x`` (same features, new indices object: no maps cached) with the plan off."""
    maps.auto_plan(False)
    try:
        return net(spconv.SparseConvTensor(x.features, x.indices.clone(), x.spatial_shape, x.batch_size))
    finally:
        maps.auto_plan(True)


def _same(a, b):
    torch.testing.assert_close(a.features, b.features, rtol=0, atol=0)
    assert torch.equal(a.indices, b.indices)


def test_an_unchanged_model_builds_every_map_at_its_first_layer(rng, built, auto_on):
    net = _net()
    seen = []
    net[0].register_forward_hook(lambda m, a, o: seen.append(len(built)))
    with torch.no_grad():
        net(_tensor(rng))
        assert len(built) == 5 and seen == [1]  # recorded, one map per layer as it came
        plan = net[0]._sv_auto_plan
        assert [s[1:3] for s in plan.steps] == [((3, 3, 3), (1, 1, 1)), ((2, 2, 2), (2, 2, 2)),
                                                ((3, 3, 3), (1, 1, 1)), ((2, 2, 2), (2, 2, 2)),
                                                ((3, 3, 3), (1, 1, 1))]
        for _ in range(2):
            built.clear()
            x = _tensor(rng)
            out = net(x)
            assert len(built) == 5 and seen[-1] == 5, "a map was built after the first layer"
            _same(out, _unplanned(net, x))
    assert map_plan.current() is None  # the run rides on the tensors, never left active
    assert not hasattr(net[1], "_sv_auto_plan")  # only the layer that starts a forward keeps a plan


def test_the_minkunet_of_the_benchmark_builds_its_maps_up_front_and_matches(rng, built, auto_on):
    from benchmarks import spconv_minkunet as spm
    net = spm.build(spconv, 4, 5, widths=(8,) * 9, blocks=1).double().eval()
    first = net.stem[0]
    seen = []
    first.register_forward_hook(lambda m, a, o: seen.append(len(built)))

    def tensor():
        c = random_voxels(rng, 900, extent=24, batches=2)
        shift, shape = spm.spatial_frame(c)
        c[:, 1:] -= shift
        return spconv.SparseConvTensor(torch.randn(len(c), 4, dtype=torch.float64), torch.from_numpy(c).int(),
                                       shape, 2)
    with torch.no_grad():
        net(tensor())
        per_scan = len(built)
        assert per_scan == 9  # a SubM map on each of 5 levels, 4 strided (the inverse layers swap them)
        built.clear()
        x = tensor()
        out = net(x)
        assert len(built) == per_scan and seen[-1] == per_scan
        ref = _unplanned(net, x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_off_builds_layer_by_layer_and_plan_maps_takes_precedence(rng, built, auto_on):
    net = _net()
    maps.auto_plan(False)
    with torch.no_grad():
        net(_tensor(rng))
        assert not hasattr(net[0], "_sv_auto_plan")
        maps.auto_plan(True)
        svt.plan_maps(net)
        net(_tensor(rng))
        net(_tensor(rng))
    assert not hasattr(net[0], "_sv_auto_plan") and net._sv_map_plan.steps  # the explicit plan saw the maps


def test_a_first_forward_that_raises_leaves_a_plan_of_what_it_asked_for(rng, built, auto_on):
    net = _net()
    bad = _tensor(rng)
    bad_net = copy.deepcopy(net)
    bad_net._modules["2"] = spconv.SubMConv3d(5, 8, 3, bias=False, indice_key="s1").double()  # wrong channel count
    with torch.no_grad(), pytest.raises(ValueError, match="channel size mismatch"):
        bad_net(bad)
    assert len(bad_net[0]._sv_auto_plan.steps) == 2  # the SubM and strided maps asked before the error
    bad_net._modules["2"] = copy.deepcopy(net[2])
    with torch.no_grad():
        x = _tensor(rng)
        _same(bad_net(x), net(spconv.SparseConvTensor(x.features, x.indices.clone(), x.spatial_shape, 2)))
    assert len(bad_net[0]._sv_auto_plan.steps) == 2  # replayed what it had; the rest built when asked


def test_a_model_copied_or_pickled_keeps_working(rng, tmp_path, auto_on):
    net = _net()
    with torch.no_grad():
        net(_tensor(rng))
        twin = copy.deepcopy(net)
        assert twin[0]._sv_auto_plan is not net[0]._sv_auto_plan
        torch.save(net, tmp_path / "net.pt")
        back = torch.load(tmp_path / "net.pt", weights_only=False)
        x = _tensor(rng)
        _same(back(x), net(spconv.SparseConvTensor(x.features, x.indices.clone(), x.spatial_shape, 2)))


def test_bad_settings_are_value_errors():
    with pytest.raises(ValueError, match="enabled must be True or False"):
        maps.auto_plan(1)
    r = subprocess.run([sys.executable, "-c", "import sparsevox.compat.spconv"], capture_output=True, text=True,
                       env={**__import__("os").environ, "SPARSEVOX_COMPAT_PLAN": "maybe"})
    assert r.returncode != 0 and "SPARSEVOX_COMPAT_PLAN must be 0 or 1" in r.stderr
    r = subprocess.run([sys.executable, "-c", "import sparsevox.compat.spconv.maps as m; print(m.auto_plan())"],
                       capture_output=True, text=True, env={**__import__("os").environ, "SPARSEVOX_COMPAT_PLAN": "0"})
    assert r.returncode == 0 and r.stdout.strip() == "False"
