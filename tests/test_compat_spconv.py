"""sparsevox.compat.spconv against spconv: the same model code built with ``tests/spconv_emulation.py``
(spconv 2.3.8's layers, dense, on the CPU; itself checked here against loop references of spconv's pair
rules) and with ``sparsevox.compat.spconv``, one state dict for both, on small random scenes and a real
scan: coordinate sets identical, features and gradients equal to float64 / float32 rounding. Where spconv
itself is installed, the same layer stacks and networks run against it: on the CPU (its CPU wheel, which CI
installs) forward only, since its CPU build's convolution backward calls CUDA; on the GPU (``-m gpu``)
forward and backward."""
import contextlib
import io
import itertools
import math
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from conftest import pointcloud_dir, spconv_cpu_build
from reference import rel_err

torch = pytest.importorskip("torch", reason="torch not installed")
import spconv_emulation as EMU  # noqa: E402

import sparsevox as sv  # noqa: E402
import sparsevox.compat.spconv as CMP  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not an installed package
from benchmarks import spconv_minkunet as spm  # noqa: E402

nn = torch.nn
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


# --- scenes, runs, comparisons -------------------------------------------------------------------------

def scene(rng, shape, n, batches=2, c=3, dtype=torch.float64, device="cpu"):
    """``(features [N, c], indices int32 [N, 1 + nd], shape, batches)``: unique random sites in ``shape``,
    rows in random order."""
    vol = math.prod(shape)
    flat = rng.choice(batches * vol, size=min(n, batches * vol), replace=False)
    b, rest = np.divmod(flat, vol)
    idx = np.stack([b] + list(np.unravel_index(rest, shape)), 1).astype(np.int32)
    feats = torch.from_numpy(rng.standard_normal((len(idx), c))).to(dtype)
    return feats.to(device), torch.from_numpy(idx).to(device), list(shape), batches


def sorted_rows(indices):
    """The permutation that sorts index rows lexicographically (batch first)."""
    i = indices.cpu().numpy()
    return torch.from_numpy(np.lexsort(i.T[::-1]).copy()).to(indices.device)


def same_tensor(ref, got, tol, what=""):
    """Same spatial shape and batch size, identical coordinate sets, features equal row by row."""
    assert type(got).__name__ == "SparseConvTensor", what
    assert got.spatial_shape == list(ref.spatial_shape) and got.batch_size == ref.batch_size, what
    pr, pg = sorted_rows(ref.indices), sorted_rows(got.indices)
    assert got.indices.dtype == torch.int32 and got.indices.shape == ref.indices.shape, what
    assert torch.equal(ref.indices[pr].cpu(), got.indices[pg].cpu()), f"{what}: coordinate sets differ"
    assert got.features.dtype == ref.features.dtype, what
    err = rel_err(got.features[pg].detach().cpu().numpy(), ref.features[pr].detach().cpu().numpy())
    assert err < tol, f"{what}: features rel err {err:.3g}"
    return pr, pg


def evaluate(sp, build, data, dtype, device="cpu", train=True, grads=True, state=None):
    """Build ``build(sp)`` (loading ``state`` when given), run it on ``data`` (:func:`scene`) and
    differentiate a fixed random linear function of its outputs. Returns ``(state dict, {name: array},
    [(sorted indices, spatial shape, batch size) per sparse output])``; outputs are keyed ``out<k>`` (a
    sparse output's rows sorted by their indices), gradients ``grad:features`` and ``grad:<parameter>``."""
    torch.manual_seed(0)
    model = build(sp).to(device=device, dtype=dtype)
    if state is not None:
        model.load_state_dict(state)
    model.train(train)
    feats, idx, shape, b = data
    f = feats.to(device=device, dtype=dtype).clone().requires_grad_(grads)
    outs = model(sp.SparseConvTensor(f, idx.to(device), shape, b))
    res, geo, loss = OrderedDict(), [], 0
    gen = torch.Generator().manual_seed(1)
    for k, o in enumerate(outs if isinstance(outs, list) else [outs]):
        if not isinstance(o, torch.Tensor):
            assert type(o).__name__ == "SparseConvTensor" and o.indices.dtype == torch.int32
            perm = sorted_rows(o.indices)
            geo.append((o.indices[perm].cpu(), list(o.spatial_shape), o.batch_size))
            o = o.features[perm]
        assert o.dtype == dtype, (k, o.dtype)
        res[f"out{k}"] = o.detach().double().cpu().numpy()
        loss = loss + (o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o)).sum()
    if grads:
        loss.backward()
        res["grad:features"] = f.grad.double().cpu().numpy()
        for name, p in model.named_parameters():
            res[f"grad:{name}"] = (torch.zeros_like(p) if p.grad is None else p.grad).double().cpu().numpy()
    return model.state_dict(), res, geo


@contextlib.contextmanager
def relu_branches(record: list | None = None, replay: list | None = None):
    """``nn.ReLU`` calls in order: ``record`` appends each call's input (float64); ``replay`` applies the
    recorded inputs' masks (``x * (recorded > 0)``, not in place), so a float64 run follows the same
    branch of every ReLU kink as the recorded float32 run. A pre-activation within rounding of zero can
    take either side in float32 (seed 2649088527 on an AVX-512 host: one element of 936 flipped, and
    training-mode BatchNorm spread it to 5 % of every upstream gradient): both sides are right, only the
    branch differs. The replay checks that it sees the recorded calls (count, shapes) and that every branch
    it changes has a float32 input within rounding of zero (1e-5 of that tensor's largest input), so a
    float32 error that moves an activation across zero is not absorbed."""
    forward, calls = nn.ReLU.forward, itertools.count()

    def relu(module, x):
        if replay is None:
            record.append(x.detach().double().clone())
            return forward(module, x)
        seen = replay[next(calls)]
        assert seen.shape == x.shape, "the replayed run called nn.ReLU in another order"
        flips = (seen > 0) != (x > 0)
        far = seen[flips].abs()
        assert not far.numel() or float(far.max()) <= 1e-5 * float(seen.abs().max()), \
            "a replayed ReLU branch was taken by an input far from zero: not a rounding kink"
        return x * (seen > 0).to(x.dtype)

    nn.ReLU.forward = relu
    try:
        yield
    finally:
        nn.ReLU.forward = forward
    if replay is not None:
        assert next(calls) == len(replay), "the replayed run called nn.ReLU fewer times than the recorded one"


def run_both(build, data, dtype=torch.float64, train=True, grads=True, ref=EMU, device="cpu", tol=None,
             what="", ref64=None):
    """The reference (the emulation or spconv) and the compat module on one state dict (the reference's)
    and one input: identical coordinate sets, spatial shapes and batch sizes; outputs and gradients equal
    within ``tol`` (gradients ``10 * tol``). For float32 with ``ref64`` (default: with the CPU emulation)
    a difference beyond that is accepted up to 4x the reference's own float32 error against its float64
    run (the float32 allowance measured on the same network: BatchNorm in training mode amplifies
    rounding); beyond that too, against compat in float64 on the float32 run's ReLU branches
    (:func:`relu_branches`). Returns the two ``{name: array}`` results and the compat side's sparse outputs' geometry."""
    tol = TOL[dtype] if tol is None else tol
    ref64 = (ref is EMU and dtype != torch.float64) if ref64 is None else ref64
    state, rr, gr = evaluate(ref, build, data, dtype, device, train, grads)
    masks = []
    with relu_branches(record=masks):
        _, rc, gc = evaluate(CMP, build, data, dtype, device, train, grads, state)
    assert len(gc) == len(gr), what
    for k, ((ir, sr, br), (ic, sc, bc)) in enumerate(zip(gr, gc)):
        assert sc == sr and bc == br, f"{what}: sparse output {k}: spatial shape / batch size"
        assert ic.shape == ir.shape and torch.equal(ic, ir), f"{what}: sparse output {k}: coordinate sets differ"
    assert list(rc) == list(rr), what
    r64 = evaluate(ref, build, data, torch.float64, device, train, grads, state)[1] if ref64 else None
    branch64 = None
    for name in rr:
        assert rc[name].shape == rr[name].shape, f"{what}: {name} shape"
        err, allow = rel_err(rc[name], rr[name]), tol * (10 if name.startswith("grad") else 1)
        if err >= allow and r64 is not None:
            err, allow = rel_err(rc[name], r64[name]), max(allow, 4 * rel_err(rr[name], r64[name]))
            if err >= allow and masks:
                # a ReLU kink taken on the other side: judge against float64 on compat's own branches (compat
                # in float64 equals the reference within 1e-12: the float64 cases of the same tests)
                if branch64 is None:
                    with relu_branches(replay=masks):
                        branch64 = evaluate(CMP, build, data, torch.float64, device, train, grads, state)[1]
                err = rel_err(rc[name], branch64[name])
        assert err < allow, f"{what}: {name}: rel err {err:.3g} (allowed {allow:.3g})"
    return rr, rc, gc


# --- the emulation itself, against loops over spconv's pair rules --------------------------------------

def loop_pairs(idx, shape, k, s, p, d, kind):
    """spconv 2.3.8's pairs written out (``ConvOutLocIter`` of ``spconv/csrc/sparse/indices.py``):
    ``(out_indices sorted, [(in_row, out_row, r)])``. ``kind``: regular (``query_npq``), transposed
    (``query_nhw_out``), subm (``query_npq_no_stride`` on the input table, ``p = k // 2 * d``)."""
    nd = len(shape)
    if kind == "subm":
        out_shape, s, p = list(shape), [1] * nd, [kk // 2 * dd for kk, dd in zip(k, d)]
    elif kind == "transposed":
        out_shape = [(n - 1) * ss - 2 * pp + kk for n, kk, ss, pp in zip(shape, k, s, p)]
    else:
        out_shape = [(n + 2 * pp - dd * (kk - 1) - 1) // ss + 1 for n, kk, ss, pp, dd in zip(shape, k, s, p, d)]
    rows = [tuple(r) for r in idx.tolist()]
    table = {r: i for i, r in enumerate(rows)}
    cand = []
    for i, row in enumerate(rows):
        for r, off in enumerate(itertools.product(*[range(kk) for kk in k])):
            o = []
            for a in range(nd):
                x = row[a + 1]
                if kind == "transposed":
                    v = x * s[a] - p[a] + off[a] * d[a]
                else:
                    num = x + p[a] - off[a] * d[a]
                    v = num // s[a] if num >= 0 and num % s[a] == 0 else -1
                o.append(v)
            if all(0 <= v < n for v, n in zip(o, out_shape)):
                cand.append((i, (row[0],) + tuple(o), r))
    if kind == "subm":  # output o is an input site; the pair is (input at o - p + r d, o)
        return sorted(rows), [(i, table[o], r) for i, o, r in cand if o in table], out_shape
    outs = sorted({o for _, o, _ in cand})
    where = {o: j for j, o in enumerate(outs)}
    return outs, [(i, where[o], r) for i, o, r in cand], out_shape


def loop_conv(feats, weight, pairs, n_out):
    c_out, c_in = weight.shape[0], weight.shape[-1]
    w = weight.reshape(c_out, -1, c_in)
    out = torch.zeros(n_out, c_out, dtype=feats.dtype)
    for i, o, r in pairs:
        out[o] += w[:, r, :] @ feats[i]
    return out


def by_rows(t):
    """``{index row: feature row}`` of a SparseConvTensor."""
    return {tuple(r): f for r, f in zip(t.indices.tolist(), t.features.detach())}


def assert_rows(t, rows, feats, what):
    got = by_rows(t)
    assert sorted(got) == [tuple(r) for r in rows], f"{what}: sites"
    ref = feats.detach()
    if not rows:  # no output site (a sparse scene can leave a strided layer none: seed 4026343615, k5 s2 p2 d2)
        assert t.features.shape == (0, ref.shape[1]), what
        return
    mine = torch.stack([got[tuple(r)] for r in rows])
    assert rel_err(mine.numpy(), ref.numpy()) < 1e-12, what


REGULAR = [  # (kernel, stride, padding, dilation) per axis or int
    (2, 2, 0, 1), (3, 2, 1, 1), (3, 2, 0, 1), (3, 1, 1, 1), (3, 1, 0, 2), (1, 2, 0, 1), (4, 3, 2, 1),
    ((3, 1, 2), (2, 1, 2), (0, 1, 1), (1, 1, 2)), (3, (2, 2, 1), (0, 1, 1), 1), (5, 2, 2, 2),
]


@pytest.mark.parametrize("geo", REGULAR, ids=str)
def test_emulation_follows_spconvs_pair_rules(rng, geo):
    """The emulation (dense convolutions read at its sites) equals loops over spconv's pair rules for
    regular, transposed and inverse convolutions and both local pools (spconv's outputs: max over the
    window and 0, the mean over the active inputs); and SubM."""
    k, s, p, d = (EMU.expand_nd(3, v) for v in geo)
    feats, idx, shape, b = scene(rng, (7, 6, 8), 40, c=2)
    x = EMU.SparseConvTensor(feats, idx, shape, b)
    torch.manual_seed(0)
    conv = EMU.SparseConv3d(2, 3, k, s, p, d, bias=False, indice_key="k").double()
    outs, pairs, out_shape = loop_pairs(idx, shape, k, s, p, d, "regular")
    y = conv(x)
    assert y.spatial_shape == out_shape
    assert_rows(y, outs, loop_conv(feats, conv.weight, pairs, len(outs)), f"regular {geo}")
    inv = EMU.SparseInverseConv3d(3, 2, k, indice_key="k").double()
    z = inv(y)
    if math.prod(k) == 1:  # spconv's conv1x1 path catches an inverse layer of kernel volume 1 (stride 1)
        assert z.indices is y.indices
    else:
        ycoarse = by_rows(y)
        yf = torch.stack([ycoarse[o] for o in outs]) if outs else torch.zeros(0, 3, dtype=torch.float64)
        ref = loop_conv(yf, inv.weight, [(o, i, r) for i, o, r in pairs], len(idx)) + inv.bias
        assert z.indices is idx and rel_err(z.features.detach().numpy(), ref.detach().numpy()) < 1e-12
    tconv = EMU.SparseConvTranspose3d(2, 3, k, s, p, d, bias=False).double()
    outs_t, pairs_t, shape_t = loop_pairs(idx, shape, k, s, p, d, "transposed")
    t = tconv(x)
    assert t.spatial_shape == shape_t
    assert_rows(t, outs_t, loop_conv(feats, tconv.weight, pairs_t, len(outs_t)), f"transposed {geo}")
    for cls, red in ((EMU.SparseMaxPool3d, "max"), (EMU.SparseAvgPool3d, "avg")):
        pooled = cls(k, s, p, d)(x)
        ref = torch.zeros(len(outs), 2, dtype=torch.float64)
        members = [[i for i, o, _ in pairs if o == j] for j in range(len(outs))]
        for j, m in enumerate(members):
            ref[j] = feats[m].max(0)[0].clamp_min(0) if red == "max" else feats[m].mean(0)
        assert_rows(pooled, outs, ref, f"{red} pool {geo}")
    if all(v % 2 for v in k) and math.prod(k) > 1:  # (kernel volume 1: the conv1x1 path, tested below)
        sub = EMU.SubMConv3d(2, 3, k, dilation=d, bias=False).double()
        _, pairs_s, _ = loop_pairs(idx, shape, k, s, p, d, "subm")
        got = sub(x)
        assert got.indices is idx
        ref = loop_conv(feats, sub.weight, pairs_s, len(idx))
        assert rel_err(got.features.detach().numpy(), ref.detach().numpy()) < 1e-12


def test_emulation_2d_and_1x1_quirk(rng):
    feats, idx, shape, b = scene(rng, (9, 7), 30, c=2)
    x = EMU.SparseConvTensor(feats, idx, shape, b)
    conv = EMU.SparseConv2d(2, 3, 3, 2, 1, bias=False).double()
    outs, pairs, out_shape = loop_pairs(idx, shape, [3, 3], [2, 2], [1, 1], [1, 1], "regular")
    assert_rows(conv(x), outs, loop_conv(feats, conv.weight, pairs, len(outs)), "2d")
    one = EMU.SubMConv3d(2, 3, 1, bias=False).double()
    f3, i3, s3, b3 = scene(rng, (4, 4, 4), 20, c=2)
    got = one(EMU.SparseConvTensor(f3, i3, s3, b3)).features
    assert rel_err(got.detach().numpy(), (f3 @ one.weight.reshape(2, 3)).detach().numpy()) < 1e-15


# --- single layers: compat against the emulation --------------------------------------------------------

class Stack(nn.Module):
    """Layers applied in turn; returns the output of each (so every intermediate is compared)."""

    def __init__(self, *layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        outs = []
        for m in self.layers:
            x = m(x)
            outs.append(x)
        return outs


DTYPES = [torch.float64, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geo", [(3, 1), ((3, 1, 5), 1), (3, 2), (5, 1), (1, 1)], ids=str)
def test_subm(rng, geo, dtype):
    k, d = geo
    data = scene(rng, (8, 7, 9), 150, c=3)
    run_both(lambda sp: Stack(sp.SubMConv3d(3, 4, k, dilation=d, indice_key="s"),
                              sp.SubMConv3d(4, 5, k, dilation=d, bias=False, indice_key="s")), data, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geo", REGULAR, ids=str)
def test_regular_with_and_without_padding_and_its_inverse(rng, geo, dtype):
    k, s, p, d = geo
    data = scene(rng, (9, 8, 10), 160, c=3)
    run_both(lambda sp: Stack(sp.SparseConv3d(3, 4, k, s, p, d, indice_key="down"),
                              sp.SubMConv3d(4, 4, 3, indice_key="coarse"),
                              sp.SparseInverseConv3d(4, 2, k, indice_key="down"),
                              sp.SubMConv3d(2, 2, 3, bias=False)), data, dtype, what=str(geo))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_windows_that_tile_the_grid(rng, k, dtype):
    """kernel = stride on extents the stride divides, conv and pools: even kernels take sparsevox's own
    strided map; odd ones must not (sparsevox centres an odd kernel's offsets, spconv does not: k3 s3 paired
    each output with the wrong window until the audit of 2026-12-03)."""
    data = scene(rng, (2 * k, 3 * k, 2 * k), 150, c=3)
    run_both(lambda sp: Stack(sp.SparseConv3d(3, 4, k, k, indice_key="down"), sp.SubMConv3d(4, 4, 3),
                              sp.SparseInverseConv3d(4, 2, k, indice_key="down")), data, dtype, what=f"k{k}s{k}")
    run_both(lambda sp: Stack(sp.SparseMaxPool3d(k, k), sp.SubMConv3d(3, 2, 3)), data, dtype, what=f"max k{k}s{k}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geo", [(2, 2, 0, 1), (3, 2, 1, 1), (3, 1, 0, 1), (3, 2, 0, 2), ((2, 3, 1), (2, 1, 1), 0, 1),
                                 (4, 2, 1, 1)], ids=str)
def test_transposed(rng, geo, dtype):
    k, s, p, d = geo
    data = scene(rng, (5, 6, 4), 60, c=3)
    run_both(lambda sp: Stack(sp.SparseConvTranspose3d(3, 4, k, s, p, d, indice_key="up"),
                              sp.SubMConv3d(4, 2, 3)), data, dtype, what=str(geo))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geo", [(2, None, 0, 1), (3, 2, 1, 1), (3, 1, 1, 1), (3, 2, 0, 2), ((1, 2, 3), 2, 0, 1)],
                         ids=str)
@pytest.mark.parametrize("pool", ["SparseMaxPool3d", "SparseAvgPool3d"])
def test_pooling_and_its_inverse(rng, pool, geo, dtype):
    k, s, p, d = geo
    data = scene(rng, (8, 9, 7), 150, c=3)
    run_both(lambda sp: Stack(getattr(sp, pool)(k, s, p, d, indice_key="pool"),
                              sp.SparseInverseConv3d(3, 2, k, indice_key="pool")), data, dtype, what=f"{pool} {geo}")


def test_max_pool_is_clamped_at_zero_and_routes_gradients_like_spconv(rng):
    """spconv's max pool starts from 0: all-negative windows give 0 (and no gradient); a tie between
    inputs sends the gradient to each of them (spconv's backward kernel: ``in == out``)."""
    idx = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 1, 1], [0, 2, 0, 0], [0, 3, 0, 0]], dtype=torch.int32)
    f = torch.tensor([[-1.0, 2.0], [-3.0, 2.0], [-0.5, 1.0], [4.0, -1.0], [-2.0, -1.0]], dtype=torch.float64,
                     requires_grad=True)
    y = CMP.SparseMaxPool3d(2)(CMP.SparseConvTensor(f, idx, [4, 2, 2], 1))
    got = by_rows(y)
    assert torch.equal(got[(0, 0, 0, 0)], torch.tensor([0.0, 2.0], dtype=torch.float64))
    assert torch.equal(got[(0, 1, 0, 0)], torch.tensor([4.0, 0.0], dtype=torch.float64))
    y.features.sum().backward()
    assert f.grad.tolist() == [[0, 1], [0, 1], [0, 0], [1, 0], [0, 0]]


def test_global_pools_as_spconv_writes_them(rng):
    """Max: ``[B, C]``; average: ``[B]``, the mean of channel 0 (spconv 2.3.8's ``torch.mean(f, 0)[0]``)."""
    data = scene(rng, (5, 5, 5), 60, batches=3, c=4)
    for cls in ("SparseGlobalMaxPool", "SparseGlobalAvgPool"):
        run_both(lambda sp: nn.Sequential(sp.SubMConv3d(4, 3, 3), getattr(sp, cls)()), data, what=cls)
    feats, idx, shape, b = data
    x = CMP.SparseConvTensor(feats, idx, shape, b)
    mx, avg = CMP.SparseGlobalMaxPool()(x), CMP.SparseGlobalAvgPool()(x)
    assert mx.shape == (3, 4) and avg.shape == (3,)
    for i in range(3):
        rows = feats[idx[:, 0] == i]
        assert torch.equal(mx[i], rows.max(0)[0]) and torch.allclose(avg[i], rows[:, 0].mean(), rtol=1e-15)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_2d_layers(rng, dtype):
    """Batch + 2 coordinates, run as 3D with a unit third axis: SubM, regular with padding, inverse,
    transposed, pools; the outputs keep 2D indices and ``dense()`` is ``[B, C, X, Y]``."""
    data = scene(rng, (11, 9), 60, c=3)

    def build(sp):
        # the padded avg pool grows the site set unless the grid is full: after the inverse layers, which
        # need their key's output sites back (before them, some random scenes broke spconv's own rule)
        return Stack(sp.SubMConv2d(3, 4, 3, indice_key="s"), sp.SparseConv2d(4, 4, 3, 2, 1, indice_key="d"),
                     sp.SubMConv2d(4, 4, (3, 1)), sp.SparseMaxPool2d(2, indice_key="p"),
                     sp.SparseInverseConv2d(4, 4, 2, indice_key="p"), sp.SparseInverseConv2d(4, 3, 3, indice_key="d"),
                     sp.SparseAvgPool2d(3, 1, 1), sp.SparseConvTranspose2d(3, 2, 3, 2, 1), sp.ToDense())
    _, rc, geo = run_both(build, data, dtype)
    assert rc["out8"].ndim == 4 and rc["out8"].shape[:2] == (2, 2) and all(g[0].shape[1] == 3 for g in geo)


def test_1d_layers(rng):
    data = scene(rng, (30,), 25, c=2)
    run_both(lambda sp: Stack(sp.SubMConv1d(2, 3, 3, indice_key="s"), sp.SparseConv1d(3, 3, 3, 2, 1, indice_key="d"),
                              sp.SparseInverseConv1d(3, 2, 3, indice_key="d"), sp.ToDense()), data)


def test_bias_add_input_and_1x1_layers(rng):
    """1×1 layers read the weight memory as ``[C_in, C_out]`` (SubM at any stride, regular at stride 1);
    ``add_input`` is added after the convolution."""
    data = scene(rng, (6, 6, 6), 80, c=3)

    class AddInput(nn.Module):
        def __init__(self, sp):
            super().__init__()
            self.a, self.b = sp.SubMConv3d(3, 5, 3), sp.SubMConv3d(3, 5, 3, bias=False)

        def forward(self, x):
            return self.b(x, add_input=self.a(x))

    run_both(lambda sp: Stack(sp.SubMConv3d(3, 4, 1), sp.SparseConv3d(4, 5, 1, bias=False),
                              sp.SubMConv3d(5, 3, 1, stride=2), AddInput(sp)), data)
    w = torch.randn(4, 1, 1, 1, 3, dtype=torch.float64)
    layer = CMP.SubMConv3d(3, 4, 1, bias=False).double()
    layer.load_state_dict({"weight": w})
    f, idx, shape, b = data
    got = layer(CMP.SparseConvTensor(f, idx, shape, b)).features
    assert rel_err(got.detach().numpy(), (f @ w.reshape(3, 4)).numpy()) < 1e-15  # not f @ w[:, 0, 0, 0].T


def test_empty_and_one_site_inputs(rng):
    for n in (0, 1):
        f = torch.randn(n, 3, dtype=torch.float64)
        idx = torch.tensor([[1, 2, 3, 1]] * n, dtype=torch.int32).reshape(n, 4)
        run_both(lambda sp: Stack(sp.SubMConv3d(3, 4, 3, indice_key="s"),
                                  sp.SparseConv3d(4, 4, 3, 2, 1, indice_key="d"),
                                  sp.SparseInverseConv3d(4, 2, 3, indice_key="d"), sp.SparseMaxPool3d(2, 1),
                                  sp.SparseAvgPool3d(2, 1), sp.SparseConvTranspose3d(2, 2, 2, 2)),
                 (f, idx, [4, 5, 6], 2), grads=n > 0)


def test_gradcheck(rng):
    """Gradients of the compat layers by finite differences (float64), independently of the emulation:
    with respect to the input features (every element) and to all parameters at once (fast mode)."""
    f, idx, shape, b = scene(rng, (5, 4, 5), 25, c=2)
    torch.manual_seed(0)
    net = Stack(CMP.SparseConv3d(2, 3, 3, 2, 1, indice_key="d"), CMP.SparseConvTranspose3d(3, 2, 2, 2, 1),
                CMP.SparseMaxPool3d(2, 1, 0, 1, indice_key="p"), CMP.SparseAvgPool3d(3, 1, 1),
                CMP.SparseInverseConv3d(2, 2, 2, indice_key="p"), CMP.SubMConv3d(2, 2, 3)).double()
    names = [n for n, _ in net.named_parameters()]

    def fn(feats, *ws):
        x = CMP.SparseConvTensor(feats, idx, shape, b)
        return tuple(o.features for o in torch.func.functional_call(net, dict(zip(names, ws)), (x,)))

    ws = [p.detach().clone() for p in net.parameters()]
    assert torch.autograd.gradcheck(lambda x: fn(x, *ws), (f.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(lambda *w: fn(f, *w), tuple(w.requires_grad_() for w in ws), fast_mode=True)


# --- indice_key rules and kernel-map sharing ---------------------------------------------------------------

def _x(rng, shape=(6, 7, 8), n=80, c=3, sp=CMP):
    f, idx, shape, b = scene(rng, shape, n, c=c)
    return sp.SparseConvTensor(f, idx, shape, b)


def test_indice_key_records_and_reuse(rng):
    x = _x(rng)
    a, b = CMP.SubMConv3d(3, 4, 3, indice_key="s").double(), CMP.SubMConv3d(4, 4, 3, indice_key="s").double()
    ya = a(x)
    assert "s" not in x.indice_dict and ya.indice_dict is not x.indice_dict  # a copy with the new entry
    data = ya.find_indice_pair("s")
    assert data.is_subm and data.ksize == [3, 3, 3] and data.indices is x.indices and data.out_indices is x.indices
    yb = b(ya)
    assert yb.indices is data.out_indices and yb.find_indice_pair("s") is data
    assert ya.replace_feature(ya.features * 2).indice_dict is ya.indice_dict  # replace_feature shares it
    # SubM layers without a key still share one kernel map per geometry (cached on the indices' Voxels)
    free = CMP.SubMConv3d(3, 4, 3).double()
    free(x)
    assert len({id(m[0]) for m in CMP.maps.geometry(x)._kmaps.values()}) == 1
    down = CMP.SparseConv3d(4, 4, 3, 2, 1, indice_key="d").double()
    yd = down(yb)
    rec = yd.find_indice_pair("d")
    assert not rec.is_subm and rec.indices is x.indices and rec.out_indices is yd.indices
    assert rec.spatial_shape == x.spatial_shape and rec.out_spatial_shape == yd.spatial_shape == [3, 4, 4]
    up = CMP.SparseInverseConv3d(4, 2, 3, indice_key="d").double()
    yu = up(yd)
    assert yu.indices is x.indices and yu.spatial_shape == x.spatial_shape
    inv = CMP.maps.inverse_map(rec.kmap)
    assert inv.in_maps is rec.kmap.out_maps and inv.out_maps is rec.kmap.in_maps  # the stored pairs, swapped
    assert CMP.maps.inverse_map(rec.kmap) is inv
    assert CMP.SubMConv3d(2, 2, 3, indice_key="s").double()(yu).indices is x.indices  # reused at the fine level
    assert CMP.maps.geometry(yu) is CMP.maps.geometry(x)  # the decoder level shares the encoder's maps
    from sparsevox.kernel_map import recall_stats
    misses = recall_stats["misses"]
    x.features.requires_grad_()
    up(down(b(a(x)))).features.sum().backward()
    assert recall_stats["misses"] == misses  # every map (the inverse one too) found again by the torch ops


@pytest.mark.parametrize("sp", [EMU, CMP], ids=["emulation", "compat"])
def test_indice_key_errors(rng, sp):
    """spconv's rules: a regular layer or pool cannot reuse a key; a SubM layer reuses only SubM records
    of the same kernel size, dilation, spatial shape and site count; an inverse layer needs the record of
    a regular layer or pool with its kernel size, on a tensor of that layer's output shape and size."""
    x = _x(rng, sp=sp)
    err = (AssertionError, ValueError)
    y = sp.SubMConv3d(3, 4, 3, indice_key="s").double()(x)
    with pytest.raises(err):
        sp.SparseConv3d(4, 4, 3, 2, indice_key="s").double()(y)
    with pytest.raises(err):
        sp.SubMConv3d(4, 4, 5, indice_key="s").double()(y)
    with pytest.raises(err):
        sp.SubMConv3d(4, 4, 3, dilation=2, indice_key="s").double()(y)
    with pytest.raises(err):
        sp.SubMConv3d(4, 4, 2).double()(y)  # even SubM kernels
    d = sp.SparseConv3d(4, 4, 2, 2, indice_key="d").double()(y)
    with pytest.raises(err):
        sp.SubMConv3d(4, 4, 3, indice_key="d").double()(d)
    with pytest.raises(err):
        sp.SparseInverseConv3d(4, 4, 3, indice_key="d").double()(d)  # kernel size differs
    with pytest.raises(err):
        sp.SparseInverseConv3d(4, 4, 2, indice_key="s").double()(d)  # a SubM record
    with pytest.raises(err):
        sp.SparseInverseConv3d(4, 4, 2, indice_key="nope").double()(d)
    with pytest.raises(err):
        sp.SparseInverseConv3d(4, 4, 2, indice_key="d").double()(y)  # not the strided layer's output
    with pytest.raises(err):
        sp.SparseMaxPool3d(2, indice_key="d")(d)
    with pytest.raises(err):
        sp.SparseConv3d(4, 4, 7, 1).double()(y)  # output spatial shape reaches zero


# --- SparseConvTensor and containers ---------------------------------------------------------------------

def test_sparse_conv_tensor_api(rng):
    f, idx, shape, b = scene(rng, (4, 5, 6), 30, c=3)
    xe, xc = EMU.SparseConvTensor(f, idx, shape, b), CMP.SparseConvTensor(f, idx, shape, b)
    for cf in (True, False):
        assert torch.equal(xc.dense(cf), xe.dense(cf))
    assert xc.dense().shape == (2, 3, 4, 5, 6) and xc.spatial_size == 120
    dense = xc.dense(channels_first=False)
    ye, yc = EMU.SparseConvTensor.from_dense(dense), CMP.SparseConvTensor.from_dense(dense)
    assert torch.equal(yc.indices, ye.indices) and torch.equal(yc.features, ye.features)
    assert yc.spatial_shape == shape and yc.batch_size == 2 and sorted(map(tuple, yc.indices.tolist())) == \
        sorted(map(tuple, idx.tolist()))
    with pytest.raises(ValueError, match="replace_feature"):
        xc.features = f
    assert torch.equal((xc + xc).features, 2 * f) and torch.equal(xc.minus().features, -f)
    sel = xc.select_by_index(torch.arange(5))
    assert torch.equal(sel.indices, idx[:5]) and sel.indice_dict == {}
    assert xc.find_indice_pair(None) is None and xc.find_indice_pair("x") is None
    for bad in (dict(indices=idx.long()), dict(spatial_shape=[4, 5]), dict(batch_size=0)):
        args = dict(features=f, indices=idx, spatial_shape=shape, batch_size=b) | bad
        with pytest.raises(ValueError):
            CMP.SparseConvTensor(**args)
    dup = torch.cat([idx, idx[:1]])
    with pytest.raises(ValueError, match="unique"):
        CMP.SubMConv3d(3, 3, 3).double()(CMP.SparseConvTensor(torch.randn(len(dup), 3).double(), dup, shape, b))


def test_sparse_sequential(rng):
    """spconv modules get the tensor, other modules the features (skipped on an empty tensor); an
    ``OrderedDict`` names the children; same state-dict keys as spconv's."""
    def build(sp):
        return sp.SparseSequential(OrderedDict([
            ("conv", sp.SubMConv3d(3, 4, 3, bias=False, indice_key="a")), ("bn", nn.BatchNorm1d(4)),
            ("relu", nn.ReLU()), ("down", sp.SparseConv3d(4, 6, 3, 2, padding=1)), ("dense", sp.ToDense())]))
    data = scene(rng, (6, 6, 6), 70, c=3)
    for train in (True, False):
        run_both(build, data, train=train)
    assert list(build(CMP).state_dict()) == list(build(EMU).state_dict())
    empty = CMP.SparseConvTensor(torch.zeros(0, 3), torch.zeros(0, 4, dtype=torch.int32), [4, 4, 4], 1)
    out = CMP.SparseSequential(nn.Linear(5, 5))(empty)  # would fail on 3 channels: it is skipped
    assert out.features.shape == (0, 3)
    seq = CMP.SparseSequential(CMP.SparseReLU(), CMP.SparseIdentity(), a=CMP.SparseBatchNorm(3))
    assert len(seq) == 3 and isinstance(seq[-1], CMP.SparseBatchNorm)


def test_tables(rng):
    x = _x(rng)
    a, b = CMP.SubMConv3d(3, 2, 3).double(), CMP.SubMConv3d(3, 2, 3).double()
    both = CMP.ConcatTable().add(a).add(b)(x)
    assert torch.equal(CMP.JoinTable()(both).features, torch.cat([t.features for t in both], 1))
    assert torch.equal(CMP.AddTable()(both).features, both[0].features + both[1].features)


def test_unsupported_features_raise_not_implemented(monkeypatch):
    with pytest.raises(NotImplementedError, match="4D"):
        CMP.SparseConv4d(3, 3, 3)
    with pytest.raises(NotImplementedError, match="4D"):
        CMP.SparseMaxPool4d(2)
    with pytest.raises(NotImplementedError, match="groups"):
        CMP.SparseConv3d(4, 4, 3, groups=2)
    with pytest.raises(NotImplementedError, match="act_type"):
        CMP.SparseConvolution(3, 4, 4, act_type="Activation.ReLU")
    CMP.SparseConvolution(3, 4, 4, act_type="Activation.None_")
    with pytest.raises(NotImplementedError, match="benchmark"):
        CMP.SparseConvTensor(torch.zeros(1, 1), torch.zeros(1, 4, dtype=torch.int32), [1, 1, 1], 1, benchmark=True)
    with pytest.raises(AttributeError):  # as in spconv: PointToVoxel lives in spconv.pytorch.utils
        CMP.PointToVoxel
    # the submodules import (model code imports them to detect spconv 2); their names raise when used
    from sparsevox.compat.spconv import functional, ops, utils
    from sparsevox.compat.spconv.identity import Identity
    from sparsevox.compat.spconv.tables import AddTable, ConcatTable, JoinTable
    assert ops.ConvAlgo is CMP.ConvAlgo and Identity is CMP.Identity and AddTable is CMP.AddTable
    assert ConcatTable is CMP.ConcatTable and JoinTable is CMP.JoinTable
    assert utils.PointToVoxel and functional.sparse_add  # provided (tests/test_compat_extras.py)
    for module, name in ((ops, "get_indice_pairs"), (functional, "SparseConvFunction")):
        with pytest.raises(NotImplementedError, match=f"{name} is not supported by sparsevox.compat.spconv"):
            getattr(module, name)
    assert not hasattr(ops, "_fields") and not hasattr(functional, "no_such_name")  # other names: AttributeError
    assert ops.get_conv_output_size([8, 9, 7], [3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1]) == [4, 5, 4]
    assert ops.get_deconv_output_size([4, 5, 4], [3, 3, 3], [2, 2, 2], [1, 1, 1], [1, 1, 1], [1, 0, 1]) == [8, 9, 8]
    with pytest.raises(AttributeError):
        CMP.no_such_layer
    with pytest.raises(NotImplementedError, match="AddTableMisaligned"):
        CMP.AddTableMisaligned()
    layer = CMP.SubMConv3d(2, 2, 3)
    monkeypatch.setenv("SPCONV_SAVED_WEIGHT_LAYOUT", "RSKC")
    with pytest.raises(NotImplementedError, match="SPCONV_SAVED_WEIGHT_LAYOUT"):
        layer.load_state_dict(layer.state_dict())
    monkeypatch.setenv("SPCONV_SAVED_WEIGHT_LAYOUT", "KRSC")
    layer.load_state_dict(layer.state_dict())


def test_layer_attributes_and_state_dict_match_spconv():
    """Parameter names, shapes (KRSC) and the attributes models read."""
    for name, args in (("SubMConv3d", (3, 4, (3, 1, 5))), ("SparseConv3d", (3, 4, 2, 2)),
                       ("SparseConvTranspose3d", (3, 4, 3, 2)), ("SparseInverseConv3d", (3, 4, 2, "k")),
                       ("SubMConv2d", (3, 4, 3)), ("SparseConv1d", (3, 4, 3))):
        e, c = getattr(EMU, name)(*args), getattr(CMP, name)(*args)
        assert {k: v.shape for k, v in c.state_dict().items()} == {k: v.shape for k, v in e.state_dict().items()}
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "subm",
                     "transposed", "inverse", "indice_key", "conv1x1", "ndim"):
            assert getattr(c, attr) == getattr(e, attr), (name, attr)
    conv = CMP.SparseConv3d(16, 32, 3, 2, 1, record_voxel_count=True)
    assert conv.weight.shape == (32, 3, 3, 3, 16) and conv.weight_shape == [32, 3, 3, 3, 16]
    assert "max_num_voxels_during_training" in conv.state_dict()
    bound = 1 / math.sqrt(16 * 27)  # kaiming-uniform with a = sqrt(5): sqrt(3) * sqrt(2 / 6) / sqrt(fan_in)
    assert 0.95 * bound < conv.weight.abs().max().item() <= bound
    assert CMP.SparseMaxPool3d(3).stride == [3, 3, 3] and CMP.SparseMaxPool3d(3, 1).stride == [1, 1, 1]


def test_record_voxel_count(rng):
    x = _x(rng)
    conv = CMP.SparseConv3d(3, 2, 3, 2, 1, record_voxel_count=True).double()
    y = conv(x)
    assert conv.get_max_num_voxels().item() == y.indices.shape[0]
    del conv._buffers["max_num_voxels_during_training"]
    fresh = CMP.SparseConv3d(3, 2, 3, 2, 1, record_voxel_count=True).double()
    fresh.load_state_dict(conv.state_dict())  # a checkpoint without the buffer loads (spconv's hook)


# --- networks ---------------------------------------------------------------------------------------------

def second_middle_encoder(sp, c_in=4, widths=(8, 8, 16, 16, 16)):
    """The sparse middle encoder of SECOND / OpenPCDet's ``VoxelBackBone8x`` (indices (b, z, y, x)),
    narrowed: SubM stem, three strided stages (padding 1, 1, (0, 1, 1)) with SubM blocks, a (3, 1, 1)
    stride-(2, 1, 1) layer, then ``.dense()`` folded to a BEV map ``[B, C * D, H, W]``."""
    w0, w1, w2, w3, w4 = widths

    def block(ci, co, k, key, stride=1, padding=0, kind="subm"):
        conv = (sp.SubMConv3d(ci, co, k, bias=False, indice_key=key) if kind == "subm" else
                sp.SparseConv3d(ci, co, k, stride=stride, padding=padding, bias=False, indice_key=key))
        return sp.SparseSequential(conv, nn.BatchNorm1d(co, eps=1e-3, momentum=0.01), nn.ReLU())

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_input = sp.SparseSequential(sp.SubMConv3d(c_in, w0, 3, padding=1, bias=False, indice_key="subm1"),
                                                  nn.BatchNorm1d(w0, eps=1e-3, momentum=0.01), nn.ReLU())
            self.conv1 = sp.SparseSequential(block(w0, w0, 3, "subm1"))
            self.conv2 = sp.SparseSequential(block(w0, w1, 3, "spconv2", 2, 1, "spconv"), block(w1, w1, 3, "subm2"),
                                             block(w1, w1, 3, "subm2"))
            self.conv3 = sp.SparseSequential(block(w1, w2, 3, "spconv3", 2, 1, "spconv"), block(w2, w2, 3, "subm3"),
                                             block(w2, w2, 3, "subm3"))
            self.conv4 = sp.SparseSequential(block(w2, w3, 3, "spconv4", 2, (0, 1, 1), "spconv"),
                                             block(w3, w3, 3, "subm4"), block(w3, w3, 3, "subm4"))
            self.conv_out = sp.SparseSequential(
                sp.SparseConv3d(w3, w4, (3, 1, 1), stride=(2, 1, 1), padding=0, bias=False, indice_key="spconv_down2"),
                nn.BatchNorm1d(w4, eps=1e-3, momentum=0.01), nn.ReLU())

        def forward(self, x):
            x = self.conv_input(x)
            stages = [self.conv1(x)]
            for conv in (self.conv2, self.conv3, self.conv4):
                stages.append(conv(stages[-1]))
            out = self.conv_out(stages[-1])
            dense = out.dense()
            n, c, d, h, w = dense.shape
            return stages + [out, dense.view(n, c * d, h, w)]

    return Encoder()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_second_middle_encoder(rng, dtype, train):
    data = scene(rng, (41, 24, 20), 500, c=4)
    _, rc, geo = run_both(second_middle_encoder, data, dtype, train=train)
    assert rc["out5"].shape == (2, 16 * 2, 3, 3)
    assert [g[1] for g in geo] == [[41, 24, 20], [21, 12, 10], [11, 6, 5], [5, 3, 3], [2, 3, 3]]


SMALL = (8, 8, 8, 16, 16, 16, 8, 8, 8)


def _minkunet_data(rng, n=400, extent=12):
    from reference import random_voxels
    c = random_voxels(rng, n, extent=extent, batches=2).astype(np.int64)
    shift, shape = spm.spatial_frame(c)
    c[:, 1:] -= shift
    return torch.from_numpy(rng.standard_normal((len(c), 4))), torch.from_numpy(c.astype(np.int32)), shape, 2


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_minkunet_of_the_benchmark(rng, dtype, train):
    """``benchmarks/spconv_minkunet.py``'s network built with the compat module: the emulation's logits
    and gradients; and the logits of sparsevox's own MinkUNet with the converted weights."""
    data = _minkunet_data(rng)
    build = lambda sp: spm.build(sp, 4, 5, widths=SMALL, blocks=(1, 2, 1, 1, 1, 1, 2, 1))  # noqa: E731
    run_both(build, data, dtype, train=train)
    if dtype == torch.float64:
        from sparsevox.adapters.torch import MinkUNet
        torch.manual_seed(2)
        net = MinkUNet(4, 5, widths=SMALL, blocks=(1, 2, 1, 1, 1, 1, 2, 1)).double().train(train)
        compat = build(CMP).double().train(train)
        spm.load_from_sparsevox(compat, net)
        feats, idx, shape, b = data
        with torch.no_grad():
            ref = net(sv.Voxels(idx, feats))
            got = compat(CMP.SparseConvTensor(feats, idx, shape, b))
        assert rel_err(got.numpy(), ref.numpy()) < 1e-12


def test_state_dict_saved_from_spconv_modules_loads_and_reproduces(rng):
    """A checkpoint written by (emulated) spconv modules with ``torch.save`` loads strictly into the
    compat network and gives the same logits."""
    data = _minkunet_data(rng, n=300)
    torch.manual_seed(3)
    ref = spm.build(EMU, 4, 5, widths=SMALL, blocks=1).double().eval()
    for m in ref.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    buf.seek(0)
    net = spm.build(CMP, 4, 5, widths=SMALL, blocks=1).double().eval()
    assert net.load_state_dict(torch.load(buf)) is not None
    feats, idx, shape, b = data
    with torch.no_grad():
        want = ref(EMU.SparseConvTensor(feats, idx, shape, b))
        got = net(CMP.SparseConvTensor(feats, idx, shape, b))
    assert rel_err(got.numpy(), want.numpy()) < 1e-12


def _real_scan(voxel=0.5):
    d = pointcloud_dir()
    path = None if d is None else d / "kitti_test_000000.bin"
    if path is None or not path.exists():
        pytest.skip("real scan kitti_test_000000.bin not found (../shared/data/pointclouds/)")
    pts = np.fromfile(path, np.float32).reshape(-1, 4)
    v = sv.Voxels.from_points(pts[:, :3], voxel, features=pts)  # features: mean x, y, z, intensity
    return np.asarray(v.coords).astype(np.int64), np.asarray(v.feats, np.float64)


def test_real_scan_second_encoder_and_minkunet():
    """A KITTI scan (800 points, 0.5 m voxels) through the SECOND encoder (indices (b, z, y, x), the
    spatial shape OpenPCDet's 41-high grid) and the MinkUNet."""
    c, f = _real_scan()
    lo = c[:, 1:].min(0)
    zyx = np.concatenate([c[:, :1], (c[:, 1:] - lo)[:, ::-1]], 1)
    shape = [41] + [int(v) + 1 for v in zyx[:, 2:].max(0)]
    assert zyx[:, 1].max() < 41
    data = (torch.from_numpy(f), torch.from_numpy(zyx.astype(np.int32)), shape, 1)
    run_both(second_middle_encoder, data, torch.float64, what="SECOND on a KITTI scan")
    shift, fshape = spm.spatial_frame(c)
    data = (torch.from_numpy(f), torch.from_numpy((c - np.r_[0, shift]).astype(np.int32)), fshape, 1)
    run_both(lambda sp: spm.build(sp, 4, 5, widths=SMALL, blocks=1), data, torch.float64, what="MinkUNet on KITTI")


# --- the GPU: against the real spconv -------------------------------------------------------------------------

def _spconv():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device for torch")
    return pytest.importorskip("spconv.pytorch", reason="spconv not installed")


GPU_CASES = {
    "subm": lambda sp: Stack(sp.SubMConv3d(3, 8, 3, indice_key="s"), sp.SubMConv3d(8, 8, 3, indice_key="s"),
                             sp.SubMConv3d(8, 4, 1), sp.SubMConv3d(4, 4, 5, dilation=2)),
    "regular+inverse": lambda sp: Stack(sp.SparseConv3d(3, 8, 3, 2, 1, indice_key="d"), sp.SubMConv3d(8, 8, 3),
                                        sp.SparseInverseConv3d(8, 4, 3, indice_key="d")),
    "regular p0 + inverse": lambda sp: Stack(sp.SparseConv3d(3, 8, 2, 2, indice_key="d"),
                                             sp.SparseConv3d(8, 8, (3, 1, 3), (2, 1, 2), (0, 0, 1), indice_key="e"),
                                             sp.SparseInverseConv3d(8, 8, (3, 1, 3), indice_key="e"),
                                             sp.SparseInverseConv3d(8, 4, 2, indice_key="d")),
    "transposed": lambda sp: Stack(sp.SparseConvTranspose3d(3, 8, 3, 2, 1), sp.SparseConvTranspose3d(8, 4, 2, 2)),
    "max pool": lambda sp: Stack(sp.SparseMaxPool3d(3, 2, 1, indice_key="p"), sp.SparseInverseConv3d(3, 4, 3, "p")),
    "avg pool": lambda sp: Stack(sp.SparseAvgPool3d(2, indice_key="p"), sp.SparseInverseConv3d(3, 4, 2, "p")),
    "2d": lambda sp: Stack(sp.SubMConv2d(3, 8, 3), sp.SparseConv2d(8, 8, 3, 2, 1), sp.SparseMaxPool2d(2),
                           sp.ToDense()),
    "global": lambda sp: nn.Sequential(sp.SubMConv3d(3, 4, 3), sp.SparseGlobalMaxPool()),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_layers_against_spconv(rng, case):
    sp = _spconv()
    shape = (24, 20) if case == "2d" else (24, 20, 16)
    data = scene(rng, shape, 2000, c=3, dtype=torch.float32)
    # spconv's avg-pool backward multiplies by the count (see adapters/compat/spconv/pool.py): forward only
    run_both(GPU_CASES[case], data, torch.float32, ref=sp, device="cuda", tol=1e-5, grads=case != "avg pool",
             what=case)


@pytest.mark.gpu
def test_gpu_networks_against_spconv(rng):
    """The SECOND encoder and the MinkUNet on a LiDAR-sized scene, in evaluation mode (BatchNorm on running
    statistics: float32 training-mode BatchNorm on tiny coarse levels amplifies rounding beyond any fixed
    tolerance, see :func:`run_both`)."""
    sp = _spconv()
    data = scene(rng, (41, 160, 140), 20000, c=4, dtype=torch.float32)
    # forward only: spconv's evaluation-mode convolutions skip autograd (its inputs get no gradient)
    run_both(second_middle_encoder, data, torch.float32, train=False, grads=False, ref=sp, device="cuda", tol=1e-5,
             what="SECOND")
    data = _minkunet_data(rng, n=20000, extent=60)
    run_both(lambda s: spm.build(s, 4, 5, widths=SMALL, blocks=1), data, torch.float32, train=False, grads=False,
             ref=sp, device="cuda", tol=1e-5, what="MinkUNet")


# --- the CPU: against the real spconv (its CPU build: `pip install spconv==2.3.8`, as CI installs it) -------
# spconv's CPU build runs the convolutions' and max pooling's forward, and max pooling's backward; its
# convolution backward and average pooling call CUDA, and global pooling is not implemented there.

def _spconv_cpu():
    return spconv_cpu_build()


CPU_CASES = [c for c in GPU_CASES if c not in ("avg pool", "global")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CPU_CASES)
def test_layers_against_the_real_spconv_on_the_cpu(rng, case, dtype):
    """The GPU test's layer stacks against spconv 2.3.8 itself on the CPU, forward: coordinate sets
    identical, outputs equal within rounding."""
    sp = _spconv_cpu()
    shape = (12, 10) if case == "2d" else (12, 10, 8)
    data = scene(rng, shape, 300, c=3, dtype=dtype)
    run_both(GPU_CASES[case], data, dtype, ref=sp, device="cpu", tol=1e-5 if dtype == torch.float32 else 1e-12,
             grads=False, what=case, ref64=False)


@pytest.mark.parametrize("net", ["SECOND", "MinkUNet"])
def test_networks_against_the_real_spconv_on_the_cpu(rng, net):
    """The SECOND encoder and the benchmark's MinkUNet, the same model code under spconv 2.3.8 and compat,
    one state dict, evaluation mode, float64: identical coordinate sets, outputs within float64 rounding."""
    sp = _spconv_cpu()
    if net == "SECOND":
        run_both(second_middle_encoder, scene(rng, (41, 48, 40), 2000, c=4), torch.float64, train=False,
                 grads=False, ref=sp, tol=1e-12, what=net)
    else:
        run_both(lambda s: spm.build(s, 4, 5, widths=SMALL, blocks=1), _minkunet_data(rng, n=1500, extent=20),
                 torch.float64, train=False, grads=False, ref=sp, tol=1e-12, what=net)
