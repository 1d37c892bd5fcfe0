"""The autotuner: time every allowed (algorithm, parameters) candidate, keep the fastest, cache it.

A single candidate with a single parameter set is chosen without timing.
"""
from __future__ import annotations

import logging
import time

log = logging.getLogger("sparsevox.autotune")

_memory: dict[str, tuple[str, dict]] = {}


def _timer(problem):
    if problem.device == "gpu":
        import cupy

        def timed(fn):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return cupy.cuda.get_elapsed_time(start, end) * 1e-3
        return timed

    def timed(fn):
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    return timed


def choose(problem, algos, run):
    """Return ``(algorithm, params)`` for ``problem`` among ``algos``.

    ``run(algo, params)`` executes one candidate on the real inputs (its result is discarded).
    """
    candidates = [(a, p) for a in algos for p in a.params(problem.direction, problem)]
    if len(candidates) == 1:
        return candidates[0]
    key = problem.key()
    hit = _memory.get(key)
    if hit is not None:
        for a, p in candidates:
            if a.name == hit[0] and p == hit[1]:
                return a, p
    timed = _timer(problem)
    best, best_t = None, float("inf")
    for a, p in candidates:
        try:
            run(a, p)  # warm-up (compiles)
            times = sorted(timed(lambda: run(a, p)) for _ in range(3))
        except Exception as e:  # a failing candidate is dropped, not fatal
            log.warning("autotune: %s %s failed and is dropped: %s", a.name, p, e)
            continue
        t = times[len(times) // 2]
        log.debug("autotune %s: %s %s %.3f ms", key, a.name, p, t * 1e3)
        if t < best_t:
            best, best_t = (a, p), t
    if best is None:
        raise RuntimeError(f"every candidate algorithm failed for {key}")
    _memory[key] = (best[0].name, best[1])
    return best
