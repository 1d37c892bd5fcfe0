"""The autotuner's accuracy check (issue 17) on the CPU: the oracle, its bound, and the autotuner's use of it.

Candidates are simulated on the host the way the GPU kernels compute (float32 sums in their own order,
one rounding of the output); sabotaged ones skip an offset or write a wrong row. The data are the
network data that made the old check drop correct kernels.
"""
import warnings

import numpy as np
import pytest
from check_cases import DATA, MAPS, busiest_offset, candidate, geometry, operands
from gpu_cases import np_dtype

from sparsevox import conv
from sparsevox.algorithms import explicit_gemm
from sparsevox.tuning import autotune, check, tune_cache
from sparsevox.errors import AlgorithmUnavailableError
from sparsevox.tuning.registry import Algorithm

DIRECTIONS = ["fwd", "dgrad", "wgrad"]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEVOX_CACHE_DIR", str(tmp_path / "cache"))
    for v in ("SPARSEVOX_FWD_ALGO_MODE", "SPARSEVOX_BWD_ALGO_MODE", "WARPCONVNET_FWD_ALGO_MODE",
              "WARPCONVNET_BWD_ALGO_MODE", "SPARSEVOX_AUTOTUNE_LOG"):
        monkeypatch.delenv(v, raising=False)
    tune_cache.reset()
    autotune._warned.clear()
    yield
    tune_cache.reset()


def case(rng, kind, data, c_in, c_out, dtype):
    kmap = geometry(rng, kind, n=600 if max(c_in, c_out) > 128 else 1200)
    x, w, g = operands(rng, data, kmap.num_in, kmap.num_out, c_in, c_out, kmap.num_offsets, dtype)
    return kmap, x, w, g


def typed(a, dtype):
    return a.astype(np_dtype(dtype))


def oracle(direction, kmap, x, w, g, dtype, tf32=False):
    """The production oracle (:func:`sparsevox.conv.oracle_of`) on operands of ``dtype``."""
    a, b = {"fwd": (x, w), "dgrad": (g, w), "wgrad": (x, g)}[direction]
    if dtype == "bfloat16":  # NumPy has no bfloat16 arithmetic: hand the oracle the exact float32 values
        a, b = a.astype(np.float32), b.astype(np.float32)
        o = conv.oracle_of("conv", direction, a, b, kmap)
        o.dtype = "bfloat16"
        return o
    o = conv.oracle_of("conv", direction, typed(a, dtype), typed(b, dtype), kmap)
    o.tf32 = tf32
    return o


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("kind", MAPS)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_correct_kernel_passes_and_sabotaged_ones_fail(rng, direction, kind, data, dtype):
    kmap, x, w, g = case(rng, kind, data, 96, 96, dtype)
    o = oracle(direction, kmap, x, w, g, dtype)
    good = o.judge(candidate(direction, x, w, g, kmap, dtype).astype(np.float64))
    assert good.ok, f"a correct {dtype} kernel was rejected: {good}"
    skipped = o.judge(candidate(direction, x, w, g, kmap, dtype, skip=busiest_offset(kmap)).astype(np.float64))
    assert not skipped.ok, "a kernel skipping the busiest offset passed"
    ref, _ = o.values()
    row = int(np.argmax(np.abs(ref).reshape(len(ref), -1).sum(1)))
    wrong = o.judge(candidate(direction, x, w, g, kmap, dtype, wrong_row=row).astype(np.float64))
    assert not wrong.ok, "a kernel writing one wrong row passed"


@pytest.mark.parametrize("c_in, c_out", [(96, 96), (192, 192), (128, 384), (384, 192)])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_wide_layers_float16(rng, direction, c_in, c_out):
    data = ["relu_bn", "tiny_grad_1e-6", "cancellation"][rng.integers(3)]
    kind = MAPS[rng.integers(3)]
    kmap, x, w, g = case(rng, kind, data, c_in, c_out, "float16")
    o = oracle(direction, kmap, x, w, g, "float16")
    v = o.judge(candidate(direction, x, w, g, kmap, "float16").astype(np.float64))
    assert v.ok, f"{kind} {data}: {v}"


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_tf32_candidate_needs_the_tf32_bound(rng, direction):
    kmap, x, w, g = case(rng, "submanifold", "relu_bn", 64, 64, "float32")
    out = candidate(direction, x, w, g, kmap, "float32", tf32=True).astype(np.float64)
    assert not oracle(direction, kmap, x, w, g, "float32").judge(out).ok  # TF32 is not float32-accurate
    assert oracle(direction, kmap, x, w, g, "float32", tf32=True).judge(out).ok


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("direction", ["fwd", "dgrad"])
def test_mask_split_is_judged_with_its_roundings(rng, direction, dtype):
    """Two passes, each rounded to the output dtype (IMPLICIT_GEMM's mask split): the bound of two
    roundings admits it; a skipped offset still fails under that bound; and under heavy cancellation
    the one-rounding bound is exceeded (the partial sum is large, its rounding error too)."""
    kmap, x, w, g = case(rng, "submanifold", "cancellation", 64, 64, dtype)
    o = oracle(direction, kmap, x, w, g, dtype)
    two = candidate(direction, x, w, g, kmap, dtype, passes=2).astype(np.float64)
    assert o.judge(two, roundings=2).ok
    assert not o.judge(two, roundings=1).ok
    skipped = candidate(direction, x, w, g, kmap, dtype, passes=2, skip=busiest_offset(kmap)).astype(np.float64)
    assert not o.judge(skipped, roundings=2).ok


def test_autotuner_asks_the_algorithm_for_its_roundings(rng):
    kmap, x, w, g = case(rng, "submanifold", "cancellation", 32, 32, "float16")
    k = Kernels("fwd", kmap, x, w, g, "float16", passes={"implicit_gemm": 2})
    name, _, problem = k.choose(names={"implicit_gemm", "explicit_gemm"})
    assert name == "implicit_gemm" and not tune_cache.get(autotune.cache_key(problem))["failed"]
    from sparsevox.tuning.registry import algorithms
    r = algorithms("conv")["implicit_gemm"].roundings
    assert r("fwd", {"mask_split": 2}) == 2 and r("dgrad", {}) == 1 and r("wgrad", {"split_k_factor": 4}) == 1


def test_explicit_gemm_rounds_once(rng):
    """EXPLICIT_GEMM's own float16 output is within the bound (it no longer rounds per offset)."""
    kmap, x, w, g = case(rng, "submanifold", "tiny_grad_1e-6", 96, 96, "float16")
    gin = explicit_gemm.dgrad(typed(g, "float16"), typed(w, "float16"), kmap)
    assert gin.dtype == np.float16
    assert oracle("dgrad", kmap, x, w, g, "float16").judge(gin.astype(np.float64)).ok


def test_oracle_is_more_precise_than_the_candidates(rng):
    """float16 inputs: the oracle sums in float32 with no intermediate 16-bit rounding, float32 inputs in
    float64; compared with a float64 evaluation its error is far under a float16 kernel's."""
    kmap, x, w, g = case(rng, "submanifold", "tiny_grad_1e-6", 96, 96, "float16")
    o = oracle("dgrad", kmap, x, w, g, "float16")
    ref, _ = o.values()
    assert ref.dtype == np.float32
    exact = explicit_gemm.dgrad(g, w, kmap)  # float64 on the same (quantised) values
    kern = candidate("dgrad", x, w, g, kmap, "float16").astype(np.float64)
    err = lambda a: np.linalg.norm(a - exact) / np.linalg.norm(exact)  # noqa: E731
    assert err(ref) < err(kern) / 100
    assert check.oracle_dtype("float32") == "float64" and check.oracle_dtype("bfloat16") == "float32"


def test_verdict_reports_shape_nan_and_missing_output(rng):
    kmap, x, w, g = case(rng, "submanifold", "relu_bn", 8, 8, "float32")
    o = oracle("fwd", kmap, x, w, g, "float32")
    ref, _ = o.values()
    assert "wrong shape" in str(o.judge(np.zeros((1, 1))))
    bad = ref.copy()
    bad[0, 0] = np.nan
    assert "non-finite" in str(o.judge(bad))
    assert not o.judge(None).ok
    assert o.judge(ref).ok and o.judge(ref).ratio == 0


# ---- the autotuner with the real oracle --------------------------------------------------------------

class Kernels:
    """Real explicit_gemm plus simulated GPU candidates on one case; a fake timer (seconds per name)."""

    COST = {"explicit_gemm": 5e-3, "implicit_gemm": 1e-3, "cutlass_implicit_gemm": 0.5e-3}

    def __init__(self, direction, kmap, x, w, g, dtype, wrong=(), passes=None):
        self.direction, self.kmap, self.dtype, self.wrong = direction, kmap, dtype, set(wrong)
        self.passes = passes or {}
        self.x, self.w, self.g = typed(x, dtype), typed(w, dtype), typed(g, dtype)
        self.host = (x, w, g)
        self.algos = [Algorithm(n, None, None, None, self._params(n), lambda p: (True, ""), None,
                                self._roundings(n)) for n in self.COST]
        self.last = None

    def _roundings(self, name):
        return lambda direction, params: self.passes.get(name, 1)

    @staticmethod
    def _params(name):
        return lambda direction, problem: [{}] if name == "explicit_gemm" else [{"tile": 1}, {"tile": 2}]

    def run(self, algo, params):
        self.last = algo.name
        d, x, w, g, kmap = self.direction, self.x, self.w, self.g, self.kmap
        if algo.name == "explicit_gemm":
            out = {"fwd": lambda: explicit_gemm.forward(x, w, kmap), "dgrad": lambda: explicit_gemm.dgrad(g, w, kmap),
                   "wgrad": lambda: explicit_gemm.wgrad(x, g, kmap, kmap.num_offsets)}[d]()
            return out * 2 if algo.name in self.wrong else out
        skip = busiest_offset(kmap) if algo.name in self.wrong else None
        return candidate(d, *self.host, kmap, self.dtype, skip=skip, passes=self.passes.get(algo.name, 1))

    def timer(self, fn):  # the candidate's warm-up call just ran (self.last); timing it again adds nothing
        return self.COST[self.last] * (1.1 if self.last == "implicit_gemm" else 1.0)

    def choose(self, named=False, names=None):
        a, b = {"fwd": (self.x, self.w), "dgrad": (self.g, self.w), "wgrad": (self.x, self.g)}[self.direction]
        problem = conv.problem_of("conv", self.direction, self.x, self.w, self.kmap)
        algos = [al for al in self.algos if names is None or al.name in names]
        algo, params = autotune.choose(problem, algos, self.run, timer=self.timer, named=named,
                                       oracle=lambda: conv.oracle_of("conv", self.direction, a, b, self.kmap))
        return algo.name, params.get("tile"), problem


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("data", ["tiny_grad_1e-6", "tiny_grad_1e-7", "cancellation"])
def test_no_correct_candidate_dropped_on_network_data(rng, direction, data):
    kmap, x, w, g = case(rng, MAPS[rng.integers(3)], data, 96, 192, "float16")
    k = Kernels(direction, kmap, x, w, g, "float16", wrong={"cutlass_implicit_gemm"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: a correct fast candidate survives
        name, tile, problem = k.choose()
    assert name == "implicit_gemm"
    entry = tune_cache.get(autotune.cache_key(problem))
    assert set(entry["failed"]) == {'cutlass_implicit_gemm {"tile": 1}', 'cutlass_implicit_gemm {"tile": 2}'}
    assert not entry["dropped"]
    assert "relative error" in entry["failed"]['cutlass_implicit_gemm {"tile": 1}']


def test_reference_only_survivor_warns_once(rng):
    kmap, x, w, g = case(rng, "submanifold", "relu_bn", 32, 32, "float16")
    k = Kernels("fwd", kmap, x, w, g, "float16", wrong={"implicit_gemm", "cutlass_implicit_gemm"})
    with pytest.warns(RuntimeWarning, match="every candidate but the reference explicit_gemm was dropped"):
        assert k.choose()[0] == "explicit_gemm"
    tune_cache.choices.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert k.choose()[0] == "explicit_gemm"  # once per process


def test_named_algorithm_is_never_vetoed(rng):
    kmap, x, w, g = case(rng, "submanifold", "relu_bn", 32, 32, "float16")
    k = Kernels("fwd", kmap, x, w, g, "float16", wrong={"implicit_gemm"})
    with pytest.warns(RuntimeWarning, match="implicit_gemm .* which you asked for, failed the accuracy check"):
        assert k.choose(named=True, names={"implicit_gemm"})[0] == "implicit_gemm"
    # under auto the same cached verdict keeps it out
    with pytest.warns(RuntimeWarning, match="but the reference"):
        assert k.choose(names={"implicit_gemm", "explicit_gemm"})[0] == "explicit_gemm"


def test_auto_with_every_candidate_failing_falls_back_to_the_reference_or_raises(rng):
    kmap, x, w, g = case(rng, "submanifold", "relu_bn", 32, 32, "float16")
    k = Kernels("fwd", kmap, x, w, g, "float16", wrong={"implicit_gemm", "cutlass_implicit_gemm"})
    with pytest.raises(AlgorithmUnavailableError, match="every candidate"):
        k.choose(names={"implicit_gemm", "cutlass_implicit_gemm"})
    k.wrong.add("explicit_gemm")
    with pytest.warns(RuntimeWarning, match="every candidate failed the accuracy check"):
        assert k.choose()[0] == "explicit_gemm"


def test_named_list_prefers_its_candidates_that_pass(rng):
    """fwd_algo=[implicit_gemm, explicit_gemm] with a wrong implicit: the correct explicit runs, silently."""
    kmap, x, w, g = case(rng, "submanifold", "relu_bn", 32, 32, "float16")
    k = Kernels("fwd", kmap, x, w, g, "float16", wrong={"implicit_gemm"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert k.choose(named=True, names={"implicit_gemm", "explicit_gemm"})[0] == "explicit_gemm"


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_non_finite_or_overflowing_elements_are_not_evidence(rng, direction):
    """An early GradScaler step: an inf in the operands, or results beyond float16's range. Correct
    candidates pass and nothing is recorded against them; a wrong one is still caught on the rest."""
    kmap, x, w, g = case(rng, "submanifold", "relu_bn", 32, 32, "float16")
    g[3, 5] = np.inf
    x[7, 1] = np.inf
    x[9, :] = 6e4  # with the row below: sums beyond float16's largest value
    w[:, :, 2] = 0.5
    k = Kernels(direction, kmap, x, w, g, "float16", wrong={"cutlass_implicit_gemm"})
    with np.errstate(invalid="ignore", over="ignore"):
        name, _, problem = k.choose()
    assert name == "implicit_gemm"
    entry = tune_cache.get(autotune.cache_key(problem))
    assert all(c.startswith("cutlass") for c in entry["failed"]), entry["failed"]


def test_verdicts_of_the_old_check_are_not_reused(rng):
    """A cache written by check version 1 (which dropped correct kernels) is not consulted."""
    kmap, x, w, g = case(rng, "submanifold", "tiny_grad_1e-6", 32, 32, "float16")
    k = Kernels("dgrad", kmap, x, w, g, "float16")
    problem = conv.problem_of("conv", "dgrad", k.x, k.w, kmap)
    import sparsevox
    old_key = f"{problem.key()}|sparsevox {sparsevox.__version__}"
    tune_cache.put(old_key, {"times_ms": {"explicit_gemm {}": 5.0},
                             "dropped": {'implicit_gemm {"tile": 1}': "wrong result: relative error 0.143",
                                         'implicit_gemm {"tile": 2}': "wrong result: relative error 0.143"}})
    assert autotune.cache_key(problem) != old_key and f"check {autotune.CHECK_VERSION}" in autotune.cache_key(problem)
    assert k.choose(names={"implicit_gemm", "explicit_gemm"})[0] == "implicit_gemm"
