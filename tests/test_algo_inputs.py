"""Algorithm inputs: every example of the reference guide, environment precedence, and errors."""
import numpy as np
import pytest
from reference import random_voxels

import sparsevox as sv
from sparsevox import (SPARSE_CONV_BWD_ALGO_MODE, SPARSE_CONV_FWD_ALGO_MODE, SPARSE_DEPTHWISE_CONV_BWD_ALGO_MODE,
                       SPARSE_DEPTHWISE_CONV_FWD_ALGO_MODE)
from sparsevox.tuning.algo_inputs import resolve_algos

ALL_CONV = ("explicit_gemm", "implicit_gemm", "cutlass_implicit_gemm")
ENV_VARS = [f"{p}_{s}" for p in ("SPARSEVOX", "WARPCONVNET")
            for s in ("FWD_ALGO_MODE", "BWD_ALGO_MODE", "DEPTHWISE_CONV_FWD_ALGO_MODE", "DEPTHWISE_CONV_BWD_ALGO_MODE")]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for v in ENV_VARS:
        monkeypatch.delenv(v, raising=False)


@pytest.mark.parametrize("value,expected,explicit", [
    (SPARSE_CONV_FWD_ALGO_MODE.IMPLICIT_GEMM, ("implicit_gemm",), True),
    ([SPARSE_CONV_FWD_ALGO_MODE.IMPLICIT_GEMM, SPARSE_CONV_FWD_ALGO_MODE.CUTLASS_IMPLICIT_GEMM],
     ("implicit_gemm", "cutlass_implicit_gemm"), True),
    (SPARSE_CONV_FWD_ALGO_MODE.AUTO, ALL_CONV, False),
    ("implicit_gemm", ("implicit_gemm",), True),
    (["implicit_gemm", "cutlass_implicit_gemm"], ("implicit_gemm", "cutlass_implicit_gemm"), True),
    ([SPARSE_CONV_FWD_ALGO_MODE.IMPLICIT_GEMM, "cutlass_implicit_gemm"], ("implicit_gemm", "cutlass_implicit_gemm"), True),
    ("EXPLICIT_GEMM", ("explicit_gemm",), True),
    ("explicit", ("explicit_gemm",), True),
    (["explicit_gemm", "auto"], ALL_CONV, False),
    (None, ALL_CONV, False),
])
def test_guide_inputs_resolve(value, expected, explicit):
    assert resolve_algos(value, "conv", "fwd") == (expected, explicit)


def test_bwd_enum_accepted_for_bwd():
    assert resolve_algos([SPARSE_CONV_BWD_ALGO_MODE.IMPLICIT_GEMM, "cutlass_implicit_gemm"], "conv", "bwd")[0] == \
        ("implicit_gemm", "cutlass_implicit_gemm")


def test_depthwise_inputs_and_guide_alias():
    assert resolve_algos([SPARSE_DEPTHWISE_CONV_FWD_ALGO_MODE.EXPLICIT, SPARSE_DEPTHWISE_CONV_FWD_ALGO_MODE.IMPLICIT],
                         "depthwise", "fwd")[0] == ("explicit", "implicit")
    assert resolve_algos(SPARSE_DEPTHWISE_CONV_BWD_ALGO_MODE.AUTO, "depthwise", "bwd") == (("explicit", "implicit"), False)
    # the guide's troubleshooting section spells depthwise algorithms explicit_gemm/implicit_gemm
    assert resolve_algos("[explicit_gemm,implicit_gemm]".strip("[]").split(","), "depthwise", "fwd")[0] == \
        ("explicit", "implicit")


@pytest.mark.parametrize("env,expected", [
    ("implicit_gemm", ("implicit_gemm",)),
    ("[implicit_gemm,cutlass_implicit_gemm]", ("implicit_gemm", "cutlass_implicit_gemm")),
    ("auto", ALL_CONV),
    (" [ explicit_gemm , implicit_gemm ] ", ("explicit_gemm", "implicit_gemm")),
])
def test_environment_values(monkeypatch, env, expected):
    monkeypatch.setenv("WARPCONVNET_FWD_ALGO_MODE", env)
    assert resolve_algos(None, "conv", "fwd")[0] == expected


def test_sparsevox_env_wins_over_warpconvnet(monkeypatch):
    monkeypatch.setenv("WARPCONVNET_FWD_ALGO_MODE", "implicit_gemm")
    monkeypatch.setenv("SPARSEVOX_FWD_ALGO_MODE", "explicit_gemm")
    assert resolve_algos(None, "conv", "fwd") == (("explicit_gemm",), True)
    monkeypatch.setenv("SPARSEVOX_DEPTHWISE_CONV_BWD_ALGO_MODE", "[explicit]")
    assert resolve_algos(None, "depthwise", "bwd") == (("explicit",), True)


def test_explicit_argument_beats_environment(monkeypatch):
    monkeypatch.setenv("SPARSEVOX_FWD_ALGO_MODE", "nonsense")
    assert resolve_algos("explicit_gemm", "conv", "fwd") == (("explicit_gemm",), True)


@pytest.mark.parametrize("bad", ["implicitgemm", "gemm", ["explicit_gemm", "bogus"], 3, []])
def test_unknown_names_list_the_valid_ones(bad):
    with pytest.raises(ValueError) as e:
        resolve_algos(bad, "conv", "fwd")
    if bad != []:
        assert "explicit_gemm" in str(e.value) and "cutlass_implicit_gemm" in str(e.value)


def test_bad_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("SPARSEVOX_BWD_ALGO_MODE", "[implicit_gemm,fast]")
    with pytest.raises(ValueError, match="SPARSEVOX_BWD_ALGO_MODE"):
        resolve_algos(None, "conv", "bwd")


def _layer(rng):
    v = sv.Voxels(random_voxels(rng, 50), rng.standard_normal((50, 4)).astype(np.float32))
    return v, rng.standard_normal((27, 4, 3)).astype(np.float32)


@pytest.mark.parametrize("algo", [None, "auto", SPARSE_CONV_FWD_ALGO_MODE.AUTO, "explicit_gemm",
                                  ["implicit_gemm", "explicit_gemm"], [SPARSE_CONV_FWD_ALGO_MODE.CUTLASS_IMPLICIT_GEMM, "auto"]])
def test_cpu_picks_explicit(rng, algo):
    v, w = _layer(rng)
    ref = sv.spatially_sparse_conv(v, w, fwd_algo="explicit_gemm").feats
    np.testing.assert_array_equal(sv.spatially_sparse_conv(v, w, fwd_algo=algo, bwd_algo=algo).feats, ref)


@pytest.mark.parametrize("algo", ["implicit_gemm", "cutlass_implicit_gemm",
                                  ["implicit_gemm", SPARSE_CONV_FWD_ALGO_MODE.CUTLASS_IMPLICIT_GEMM]])
def test_cpu_without_a_cpu_algorithm_is_a_clear_error(rng, algo):
    v, w = _layer(rng)
    with pytest.raises(sv.AlgorithmUnavailableError, match="only explicit_gemm"):
        sv.spatially_sparse_conv(v, w, fwd_algo=algo)


def test_env_selects_on_cpu(rng, monkeypatch):
    v, w = _layer(rng)
    monkeypatch.setenv("SPARSEVOX_FWD_ALGO_MODE", "implicit_gemm")
    with pytest.raises(sv.AlgorithmUnavailableError):
        sv.spatially_sparse_conv(v, w)
    monkeypatch.setenv("SPARSEVOX_FWD_ALGO_MODE", "[implicit_gemm,explicit_gemm]")
    assert sv.spatially_sparse_conv(v, w).feats.shape == (50, 3)
