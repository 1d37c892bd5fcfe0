"""The autotuner: time every allowed (algorithm, parameters) candidate, keep the fastest, cache it.

``choose(problem, algos, run)`` is called by :func:`sparsevox.conv.select` for convolution and
depthwise convolution alike, once per direction (``fwd``, ``dgrad``, ``wgrad`` are separate problems).

1. Candidates are every parameter dict of every allowed, available algorithm (the algorithm input is a
   filter on this search space). A single candidate with a single parameter set is chosen untimed.
2. A configuration (``Problem.key()`` plus the library version) already in the cache (memory, then the
   file of :mod:`sparsevox.tuning.tune_cache`) is answered from it: the fastest cached candidate that the
   filter allows. Candidates the cache has never seen are tuned and merged in.
3. Tuning a candidate: one warm-up call (it compiles, builds derived maps) whose output is judged once
   by :class:`sparsevox.tuning.check.Oracle` — the operation evaluated on the same inputs in a wider dtype,
   with an elementwise bound that follows the candidate's dtype (one rounding of the output plus the
   accumulation). A candidate that raises is dropped. One that fails the check is dropped when the
   algorithm input was ``auto``; an algorithm the user named is never vetoed: it is timed, candidates of
   the named algorithms that pass are preferred, and one that failed runs only when none passed, with
   a warning giving the measured error. Then timed calls (CUDA events on the GPU,
   ``perf_counter`` on the CPU), as many as fit a share of :data:`TUNE_BUDGET_S` (at least
   :data:`MIN_REPEATS`), and the median is its time. A candidate whose first timing is
   :data:`PRUNE_FACTOR` times the best so far is not repeated.
4. Memory breaks near ties: a usable candidate within :data:`MEMORY_TIE` of the fastest that declares
   less scratch memory (``Algorithm.scratch``) runs instead (:func:`with_less_scratch`).
5. Loud where it costs: when every candidate but the reference algorithm (EXPLICIT_GEMM / EXPLICIT) of
   a configuration was dropped, a ``warnings.warn`` names the configuration and the reasons, once per
   process, because that silently costs 5-10x.

Logging: logger ``sparsevox.autotune``; ``SPARSEVOX_AUTOTUNE_LOG=1`` prints every candidate and its time
to stderr; a configuration whose tuning takes over a second gets a progress line at INFO.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import statistics
import sys
import time
import warnings

from . import tune_cache
from ..errors import AlgorithmUnavailableError

log = logging.getLogger("sparsevox.autotune")

TUNE_BUDGET_S = 0.25  # timed calls per configuration, all candidates together (warm-ups not counted)
MIN_REPEATS = 3
MAX_REPEATS = 50
PRUNE_FACTOR = 2.0
PROGRESS_AFTER_S = 1.0
MEMO_LIMIT = 4096  # in-process final choices kept before the memo is emptied
# A candidate at most this much slower than the fastest is taken instead when it declares less scratch
# memory (Algorithm.scratch): in a float16 MinkUNet step on SemanticKITTI the peak (468 MiB, spconv 378) was
# the float32 output buffer of a CUTLASS layer at level 0, 67 MiB more than IMPLICIT_GEMM holds (H200,
# 456b6df, benchmarks/probes/memory_phases.py).
MEMORY_TIE = 0.10

REFERENCE = {"conv": "explicit_gemm", "depthwise": "explicit"}

# Part of every cache key: verdicts of an older check are not trusted (version 1 compared candidates
# with float16 EXPLICIT_GEMM output at a flat 1 % and dropped correct kernels; issue 17).
CHECK_VERSION = 2


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
        _version_key = f"sparsevox {__version__}|check {CHECK_VERSION}"
    return f"{problem.key()}{_variant_key(problem)}|{_version_key}"


def _variant_key(problem) -> str:
    """What process-wide switches add to a problem's key: :func:`_rows_key`, and ``|no3xtf32`` for a GPU
    float32 convolution while :func:`sparsevox.config.allow_tf32x3` is off (its choices differ)."""
    from ..config import allow_tf32x3
    off = problem.device == "gpu" and problem.op == "conv" and problem.dtype == "float32" and not allow_tf32x3()
    return _rows_key(problem) + ("|no3xtf32" if off else "")


def _rows_key(problem) -> str:
    """``|unsorted`` when IMPLICIT_GEMM will not sort this problem's rows (:func:`sparsevox.config.sort_rows`):
    the best tile differs, and a mask split, which only pays on sorted rows, is not a candidate then."""
    from ..config import sort_rows
    if problem.device != "gpu" or problem.op != "conv" or problem.direction == "wgrad":
        return ""  # the slot order is IMPLICIT_GEMM's forward and dgrad tables only
    return "" if sort_rows(dtype_name=problem.dtype) else "|unsorted"


_verbose_handler = None


def _candidate_logger():
    """``log.info`` (to stderr) under ``SPARSEVOX_AUTOTUNE_LOG=1``, else ``log.debug``."""
    global _verbose_handler
    if os.environ.get("SPARSEVOX_AUTOTUNE_LOG", "0").lower() not in ("1", "true", "yes"):
        return log.debug
    if _verbose_handler is None:
        _verbose_handler = logging.StreamHandler(sys.stderr)
        _verbose_handler.setLevel(logging.INFO)
        _verbose_handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.addHandler(_verbose_handler)
        if log.getEffectiveLevel() > logging.INFO:
            log.setLevel(logging.INFO)
    return log.info


def choose(problem, algos, run, *, timer=None, oracle=None, named=False):
    """Return ``(algorithm, params)`` for ``problem`` among ``algos``.

    Args:
        problem: :class:`sparsevox.tuning.problem.Problem` (its ``direction`` says which of forward, dgrad,
            wgrad ``run`` executes).
        algos: the allowed, available :class:`~sparsevox.tuning.registry.Algorithm` objects.
        run: ``run(algo, params) -> output array``: one call of a candidate on the real inputs.
        timer: ``timer(fn) -> seconds`` of one call of ``fn()``; default CUDA events on the GPU,
            ``perf_counter`` on the CPU.
        oracle: ``oracle() ->`` a :class:`sparsevox.tuning.check.Oracle` of this call (anything with
            ``judge(out) -> Verdict``), built when the first candidate is checked; None checks nothing.
        named: the user named these algorithms (not ``auto``): a failed check warns instead of dropping.
    """
    names = tuple(a.name for a in algos)
    exact = (problem, names, named)  # the fast path: this very problem was answered before
    hit = tune_cache.choices.get(exact)
    if hit is not None:
        return hit
    bucket = (problem.key(), names, named)  # a new N in a known bucket (scans differ in size every batch)
    best = tune_cache.choices.get(bucket)
    if best is None:
        candidates = [(a, p) for a in algos for p in a.params(problem.direction, problem)]
        if not candidates:
            raise AlgorithmUnavailableError(f"no candidate to run for {problem.key()}: every algorithm "
                                            "offered no parameter set")
        if len(candidates) == 1:
            best = candidates[0]
        else:
            best = _choose_timed(problem, candidates, run, timer, oracle, named)
        tune_cache.choices[bucket] = best
    if len(tune_cache.choices) > MEMO_LIMIT:  # one entry per exact size seen: keep it bounded
        tune_cache.choices.clear()
    tune_cache.choices[exact] = best
    return best


def with_less_scratch(problem, candidates, usable, best: int) -> int:
    """The index of the candidate to run: ``best`` (the fastest of ``usable``, ``[(ms, index)]``) unless
    another usable one within :data:`MEMORY_TIE` of its time declares less scratch memory than it does
    (``Algorithm.scratch``), then the one of those that declares the least (the faster on a tie). A
    candidate that declares nothing is never taken for memory, and a fastest one that declares nothing
    keeps its place."""
    def scratch(n):
        algo, params = candidates[n]
        if algo.scratch is None:
            return None
        try:
            return int(algo.scratch(problem.direction, problem, params))
        except Exception as e:  # a declaration that fails declares nothing; the choice stays the fastest
            _warn_once(problem.key(), f"scratch:{algo.name}",
                       f"sparsevox: {algo.name}.scratch raised {type(e).__name__}: {e}; ignored")
            return None
    fastest = dict((n, ms) for ms, n in usable)[best]
    own = scratch(best)
    if own is None or own == 0:
        return best
    near = [(s, ms, n) for ms, n in usable if ms <= fastest * (1 + MEMORY_TIE) and (s := scratch(n)) is not None
            and s < own]
    if not near:
        return best
    s, ms, n = min(near)
    log.debug("autotune %s: %s within %.0f %% of the fastest (%.4f vs %.4f ms) holds %d bytes less scratch",
              problem.key(), candidates[n][0].name, MEMORY_TIE * 100, ms, fastest, own - s)
    return n


_warned: set = set()  # (configuration key, what) already warned about in this process


def _warn_once(key, what, message):
    if (key, what) not in _warned:
        _warned.add((key, what))
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _choose_timed(problem, candidates, run, timer, oracle, named):
    key = cache_key(problem)
    ids = [candidate_id(a.name, p) for a, p in candidates]
    entry = tune_cache.get(key) or {"times_ms": {}, "dropped": {}, "failed": {}}
    failed = entry.get("failed", {})
    todo = [(c, i) for c, i in zip(candidates, ids) if i not in entry["times_ms"] and i not in entry["dropped"]
            and (named or i not in failed)]
    if todo:
        best_ms = min((entry["times_ms"][i] for i in ids if i in entry["times_ms"] and (named or i not in failed)),
                      default=float("inf"))
        new = _tune(problem, key, todo, run, timer or _default_timer(problem), oracle, named, best_ms)
        entry = tune_cache.merge_entry(entry, new)
        tune_cache.put(key, entry)
        failed = entry.get("failed", {})
    usable = [(entry["times_ms"][i], n) for n, i in enumerate(ids) if i in entry["times_ms"] and i not in failed]
    if named and not usable:  # the user's algorithms all failed the check: they run anyway (warned above)
        usable = [(entry["times_ms"][i], n) for n, i in enumerate(ids) if i in entry["times_ms"]]
    reference = REFERENCE[problem.op]
    if not usable:
        reasons = "; ".join(f"{i}: {entry['dropped'].get(i) or failed.get(i, '?')}" for i in ids)
        fallback = [n for n, (a, _) in enumerate(candidates) if a.name == reference and ids[n] not in entry["dropped"]]
        if not fallback:
            raise AlgorithmUnavailableError(f"every candidate algorithm was dropped for {key} ({reasons})")
        _warn_once(key, "all", f"sparsevox: every candidate failed the accuracy check for {key}; running the "
                               f"reference algorithm {reference} ({reasons})")
        return candidates[fallback[0]]
    ms, n = min(usable)
    n = with_less_scratch(problem, candidates, usable, n)
    ms = entry["times_ms"][ids[n]]
    if ids[n] in failed:  # only reachable for named algorithms
        _warn_once(key, ids[n], f"sparsevox: {ids[n]}, which you asked for, failed the accuracy check for {key} "
                                f"({failed[ids[n]]}); it is used because you named it and no candidate of "
                                f"the algorithms you named passed")
    survivors = {candidates[m][0].name for _, m in usable}
    if not named and survivors == {reference} and len({a.name for a, _ in candidates}) > 1:
        reasons = "; ".join(f"{i}: {entry['dropped'].get(i) or failed.get(i)}" for i in ids
                            if i in entry["dropped"] or i in failed)
        _warn_once(key, "reference-only",
                   f"sparsevox: every candidate but the reference {reference} was dropped for {key}; this "
                   f"configuration runs the slow reference algorithm ({reasons})")
    log.debug("autotune %s: chose %s (%.4f ms)", key, ids[n], ms)
    return candidates[n]


def _default_timer(problem):
    return gpu_timer if problem.device == "gpu" else cpu_timer


def _tune(problem, key, todo, run, timer, oracle, named, best_ms):
    """Check and time the ``todo`` ``[((algo, params), id)]``; return
    ``{"times_ms": .., "dropped": .., "failed": ..}``."""
    say = _candidate_logger()
    check = _Checker(key, oracle)
    budget = TUNE_BUDGET_S / len(todo)
    times, dropped, failed = {}, {}, {}
    started = time.perf_counter()
    announced = False
    for n, ((algo, params), cid) in enumerate(todo):
        try:
            call = functools.partial(run, algo, params)
            roundings = algo.roundings(problem.direction, params) if algo.roundings else 1
            failure = check(call(), roundings)  # the warm-up call; its output is checked
            samples = None
            if failure:
                failed[cid] = failure
                log.warning("autotune %s: %s %s: wrong result: %s", key, "named" if named else "dropped", cid,
                            failure)
            if named or not failure:
                samples = _samples(call, timer, budget, best_ms)
        except Exception as e:  # a candidate that cannot run here is dropped, not fatal
            dropped[cid] = f"raised {type(e).__name__}: {e}"
            failed.pop(cid, None)
            log.warning("autotune %s: dropped %s: %s", key, cid, dropped[cid])
            continue
        if samples is None:
            continue
        times[cid] = ms = statistics.median(samples) * 1e3
        if cid not in failed:
            best_ms = min(best_ms, ms)
        say("autotune %s: %s %.4f ms (median of %d)", key, cid, ms, len(samples))
        elapsed = time.perf_counter() - started
        if elapsed > PROGRESS_AFTER_S and not announced and n + 1 < len(todo):
            announced = True
            log.info("autotune: still tuning %s after %.1f s (%d of %d candidates done)",
                     key, elapsed, n + 1, len(todo))
    elapsed = time.perf_counter() - started  # every tuning is logged (counted by benchmarks); slow ones at INFO
    (log.info if elapsed > PROGRESS_AFTER_S else log.debug)("autotune: tuned %s in %.1f s (%d candidates)",
                                                            key, elapsed, len(todo))
    return {"times_ms": times, "dropped": dropped, "failed": failed}


def _samples(call, timer, budget_s, best_ms) -> list[float]:
    """Timings (seconds) of ``call``: as many as fit ``budget_s`` within [MIN_REPEATS, MAX_REPEATS], or
    just one when that one is already PRUNE_FACTOR times slower than the best so far."""
    first = timer(call)
    if first * 1e3 > PRUNE_FACTOR * best_ms:
        return [first]
    reps = min(max(int(budget_s / max(first, 1e-9)), MIN_REPEATS), MAX_REPEATS)
    return [first] + [timer(call) for _ in range(reps - 1)]


class _Checker:
    """Judges candidates' outputs with the oracle, built when first needed.

    ``checker(out, roundings)`` returns None when ``out`` passes (or there is nothing to check against),
    else the reason, with the measured error.
    """

    def __init__(self, key, oracle_factory):
        self.key, self.factory = key, oracle_factory
        self.oracle = self.unusable = None

    def _oracle(self):
        if self.oracle is None and self.unusable is None and self.factory is not None:
            try:
                self.oracle = self.factory()
            except Exception as e:  # without an oracle nothing can be checked; say so once
                self.unusable = f"{type(e).__name__}: {e}"
                log.warning("autotune %s: the oracle could not be built (%s); candidates are not checked",
                            self.key, self.unusable)
        return self.oracle

    def __call__(self, out, roundings=1):
        oracle = self._oracle()
        if oracle is None:
            return None
        try:
            verdict = oracle.judge(out, roundings)
        except Exception as e:  # the oracle itself failed (out of memory, say): not the candidate's fault
            self.unusable, self.oracle, self.factory = f"{type(e).__name__}: {e}", None, None
            log.warning("autotune %s: the oracle raised (%s); candidates are not checked", self.key, self.unusable)
            return None
        return None if verdict.ok else str(verdict)
