"""MinkUNet (SparseResUNet42 shape): structure, forward/backward and training on CPU tensors; the spconv
version and its weight loader against a dense emulation of spconv's layers; the GPU against the CPU."""
import gc
import sys
from pathlib import Path

import numpy as np
import pytest
from reference import random_voxels, rel_err

import sparsevox as sv

torch = pytest.importorskip("torch", reason="torch not installed")
svt = pytest.importorskip("sparsevox.adapters.torch")
nn = torch.nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not an installed package
from benchmarks import spconv_minkunet as spm  # noqa: E402
from benchmarks.end_to_end import calibrate_batchnorm as _calibrate_bn  # noqa: E402

SMALL = (8, 8, 8, 16, 16, 16, 8, 8, 8)


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


def _scene(rng, n=500, extent=12, batches=2, c=4, dtype=torch.float64, device="cpu", shift=0):
    coords = random_voxels(rng, n, extent=extent, batches=batches)
    coords[:, 1:] += shift
    return sv.Voxels(torch.from_numpy(coords).to(device), torch.randn(len(coords), c, dtype=dtype, device=device))


def _levels(coords, n):
    """Voxel counts of levels 0..n: unique floor(c / 2^l) per batch."""
    c = np.asarray(coords, np.int64)
    out = []
    for lvl in range(n + 1):
        out.append(len(np.unique(np.concatenate([c[:, :1], c[:, 1:] >> lvl], 1), axis=0)))
    return out


def test_default_shape_levels_and_forward(rng):
    v = _scene(rng, dtype=torch.float32)
    net = svt.MinkUNet(4, 20)
    assert net.widths == (32, 32, 64, 128, 256, 256, 128, 96, 96) and net.blocks == (2,) * 8
    assert 21.5e6 < sum(p.numel() for p in net.parameters()) < 22e6  # SPVNAS MinkUNet (cr 1): 21.7M
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, k=k: seen.__setitem__(k, out))
             for k, m in [("stem", net.stem)] + [(f"enc{i}", m) for i, m in enumerate(net.encoder)]
             + [(f"dec{j}", m) for j, m in enumerate(net.decoder)]]
    logits = net(v)
    for h in hooks:
        h.remove()
    assert isinstance(logits, torch.Tensor) and logits.shape == (v.num_voxels, 20)
    counts = _levels(v.coords.numpy(), 4)
    assert [seen["stem"].num_voxels] + [seen[f"enc{i}"].num_voxels for i in range(4)] == counts
    assert [seen[f"enc{i}"].num_channels for i in range(4)] == [32, 64, 128, 256]
    assert [seen[f"dec{j}"].num_voxels for j in range(4)] == counts[3::-1]
    assert [seen[f"dec{j}"].num_channels for j in range(4)] == [256, 128, 96, 96]
    assert seen["dec3"].coords is v.coords  # back on the input's sites, in its order
    # the finest decoder level's SubM k3 map is the stem's (cached on the input geometry)
    assert sv.kernel_map(seen["dec3"], 3) is sv.kernel_map(v, 3)


def _counting_builder(monkeypatch):
    """A list that grows by one per kernel map the NumPy builder makes."""
    import importlib
    km = importlib.import_module("sparsevox.kernel_map")  # (the package attribute is the function)
    built, real = [], km.BUILDERS.get("numpy", km.build_kernel_map)
    monkeypatch.setitem(km.BUILDERS, "numpy", lambda *a, **k: built.append(a[2:4]) or real(*a, **k))
    return built


def test_build_maps_builds_every_map_the_forward_uses(rng, monkeypatch):
    """``build_maps`` makes the SubM k3 maps of levels 0-4 and the four strided maps (1x1x1 convolutions
    and the decoder's transposed maps need none); the forward after it builds nothing, and a forward on
    fresh voxels builds exactly those nine. Level i's sites are the unique floor(c / 2^i)."""
    built = _counting_builder(monkeypatch)
    net = svt.MinkUNet(4, 5, widths=SMALL, blocks=(1, 2, 1, 1, 1, 1, 2, 1)).double()
    v = _scene(rng)
    sites = net.build_maps(v)
    assert sites[0] is v and [s.num_voxels for s in sites] == _levels(v.coords.numpy(), 4)
    assert all(s.feats is None for s in sites[1:])
    assert sorted(built) == sorted([((3, 3, 3), (1, 1, 1))] * 5 + [((2, 2, 2), (2, 2, 2))] * 4)
    logits = net(v)
    assert len(built) == 9, "the forward built a map build_maps had not"
    fresh = sv.Voxels(v.coords.clone(), v.feats)
    torch.testing.assert_close(net(fresh), logits, rtol=0, atol=0)
    assert len(built) == 18


def test_build_maps_drops_the_validation_hash_table(rng, monkeypatch):
    """Once every map is built, no level keeps the hash table that validating the input built on the GPU
    (16 MiB at SemanticKITTI's size, held to the end of the step before); a map asked for later on those
    sites is still built, by the builder's own table. (NumPy voxels have no table: a stand-in marks it.)"""
    built = _counting_builder(monkeypatch)
    net = svt.MinkUNet(4, 5, widths=SMALL, blocks=1).double()
    v = _scene(rng)
    v._hash = table = object()
    kept = v.replace(v.feats)  # a copy made before keeps its reference: only the levels' own go
    sites = net.build_maps(v)
    assert [s._hash for s in sites] == [None] * 5 and kept._hash is table
    assert net(v).shape == (v.num_voxels, 5)
    n = len(built)
    sv.kernel_map(v, 5)
    assert len(built) == n + 1


def test_the_map_plan_is_found_once_and_a_replaced_layer_still_runs(rng, monkeypatch):
    """The level plan is walked from the modules on the first forward only (it cost ~0.5 ms a step); a
    convolution swapped in later for one of another kernel size is not in it, and builds its own map."""
    net = svt.MinkUNet(4, 5, widths=SMALL, blocks=1).double()
    walks = []
    real = net._find_subm_geometries
    monkeypatch.setattr(net, "_find_subm_geometries", lambda: walks.append(1) or real())
    net(_scene(rng)), net(_scene(rng))
    assert len(walks) == 1
    old = net.encoder[0].blocks[0].main[0]
    net.encoder[0].blocks[0].main[0] = svt.SparseConv3d(old.weight.shape[1], old.weight.shape[2], 5,
                                                         bias=False).double()
    v = _scene(rng)
    assert net(v).shape == (v.num_voxels, 5) and len(walks) == 1


def test_a_step_frees_its_maps_by_reference_counting(rng):
    """With the cyclic GC off, dropping a step's voxels and outputs frees every map it built (cycles
    through the level caches would hold a step's maps in GPU memory until the GC ran)."""
    import gc
    import weakref
    net = svt.MinkUNet(4, 5, widths=SMALL, blocks=1).double()
    v = _scene(rng)
    gc.collect()
    gc.disable()
    try:
        sites = net.build_maps(v)
        refs = [weakref.ref(e[0]) for s in sites for e in s._kmaps.values() if isinstance(e, tuple)]
        assert len(refs) >= 9
        net(v).sum().backward()
        del sites, v
        assert [r for r in refs if r() is not None] == []
    finally:
        gc.enable()


def test_backward_reaches_every_parameter(rng):
    v = _scene(rng, n=300, extent=10, dtype=torch.float32)
    net = svt.MinkUNet(4, 7)
    loss = nn.functional.cross_entropy(net(v), torch.randint(0, 7, (v.num_voxels,)))
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(float(p.grad.abs().sum()) > 0 for p in net.parameters())


def test_a_few_sgd_steps_reduce_the_loss(rng):
    torch.manual_seed(0)
    coords = random_voxels(np.random.default_rng(7), 400, extent=10, batches=2)
    feats = torch.from_numpy(np.concatenate([coords[:, 1:] / 5.0, np.ones((len(coords), 1))], 1))
    labels = torch.from_numpy(((coords[:, 1] > 0).astype(np.int64) + (coords[:, 3] > 1)))  # 3 classes
    net = svt.MinkUNet(4, 3, widths=SMALL, blocks=1).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(15):
        x = sv.Voxels(torch.from_numpy(coords), feats)  # fresh Voxels (fresh kernel maps) every step
        loss = nn.functional.cross_entropy(net(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_eval_logits_follow_row_order_and_shifts_by_16(rng):
    v = _scene(rng, n=400, extent=10)
    net = svt.MinkUNet(4, 5, widths=SMALL, blocks=1).double().eval()
    with torch.no_grad():
        ref = net(v)
        perm = torch.randperm(v.num_voxels)
        out = net(sv.Voxels(v.coords[perm], v.feats[perm]))
        assert rel_err(out.numpy(), ref[perm].numpy()) < 1e-12
        shifted = v.coords.clone()
        shifted[:, 1:] += torch.tensor([16, -32, 48], dtype=shifted.dtype)  # every level's parents shift whole
        assert rel_err(net(sv.Voxels(shifted, v.feats)).numpy(), ref.numpy()) < 1e-12


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="9 positive"):
        svt.MinkUNet(4, 5, widths=(8, 8))
    with pytest.raises(ValueError, match="blocks"):
        svt.MinkUNet(4, 5, blocks=0)
    net = svt.MinkUNet(3, 2, widths=SMALL, blocks=(1, 2, 1, 1, 1, 1, 2, 1))
    assert len(net.encoder[1].blocks) == 2 and len(net.decoder[2].blocks) == 2


# --- the spconv version, against a dense emulation of spconv's layers --------------------------------

def _emulation():
    import spconv_emulation
    return spconv_emulation


def _spconv_input(sp, v):
    shift, shape = spm.spatial_frame(v.coords.numpy())
    c = v.coords.numpy().astype(np.int64)
    c[:, 1:] -= shift
    return sp.SparseConvTensor(v.feats, torch.from_numpy(c.astype(np.int32)), shape, int(c[:, 0].max()) + 1)


@pytest.mark.parametrize("blocks", [1, 2])
def test_spconv_model_with_loaded_weights_gives_the_same_logits(rng, blocks):
    sp = _emulation()
    v = _scene(rng, n=400, extent=12, shift=-3)  # negative coordinates: spconv's input is shifted by 16s
    net = svt.MinkUNet(4, 5, widths=SMALL, blocks=blocks).double()
    _calibrate_bn(net, v)
    spnet = spm.build(sp, 4, 5, widths=SMALL, blocks=blocks).double()
    spm.load_from_sparsevox(spnet, net)
    x = _spconv_input(sp, v)
    for train in (False, True):
        net.train(train)
        spnet.train(train)
        with torch.no_grad():
            assert rel_err(spnet(x).numpy(), net(v).numpy()) < 1e-12


def test_weight_conversion_layouts_matter(rng):
    """The emulated layers tell the conversions apart: a 1x1 SubM layer reads [C_in, C_out] memory (a
    transpose is wrong), and the inverse layer takes the weight unflipped (a flip is wrong)."""
    sp = _emulation()
    v = _scene(rng, n=200, extent=8, c=3)
    x = _spconv_input(sp, v)
    one = svt.SparseConv3d(3, 5, 1, bias=False).double()
    sp_one = sp.SubMConv3d(3, 5, 1, bias=False).double()
    ref = one(v).feats.detach().numpy()
    with torch.no_grad():
        sp_one.weight.copy_(spm.convert_weight(one.weight, sp_one.weight.shape))
        assert rel_err(sp_one(x).features.numpy(), ref) < 1e-12
        sp_one.weight.copy_(one.weight[0].t().reshape(5, 1, 1, 1, 3))  # the "obvious" layout
        assert rel_err(sp_one(x).features.numpy(), ref) > 1e-3
    down = svt.SparseConv3d(3, 4, 2, stride=2, bias=False).double()
    up = svt.SparseConv3d(4, 3, 2, stride=2, transposed=True, bias=False).double()
    sp_down = sp.SparseConv3d(3, 4, 2, 2, bias=False, indice_key="d").double()
    sp_up = sp.SparseInverseConv3d(4, 3, 2, indice_key="d", bias=False).double()
    with torch.no_grad():
        sp_down.weight.copy_(spm.convert_weight(down.weight, sp_down.weight.shape))
        ref = up(down(v), output_voxels=v).feats.numpy()
        sp_up.weight.copy_(spm.convert_weight(up.weight, sp_up.weight.shape))
        assert rel_err(sp_up(sp_down(x)).features.numpy(), ref) < 1e-12
        sp_up.weight.copy_(spm.convert_weight(up.weight.flip(0), sp_up.weight.shape))
        assert rel_err(sp_up(sp_down(x)).features.numpy(), ref) > 1e-3


def test_spatial_frame_and_loader_errors():
    c = np.array([[0, -17, 0, 5], [1, 30, 3, -1]], np.int32)
    shift, shape = spm.spatial_frame(c)
    assert list(shift) == [-32, 0, -16] and all(s % 16 == 0 for s in shape)
    assert all((c[:, 1:] - shift).max(axis=0) + 2 <= shape) and (c[:, 1:] - shift).min() >= 0
    sp = _emulation()
    with pytest.raises(ValueError, match="differ"):
        spm.load_from_sparsevox(spm.build(sp, 4, 5, widths=SMALL, blocks=1), svt.MinkUNet(4, 5, widths=SMALL))
    with pytest.raises(ValueError, match="does not fit"):
        spm.convert_weight(torch.zeros(8, 3, 4), (4, 3, 3, 3, 3))


# --- GPU ----------------------------------------------------------------------------------------------

def _outputs_and_grads(net, v, labels_seed=0, perm=None):
    """Logits in eval and train mode and the train-mode loss gradients, as float64 NumPy. ``perm``: ``v``'s
    rows are the natural order's rows ``perm`` (the labels follow them; logits come back in natural order)."""
    outs = []
    for train in (False, True):
        net.train(train)
        outs.append(net(v))
    labels = torch.randint(0, 6, (v.num_voxels,), generator=torch.Generator().manual_seed(labels_seed))
    if perm is not None:
        labels = labels[torch.from_numpy(perm)]
    nn.functional.cross_entropy(outs[-1], labels.to(outs[-1].device)).backward()
    as64 = lambda t: t.detach().cpu().double().numpy()  # noqa: E731
    back = np.argsort(perm) if perm is not None else slice(None)
    return [as64(o)[back] for o in outs], {n: as64(p.grad) for n, p in net.named_parameters()}


def _smooth(net):
    """``net`` with every ReLU replaced by a GELU (in place; returns ``net``)."""
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.GELU())
    return net


def check_against_float64(rng, dtype, device, permute=False):
    """The network on ``device`` in ``dtype`` against the same network in float64 on the CPU (NumPy
    backend). float64 must agree to 1e-10 (gradients 1e-9). float32 is judged by what float32 arithmetic
    does on this very network and scene: 10x the largest error of the CPU's float32 run against float64
    over two row orders (the natural one and a permutation of the voxels: another summation order).

    For float32 the ReLUs become GELUs in every copy. A ReLU's gradient jumps where its input crosses
    zero, and a float32 rounding moves some of the ~10^7 pre-activations of a step across it: one such
    flip changes a weight gradient (a sum over ~3000 voxels) by ~1e-2 relative. So with ReLUs the float32
    gradient error was either ~1e-6 or ~1e-3 depending on the summation order alone (CPU, same scene: 2.2e-6
    in the natural order, 1.4e-3 permuted; 4 scenes of 6), the GPU failed one run in four (1.75e-3 against
    4.5e-5) and a CPU run in a third order failed in CI. With GELUs the CPU errors over orders stay within
    2x of each other (8 scenes). ``permute``: the run judged takes the voxels in yet another order."""
    v64 = _scene(rng, n=3000, extent=24, dtype=torch.float64)
    smooth = _smooth if dtype != torch.float64 else (lambda net: net)
    torch.manual_seed(0)
    ref = smooth(svt.MinkUNet(4, 6)).double()
    _calibrate_bn(ref, v64)
    state = ref.state_dict()

    def copy(dt, dev, perm=None):
        net = smooth(svt.MinkUNet(4, 6)).to(dt)
        net.load_state_dict(state)
        rows = slice(None) if perm is None else torch.from_numpy(perm)
        v = sv.Voxels(v64.coords[rows].contiguous().to(dev), v64.feats[rows].to(dt).to(dev))
        return net.to(dev), v
    ref_outs, ref_grads = _outputs_and_grads(ref, v64)
    judged = rng.permutation(v64.num_voxels) if permute else None
    dev_outs, dev_grads = _outputs_and_grads(*copy(dtype, device, judged), perm=judged)
    if dtype == torch.float64:
        allow_outs = [1e-10] * 2
        allow_grads = {n: 1e-9 for n in ref_grads}
    else:
        allow_outs, allow_grads = [1e-7] * 2, {n: 1e-6 for n in ref_grads}
        for perm in (None, rng.permutation(v64.num_voxels)):
            cpu_outs, cpu_grads = _outputs_and_grads(*copy(dtype, "cpu", perm), perm=perm)
            allow_outs = [max(a, rel_err(c, r)) for a, c, r in zip(allow_outs, cpu_outs, ref_outs)]
            allow_grads = {n: max(allow_grads[n], rel_err(cpu_grads[n], ref_grads[n])) for n in ref_grads}
        allow_outs = [10 * a for a in allow_outs]
        allow_grads = {n: 10 * a for n, a in allow_grads.items()}
    for mode, g, r, allow in zip(("eval", "train"), dev_outs, ref_outs, allow_outs):
        assert rel_err(g, r) <= allow, f"{mode} logits: {rel_err(g, r):.3g} > {allow:.3g}"
    for n in ref_grads:
        e = rel_err(dev_grads[n], ref_grads[n])
        assert e <= allow_grads[n], f"grad of {n}: {e:.3g} > {allow_grads[n]:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gpu_matches_the_float64_reference(rng, dtype):
    """The GPU network against float64 on the CPU (:func:`check_against_float64`)."""
    check_against_float64(rng, dtype, "cuda")


def test_a_permuted_cpu_run_passes_the_float64_check(rng):
    """The check's machinery on the CPU: a float32 run with the voxel rows permuted (another summation
    order, logits mapped back to the natural order) must pass it, as the GPU run must."""
    check_against_float64(rng, torch.float32, "cpu", permute=True)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_steps_voxels_and_maps_are_freed_without_the_garbage_collector(rng, device):
    """A step's Voxels (and with it the kernel maps, slot tables and spare outputs it holds) must be freed
    when the caller drops it, not when the garbage collector next runs: a reference cycle would make a
    training loop's memory depend on the collector's timing."""
    import weakref
    coords = torch.from_numpy(random_voxels(rng, 3000, extent=20, batches=2)).to(device)
    feats = torch.randn(len(coords), 4, device=device)
    labels = torch.randint(0, 10, (len(coords),), device=device)
    net = svt.MinkUNet(4, 10).to(device).train()
    gc.collect()
    gc.disable()
    try:
        for _ in range(2):  # the second step: every layer past its first call (spares, prepared launches)
            x = sv.Voxels(coords.clone(), feats)
            loss = nn.functional.cross_entropy(net(x).float(), labels)
            loss.backward()
            alive = weakref.ref(x)
            del x, loss
            assert alive() is None, "the step's Voxels outlived its last reference (a reference cycle)"
    finally:
        gc.enable()


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [False, True])
def test_gpu_training_with_fresh_voxels_does_not_grow_memory(rng, amp):
    coords = torch.from_numpy(random_voxels(rng, 20000, extent=40, batches=2)).cuda()
    feats = torch.randn(len(coords), 4, device="cuda")
    labels = torch.randint(0, 10, (len(coords),), device="cuda")
    net = svt.MinkUNet(4, 10).cuda().train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    allocated, collected = [], []
    for _ in range(20):
        x = sv.Voxels(coords.clone(), feats)  # new coords object: fresh kernel maps every step
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            loss = nn.functional.cross_entropy(net(x).float(), labels)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        del x, loss
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated())
        gc.collect()
        collected.append(torch.cuda.memory_allocated())
    # memory freed only by the garbage collector: a reference cycle holding a step's maps or outputs (its
    # release, and so the step's memory, then depends on when the collector happens to run)
    held = [(a - c) >> 10 for a, c in zip(allocated, collected)]
    assert not any(held), f"KiB freed only by gc.collect() per step: {held}"
    warm = allocated[4]
    growth = max(allocated[5:]) - warm
    assert growth <= 0.01 * warm + (1 << 20), f"MiB allocated after each step: {[a >> 20 for a in allocated]}"


def _semantickitti_voxels(voxel=0.05):
    """The SemanticKITTI scan voxelised at 5 cm: int32 coords [N, 4] (batch 0), feats [N, 4] (x y z
    remission of the first point of each voxel) and labels [N] (its semantic class, renumbered 0..C-1)."""
    from conftest import pointcloud_dir
    d = pointcloud_dir()
    if d is None or not (d / "semantickitti_000000.label").is_file():
        pytest.skip("the SemanticKITTI scan is not here (../shared/data/pointclouds or .gpudata/pointclouds)")
    pts = np.fromfile(d / "semantickitti_000000.bin", dtype=np.float32).reshape(-1, 4)
    sem = np.fromfile(d / "semantickitti_000000.label", dtype=np.uint32) & 0xFFFF
    grid = np.floor(pts[:, :3] / voxel).astype(np.int64)
    _, first = np.unique(grid, axis=0, return_index=True)
    coords = np.concatenate([np.zeros((len(first), 1), np.int64), grid[first]], 1).astype(np.int32)
    _, labels = np.unique(sem[first], return_inverse=True)
    return coords, pts[first], labels.astype(np.int64)


@pytest.mark.gpu
def test_gpu_training_on_the_real_scan_reduces_the_loss_without_growing_memory():
    """Issue 18: 100 training steps on the SemanticKITTI scan (float16 autocast, GradScaler, a fresh
    Voxels and fresh kernel maps every step) lower the cross-entropy and hold memory steady."""
    coords, feats, labels = _semantickitti_voxels()
    coords, feats = torch.from_numpy(coords).cuda(), torch.from_numpy(feats).cuda()
    labels = torch.from_numpy(labels).cuda()
    torch.manual_seed(0)
    net = svt.MinkUNet(4, int(labels.max()) + 1).cuda().train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    losses, allocated = [], []
    for _ in range(100):
        x = sv.Voxels(coords.clone(), feats)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.cross_entropy(net(x).float(), labels)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss))
        del x, loss
        allocated.append(torch.cuda.memory_allocated())
    first, last = np.mean(losses[:5]), np.mean(losses[-10:])
    assert np.isfinite(losses).all() and last < 0.7 * first, (first, last)
    warm = allocated[9]
    assert max(allocated[10:]) - warm <= 0.01 * warm + (1 << 20), [a >> 20 for a in allocated[::10]]


def test_shape_arguments_are_checked_by_name():
    from sparsevox.unet import DEFAULT_WIDTHS, unet_shape
    assert unet_shape() == (DEFAULT_WIDTHS, (2,) * 8)
    assert unet_shape(blocks=np.int64(1))[1] == (1,) * 8  # NumPy ints count as one int
    with pytest.raises(ValueError, match="widths must be 9 positive channel counts"):
        svt.MinkUNet(4, 5, widths=(8, 8))
    with pytest.raises(ValueError, match="blocks must be an int >= 1 or 8 of them"):
        svt.MinkUNet(4, 5, blocks=(1, 2))
    with pytest.raises(ValueError, match="blocks must be an int >= 1"):
        svt.MinkUNet(4, 5, blocks=0)
