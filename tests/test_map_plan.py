"""Map plans (sparsevox/map_plan.py, adapters/torch/plan.py): a model's maps recorded on its first forward
and built, and waited for, at the first map request of every later one (issue 19), on the CPU backend."""
import copy
import importlib

import numpy as np
import pytest
from reference import random_voxels

import sparsevox as sv

torch = pytest.importorskip("torch", reason="torch not installed")
svt = pytest.importorskip("sparsevox.adapters.torch")
nn = torch.nn
km = importlib.import_module("sparsevox.kernel_map")  # (the package attribute is the function)
map_plan = importlib.import_module("sparsevox.map_plan")


@pytest.fixture
def built(monkeypatch):
    """A list that grows by ``(kernel_size, stride)`` per kernel map the NumPy builder makes."""
    out, real = [], km.BUILDERS.get("numpy", km.build_kernel_map)
    monkeypatch.setitem(km.BUILDERS, "numpy", lambda *a, **k: out.append(a[2:4]) or real(*a, **k))
    return out


def _scene(rng, c=4, extent=16, shift=8):
    coords = random_voxels(rng, 600, extent=extent, batches=2)
    coords[:, 1:] += shift  # inside [0, 2 * extent) for the spconv-style grid
    return torch.from_numpy(coords), torch.randn(len(coords), c, dtype=torch.float64)


def _two_level_net():
    conv = svt.SparseConv3d
    return svt.SparseSequential(conv(4, 8, 3, bias=False), svt.BatchNorm(8), nn.ReLU(), conv(8, 8, 2, stride=2),
                                conv(8, 8, 3), conv(8, 8, 2, stride=2), conv(8, 8, 3, dilation=2)).double().eval()


def _builds_at_first_layer(first, built):
    seen = []
    first.register_forward_hook(lambda m, a, o: seen.append(len(built)))
    return seen


def test_a_planned_forward_builds_every_map_at_its_first_layer(rng, built):
    """Second and later forwards (new scans) build the five maps (SubM k3 of three levels, two strided)
    inside the first layer's call, the same five the first forward built layer by layer, with the same
    output as the model without a plan."""
    net = _two_level_net()
    plain = copy.deepcopy(net)
    assert svt.plan_maps(net) is net and svt.plan_maps(net) is net
    seen = _builds_at_first_layer(net[0], built)
    with torch.no_grad():
        net(sv.Voxels(*_scene(rng)))
        assert len(built) == 5 and seen == [1]  # recorded: one map per layer as it came
        assert [s[1:4] for s in net._sv_map_plan.steps] == [
            ((3, 3, 3), (1, 1, 1), (1, 1, 1)), ((2, 2, 2), (2, 2, 2), (1, 1, 1)), ((3, 3, 3), (1, 1, 1), (1, 1, 1)),
            ((2, 2, 2), (2, 2, 2), (1, 1, 1)), ((3, 3, 3), (1, 1, 1), (2, 2, 2))]
        for _ in range(2):
            built.clear()
            v = sv.Voxels(*_scene(rng))
            out = net(v)
            assert len(built) == 5 and seen[-1] == 5, "a map was built after the first layer"
            torch.testing.assert_close(out.feats, plain(v).feats, rtol=0, atol=0)
            assert torch.equal(out.coords, plain(v).coords)
    assert map_plan._RUN.get() is None


def test_a_forward_that_raises_leaves_no_plan_active_and_records_nothing(rng, built):
    """A first forward that raises (a wrong channel count; a KeyboardInterrupt from a layer) records no
    plan and leaves none active; the next forward records the whole plan, and the one after replays it."""
    net = svt.plan_maps(_two_level_net())
    with pytest.raises(ValueError):
        net(sv.Voxels(*_scene(rng, c=5)))
    assert map_plan._RUN.get() is None and net._sv_map_plan.steps is None
    stop = net[3].register_forward_hook(lambda m, a, o: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        net(sv.Voxels(*_scene(rng)))
    stop.remove()
    assert map_plan._RUN.get() is None and net._sv_map_plan.steps is None
    with torch.no_grad():
        net(sv.Voxels(*_scene(rng)))
        assert len(net._sv_map_plan.steps) == 5
        seen = _builds_at_first_layer(net[0], built)
        built.clear()
        net(sv.Voxels(*_scene(rng)))
        assert seen == [5] and len(built) == 5


def test_planned_forwards_in_two_threads_each_have_their_own_run(rng):
    import threading
    net = svt.plan_maps(_two_level_net())
    plain = copy.deepcopy(net)
    scenes = [_scene(rng) for _ in range(4)]
    with torch.no_grad():
        net(sv.Voxels(*scenes[0]))  # recorded
        want = [plain(sv.Voxels(*s)).feats for s in scenes]
    got, errors = {}, []

    def work(i):
        try:
            with torch.no_grad():
                for j in (i, i + 2):
                    got[j] = net(sv.Voxels(*scenes[j])).feats
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    for j in range(4):
        torch.testing.assert_close(got[j], want[j], rtol=0, atol=0)


def test_maps_after_a_pooling_layer_are_planned_too(rng, built):
    """Pooled outputs share the sites a plan built their level's maps on: conv, max pool, conv, max
    pool, conv builds five maps per forward, all at the first layer, as without a plan."""
    conv = svt.SparseConv3d
    net = svt.SparseSequential(conv(4, 8, 3, bias=False), svt.MaxPool3d(2), conv(8, 8, 3, bias=False),
                               svt.MaxPool3d(2), conv(8, 8, 3, bias=False)).double()
    plain = copy.deepcopy(net)
    svt.plan_maps(net)
    seen = _builds_at_first_layer(net[0], built)
    with torch.no_grad():
        net(sv.Voxels(*_scene(rng)))
        built.clear()
        v = sv.Voxels(*_scene(rng))
        out = net(v)
        assert len(built) == 5 and seen[-1] == 5
        torch.testing.assert_close(out.feats, plain(v).feats, rtol=0, atol=0)


def test_plan_maps_refuses_what_is_not_a_module():
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        svt.plan_maps(lambda x: x)


def test_a_planned_minkunet_builds_no_more_maps(rng, built):
    """``MinkUNet`` builds its maps itself; under a plan as well it still builds nine per new scan."""
    net = svt.plan_maps(svt.MinkUNet(4, 5, widths=(8, 8, 8, 16, 16, 16, 8, 8, 8), blocks=1).double().eval())
    with torch.no_grad():
        for _ in range(3):
            built.clear()
            net(sv.Voxels(*_scene(rng)))
            assert len(built) == 9


def test_a_planned_spconv_api_model_builds_its_maps_at_its_first_layer(rng, built):
    """The same for a model written against ``sparsevox.compat.spconv`` (SubM, k2 s2 on a grid the stride
    divides, SubM, inverse): three maps built inside the first layer's call from the second forward on
    (the inverse layer reuses the strided map swapped), and the same output as without a plan."""
    spconv = pytest.importorskip("sparsevox.compat.spconv")
    net = spconv.SparseSequential(spconv.SubMConv3d(4, 8, 3, bias=False, indice_key="s0"),
                                  spconv.SparseConv3d(8, 8, 2, 2, bias=False, indice_key="d1"),
                                  spconv.SubMConv3d(8, 8, 3, bias=False, indice_key="s1"),
                                  spconv.SparseInverseConv3d(8, 4, 2, bias=False, indice_key="d1")).double()
    plain = copy.deepcopy(net)
    svt.plan_maps(net)
    seen = _builds_at_first_layer(net[0], built)

    def tensor(c, f):
        return spconv.SparseConvTensor(f, c.int(), [32, 32, 32], 2)
    with torch.no_grad():
        net(tensor(*_scene(rng)))
        for _ in range(2):
            built.clear()
            c, f = _scene(rng)
            out = net(tensor(c, f))
            assert len(built) == 3 and seen[-1] == 3, "a map was built after the first layer"
            ref = plain(tensor(c, f))
            torch.testing.assert_close(out.features, ref.features, rtol=0, atol=0)
            assert torch.equal(out.indices, ref.indices)


def test_a_planned_model_pickles_and_a_copy_has_its_own_plan(rng, tmp_path):
    net = svt.plan_maps(_two_level_net())
    with torch.no_grad():
        net(sv.Voxels(*_scene(rng)))
    twin = copy.deepcopy(net)
    assert twin._sv_map_plan is not net._sv_map_plan and twin._sv_map_plan.steps == net._sv_map_plan.steps
    torch.save(net, tmp_path / "net.pt")
    back = torch.load(tmp_path / "net.pt", weights_only=False)
    v = sv.Voxels(*_scene(rng))
    with torch.no_grad():
        torch.testing.assert_close(back(v).feats, net(v).feats, rtol=0, atol=0)
    assert back._sv_map_plan.steps == net._sv_map_plan.steps


def test_a_replayed_plan_drops_the_validation_hash_table(rng, built):
    """Once the planned maps are built, the input's hash table (validation's, kept for its maps; NumPy
    voxels have none: a stand-in marks it) is dropped; a map the plan did not build is still built."""
    net = _two_level_net()
    svt.plan_maps(net)
    with torch.no_grad():
        net(sv.Voxels(*_scene(rng)))  # records
        v = sv.Voxels(*_scene(rng))
        v._hash = object()
        net(v)
        assert v._hash is None
        n = len(built)
        sv.kernel_map(v, 5)
        assert len(built) == n + 1
