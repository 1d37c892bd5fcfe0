"""sparsevox.compat.spconv's argument checks: the layers refuse bad sizes when they are made, by name
(spconv 2.3.8 lets 0 through to a ZeroDivisionError, -1 to a negative dimension, 3.7 to a truncated 3), and
``SparseConvTensor.dense()`` refuses indices outside its grid (was a raw IndexError, or a silent wrap round
for a negative index); everything spconv accepts and computes meaningfully still works, as spconv's: negative
padding and output_padding (they crop), ``stride=None`` pools, integral floats such as ``(3.0, 3, 3)``."""
import numpy as np
import pytest
from conftest import spconv_cpu_build

torch = pytest.importorskip("torch", reason="torch not installed")
import sparsevox.compat.spconv as CMP  # noqa: E402

NDS = (1, 2, 3)  # (4D layers raise NotImplementedError in compat: sparsevox is a 3D library)
CONVS = [f"{kind}{nd}d" for nd in NDS for kind in ("SubMConv", "SparseConv", "SparseConvTranspose",
                                                   "SparseInverseConv")]
STRIDED = [n for n in CONVS if "Inverse" not in n]  # the convolutions that take stride, padding and dilation
POOLS = [f"Sparse{kind}Pool{nd}d" for nd in NDS for kind in ("Max", "Avg")]


def nd_of(name: str) -> int:
    return int(name[-2])


def conv(name, in_channels=3, out_channels=4, kernel_size=3, **kw):
    if "Inverse" in name:
        kw.setdefault("indice_key", "k")
    return getattr(CMP, name)(in_channels, out_channels, kernel_size, **kw)


def pool(name, kernel_size=2, **kw):
    return getattr(CMP, name)(kernel_size, **kw)


def bad_sizes(nd, low):
    """Values of a size argument that must be refused: below ``low`` (as one int and on one axis),
    fractional, the wrong number of axes, not numbers."""
    return [low - 1, -3, 2.5, (low - 1,) + (3,) * (nd - 1), (3.7,) + (3,) * (nd - 1), (3,) * (nd + 1), "3", None,
            True]


def cases(names, low):
    return [(n, v) for n in names for v in bad_sizes(nd_of(n), low)]


# --- the audit's cases ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, match", [
    (lambda: CMP.SubMConv3d(3, 4, 0), "kernel_size must be >= 1 per axis, got 0"),  # was ZeroDivisionError
    (lambda: CMP.SubMConv3d(3, 4, -1), "kernel_size must be >= 1"),  # was RuntimeError (negative dimension)
    (lambda: CMP.SparseConv3d(0, 4, 3), "in_channels must be an integer >= 1, got 0"),  # was ZeroDivisionError
    (lambda: CMP.SparseConv3d(3, 4, 3, stride=0), "stride must be >= 1"),  # was ZeroDivisionError in forward
    (lambda: CMP.SparseMaxPool3d(0), "kernel_size must be >= 1"),  # was ZeroDivisionError in forward
    (lambda: CMP.SparseConv3d(3, 4, (3.7, 3, 3)), r"kernel_size must be an integer >= 1 or 3 such integers"),
    (lambda: CMP.SparseConv3d(2.5, 4, 3), "in_channels must be an integer >= 1, got 2.5"),  # was truncated to 2
])
def test_the_audits_cases_raise_a_value_error_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# --- constructors, over every layer class -----------------------------------------------------------------

@pytest.mark.parametrize("arg", ["in_channels", "out_channels"])
@pytest.mark.parametrize("bad", [0, -1, 2.5, "4", None, False])
@pytest.mark.parametrize("name", CONVS)
def test_channels_must_be_integers_of_at_least_one(name, arg, bad):
    with pytest.raises(ValueError, match=f"{arg} must be an integer >= 1, got {bad!r}"):
        conv(name, **{arg: bad})


@pytest.mark.parametrize("name, bad", cases(CONVS + POOLS, 1), ids=str)
def test_kernel_size_must_be_integers_of_at_least_one_per_axis(name, bad):
    with pytest.raises(ValueError, match="kernel_size must be"):
        (conv if name in CONVS else pool)(name, kernel_size=bad)


@pytest.mark.parametrize("name, arg, bad", [  # (a pool's stride None is its kernel size: tested below)
    (n, arg, v) for arg in ("stride", "dilation") for n, v in cases(STRIDED + POOLS, 1)
    if not (arg == "stride" and v is None and n in POOLS)], ids=str)
def test_stride_and_dilation_must_be_integers_of_at_least_one_per_axis(name, arg, bad):
    """SubM layers too: spconv ignores their stride, but a stride of 0 is a mistake there as well."""
    with pytest.raises(ValueError, match=f"{arg} must be"):
        (conv if name in CONVS else pool)(name, **{arg: bad})


@pytest.mark.parametrize("name", STRIDED + POOLS)
def test_padding_takes_any_integer_but_no_fraction(name):
    """Negative padding crops in spconv (its output size and pairs; compared with spconv below), so it is
    accepted; fractions are refused, not truncated."""
    nd, make = nd_of(name), conv if name in CONVS else pool
    assert make(name, padding=-1).padding == [-1] * nd
    assert make(name, padding=(2,) + (-1,) * (nd - 1)).padding == [2] + [-1] * (nd - 1)
    for bad in (0.5, (1.5,) + (0,) * (nd - 1), (0,) * (nd + 1), "1", None):
        with pytest.raises(ValueError, match=f"padding must be an integer or {nd} such integers"):
            make(name, padding=bad)


@pytest.mark.parametrize("nd", NDS)
def test_output_padding_takes_any_integer_but_no_fraction(nd):
    make = lambda op: CMP.SparseConvolution(nd, 3, 4, 3, 2, output_padding=op, transposed=True)  # noqa: E731
    assert make(-1).output_padding == [-1] * nd and make(3).output_padding == [3] * nd
    for bad in (0.5, (1,) * (nd + 1), "1"):
        with pytest.raises(ValueError, match="output_padding must be"):
            make(bad)


def test_pool_stride_none_is_the_kernel_size():
    assert CMP.SparseMaxPool3d((2, 3, 1)).stride == [2, 3, 1]
    assert CMP.SparseAvgPool2d(3, None).stride == [3, 3]
    assert CMP.SparseMaxPool(3, (1, 2, 3), None).stride == [1, 2, 3]


def test_integer_values_of_other_types_are_accepted():
    """NumPy and torch integers, NumPy arrays, and integral floats inside a sequence (spconv's ``int(v)``
    takes ``(3.0, 3, 3)``)."""
    layer = CMP.SparseConv3d(np.int64(3), torch.tensor(4), np.array([3, 1, 3]), (2.0, 1, 2), padding=(1.0, 0, 1))
    assert (layer.in_channels, layer.out_channels) == (3, 4) and type(layer.in_channels) is int
    assert layer.kernel_size == [3, 1, 3] and layer.stride == [2, 1, 2] and layer.padding == [1, 0, 1]
    assert all(type(v) is int for v in layer.kernel_size + layer.stride + layer.padding)
    assert CMP.SparseMaxPool2d(np.array([2, 2]), dilation=np.int32(1)).kernel_size == [2, 2]


# configurations the spconv comparison tests (tests/test_compat_spconv.py) build: each must still construct,
# with spconv's normalised sizes where spconv is installed
SPCONV_TEST_LAYERS = [
    *[("SubMConv3d", (3, 4, k), {"dilation": d}) for k, d in [(3, 1), ((3, 1, 5), 1), (3, 2), (5, 1), (1, 1), (2, 1)]],
    *[(cls, (3, 4, k, s, p, d), {}) for cls in ("SparseConv3d", "SparseConvTranspose3d") for k, s, p, d in [
        (2, 2, 0, 1), (3, 2, 1, 1), (3, 2, 0, 1), (3, 1, 1, 1), (3, 1, 0, 2), (1, 2, 0, 1), (4, 3, 2, 1),
        ((3, 1, 2), (2, 1, 2), (0, 1, 1), (1, 1, 2)), (3, (2, 2, 1), (0, 1, 1), 1), (5, 2, 2, 2),  # REGULAR
        (3, 2, 0, 2), ((2, 3, 1), (2, 1, 1), 0, 1), (4, 2, 1, 1), (3, 1, 0, 1)]],  # test_transposed
    *[(cls, (k, s, p, d), {}) for cls in ("SparseMaxPool3d", "SparseAvgPool3d") for k, s, p, d in [
        (2, None, 0, 1), (3, 2, 1, 1), (3, 1, 1, 1), (3, 2, 0, 2), ((1, 2, 3), 2, 0, 1), (2, 1, 0, 1)]],
    *[("SparseInverseConv3d", (4, 2, k, "d"), {}) for k in (1, 2, 3, (3, 1, 2), (3, 1, 3), 5)],
    *[("SparseConv3d", (3, 4, k, k), {}) for k in (2, 3, 4, 5)],
    ("SubMConv3d", (16, 16, 3), {"padding": 1, "bias": False, "indice_key": "subm1"}),  # SECOND
    ("SparseConv3d", (64, 128, (3, 1, 1)), {"stride": (2, 1, 1), "padding": 0, "bias": False}),
    ("SubMConv3d", (5, 3, 1), {"stride": 2}), ("SparseConv3d", (4, 5, 1), {"bias": False}),  # 1x1 layers
    ("SubMConv2d", (3, 4, (3, 1)), {}), ("SparseConv2d", (4, 4, 3, 2, 1), {}), ("SparseMaxPool2d", (2,), {}),
    ("SparseAvgPool2d", (3, 1, 1), {}), ("SparseConvTranspose2d", (3, 2, 3, 2, 1), {}),
    ("SparseInverseConv2d", (4, 3, 3), {"indice_key": "d"}),
    ("SubMConv1d", (2, 3, 3), {}), ("SparseConv1d", (3, 3, 3, 2, 1), {}), ("SparseInverseConv1d", (3, 2, 3, "d"), {}),
]


@pytest.mark.parametrize("name, args, kw", SPCONV_TEST_LAYERS, ids=str)
def test_every_configuration_of_the_spconv_tests_still_constructs(name, args, kw):
    layer = getattr(CMP, name)(*args, **kw)
    try:
        import spconv.pytorch as SP
    except ImportError:
        return
    ref = getattr(SP, name)(*args, **kw)
    for attr in ("kernel_size", "stride", "padding", "dilation", "in_channels", "out_channels"):
        assert getattr(layer, attr, None) == getattr(ref, attr, None), attr


# --- negative padding and output_padding as spconv computes them ----------------------------------------------

def _scene(seed=0, shape=(7, 6, 8), n=60):
    rng = np.random.default_rng(seed)
    flat = rng.choice(2 * int(np.prod(shape)), n, replace=False)
    b, rest = np.divmod(flat, int(np.prod(shape)))
    idx = torch.from_numpy(np.stack([b, *np.unravel_index(rest, shape)], 1).astype(np.int32))
    return torch.from_numpy(rng.standard_normal((n, 3))), idx, list(shape)


@pytest.mark.parametrize("make", [
    lambda sp, SC: sp.SparseConv3d(3, 4, 3, 1, -1), lambda sp, SC: sp.SparseConv3d(3, 4, 3, 2, (-1, 0, 1)),
    lambda sp, SC: sp.SparseMaxPool3d(3, 1, -1), lambda sp, SC: sp.SparseConvTranspose3d(3, 4, 3, 2, -1),
    lambda sp, SC: SC(3, 3, 4, 3, 2, output_padding=-1, transposed=True),
    lambda sp, SC: SC(3, 3, 4, 3, 2, 1, output_padding=(3, 0, 1), transposed=True),
], ids=["conv p-1", "conv s2 p(-1,0,1)", "max pool p-1", "transposed p-1", "transposed op-1", "transposed op(3,0,1)"])
@pytest.mark.usefixtures("one_thread")  # (spconv's CPU build races with several torch threads: rows off by 0.3)
def test_negative_padding_and_any_output_padding_compute_what_spconv_does(make):
    SP = spconv_cpu_build()
    from spconv.pytorch.conv import SparseConvolution
    feats, idx, shape = _scene()
    ref_layer, layer = make(SP, SparseConvolution).double(), make(CMP, CMP.SparseConvolution).double()
    layer.load_state_dict(ref_layer.state_dict())
    ref, got = ref_layer(SP.SparseConvTensor(feats, idx, shape, 2)), layer(CMP.SparseConvTensor(feats, idx, shape, 2))
    assert got.spatial_shape == ref.spatial_shape
    order = [torch.from_numpy(np.lexsort(t.indices.numpy().T[::-1]).copy()) for t in (ref, got)]
    assert torch.equal(ref.indices[order[0]], got.indices[order[1]])
    assert torch.allclose(ref.features[order[0]], got.features[order[1]], rtol=1e-12, atol=1e-12)


# --- dense() --------------------------------------------------------------------------------------------------

def _tensor(rows, shape, batch_size=2):
    idx = torch.tensor(rows, dtype=torch.int32)
    return CMP.SparseConvTensor(torch.ones(len(rows), 2), idx, shape, batch_size)


@pytest.mark.parametrize("rows, shape", [
    ([[0, 1, 1, 1], [1, 4, 0, 0]], [4, 3, 3]),  # x = spatial_shape[0] (was an IndexError)
    ([[0, 1, 1, 1], [0, 0, 3, 0]], [4, 3, 3]),
    ([[0, 1, 1, 1], [2, 0, 0, 0]], [4, 3, 3]),  # batch index = batch_size (was an IndexError)
    ([[0, 1, -1, 1]], [4, 3, 3]),  # negative: torch wrapped it round to y = 2, silently
    ([[-1, 1, 1, 1]], [4, 3, 3]),
    ([[0, 1, 5]], [4, 5]), ([[1, 7]], [7]),
], ids=str)
def test_dense_refuses_indices_outside_the_grid_by_name(rows, shape):
    with pytest.raises(ValueError, match=r"indices must lie in \[0, batch_size\).*\[0, spatial_shape\)"):
        _tensor(rows, shape).dense()


def test_dense_at_the_edges_of_the_grid_and_without_sites():
    d = _tensor([[0, 0, 0, 0], [1, 3, 2, 2]], [4, 3, 3]).dense()
    assert d.shape == (2, 2, 4, 3, 3) and d[1, :, 3, 2, 2].tolist() == [1, 1] and d.sum() == 4
    empty = CMP.SparseConvTensor(torch.zeros(0, 2), torch.zeros(0, 4, dtype=torch.int32), [4, 3, 3], 2)
    assert empty.dense(channels_first=False).shape == (2, 4, 3, 3, 2) and not empty.dense().any()


def test_dense_keeps_one_row_of_a_duplicate_site_as_spconv_and_says_so():
    x = CMP.SparseConvTensor(torch.tensor([[1.0, 2.0], [10.0, 20.0]]),
                             torch.tensor([[0, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.int32), [3, 3, 3], 1)
    got = x.dense()[0, :, 1, 1, 1].tolist()
    assert got in ([1.0, 2.0], [10.0, 20.0])  # one of the rows, not their sum (spconv's scatter)
    assert "Duplicate sites are not checked" in " ".join(CMP.SparseConvTensor.dense.__doc__.split())
