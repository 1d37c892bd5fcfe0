"""The autotuner and its cache on the CPU: fake algorithms, a fake timer, a temporary cache directory.

Fake candidates cost a fixed number of (fake) seconds; the fake timer reports the cost of the candidate
that ``run`` last executed. Their outputs equal the reference's unless a candidate is set to be wrong.
"""
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import sparsevox
from sparsevox.tuning import autotune, check, registry, tune_cache
from sparsevox.tuning.algo_inputs import (SPARSE_CONV_BWD_ALGO_MODE, SPARSE_CONV_FWD_ALGO_MODE,
                                         SPARSE_DEPTHWISE_CONV_FWD_ALGO_MODE, resolve_algos)
from sparsevox.conv import select
from sparsevox.errors import AlgorithmUnavailableError
from sparsevox.tuning.problem import Problem
from sparsevox.tuning.registry import Algorithm

TESTS = Path(__file__).parent
ENV_VARS = [p + s for p in ("SPARSEVOX_", "WARPCONVNET_") for s in (
    "FWD_ALGO_MODE", "BWD_ALGO_MODE", "DEPTHWISE_CONV_FWD_ALGO_MODE", "DEPTHWISE_CONV_BWD_ALGO_MODE")]

# name -> {tile parameter: fake seconds}; None means the algorithm has no parameters ({}).
COSTS = {"explicit_gemm": {None: 5e-3}, "implicit_gemm": {1: 3e-3, 2: 1e-3}, "cutlass_implicit_gemm": {0: 0.5e-3}}
REF_OUT = np.arange(12.0).reshape(4, 3)


class Fakes:
    """Fake algorithms plus the ``run`` and ``timer`` that go with them; records every call."""

    def __init__(self, costs=COSTS, wrong=(), raising=(), unavailable=()):
        self.costs, self.wrong, self.raising = costs, set(wrong), set(raising)
        self.last = None
        self.runs, self.timed = [], []
        self.algos = {n: self._algo(n, n in unavailable) for n in costs}

    def _algo(self, name, unavailable):
        def params(direction, problem):
            return [{} if t is None else {"tile": t} for t in self.costs[name]]

        def available(problem):
            return (False, "the fake library is not built") if unavailable else (True, "")
        return Algorithm(name, None, None, None, params, available)

    def run(self, algo, params):
        self.last = (algo.name, params.get("tile"))
        self.runs.append(self.last)
        if self.last in self.raising:
            raise RuntimeError("fake kernel launch failure")
        return REF_OUT + (1.0 if self.last in self.wrong else 0.0)

    @staticmethod
    def oracle(problem):
        """REF_OUT as a product (REF_OUT @ I), judged with the candidates' dtype."""
        return lambda: check.Oracle(lambda a, b: a @ b, REF_OUT, np.eye(3), dtype=problem.dtype, depth=3,
                                    tf32=problem.tf32)

    def timer(self, fn):
        fn()
        self.timed.append(self.last)
        return self.costs[self.last[0]][self.last[1]]

    def choose(self, problem, names=None):
        algos = [self.algos[n] for n in (names or self.costs)]
        algo, params = autotune.choose(problem, algos, self.run, timer=self.timer, oracle=self.oracle(problem))
        return algo.name, params.get("tile")


def problem(c_in=16, direction="fwd", op="conv", dtype="float32", tf32=False):
    return Problem(op, direction, "cpu", dtype, 1000, 1000, c_in, 32, 27, (1, 1, 1), "submanifold", "", tf32)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("SPARSEVOX_CACHE_DIR", str(d))
    for v in ENV_VARS + ["SPARSEVOX_AUTOTUNE_LOG"]:
        monkeypatch.delenv(v, raising=False)
    tune_cache.reset()
    yield d
    tune_cache.reset()


def cache_file_entries(d):
    data = json.loads((d / "autotune.json").read_text())
    assert data["format"] == tune_cache.FORMAT and data["library"] == "sparsevox"
    return data["entries"]


# ---- algorithm inputs: every form, environment precedence (sparsevox.tuning.algo_inputs.resolve_algos) --------

ALL_CONV = ("explicit_gemm", "implicit_gemm", "cutlass_implicit_gemm")


@pytest.mark.parametrize("value, names, explicit", [
    (SPARSE_CONV_FWD_ALGO_MODE.IMPLICIT_GEMM, ("implicit_gemm",), True),
    ("implicit_gemm", ("implicit_gemm",), True),
    ("IMPLICIT_GEMM ", ("implicit_gemm",), True),
    (["implicit_gemm", "cutlass_implicit_gemm"], ("implicit_gemm", "cutlass_implicit_gemm"), True),
    ([SPARSE_CONV_FWD_ALGO_MODE.IMPLICIT_GEMM, "cutlass_implicit_gemm"],
     ("implicit_gemm", "cutlass_implicit_gemm"), True),
    ((SPARSE_CONV_FWD_ALGO_MODE.EXPLICIT_GEMM, SPARSE_CONV_FWD_ALGO_MODE.EXPLICIT_GEMM), ("explicit_gemm",), True),
    (SPARSE_CONV_FWD_ALGO_MODE.AUTO, ALL_CONV, False),
    ("auto", ALL_CONV, False),
    (["implicit_gemm", "auto"], ALL_CONV, False),
    (None, ALL_CONV, False),
])
def test_resolve_every_input_form(value, names, explicit):
    assert resolve_algos(value, "conv", "fwd") == (names, explicit)


def test_resolve_bwd_enum_and_depthwise_names():
    assert resolve_algos(SPARSE_CONV_BWD_ALGO_MODE.CUTLASS_IMPLICIT_GEMM, "conv", "bwd") == (
        ("cutlass_implicit_gemm",), True)
    assert resolve_algos([SPARSE_DEPTHWISE_CONV_FWD_ALGO_MODE.IMPLICIT, "explicit"], "depthwise", "fwd") == (
        ("implicit", "explicit"), True)
    assert resolve_algos("explicit_gemm", "depthwise", "fwd") == (("explicit",), True)  # the guide's spelling
    assert resolve_algos("auto", "depthwise", "bwd") == (("explicit", "implicit"), False)


@pytest.mark.parametrize("bad", ["winograd", ["implicit_gemm", "nope"], [], 3, [None]])
def test_resolve_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="fwd_algo"):
        resolve_algos(bad, "conv", "fwd")


def test_environment_precedence(monkeypatch):
    monkeypatch.setenv("WARPCONVNET_FWD_ALGO_MODE", "[explicit_gemm, implicit_gemm]")
    assert resolve_algos(None, "conv", "fwd") == (("explicit_gemm", "implicit_gemm"), True)
    monkeypatch.setenv("SPARSEVOX_FWD_ALGO_MODE", "cutlass_implicit_gemm")
    assert resolve_algos(None, "conv", "fwd") == (("cutlass_implicit_gemm",), True)
    monkeypatch.setenv("SPARSEVOX_FWD_ALGO_MODE", "auto")
    assert resolve_algos(None, "conv", "fwd") == (ALL_CONV, False)
    # an explicit argument beats the environment; bwd and depthwise read their own variables
    assert resolve_algos("explicit_gemm", "conv", "fwd") == (("explicit_gemm",), True)
    assert resolve_algos(None, "conv", "bwd") == (ALL_CONV, False)
    monkeypatch.setenv("WARPCONVNET_DEPTHWISE_CONV_BWD_ALGO_MODE", "['implicit']")
    assert resolve_algos(None, "depthwise", "bwd") == (("implicit",), True)
    monkeypatch.setenv("SPARSEVOX_BWD_ALGO_MODE", "bogus")
    with pytest.raises(ValueError, match="SPARSEVOX_BWD_ALGO_MODE"):
        resolve_algos(None, "conv", "bwd")


# ---- the search: filters, candidates, timing ----------------------------------------------------

@pytest.fixture
def fake_registry(monkeypatch):
    """A temporary registry holding fake conv and depthwise algorithms; sparsevox.conv.select uses it."""
    conv = Fakes(unavailable=("cutlass_implicit_gemm",))
    dw = Fakes({"explicit": {None: 2e-3}, "implicit": {4: 1e-3, 8: 0.7e-3}})
    monkeypatch.setattr(registry, "_loaded", True)
    monkeypatch.setitem(registry._REGISTRY, "conv", dict(conv.algos))
    monkeypatch.setitem(registry._REGISTRY, "depthwise", dict(dw.algos))
    timers = {"conv": conv, "depthwise": dw}
    monkeypatch.setattr(autotune, "_default_timer", lambda p: timers[p.op].timer)
    return conv, dw


@pytest.mark.parametrize("algo_input, chosen, timed", [
    ("explicit_gemm", ("explicit_gemm", None), set()),  # one candidate, one parameter set: no timing
    (SPARSE_CONV_FWD_ALGO_MODE.IMPLICIT_GEMM, ("implicit_gemm", 2), {("implicit_gemm", 1), ("implicit_gemm", 2)}),
    (["explicit_gemm", SPARSE_CONV_FWD_ALGO_MODE.IMPLICIT_GEMM], ("implicit_gemm", 2),
     {("explicit_gemm", None), ("implicit_gemm", 1), ("implicit_gemm", 2)}),
    ("auto", ("implicit_gemm", 2), {("explicit_gemm", None), ("implicit_gemm", 1), ("implicit_gemm", 2)}),
    (None, ("implicit_gemm", 2), {("explicit_gemm", None), ("implicit_gemm", 1), ("implicit_gemm", 2)}),
])
def test_filter_is_the_search_space(fake_registry, algo_input, chosen, timed):
    conv, _ = fake_registry
    algo, params = select(problem(), algo_input, conv.run)
    assert (algo.name, params.get("tile")) == chosen
    assert set(conv.timed) == timed  # cutlass is unavailable: never run, never timed
    assert ("cutlass_implicit_gemm", 0) not in conv.runs


def test_unavailable_algorithm_alone_is_an_error(fake_registry):
    conv, _ = fake_registry
    with pytest.raises(AlgorithmUnavailableError, match="the fake library is not built"):
        select(problem(), "cutlass_implicit_gemm", conv.run)


def test_environment_filters_depthwise(fake_registry, monkeypatch):
    _, dw = fake_registry
    monkeypatch.setenv("SPARSEVOX_DEPTHWISE_CONV_FWD_ALGO_MODE", "[explicit,implicit]")
    algo, params = select(problem(op="depthwise"), None, dw.run)
    assert (algo.name, params) == ("implicit", {"tile": 8})
    key = autotune.cache_key(problem(op="depthwise"))
    assert key.startswith("depthwise|fwd|") and key.endswith(
        f"|sparsevox {sparsevox.__version__}|check {autotune.CHECK_VERSION}")
    assert set(tune_cache.get(key)["times_ms"]) == {'explicit {}', 'implicit {"tile": 4}', 'implicit {"tile": 8}'}


def test_directions_are_tuned_separately():
    f = Fakes()
    for d in ("fwd", "dgrad", "wgrad"):
        assert f.choose(problem(direction=d)) == ("cutlass_implicit_gemm", 0)
    keys = set(tune_cache.entries())
    assert {k.split("|")[1] for k in keys} == {"fwd", "dgrad", "wgrad"}


def test_repeats_adapt_and_clear_losers_are_not_repeated():
    f = Fakes({"explicit_gemm": {None: 1e-4}, "implicit_gemm": {1: 5e-4, 2: 0.9e-4}})
    f.choose(problem(), ["explicit_gemm", "implicit_gemm"])
    n = {c: f.timed.count(c) for c in set(f.timed)}
    per_candidate = autotune.TUNE_BUDGET_S / 3
    assert n[("explicit_gemm", None)] == min(int(per_candidate / 1e-4), autotune.MAX_REPEATS)
    assert n[("implicit_gemm", 1)] == 1  # 5x slower than the best so far
    assert autotune.MIN_REPEATS <= n[("implicit_gemm", 2)] <= autotune.MAX_REPEATS
    slow = Fakes({"explicit_gemm": {None: 1.0}, "implicit_gemm": {1: 0.9}})
    slow.choose(problem(c_in=8))
    assert slow.timed.count(("explicit_gemm", None)) == autotune.MIN_REPEATS  # a slow kernel: few repeats
    # warm-up and check calls are not timed: run is called more often than the timer
    assert len(f.runs) > len(f.timed)


def test_memory_hit_and_narrower_filter_need_no_timing():
    f = Fakes()
    assert f.choose(problem()) == ("cutlass_implicit_gemm", 0)
    f.timed.clear()
    f.runs.clear()
    assert f.choose(problem()) == ("cutlass_implicit_gemm", 0)
    assert f.choose(problem(), ["explicit_gemm", "implicit_gemm"]) == ("implicit_gemm", 2)  # best within filter
    assert f.timed == [] and f.runs == []


def test_other_sizes_in_the_same_bucket_reuse_the_choice(monkeypatch):
    f = Fakes()
    f.choose(problem())
    f.runs.clear()
    monkeypatch.setattr(autotune, "MEMO_LIMIT", 5)
    for n in range(600, 1000, 20):  # the same power-of-two bucket as 1000; the memo stays bounded
        p = Problem("conv", "fwd", "cpu", "float32", n, n, 16, 32, 27, (1, 1, 1), "submanifold")
        assert f.choose(p) == ("cutlass_implicit_gemm", 0)
        assert len(tune_cache.choices) <= 6
    assert f.runs == []
    assert f.choose(Problem("conv", "fwd", "cpu", "float32", 2000, 2000, 16, 32, 27, (1, 1, 1),
                            "submanifold")) == ("cutlass_implicit_gemm", 0)
    assert f.runs  # a new bucket is tuned


def test_new_candidates_are_tuned_and_merged():
    f = Fakes()
    assert f.choose(problem(), ["explicit_gemm", "implicit_gemm"]) == ("implicit_gemm", 2)
    f.timed.clear()
    assert f.choose(problem()) == ("cutlass_implicit_gemm", 0)
    assert set(f.timed) == {("cutlass_implicit_gemm", 0)}  # only the candidate the cache had not seen


# ---- the accuracy check (details: test_check.py) -------------------------------------------------------------

def test_candidate_failing_the_check_is_dropped(caplog):
    f = Fakes(wrong={("cutlass_implicit_gemm", 0)})
    with caplog.at_level(logging.WARNING, logger="sparsevox.autotune"):
        assert f.choose(problem()) == ("implicit_gemm", 2)
    assert ("cutlass_implicit_gemm", 0) not in f.timed
    assert "dropped cutlass_implicit_gemm" in caplog.text and "relative error" in caplog.text
    entry = tune_cache.get(autotune.cache_key(problem()))
    assert "relative error" in entry["failed"]['cutlass_implicit_gemm {"tile": 0}']
    f.runs.clear()
    assert f.choose(problem(), ["cutlass_implicit_gemm", "implicit_gemm"]) == ("implicit_gemm", 2)
    assert f.runs == []  # the verdict is cached with the configuration


def test_candidate_raising_is_dropped(caplog):
    f = Fakes(raising={("implicit_gemm", 2), ("cutlass_implicit_gemm", 0)})
    with caplog.at_level(logging.WARNING, logger="sparsevox.autotune"):
        assert f.choose(problem()) == ("implicit_gemm", 1)
    assert "raised RuntimeError: fake kernel launch failure" in caplog.text


def test_every_candidate_dropped_is_an_error():
    f = Fakes(raising={("implicit_gemm", 1), ("implicit_gemm", 2)})
    with pytest.raises(AlgorithmUnavailableError, match="every candidate"):
        f.choose(problem(), ["implicit_gemm"])


@pytest.mark.parametrize("dtype, tf32, err, ok", [
    ("float64", False, 1e-16, True), ("float64", False, 1e-13, False),
    ("float32", False, 5e-7, True), ("float32", False, 5e-6, False), ("float32", True, 5e-4, True),
    ("float16", False, 5e-4, True), ("float16", False, 5e-3, False),
    ("bfloat16", False, 5e-3, True), ("bfloat16", False, 5e-2, False),
])
def test_dtype_bounds(dtype, tf32, err, ok):
    """One rounding of the output (unit roundoff u: 2^-53, 2^-24, 2^-11, 2^-8) passes; ten does not."""
    f = Fakes({"explicit_gemm": {None: 2e-3}, "implicit_gemm": {1: 1e-3}})

    def run(algo, params):
        f.run(algo, params)
        return REF_OUT if algo.name == "explicit_gemm" else REF_OUT * (1 + err)
    algos = list(f.algos.values())
    p = problem(dtype=dtype, tf32=tf32)
    with contextlib.nullcontext() if ok else pytest.warns(RuntimeWarning, match="but the reference"):
        algo, _ = autotune.choose(p, algos, run, timer=f.timer, oracle=f.oracle(p))
    assert (algo.name == "implicit_gemm") == ok


# ---- visibility -------------------------------------------------------------------------------

def test_autotune_log_env_prints_every_candidate(monkeypatch, caplog, capfd):
    monkeypatch.setenv("SPARSEVOX_AUTOTUNE_LOG", "1")
    monkeypatch.setattr(autotune, "PROGRESS_AFTER_S", 0.0)  # make the progress lines appear
    f = Fakes()
    try:
        with caplog.at_level(logging.INFO, logger="sparsevox.autotune"):
            f.choose(problem())
    finally:
        autotune.log.removeHandler(autotune._verbose_handler)
        autotune._verbose_handler = None
        autotune.log.setLevel(logging.NOTSET)
    text = caplog.text
    for cid in ('explicit_gemm {}', 'implicit_gemm {"tile": 1}', 'implicit_gemm {"tile": 2}',
                'cutlass_implicit_gemm {"tile": 0}'):
        assert cid in text
    assert "still tuning" in text and "tuned conv|fwd|" in text
    assert 'implicit_gemm {"tile": 2} 1.0000 ms' in capfd.readouterr().err


# ---- the persistent cache --------------------------------------------------------------------------

def test_cache_file_written_in_background_and_real_cpu_path_writes_nothing(cache_dir):
    vox = sparsevox.Voxels(np.array([[0, 0, 0, 0], [0, 1, 0, 0]], np.int32), np.ones((2, 3), np.float32))
    sparsevox.spatially_sparse_conv(vox, np.ones((27, 3, 2), np.float32), fwd_algo="auto")
    tune_cache.flush()
    assert not (cache_dir / "autotune.json").exists()  # the CPU has one candidate: nothing to tune
    Fakes().choose(problem())
    tune_cache.flush()
    entries = cache_file_entries(cache_dir)
    assert list(entries) == [autotune.cache_key(problem())]
    assert len(entries[autotune.cache_key(problem())]["times_ms"]) == 4


def _child(c_ins, out_path, go=None):
    """Runs in a subprocess: tune each C_in, write what was chosen and how many timer calls it took.
    With ``go``, wait for that file first so that concurrent children overlap, and save after each."""
    if go:  # widen the read-merge-write window so that, without the file lock, entries would be lost
        read = tune_cache._read

        def slow_read(path):
            found = read(path)
            time.sleep(0.01)
            return found
        tune_cache._read = slow_read
    while go and not Path(go).exists():
        time.sleep(0.001)
    f = Fakes()
    chosen = []
    for c in c_ins:
        chosen.append(f.choose(problem(c_in=c)))
        if go:
            tune_cache.flush()  # one save per key, to interleave with the other writer (else: atexit saves)
    Path(out_path).write_text(json.dumps({"chosen": chosen, "timed": len(f.timed)}))


def _spawn(cache_dir, c_ins, out_path, go=None):
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_autotune as t; "
            f"t._child({list(c_ins)!r}, {str(out_path)!r}, {go and str(go)!r})")
    env = dict(os.environ, SPARSEVOX_CACHE_DIR=str(cache_dir))
    return subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)


def _finish(proc):
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err


def test_cache_hit_across_processes(cache_dir, tmp_path):
    _finish(_spawn(cache_dir, [16], tmp_path / "a.json"))
    first = json.loads((tmp_path / "a.json").read_text())
    assert first["timed"] > 0
    _finish(_spawn(cache_dir, [16], tmp_path / "b.json"))
    second = json.loads((tmp_path / "b.json").read_text())
    assert second == {"chosen": first["chosen"], "timed": 0}


def test_concurrent_writers_merge(cache_dir, tmp_path):
    go = tmp_path / "go"
    a = _spawn(cache_dir, range(1, 31), tmp_path / "a.json", go)
    b = _spawn(cache_dir, range(101, 131), tmp_path / "b.json", go)
    time.sleep(1.0)  # both children import sparsevox and wait; then they tune and save at once
    go.write_text("")
    _finish(a)
    _finish(b)
    keys = set(cache_file_entries(cache_dir))
    assert keys == {autotune.cache_key(problem(c_in=c)) for c in [*range(1, 31), *range(101, 131)]}
    assert not list(cache_dir.glob("*.tmp"))


@pytest.mark.parametrize("content", ["{not json", '{"format": 999, "library": "sparsevox", "entries": {}}',
                                     '{"some": "other tool"}', '[1, 2]', "\x00\xff"])
def test_corrupt_or_foreign_file_is_moved_aside(cache_dir, caplog, content):
    cache_dir.mkdir()
    (cache_dir / "autotune.json").write_text(content)
    f = Fakes()
    with caplog.at_level(logging.WARNING, logger="sparsevox.tune_cache"):
        assert f.choose(problem()) == ("cutlass_implicit_gemm", 0)
        tune_cache.flush()
    assert f.timed  # tuning started fresh
    assert "unusable" in caplog.text and "moved aside" in caplog.text
    aside = list(cache_dir.glob("autotune.json.bad-*"))
    assert len(aside) == 1 and aside[0].read_text() == content
    assert list(cache_file_entries(cache_dir)) == [autotune.cache_key(problem())]


def _assert_works_and_warns_once(caplog, keys=(16, 17, 18)):
    f = Fakes()
    with caplog.at_level(logging.WARNING, logger="sparsevox.tune_cache"):
        for c in keys:
            assert f.choose(problem(c_in=c)) == ("cutlass_implicit_gemm", 0)
            tune_cache.flush()
    warnings = [r for r in caplog.records if "not writable" in r.getMessage()]
    assert len(warnings) == 1
    f.timed.clear()
    assert f.choose(problem(c_in=keys[0])) == ("cutlass_implicit_gemm", 0) and f.timed == []  # kept in memory


def test_unwritable_cache_location(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("SPARSEVOX_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    tune_cache.reset()
    _assert_works_and_warns_once(caplog)


def test_read_only_cache_dir(cache_dir, caplog, monkeypatch):
    Fakes().choose(problem(c_in=5))
    tune_cache.flush()
    tune_cache.reset()
    cache_dir.chmod(0o555)
    try:
        if os.access(cache_dir, os.W_OK):  # root ignores permissions: fail the writes the way EROFS would
            def read_only(*a, **k):
                raise OSError(30, "Read-only file system")
            monkeypatch.setattr(tune_cache, "_file_lock", read_only)
        f = Fakes()
        assert f.choose(problem(c_in=5)) == ("cutlass_implicit_gemm", 0) and f.timed == []  # reading works
        _assert_works_and_warns_once(caplog)
    finally:
        cache_dir.chmod(0o755)
    assert list(cache_file_entries(cache_dir)) == [autotune.cache_key(problem(c_in=5))]


# ---- python -m sparsevox cache ... -------------------------------------------------------------

def test_cli_path_show_clear(cache_dir, capsys):
    assert tune_cache.cli(["path"]) == 0
    assert capsys.readouterr().out.strip() == str(cache_dir / "autotune.json")
    Fakes().choose(problem())
    tune_cache.flush()
    tune_cache.reset()
    assert tune_cache.cli(["show"]) == 0
    out = capsys.readouterr().out
    assert "1 configuration(s)" in out and autotune.cache_key(problem()) in out
    assert 'cutlass_implicit_gemm {"tile": 0}  0.5000 ms  (4 timed, 0 dropped, 0 failed the check)' in out
    assert tune_cache.cli(["clear"]) == 0
    assert "removed 1 file(s)" in capsys.readouterr().out
    assert not (cache_dir / "autotune.json").exists()
    f = Fakes()
    f.choose(problem())
    assert f.timed  # clear also forgot the in-memory choices
    assert tune_cache.cli(["bogus"]) == 2 and tune_cache.cli([]) == 2
    assert "usage" in capsys.readouterr().out


def test_cli_through_module_entry_point(cache_dir):
    env = dict(os.environ, SPARSEVOX_CACHE_DIR=str(cache_dir))
    out = subprocess.run([sys.executable, "-m", "sparsevox", "cache", "path"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(cache_dir / "autotune.json")


# ---- memory tie-break: a candidate within MEMORY_TIE of the fastest that declares less scratch --------------

def _with_scratch(fakes, scratch):
    """Give each fake algorithm ``scratch[name]`` bytes (a number, or None: declares nothing)."""
    import dataclasses
    for name, s in scratch.items():
        fn = None if s is None else (lambda direction, problem, params, s=s: s)
        fakes.algos[name] = dataclasses.replace(fakes.algos[name], scratch=fn)


@pytest.mark.parametrize("implicit_s, cutlass_s, chosen", [
    (0, 70 << 20, ("implicit_gemm", 2)),               # 5 % slower, 70 MiB less: taken
    (None, 70 << 20, ("cutlass_implicit_gemm", 0)),     # declares nothing: never taken for memory
    (0, None, ("cutlass_implicit_gemm", 0)),            # the fastest declares nothing: it keeps its place
    (0, 0, ("cutlass_implicit_gemm", 0)),               # no less scratch: the fastest
])
def test_a_near_candidate_with_less_scratch_is_taken(implicit_s, cutlass_s, chosen):
    f = Fakes({"explicit_gemm": {None: 5e-3}, "implicit_gemm": {1: 3e-3, 2: 1.05e-3},
               "cutlass_implicit_gemm": {0: 1e-3}})
    _with_scratch(f, {"implicit_gemm": implicit_s, "cutlass_implicit_gemm": cutlass_s})
    assert f.choose(problem()) == chosen


def test_a_slower_candidate_is_not_taken_for_memory_and_the_least_scratch_wins():
    f = Fakes({"explicit_gemm": {None: 1.08e-3}, "implicit_gemm": {1: 1.09e-3, 2: 1.2e-3},
               "cutlass_implicit_gemm": {0: 1e-3}})
    _with_scratch(f, {"explicit_gemm": 10, "implicit_gemm": 0, "cutlass_implicit_gemm": 100})
    assert f.choose(problem()) == ("implicit_gemm", 1)  # 9 % slower, the least scratch; tile 2 is 20 % slower
    g = Fakes({"explicit_gemm": {None: 5e-3}, "implicit_gemm": {1: 3e-3, 2: 1.2e-3},
               "cutlass_implicit_gemm": {0: 1e-3}})
    _with_scratch(g, {"implicit_gemm": 0, "cutlass_implicit_gemm": 100})
    assert g.choose(problem(c_in=17)) == ("cutlass_implicit_gemm", 0)  # 20 % slower: speed first


def test_declared_scratch_of_the_gpu_algorithms():
    """CUTLASS holds a float32 result buffer (67 MiB at SemanticKITTI's 183,534 sites x 96 channels);
    IMPLICIT_GEMM's forward and dgrad hold nothing, its 16-bit weight gradient a float32 accumulator."""
    from sparsevox.algorithms import cutlass_implicit_gemm as cig
    from sparsevox.algorithms import implicit_gemm as ig
    p = Problem("conv", "fwd", "gpu", "float16", 183_534, 183_534, 128, 96, 27, (1, 1, 1), "submanifold")
    assert cig._scratch("fwd", p, {}) == 4 * 183_534 * 96
    assert cig._scratch("dgrad", p, {}) == 4 * 183_534 * 128
    assert cig._scratch("wgrad", p, {}) == 4 * 27 * 128 * 96
    odd = Problem("conv", "fwd", "gpu", "float16", 10, 20, 3, 96, 27, (1, 1, 1), "submanifold")
    assert cig._scratch("fwd", odd, {}) == 4 * 20 * 96 + 2 * (10 * 8 + 27 * 8 * 96)  # padded copies of feats, W
    assert ig._scratch("fwd", p, {}) == ig._scratch("dgrad", p, {}) == 0
    assert ig._scratch("wgrad", p, {}) == 4 * 27 * 128 * 96
    assert ig._scratch("wgrad", Problem("conv", "wgrad", "gpu", "float32", 9, 9, 4, 4, 27, (1, 1, 1), "submanifold"),
                       {}) == 0


def test_a_scratch_declaration_that_raises_declares_nothing():
    f = Fakes({"explicit_gemm": {None: 5e-3}, "implicit_gemm": {1: 3e-3, 2: 1.05e-3},
               "cutlass_implicit_gemm": {0: 1e-3}})
    _with_scratch(f, {"implicit_gemm": 0})
    import dataclasses

    def broken(direction, problem, params):
        raise KeyError("no such size")
    f.algos["cutlass_implicit_gemm"] = dataclasses.replace(f.algos["cutlass_implicit_gemm"], scratch=broken)
    with pytest.warns(RuntimeWarning, match="scratch raised KeyError"):
        assert f.choose(problem(c_in=18)) == ("cutlass_implicit_gemm", 0)  # the fastest, as without a declaration
    assert f.choose(problem(c_in=18)) == ("cutlass_implicit_gemm", 0)  # and again from the cache, no raise
