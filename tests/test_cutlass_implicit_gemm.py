"""CUTLASS_IMPLICIT_GEMM: availability rules and the built library (CPU); every kind x dtype x direction
x parameter set against the float64 dense oracle (GPU).

GPU tests need ``sparsevox/_lib/libsparsevox_cutlass.so`` (``python -m sparsevox build-cutlass``); without
it they skip with "no CUTLASS library". The outputs of this algorithm are float32 buffers it zeroes
itself (offsets accumulate into them), so there is no caller buffer to poison; rows without pairs are
checked to come out exactly zero instead.
"""
import ctypes

import numpy as np
import pytest
from gpu_cases import host, np_dtype, quantised_case, to_gpu
from reference import TOL, dense_conv, dense_conv_grads, random_voxels, rel_err

import sparsevox as sv
from sparsevox.cuda import cutlass_lib
from sparsevox.algorithms import cutlass_implicit_gemm as cig
from sparsevox.errors import AlgorithmUnavailableError
from sparsevox.tuning.problem import Problem
from sparsevox.testing import KINDS

NO_LIBRARY = "no CUTLASS library (run `python -m sparsevox build-cutlass`)"
needs_library = pytest.mark.skipif(not cutlass_lib.available()[0], reason=NO_LIBRARY)

# dtype under test -> (array dtype, TF32 switch)
DTYPES = {"float16": ("float16", False), "bfloat16": ("bfloat16", False), "tf32": ("float32", True)}
TOLS = {"float16": TOL["float16"], "bfloat16": TOL["bfloat16"], "tf32": 5e-3}


def _problem(device="gpu", dtype="float16", tf32=False, c_in=16, c_out=16, direction="fwd"):
    return Problem("conv", direction, device, dtype, 1000, 1000, c_in, c_out, 27, (1, 1, 1), "submanifold",
                   "", tf32)


@pytest.fixture
def missing_library(monkeypatch, tmp_path):
    path = tmp_path / "libsparsevox_cutlass.so"
    monkeypatch.setenv(cutlass_lib.ENV_VAR, str(path))
    cutlass_lib.reset()
    yield path
    cutlass_lib.reset()  # the next lookup sees the restored environment


# ---------------------------------------------------------------- CPU: availability and parameters

def test_reason_says_how_to_build_when_library_missing(missing_library):
    ok, why = cutlass_lib.available()
    assert not ok and "python -m sparsevox build-cutlass" in why and str(missing_library) in why
    ok, why = cig._available(_problem())
    assert not ok and "build-cutlass" in why


def test_asking_for_it_alone_is_an_error_naming_the_reason(missing_library):
    from sparsevox.conv import select
    with pytest.raises(AlgorithmUnavailableError, match="build-cutlass"):
        select(_problem(), "cutlass_implicit_gemm", lambda a, p: None)


def test_cpu_arrays_are_refused_clearly(rng):
    v = sv.Voxels(random_voxels(rng, 50), rng.standard_normal((50, 8)).astype(np.float32))
    w = rng.standard_normal((27, 8, 8)).astype(np.float32)
    with pytest.raises(AlgorithmUnavailableError, match="cutlass_implicit_gemm.*GPU"):
        sv.spatially_sparse_conv(v, w, fwd_algo=sv.SPARSE_CONV_FWD_ALGO_MODE.CUTLASS_IMPLICIT_GEMM)


@pytest.mark.parametrize("dtype,tf32,expect", [
    ("float32", False, "TF32"),  # never a silent cast to float16
    ("float64", False, "not supported"),
    ("float64", True, "not supported"),
])
def test_dtype_rules(dtype, tf32, expect):
    ok, why = cig._available(_problem(dtype=dtype, tf32=tf32))
    assert not ok and expect in why


def test_not_for_depthwise_or_cpu():
    assert not cig._available(_problem(device="cpu"))[0]
    p = Problem("depthwise", "fwd", "gpu", "float16", 10, 10, 8, 8, 27, (1, 1, 1), "submanifold")
    assert not cig._available(p)[0]


@pytest.mark.parametrize("direction", ["fwd", "dgrad", "wgrad"])
@pytest.mark.parametrize("c_in,c_out", [(3, 5), (16, 32), (64, 128), (128, 128), (256, 64), (512, 512)])
def test_params_are_few_and_valid(direction, c_in, c_out):
    ps = cig._params(direction, _problem(c_in=c_in, c_out=c_out, direction=direction))
    assert 1 <= len(ps) <= 8 and len({tuple(sorted(p.items())) for p in ps}) == len(ps)
    for p in ps:
        assert p["mma_tile"] in cig.TILE_SHAPES and p["split_k_slices"] in cig.SPLIT_K


@needs_library
def test_built_library_loads_and_validates_arguments():
    """Runs without a GPU: argument checks come before any CUDA call."""
    lib, _ = cutlass_lib._load()
    offsets = np.array([0, 0], np.int64)
    ptr = offsets.ctypes.data_as(ctypes.POINTER(ctypes.c_int64))
    for (dtype, tile, split), msg in [((0, 4, 1), "mma_tile"), ((0, 0, 0), "split_k_slices"),
                                      ((3, 0, 1), "dtype")]:
        status = lib.sparsevox_cutlass_forward(dtype, tile, split, 0, 0, 0, 8, 8, 0, 0, ptr, 1, 0, 0)
        assert status == 1 and msg in cutlass_lib.last_error()
    bad = np.array([0, 5, 3], np.int64)
    status = lib.sparsevox_cutlass_wgrad(1, 0, 1, 0, 0, 0, 8, 8, 0, 0,
                                         bad.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)), 2, 0, 0)
    assert status == 1 and "non-decreasing" in cutlass_lib.last_error()


# ---------------------------------------------------------------- GPU: against the dense oracle

def _case(rng, kind, c_in, c_out, dtype, n=400, extent=10, ks=3):
    """:func:`gpu_cases.quantised_case` plus a quantised grad_out and the oracle's results.

    TF32 inputs stay float32 (``dtype`` "float32"): the rounding to TF32 is the kernel's."""
    case = quantised_case(rng, kind, c_in, c_out, dtype, n, extent, ks)
    g = rng.standard_normal((case["kmap"].num_out, c_out)).astype(np_dtype(dtype)).astype(np.float64)
    geo = (case["ks"], case["s"], 1, case["tr"], case["out_coords"])
    ref = dense_conv(case["coords"], case["feats"], case["weight"], *geo)
    rgf, rgw = dense_conv_grads(case["coords"], case["feats"], case["weight"], g, *geo)
    return dict(kmap=case["kmap"], x=case["x"], w=case["w"], g=to_gpu(g, dtype), ref=ref, rgf=rgf, rgw=rgw,
                problem=dict(c_in=c_in, c_out=c_out))


def _run(case, direction, params):
    kmap = case["kmap"]
    if direction == "fwd":
        return cig.forward(case["x"], case["w"], kmap, **params), case["ref"]
    if direction == "dgrad":
        return cig.dgrad(case["g"], case["w"], kmap, **params), case["rgf"]
    return cig.wgrad(case["x"], case["g"], kmap, kmap.num_offsets, **params), case["rgw"]


def _check_every_param(case, label, direction):
    dtype, tf32 = DTYPES[label]
    problem = _problem(dtype=dtype, tf32=tf32, direction=direction, **case["problem"])
    ok, why = cig._available(problem)
    assert ok, why
    for params in cig._params(direction, problem):
        got, ref = _run(case, direction, params)
        assert got.dtype.name == dtype and tuple(got.shape) == ref.shape
        err = rel_err(host(got), ref)
        assert err < TOLS[label], f"{direction} {params}: rel err {err:.3g}"
        if direction != "wgrad":  # rows no pair reaches are exactly zero
            idle = np.abs(ref).sum(axis=1) == 0
            assert np.all(host(got)[idle] == 0), f"{direction} {params}: rows without pairs are not zero"


@pytest.mark.parametrize("direction", ["fwd", "dgrad", "wgrad"])
@pytest.mark.parametrize("label", list(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.gpu
@needs_library
def test_matches_dense_oracle(rng, kind, label, direction):
    case = _case(rng, kind, 16, 24, DTYPES[label][0])
    _check_every_param(case, label, direction)


@pytest.mark.parametrize("c_in,c_out", [(3, 5), (130, 36)])  # padded channels; split-K over 136 channels
@pytest.mark.parametrize("label", list(DTYPES))
@pytest.mark.gpu
@needs_library
def test_padded_channels_and_split_k(rng, c_in, c_out, label):
    case = _case(rng, "strided", c_in, c_out, DTYPES[label][0], n=300, extent=8)
    for direction in ("fwd", "dgrad", "wgrad"):
        _check_every_param(case, label, direction)


@pytest.mark.gpu
@needs_library
def test_public_api_and_tf32_opt_in(rng):
    import cupy
    algo = sv.SPARSE_CONV_FWD_ALGO_MODE.CUTLASS_IMPLICIT_GEMM
    coords = random_voxels(rng, 500, extent=12, batches=2)
    feats = rng.standard_normal((len(coords), 16)).astype(np.float32)
    weight = (rng.standard_normal((27, 16, 8)) / 8).astype(np.float32)
    ref = dense_conv(coords, feats, weight, 3, 1, 1, False, coords)

    v16 = sv.Voxels(cupy.asarray(coords), cupy.asarray(feats).astype(cupy.float16))
    out = sv.spatially_sparse_conv(v16, cupy.asarray(weight).astype(cupy.float16), fwd_algo=algo)
    assert out.feats.dtype == cupy.float16
    assert rel_err(host(out.feats), dense_conv(coords, feats.astype(np.float16), weight.astype(np.float16),
                                               3, 1, 1, False, coords)) < TOL["float16"]

    v32 = sv.Voxels(cupy.asarray(coords), cupy.asarray(feats))
    w32 = cupy.asarray(weight)
    previous = sv.allow_tf32()
    try:
        sv.allow_tf32(False)
        with pytest.raises(AlgorithmUnavailableError, match="TF32"):
            sv.spatially_sparse_conv(v32, w32, fwd_algo=algo)
        sv.allow_tf32(True)
        out = sv.spatially_sparse_conv(v32, w32, fwd_algo=algo)
        assert out.feats.dtype == cupy.float32 and rel_err(host(out.feats), ref) < TOLS["tf32"]
        kmap = sv.kernel_map(v32, 3)
        g = cupy.asarray(rng.standard_normal((len(coords), 8)).astype(np.float32))
        gf, gw = sv.conv_backward(g, v32.feats, w32, kmap, bwd_algo="cutlass_implicit_gemm")
        rgf, rgw = dense_conv_grads(coords, feats, weight, g.get(), 3, 1, 1, False, coords)
        assert rel_err(host(gf), rgf) < TOLS["tf32"] and rel_err(host(gw), rgw) < TOLS["tf32"]
    finally:
        sv.allow_tf32(previous)


@pytest.mark.gpu
@needs_library
def test_runs_on_the_callers_stream(rng):
    import cupy
    case = _case(rng, "submanifold", 32, 32, "float16", n=2000, extent=16)
    cupy.cuda.Device().synchronize()  # the inputs were made on the legacy stream, which ours does not wait for
    with cupy.cuda.Stream(non_blocking=True) as stream:
        out = cig.forward(case["x"], case["w"], case["kmap"], mma_tile=3, split_k_slices=1)
        gw = cig.wgrad(case["x"], case["g"], case["kmap"], case["kmap"].num_offsets, mma_tile=3, split_k_slices=8)
        stream.synchronize()
    assert rel_err(host(out), case["ref"]) < TOL["float16"]
    assert rel_err(host(gw), case["rgw"]) < TOL["float16"]
