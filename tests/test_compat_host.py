"""Host-side shortcuts of sparsevox.compat.spconv (issue 21's ≤ 5 % over native): the inverse layer's map
is the strided map swapped (shared tables, as sparsevox's own transposed twins); the weight in sparsevox's
layout is a view of the parameter, stored in that memory order under spconv's shape. On the CPU (one GPU test)."""
import numpy as np
import pytest
from reference import random_voxels

torch = pytest.importorskip("torch")
spconv = pytest.importorskip("sparsevox.compat.spconv")
from sparsevox.compat.spconv import maps  # noqa: E402

import sparsevox as sv  # noqa: E402


def test_inverse_map_is_the_strided_map_swapped_and_cached(rng):
    c = torch.from_numpy(random_voxels(rng, 300, extent=10, batches=2))
    geom = sv.Voxels(c, None)
    kmap, outs, out_geom = maps.strided_map(geom, (2, 2, 2), (2, 2, 2), (0, 0, 0), (1, 1, 1), [8, 8, 8])
    inv = maps.inverse_map(kmap)
    assert inv.swapped_from is kmap and inv.kind == "transposed" and maps.inverse_map(kmap) is inv
    assert (inv.num_in, inv.num_out) == (kmap.num_out, kmap.num_in)
    np.testing.assert_array_equal(np.asarray(inv.in_maps), np.asarray(kmap.out_maps))
    np.testing.assert_array_equal(np.asarray(inv.out_maps), np.asarray(kmap.in_maps))


@pytest.mark.parametrize("lib", ["compat", "native"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_maps_of_a_step_are_freed_without_the_cycle_collector(rng, device, lib):
    """No reference cycle keeps a step's maps: with the collector off, dropping the model's input and
    output frees every map (a strong inverse-map cache made one, so maps waited for ``gc.collect``)."""
    import gc
    import weakref

    from benchmarks import spconv_minkunet as spm
    from sparsevox.kernel_map import KernelMap
    from sparsevox.adapters.torch import MinkUNet
    model = (spm.build(spconv, 4, 3, widths=(8,) * 9) if lib == "compat" else MinkUNet(4, 3, widths=(8,) * 9))
    model = model.to(device)
    c = random_voxels(rng, 400, extent=24, batches=1)
    shift, shape = spm.spatial_frame(c)
    c[:, 1:] -= shift
    made = []
    real_init = KernelMap.__init__

    def recording_init(self, *a, **k):
        real_init(self, *a, **k)
        made.append(weakref.ref(self))
    gc.collect()
    gc.disable()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(KernelMap, "__init__", recording_init)
            for train in (False, True):
                model.train(train)
                f, cc = torch.randn(len(c), 4, device=device), torch.from_numpy(c).to(device)
                x = spconv.SparseConvTensor(f, cc, shape, 1) if lib == "compat" else sv.Voxels(cc, f)
                with torch.set_grad_enabled(train):
                    y = model(x)
                    y = y if isinstance(y, torch.Tensor) else y.features
                    if train:
                        y.sum().backward()
                del x, y
        assert made and all(r() is None for r in made), \
            f"{sum(r() is not None for r in made)} of {len(made)} maps alive"
    finally:
        gc.enable()


def test_replace_feature_checks_the_features_as_the_constructor_did():
    x = spconv.SparseConvTensor(torch.ones(3, 2), torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 2, 0, 0]],
                                                              dtype=torch.int32), [4, 4, 4], 1)
    with pytest.raises(ValueError, match=r"features must be \[N, C\], got \(3,\)"):
        x.replace_feature(torch.ones(3))
    y = x.replace_feature(torch.zeros(3, 5))
    assert y.features.shape == (3, 5) and y.indices is x.indices and y.spatial_shape == [4, 4, 4]
    assert y.spatial_shape is not x.spatial_shape  # its own list


def test_inference_weight_ignores_a_weight_of_the_wrong_size():
    """A weight whose element count does not match the layer (a view into a larger storage) must not be
    read past its end by the no-gradient as_strided view: it takes the reshape path, which raises."""
    layer = spconv.SubMConv3d(3, 5, 3, bias=False)
    big = torch.zeros(5 * 27 * 3 + 10)
    layer.weight = torch.nn.Parameter(big[:134].reshape(134), requires_grad=False)
    with torch.no_grad(), pytest.raises(RuntimeError, match="invalid for input of size 134"):
        layer.sparsevox_weight()


@pytest.mark.parametrize("layer", ["subm", "strided"])
def test_an_in_place_edit_of_the_indices_gets_fresh_maps(rng, layer):
    """Editing ``x.indices`` in place (a flip for test-time augmentation, VoxelNeXt's ``indices[:, 1:] *= 2``)
    and convolving again without an ``indice_key`` must give what a fresh tensor gives, as in spconv (the
    geometry was cached per indices object, so the old sites' maps were served)."""
    idx = torch.from_numpy(random_voxels(rng, 300, extent=20, batches=2) + np.array([0, 10, 10, 10], np.int32))
    feat = torch.randn(len(idx), 4, dtype=torch.float64)
    conv = (spconv.SubMConv3d(4, 3, 3, bias=False) if layer == "subm"
            else spconv.SparseConv3d(4, 3, 3, 2, 1, bias=False)).double()
    x = spconv.SparseConvTensor(feat, idx.clone(), [20, 20, 20], 2)
    with torch.no_grad():
        before = conv(x).dense()
        x.indices[:, 2] = 19 - x.indices[:, 2]  # a flip along y: still unique and inside the grid
        got = conv(x).dense()
        want = conv(spconv.SparseConvTensor(feat, x.indices.clone(), [20, 20, 20], 2)).dense()
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert not torch.equal(got, before)


def test_an_edit_before_a_reused_or_inverse_map_is_not_laundered(rng):
    """A SubM layer reusing an ``indice_key``, or an inverse layer, hands on the geometry recorded with the
    key; stamped with the indices' version *now*, an edit made after the record would pass for fresh and
    the next keyless layer would get the old sites' maps."""
    idx = torch.from_numpy(random_voxels(rng, 200, extent=12) + np.array([0, 6, 6, 6], np.int32))
    feat = torch.randn(len(idx), 4, dtype=torch.float64)
    keyed = spconv.SubMConv3d(4, 4, 3, bias=False, indice_key="a").double()
    plain = spconv.SubMConv3d(4, 4, 3, bias=False).double()
    down = spconv.SparseConv3d(4, 4, 3, 2, 1, bias=False, indice_key="d").double()
    up = spconv.SparseInverseConv3d(4, 4, 3, indice_key="d", bias=False).double()

    def fresh(t):
        return plain(spconv.SparseConvTensor(t.features, t.indices.clone(), [12, 12, 12], 1)).features
    with torch.no_grad():
        x = spconv.SparseConvTensor(feat, idx.clone(), [12, 12, 12], 1)
        y = keyed(x)
        x.indices[:, 2] = 11 - x.indices[:, 2]
        z = keyed(y)  # reuses the recorded pairs, as spconv does
        torch.testing.assert_close(plain(z).features, fresh(z))
        x = spconv.SparseConvTensor(feat, idx.clone(), [12, 12, 12], 1)
        plain(x)
        y = down(x)
        x.indices[:, 2] = 11 - x.indices[:, 2]
        u = up(y)
        torch.testing.assert_close(plain(u).features, fresh(u))


def test_inference_tensors_have_no_version_and_still_run(rng):
    idx = torch.from_numpy(random_voxels(rng, 100, extent=8) + np.array([0, 4, 4, 4], np.int32))
    with torch.inference_mode():
        inf_idx = idx.clone()
        assert maps.version(inf_idx) is None
        x = spconv.SparseConvTensor(torch.randn(len(idx), 2), inf_idx, [8, 8, 8], 1)
        conv = spconv.SubMConv3d(2, 3, 3, bias=False)
        first, again = conv(x), conv(x)  # the second finds the geometry cached by identity
        assert first.features.shape == (len(idx), 3) and torch.equal(first.features, again.features)
    assert maps.version(idx) == idx._version


def test_constructor_parameters_are_spconvs_in_order():
    """spconv 2.3.8's parameter order (conv.py): positional calls of subclasses (grouped or quantised layers
    pass fp32_accum, large_kernel_fast_algo, name by position) land on the same parameters."""
    import inspect
    head = ["in_channels", "out_channels", "kernel_size"]
    regular = head + ["stride", "padding", "dilation", "groups", "bias", "indice_key", "algo", "fp32_accum"]
    want = {"SubMConv3d": regular + ["large_kernel_fast_algo", "name"],
            "SparseConv3d": regular + ["record_voxel_count", "large_kernel_fast_algo", "name"],
            "SparseConvTranspose3d": regular + ["record_voxel_count", "large_kernel_fast_algo", "name"],
            "SparseInverseConv3d": head + ["indice_key", "bias", "algo", "fp32_accum", "large_kernel_fast_algo",
                                           "name"]}
    for name, params in want.items():
        got = list(inspect.signature(getattr(spconv, name).__init__).parameters)[1:]
        assert got == params, (name, got)
    layer = spconv.SubMConv3d(2, 3, 3, 1, 0, 1, 1, False, "k", None, None, False, "its_name")
    assert layer.indice_key == "k" and layer.name == "its_name"


@pytest.mark.parametrize("k", [3, 1])
def test_subclass_convolves_with_a_derived_weight_through_conv_forward(rng, k):
    """spconv's ``_conv_forward(training, input, weight, bias, ...)``: what fake-quantising or grouped
    subclasses call from their own ``forward`` with a weight of their making (k=1: spconv's 1x1 path)."""
    class Doubled(spconv.SubMConv3d):
        def forward(self, input, add_input=None):
            return self._conv_forward(self.training, input, self.weight * 2, self.bias * 3, add_input,
                                      name=self.name, sparse_unique_name=self._sparse_unique_name)
    idx = torch.from_numpy(random_voxels(rng, 200, extent=10) + np.array([0, 5, 5, 5], np.int32))
    x = spconv.SparseConvTensor(torch.randn(len(idx), 3, dtype=torch.float64), idx, [10, 10, 10], 1)
    layer = Doubled(3, 4, k).double()
    plain = spconv.SubMConv3d(3, 4, k).double()
    with torch.no_grad():
        plain.weight.copy_(layer.weight * 2)
        plain.bias.copy_(layer.bias * 3)
        np.testing.assert_allclose(layer(x).features.numpy(), plain(x).features.numpy(), rtol=1e-12, atol=1e-12)
    with pytest.raises(NotImplementedError, match="int8"):
        layer._conv_forward(False, x, layer.weight, None, output_scale=0.5)


def test_indice_data_pair_tensors_follow_spconvs_rule(rng):
    """``pair_fwd``/``pair_bwd``/``indice_pairs``/``indice_pair_num`` of a SubM k3 record: every pair obeys
    spconv's ``i = o - 1 + r`` per axis (r the offset's index per axis), every neighbour is paired, and
    the four views agree."""
    idx = torch.from_numpy(random_voxels(rng, 150, extent=6, batches=2) + np.array([0, 3, 3, 3], np.int32))
    x = spconv.SparseConvTensor(torch.randn(len(idx), 2), idx, [6, 6, 6], 2)
    with torch.no_grad():
        y = spconv.SubMConv3d(2, 2, 3, indice_key="s")(x)
    d = y.indice_dict["s"]
    fwd, bwd, pairs, num = d.pair_fwd, d.pair_bwd, d.indice_pairs, d.indice_pair_num
    n = len(idx)
    assert fwd.shape == (27, n) and bwd.shape == (27, n) and pairs.shape == (2, 27, n) and num.shape == (27,)
    rows = {tuple(r): j for j, r in enumerate(idx.tolist())}
    for r in range(27):
        delta = np.array([0, r // 9 - 1, r // 3 % 3 - 1, r % 3 - 1])
        want = {o: rows.get(tuple(np.array(c) + delta)) for o, c in enumerate(idx.tolist())}
        want = {o: i for o, i in want.items() if i is not None}
        got = {o: int(i) for o, i in enumerate(fwd[r].tolist()) if i >= 0}
        assert got == want, r
        assert {int(i): o for i, o in enumerate(bwd[r].tolist()) if o >= 0} == {i: o for o, i in want.items()}
        m = int(num[r])
        assert m == len(want) and (pairs[:, r, m:] == -1).all()
        assert dict(zip(pairs[1, r, :m].tolist(), pairs[0, r, :m].tolist())) == want


def test_grid_check_and_shift_helpers():
    lo, hi = torch.tensor([0, 2, 5]), torch.tensor([7, 8, 9])
    assert maps._inside(lo, hi, (8, 9, 10)) is True
    assert maps._inside(lo, hi, (8, 8, 10)) is False  # hi y = 8 is outside [0, 8)
    assert maps._inside(torch.tensor([0, -1, 0]), hi, (8, 9, 10)) is False
    rows = torch.tensor([[0, 1, 2, 3], [1, 4, 5, 6]], dtype=torch.int32)
    moved = maps._moved(rows, (2, 0, -1))
    assert moved.tolist() == [[0, 3, 2, 2], [1, 6, 5, 5]] and moved.dtype == torch.int32
    assert rows.tolist() == [[0, 1, 2, 3], [1, 4, 5, 6]]  # the input is left as it was


def test_core_weight_is_a_view_of_the_parameter_not_a_copy():
    """Issue 21: the [K, C_in, C_out] weight without a copy per call. The parameter keeps spconv's shape
    but the core's memory order, so the core weight is a view of it (same memory) and in-place writes show."""
    layer = spconv.SubMConv3d(3, 5, 3, bias=False).double()
    assert layer.weight.shape == (5, 3, 3, 3, 3) and not layer.weight.is_contiguous()
    with torch.no_grad():
        a = layer.sparsevox_weight()
        assert a.is_contiguous() and a.data_ptr() == layer.weight.data_ptr()
        np.testing.assert_array_equal(a.numpy(), layer.weight.reshape(5, 27, 3).permute(1, 2, 0).numpy())
        a = a.clone()
        layer.weight.mul_(2.0)
        assert torch.equal(layer.sparsevox_weight(), 2.0 * a)
    g = layer.sparsevox_weight()  # with a gradient (the permuted view's path): same values, grad flows back
    assert g.data_ptr() == layer.weight.data_ptr() and g.grad_fn is not None
    np.testing.assert_array_equal(g.detach().numpy(), 2.0 * a.numpy())
    (g * torch.arange(g.numel(), dtype=g.dtype).reshape(g.shape)).sum().backward()
    np.testing.assert_array_equal(layer.weight.grad.reshape(5, 27, 3).permute(1, 2, 0).numpy().ravel(),
                                  np.arange(g.numel()))
    assert layer.weight.grad.stride() == layer.weight.stride()  # no re-layout of the gradient either
    layer.float()
    with torch.no_grad():
        assert layer.sparsevox_weight().dtype == torch.float32


def test_weight_layout_survives_state_dicts_copies_and_casts():
    """A contiguous spconv-layout tensor (what spconv saves) loads by shape into the strided parameter;
    ``.to``, deepcopy and a state-dict round trip keep the memory order; an assigned contiguous weight
    (``load_state_dict(assign=True)``) still convolves correctly (copied per call)."""
    import copy
    import io
    layer = spconv.SparseConv3d(4, 6, (2, 3, 1), 2, bias=False)
    saved = torch.randn(6, 2, 3, 1, 4)  # contiguous, as spconv's own parameter
    layer.load_state_dict({"weight": saved})
    assert torch.equal(layer.weight, saved) and layer.weight.stride() == (1, 72, 24, 24, 6)
    ref = saved.reshape(6, 6, 4).permute(1, 2, 0)
    for other in (layer.double(), copy.deepcopy(layer)):
        assert other.weight.stride() == (1, 72, 24, 24, 6)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf)["weight"], saved.double())
    layer.load_state_dict({"weight": saved.double()}, assign=True)
    assert layer.weight.is_contiguous()
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            w = layer.sparsevox_weight()
        assert w.is_contiguous() and w.data_ptr() != layer.weight.data_ptr()  # a copy: the core needs [K, C_in, C_out]
        np.testing.assert_array_equal(w.detach().numpy(), ref.double().numpy())


def test_eval_layer_follows_writes_through_data(rng):
    """A write through ``.data`` (EMA updates, manual loading) does not bump the weight's version counter:
    an eval-mode layer must still use the new values (a copy cached per version served the old ones)."""
    c = torch.from_numpy(random_voxels(rng, 60, extent=6, batches=1))
    x = spconv.SparseConvTensor(torch.randn(len(c), 3, dtype=torch.float64), c, [12, 12, 12], 1)
    layer = spconv.SubMConv3d(3, 2, 3, bias=False).double().eval()
    with torch.no_grad():
        a = layer(x).features.clone()
        layer.weight.data.mul_(2.0)
        b = layer(x).features
    assert float(a.abs().max()) > 0 and torch.allclose(b, 2.0 * a)


def test_training_gets_a_differentiable_copy():
    layer = spconv.SubMConv3d(3, 5, 3, bias=False).double()
    w = layer.sparsevox_weight()
    assert w.requires_grad and w.grad_fn is not None and w.is_contiguous()  # the launch path needs it
    w.sum().backward()
    assert layer.weight.grad is not None and float(layer.weight.grad.abs().sum()) == 5 * 27 * 3


def test_weights_made_in_inference_mode_and_recomputed_weights():
    with torch.inference_mode():
        layer = spconv.SubMConv3d(3, 5, 3, bias=False)  # inference-tensor weight: no version counter
        a = layer.sparsevox_weight()
        assert a.shape == (27, 3, 5)
    layer = spconv.SubMConv3d(3, 5, 3, bias=False)
    original = layer.weight
    with torch.no_grad():
        a = layer.sparsevox_weight()
        layer.weight = torch.nn.Parameter(original.detach() * 3.0)  # another tensor (a recomputed weight)
        b = layer.sparsevox_weight()
    assert torch.allclose(b, 3.0 * a)


def _pairs(kmap):
    o = kmap.offsets_host
    return sorted((k, int(a), int(b)) for k in range(len(o) - 1)
                  for a, b in zip(np.asarray(kmap.in_maps)[o[k]:o[k + 1]], np.asarray(kmap.out_maps)[o[k]:o[k + 1]]))


@pytest.mark.parametrize("shape,taken", [((12, 10, 8), True), ((12, 11, 8), False), ((12, 10, 7), False)])
def test_tiling_strided_layers_use_the_native_map_with_spconvs_sites(rng, shape, taken):
    """k2 s2 p0 on a grid whose extents the stride divides: sparsevox's own strided map (cached on the
    geometry) with the same output sites, order and pairs as spconv's rule computed in torch."""
    c = random_voxels(rng, 300, extent=min(shape), batches=2)
    c[:, 1:] += min(shape) // 2  # into [0, min(shape)): inside the grid
    assert (c[:, 1:] >= 0).all() and (c[:, 1:] < np.asarray(shape)).all()
    geom = sv.Voxels(torch.from_numpy(c), None)
    out_shape = maps.conv_output_size(list(shape), [2, 2, 2], [2, 2, 2], [0, 0, 0], [1, 1, 1])
    args = (geom, (2, 2, 2), (2, 2, 2), (0, 0, 0), (1, 1, 1), maps.lift(out_shape, 1))
    kmap, outs, out_geom = maps.strided_map(*args, in_shape=shape)
    assert (kmap is sv.kernel_map(geom, 2, 2)) is taken
    ref_kmap, ref_outs, _ = maps.strided_map(sv.Voxels(torch.from_numpy(c), None), *args[1:])  # spconv's rule
    assert torch.equal(outs, ref_outs) and out_geom.coords is outs
    assert _pairs(kmap) == _pairs(ref_kmap)


def test_inputs_outside_the_grid_keep_spconvs_rule(rng):
    c = random_voxels(rng, 200, extent=10, batches=1)
    c[:, 1:] += 5  # into [0, 10)
    c = c[c[:, 1] != 9]
    c[0, 1:] = [11, 0, 0]  # outside a (10, 10, 10) grid: spconv drops its output site
    geom = sv.Voxels(torch.from_numpy(c), None)
    kmap, outs, _ = maps.strided_map(geom, (2, 2, 2), (2, 2, 2), (0, 0, 0), (1, 1, 1), (5, 5, 5), in_shape=(10, 10, 10))
    assert kmap is not sv.kernel_map(geom, 2, 2) and int(outs[:, 1].max()) < 5


def test_a_unets_strided_layers_read_the_device_once_per_step(rng, monkeypatch):
    """spconv's MinkUNet on compat: the grid check of its four k2 s2 layers (all input sites inside the
    grid, so sparsevox's own strided map applies) reads the device once per fresh input, with the input
    geometry's validation, before any convolution is queued; the coarser levels' sites are floor(c / 2) of
    checked ones, inside their grids by construction (each read drained the convolutions queued before it,
    once per level). The logits are unchanged."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import spconv_minkunet as spm
    idx = np.unique(np.c_[np.zeros((400, 1), np.int64), rng.integers(0, 12, (400, 3))], axis=0)
    shift, shape = spm.spatial_frame(idx)
    idx[:, 1:] -= shift
    feats = torch.from_numpy(rng.normal(size=(len(idx), 4)))
    net = spm.build(spconv, 4, 5, widths=(4,) * 9, blocks=1).double().eval()
    events, real = [], torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: events.append("read") or real(*a, **k))
    conv_mod = sys.modules[spconv.SubMConv3d.__module__]
    real_conv = conv_mod.conv_features
    monkeypatch.setattr(conv_mod, "conv_features", lambda *a, **k: events.append("conv") or real_conv(*a, **k))
    with torch.no_grad():
        out = net(spconv.SparseConvTensor(feats, torch.from_numpy(idx).int(), shape, 1))
        assert events.count("read") == 1 and events[0] == "read", events[:3]  # before any convolution
        events.clear()
        again = net(spconv.SparseConvTensor(feats, torch.from_numpy(idx).int(), shape, 1))  # a fresh input
    assert events.count("read") == 1 and events[0] == "read" and torch.equal(out, again)


def _weight_paths(fn, weight, path=()):
    """Node-name paths from the autograd node ``fn`` to ``weight``'s AccumulateGrad."""
    if fn is None:
        return []
    if getattr(fn, "variable", None) is weight:
        return [path]
    return [p for nxt, _ in fn.next_functions for p in _weight_paths(nxt, weight, path + (type(fn).__name__,))]


@pytest.mark.gpu
def test_autocast_training_casts_the_weight_as_native_layers_do(rng):
    """Under autocast the compat layer hands the convolution its float32 weight view, which casts it inside
    its autograd node like a native layer's: no cast node between the convolution and the parameter (only
    views), the same float16 output as ``conv_features`` on the [K, C_in, C_out] weight itself, and the
    same weight gradient laid out as the parameter, to float32 accumulation (both float32 accumulators; they
    may differ in summation order). The GPU run at 38e2835 found the two calls' gradients 5e-4 apart
    (relative, float16 rounding): a signature's first backward (the core call) rounded the accumulator to
    the features' dtype, later calls' prepared launches did not; since the weight gradient's dtype reaches
    the algorithms' wgrad, neither rounds (tests/test_weight_grad_dtype.py)."""
    from sparsevox.adapters.torch.functional import conv_features
    c = torch.from_numpy(random_voxels(rng, 500, extent=12, batches=2)).cuda()
    feats = torch.randn(len(c), 16, device="cuda")
    layer = spconv.SubMConv3d(16, 24, 3, bias=False, indice_key="k").cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        out = layer(spconv.SparseConvTensor(feats, c, [24, 24, 24], 2))
        w = layer.weight.detach().reshape(24, 27, 16).permute(1, 2, 0).contiguous().requires_grad_()
        ref = conv_features(feats, w, out.indice_dict["k"].kmap)
    paths = _weight_paths(out.features.grad_fn, layer.weight)
    views = {"PermuteBackward0", "ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0"}
    assert paths and all(set(p[1:]) <= views for p in paths), paths
    assert out.features.dtype == ref.dtype == torch.float16 and torch.equal(out.features, ref)
    g = torch.randn_like(ref)
    out.features.backward(g)
    ref.backward(g)
    assert layer.weight.grad.stride() == layer.weight.stride()
    got = layer.weight.grad.reshape(24, 27, 16).permute(1, 2, 0).double()
    assert layer.weight.grad.dtype == w.grad.dtype == torch.float32
    assert float((got - w.grad.double()).norm() / w.grad.double().norm()) < 1e-5


@pytest.mark.parametrize("make", [
    lambda: spconv.SubMConv3d(4, 6, (3, 1, 3), bias=False),
    lambda: spconv.SubMConv2d(3, 5, 3, bias=False),
    lambda: spconv.SubMConv1d(3, 5, 3, bias=False),
    lambda: spconv.SparseConv3d(1, 6, 2, 2, bias=False),  # C_in 1
    lambda: spconv.SparseConv3d(4, 1, 3, 2, bias=False),  # C_out 1
    lambda: spconv.SparseConv3d(4, 6, 1, 2, bias=False),  # K 1 but strided: not spconv's 1x1 path
    lambda: spconv.SparseConvTranspose3d(4, 6, 2, 2, bias=False),
    lambda: spconv.SparseInverseConv3d(4, 6, 3, indice_key="k", bias=False),
], ids=["subm-k313", "2d", "1d", "cin1", "cout1", "k1-s2", "transposed", "inverse"])
def test_core_weight_view_of_every_layer_kind(make):
    layer = make().double()
    assert not layer.conv1x1
    c_out, *ks, c_in = layer.weight.shape
    ref = layer.weight.detach().contiguous().reshape(c_out, -1, c_in).permute(1, 2, 0)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            w = layer.sparsevox_weight()
        assert w.is_contiguous() and w.shape == ref.shape and w.data_ptr() == layer.weight.data_ptr()
        assert torch.equal(w.detach(), ref)


def test_seeded_initialisation_draws_spconvs_values():
    """The weight is drawn in index order, as into spconv's contiguous parameter: one seed, one network
    under either library (a draw straight into the strided parameter fills it in memory order)."""
    import math
    torch.manual_seed(7)
    layer = spconv.SubMConv3d(3, 5, 3)
    torch.manual_seed(7)
    bound = 1 / math.sqrt(3 * 27)  # Kaiming-uniform, a = sqrt(5): sqrt(3) * sqrt(2 / 6) / sqrt(fan_in)
    expected = torch.empty(5, 3, 3, 3, 3).uniform_(-bound, bound)
    assert not layer.weight.is_contiguous() and torch.equal(layer.weight.detach(), expected)
