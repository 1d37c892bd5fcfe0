"""The process-wide slot-sort switch (sparsevox.config.sort_rows): values, the environment variable, the
per-dtype decision, and that the autotune key says when rows are not sorted."""
import os
import subprocess
import sys

import pytest

from sparsevox import config
from sparsevox.tuning import autotune
from sparsevox.tuning.problem import Problem


@pytest.fixture
def restore():
    before = config.sort_rows()
    yield
    config.sort_rows(before)


def _problem(dtype, device="gpu"):
    return Problem("conv", "fwd", device, dtype, 1000, 1000, 32, 32, 27, (1, 1, 1), "submanifold", "H200")


def test_auto_sorts_only_simt_dtypes(restore):
    config.sort_rows("auto")
    assert [config.sort_rows(dtype_name=d) for d in ("float16", "bfloat16", "float32", "float64")] == \
        [False, False, True, True]


@pytest.mark.parametrize("value", [True, False])
def test_forced_value_applies_to_every_dtype(restore, value):
    config.sort_rows(value)
    assert config.sort_rows() is value
    assert {config.sort_rows(dtype_name=d) for d in ("float16", "float32")} == {value}


@pytest.mark.parametrize("bad", ["yes", 1, 2.0])
def test_bad_value_is_a_value_error(restore, bad):
    with pytest.raises(ValueError, match="enabled must be True, False or 'auto'"):
        config.sort_rows(bad)


def test_cache_key_marks_unsorted_gpu_problems(restore):
    config.sort_rows("auto")
    assert "|unsorted|" in autotune.cache_key(_problem("float16"))
    assert "|unsorted|" not in autotune.cache_key(_problem("float32"))
    assert "|unsorted|" not in autotune.cache_key(_problem("float16", device="cpu"))
    config.sort_rows(True)
    assert "|unsorted|" not in autotune.cache_key(_problem("float16"))


@pytest.mark.parametrize("env,want", [("0", "False"), ("never", "False"), ("1", "True"), ("auto", "auto")])
def test_environment_variable(env, want):
    code = "from sparsevox import config; print(config.sort_rows())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "SPARSEVOX_SORT_ROWS": env})
    assert out.stdout.strip() == want


def test_bad_environment_variable_names_it():
    out = subprocess.run([sys.executable, "-c", "import sparsevox.config"], capture_output=True, text=True,
                         env={**os.environ, "SPARSEVOX_SORT_ROWS": "sometimes"})
    assert out.returncode != 0 and "SPARSEVOX_SORT_ROWS must be one of" in out.stderr


def test_changing_the_policy_forgets_the_process_memo(restore):
    from sparsevox.tuning import tune_cache
    config.sort_rows("auto")
    tune_cache.choices["probe"], tune_cache.plans["probe"] = 1, 2
    config.sort_rows("auto")  # unchanged: the memo stays
    assert "probe" in tune_cache.choices and "probe" in tune_cache.plans
    config.sort_rows(True)
    assert "probe" not in tune_cache.choices and "probe" not in tune_cache.plans


@pytest.mark.parametrize("op,direction", [("conv", "wgrad"), ("depthwise", "fwd"), ("depthwise", "dgrad")])
def test_cache_key_unchanged_where_rows_are_not_sorted_anyway(restore, op, direction):
    config.sort_rows("auto")
    p = Problem(op, direction, "gpu", "float16", 1000, 1000, 32, 32, 27, (1, 1, 1), "submanifold", "H200")
    assert "|unsorted" not in autotune.cache_key(p)


def test_one_pair_rows_use_the_csr_order_sorted_or_not():
    """The reverse table of a k2 s2 map (one pair per input row) has one form and one cache key whatever
    the policy, so float16 and float32 layers on one map share it; other tables follow the flag."""
    from types import SimpleNamespace

    from sparsevox.algorithms.implicit_gemm import _csr_ordered
    down = SimpleNamespace(kind="strided", kernel_size=(2, 2, 2), stride=(2, 2, 2), dilation=(1, 1, 1),
                           num_pairs=80, num_in=80, num_offsets=8)
    assert _csr_ordered(down, True, False, 0, 8) is True
    assert _csr_ordered(down, True, False, 0, 4) is False  # a part of the offsets
    assert _csr_ordered(down, False, False, 0, 8) is False  # the forward table: rows have up to 8 pairs
    assert _csr_ordered(down, False, True, 0, 8) is True


def test_tf32x3_switch_removes_the_candidates_and_marks_the_key():
    from sparsevox.algorithms import implicit_gemm as ig
    from sparsevox.tuning import tune_cache
    assert config.allow_tf32x3() is True  # on by default
    assert any(p.get("tf32x3") for p in ig.fwd_params("float32", 128, 27))
    tune_cache.choices["probe"] = 1
    try:
        assert config.allow_tf32x3(False) is False
        assert "probe" not in tune_cache.choices  # the process's choices are forgotten
        assert not any(p.get("tf32x3") for p in ig.fwd_params("float32", 128, 27) + ig.wgrad_params("float32", 128, 128))
        assert autotune.cache_key(_problem("float32")).count("|no3xtf32") == 1
        assert "|no3xtf32" not in autotune.cache_key(_problem("float16"))
    finally:
        config.allow_tf32x3(True)
    assert "|no3xtf32" not in autotune.cache_key(_problem("float32"))
    with pytest.raises(ValueError, match="enabled must be True or False"):
        config.allow_tf32x3("no")


def test_tf32x3_environment_variable():
    out = subprocess.run([sys.executable, "-c", "import sparsevox as sv; print(sv.allow_tf32x3())"], check=True,
                         capture_output=True, text=True, env={**os.environ, "SPARSEVOX_ALLOW_TF32X3": "0"})
    assert out.stdout.strip() == "False"
