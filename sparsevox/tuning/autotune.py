"""The autotuner: time every allowed (algorithm, parameters) candidate, keep the fastest, cache it.

``choose(problem, algos, run)`` is called by :func:`sparsevox.conv.select` for convolution and
depthwise convolution alike, once per direction (``fwd``, ``dgrad``, ``wgrad`` are separate problems).

1. Candidates are every parameter dict of every allowed, available algorithm (the algorithm input is a
   filter on this search space). A single candidate with a single parameter set is chosen untimed.
2. A configuration (``Problem.key()`` plus the library version) already in the cache (memory, then the
   file of :mod:`sparsevox.tune_cache`) is answered from it: the fastest cached candidate that the
   filter allows. Candidates the cache has never seen are tuned and merged in.
3. Tuning a candidate: one warm-up call (it compiles, builds derived maps) whose result is checked once
   against the reference algorithm (EXPLICIT_GEMM / EXPLICIT) within the dtype's tolerance (relative
   Frobenius error); a candidate that fails the check or raises is dropped with a logged reason. Then
   timed calls (CUDA events on the GPU, ``perf_counter`` on the CPU), as many as fit a share of
   :data:`TUNE_BUDGET_S` (at least :data:`MIN_REPEATS`), and the median is its time. A candidate whose
   first timing is :data:`PRUNE_FACTOR` times the best so far is not repeated.

Logging: logger ``sparsevox.autotune``; ``SPARSEVOX_AUTOTUNE_LOG=1`` prints every candidate and its time
to stderr; a configuration whose tuning takes over a second gets a progress line at INFO.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import statistics
import sys
import time

from . import tune_cache
from .._arrays import array_module
from ..errors import AlgorithmUnavailableError

log = logging.getLogger("sparsevox.autotune")

TUNE_BUDGET_S = 0.25  # timed calls per configuration, all candidates together (warm-ups not counted)
MIN_REPEATS = 3
MAX_REPEATS = 50
PRUNE_FACTOR = 2.0
PROGRESS_AFTER_S = 1.0
MEMO_LIMIT = 4096  # in-process final choices kept before the memo is emptied

# Relative Frobenius error ||candidate - reference|| / ||reference|| a candidate must meet.
TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-2, "bfloat16": 2e-2}
TF32_TOLERANCE = 1e-3

REFERENCE = {"conv": "explicit_gemm", "depthwise": "explicit"}


def cpu_timer(fn) -> float:
    """Seconds one call of ``fn()`` takes on the host."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def gpu_timer(fn) -> float:
    """Seconds one call of ``fn()`` takes on the current CUDA stream (CuPy events)."""
    import cupy
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return cupy.cuda.get_elapsed_time(start, end) * 1e-3


def candidate_id(algo_name: str, params: dict) -> str:
    """How a candidate is named in the cache and in logs: ``implicit_gemm {"fwd_block_size": 16}``."""
    return f"{algo_name} {json.dumps(params, sort_keys=True, default=str)}"


_version_key = None


def cache_key(problem) -> str:
    """``Problem.key()`` plus the library version: a new sparsevox tunes afresh."""
    global _version_key
    if _version_key is None:
        from .. import __version__
        _version_key = f"sparsevox {__version__}"
    return f"{problem.key()}|{_version_key}"


def tolerance(problem) -> float:
    return TF32_TOLERANCE if problem.tf32 and problem.dtype == "float32" else TOLERANCE.get(problem.dtype, 1e-5)


def relative_error(out, ref) -> float:
    """``||out - ref|| / ||ref||`` in float64 (the absolute norm when ``ref`` is all zeros); inf on a shape
    mismatch or a non-finite result."""
    if tuple(out.shape) != tuple(ref.shape):
        return float("inf")
    xp = array_module(ref)
    r = ref.astype(xp.float64)
    num = float(xp.linalg.norm(out.astype(xp.float64) - r))
    den = float(xp.linalg.norm(r))
    err = num / den if den > 0 else num
    return err if math.isfinite(err) else float("inf")


_verbose_handler = None


def _candidate_logger():
    """``log.info`` (to stderr) under ``SPARSEVOX_AUTOTUNE_LOG=1``, else ``log.debug``."""
    global _verbose_handler
    if os.environ.get("SPARSEVOX_AUTOTUNE_LOG", "0").lower() not in ("1", "true", "yes"):
        return log.debug
    if _verbose_handler is None:
        _verbose_handler = logging.StreamHandler(sys.stderr)
        _verbose_handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.addHandler(_verbose_handler)
        if log.getEffectiveLevel() > logging.INFO:
            log.setLevel(logging.INFO)
    return log.info


def choose(problem, algos, run, *, timer=None, reference=None):
    """Return ``(algorithm, params)`` for ``problem`` among ``algos``.

    Args:
        problem: :class:`sparsevox.problem.Problem` (its ``direction`` says which of forward, dgrad,
            wgrad ``run`` executes).
        algos: the allowed, available :class:`~sparsevox.registry.Algorithm` objects.
        run: ``run(algo, params) -> output array``: one call of a candidate on the real inputs.
        timer: ``timer(fn) -> seconds`` of one call of ``fn()``; default CUDA events on the GPU,
            ``perf_counter`` on the CPU.
        reference: the Algorithm whose output candidates are checked against; default the registry's
            EXPLICIT_GEMM (conv) / EXPLICIT (depthwise).
    """
    names = tuple(a.name for a in algos)
    exact = (problem, names)  # the fast path: this very problem was answered before
    hit = tune_cache.choices.get(exact)
    if hit is not None:
        return hit
    bucket = (problem.key(), names)  # a new N in a known bucket (scans differ in size every batch)
    best = tune_cache.choices.get(bucket)
    if best is None:
        candidates = [(a, p) for a in algos for p in a.params(problem.direction, problem)]
        if not candidates:
            raise AlgorithmUnavailableError(f"no candidate to run for {problem.key()}: every algorithm "
                                            "offered no parameter set")
        best = candidates[0] if len(candidates) == 1 else _choose_timed(problem, candidates, run, timer, reference)
        tune_cache.choices[bucket] = best
    if len(tune_cache.choices) > MEMO_LIMIT:  # one entry per exact size seen: keep it bounded
        tune_cache.choices.clear()
    tune_cache.choices[exact] = best
    return best


def _choose_timed(problem, candidates, run, timer, reference):
    key = cache_key(problem)
    ids = [candidate_id(a.name, p) for a, p in candidates]
    entry = tune_cache.get(key) or {"times_ms": {}, "dropped": {}}
    todo = [(c, i) for c, i in zip(candidates, ids) if i not in entry["times_ms"] and i not in entry["dropped"]]
    if todo:
        best_ms = min((entry["times_ms"][i] for i in ids if i in entry["times_ms"]), default=float("inf"))
        new = _tune(problem, key, todo, run, timer or _default_timer(problem), reference, best_ms)
        entry = tune_cache.merge_entry(entry, new)
        tune_cache.put(key, entry)
    timed = [(entry["times_ms"][i], n) for n, i in enumerate(ids) if i in entry["times_ms"]]
    if not timed:
        reasons = "; ".join(f"{i}: {entry['dropped'].get(i, '?')}" for i in ids)
        raise AlgorithmUnavailableError(f"every candidate algorithm was dropped for {key} ({reasons})")
    ms, n = min(timed)
    log.debug("autotune %s: chose %s (%.4f ms)", key, ids[n], ms)
    return candidates[n]


def _default_timer(problem):
    return gpu_timer if problem.device == "gpu" else cpu_timer


def _tune(problem, key, todo, run, timer, reference, best_ms):
    """Check and time the ``todo`` ``[((algo, params), id)]``; return ``{"times_ms": .., "dropped": ..}``."""
    say = _candidate_logger()
    check = _Checker(problem, key, run, reference or _reference_algorithm(problem.op))
    budget = TUNE_BUDGET_S / len(todo)
    times, dropped = {}, {}
    started = time.perf_counter()
    announced = False
    for n, ((algo, params), cid) in enumerate(todo):
        try:
            call = functools.partial(run, algo, params)
            failure = check(algo, call())  # the warm-up call; its output is checked
            samples = None if failure else _samples(call, timer, budget, best_ms)
        except Exception as e:  # a candidate that cannot run here is dropped, not fatal
            failure = f"raised {type(e).__name__}: {e}"
        if failure:
            dropped[cid] = failure
            log.warning("autotune %s: dropped %s: %s", key, cid, failure)
            continue
        times[cid] = ms = statistics.median(samples) * 1e3
        best_ms = min(best_ms, ms)
        say("autotune %s: %s %.4f ms (median of %d)", key, cid, ms, len(samples))
        elapsed = time.perf_counter() - started
        if elapsed > PROGRESS_AFTER_S and not announced and n + 1 < len(todo):
            announced = True
            log.info("autotune: still tuning %s after %.1f s (%d of %d candidates done)",
                     key, elapsed, n + 1, len(todo))
    elapsed = time.perf_counter() - started
    if elapsed > PROGRESS_AFTER_S:
        log.info("autotune: tuned %s in %.1f s (%d candidates)", key, elapsed, len(todo))
    return {"times_ms": times, "dropped": dropped}


def _samples(call, timer, budget_s, best_ms) -> list[float]:
    """Timings (seconds) of ``call``: as many as fit ``budget_s`` within [MIN_REPEATS, MAX_REPEATS], or
    just one when that one is already PRUNE_FACTOR times slower than the best so far."""
    first = timer(call)
    if first * 1e3 > PRUNE_FACTOR * best_ms:
        return [first]
    reps = min(max(int(budget_s / max(first, 1e-9)), MIN_REPEATS), MAX_REPEATS)
    return [first] + [timer(call) for _ in range(reps - 1)]


class _Checker:
    """Compares a candidate's output with the reference algorithm's, computed once when first needed.

    ``checker(algo, out)`` returns None when ``out`` is within the dtype's tolerance (or ``algo`` is the
    reference itself), else the reason to drop the candidate.
    """

    def __init__(self, problem, key, run, ref_algo):
        self.problem, self.key, self.run, self.ref_algo = problem, key, run, ref_algo
        self.ref_out = self.unusable = None

    def reference(self):
        if self.ref_out is None and self.unusable is None:
            try:
                params = self.ref_algo.params(self.problem.direction, self.problem)[0]
                self.ref_out = self.run(self.ref_algo, params)
            except Exception as e:  # without a reference nothing can be checked; say so once
                self.unusable = f"{type(e).__name__}: {e}"
                log.warning("autotune %s: reference %s raised (%s); candidates are not checked",
                            self.key, self.ref_algo.name, self.unusable)
        return self.ref_out

    def __call__(self, algo, out):
        if algo.name == self.ref_algo.name:
            return None
        ref = self.reference()
        if ref is None:
            return None
        if out is None:
            return "returned no output to check"
        try:
            err = relative_error(out, ref)
        except Exception as e:  # the comparison itself failed (an exotic dtype): not the candidate's fault
            log.warning("autotune %s: could not check %s (%s: %s)", self.key, algo.name, type(e).__name__, e)
            return None
        tol = tolerance(self.problem)
        if not err <= tol:
            return (f"wrong result: relative error {err:.3g} vs {self.ref_algo.name} exceeds {tol:g} "
                    f"({self.problem.dtype})")
        return None


def _reference_algorithm(op: str):
    from .registry import algorithms
    return algorithms(op)[REFERENCE[op]]
