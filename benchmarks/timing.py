"""Timing: medians of CUDA-event timings after warm-up (host ``perf_counter`` on the CPU), and the dense
cuBLAS rate that the sparse layers are compared with.

Each timed repetition records a start and an end event on torch's current stream around one call and
waits for the end event, so a figure covers the host overhead of the call as well as its kernels (for
small layers the host part dominates; that is what a network sees). CuPy work launched by the core
without an explicit stream goes to the legacy default stream, which synchronises with torch's default
stream, so the events cover it too.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass


@dataclass
class Timing:
    """Median and spread of one measurement, in milliseconds."""
    ms: float
    min_ms: float
    max_ms: float
    repeats: int

    def as_dict(self) -> dict:
        return {"ms": self.ms, "min_ms": self.min_ms, "max_ms": self.max_ms, "repeats": self.repeats}


def synchronize(device: str) -> None:
    if device == "gpu":
        import torch
        torch.cuda.synchronize()


def time_call(fn, device: str, warmup: int = 3, repeats: int = 20) -> Timing:
    """Run ``fn()`` ``warmup`` times, then time ``repeats`` calls one by one; return their median.

    Args:
        fn: a callable with no arguments (its result is dropped).
        device: ``"gpu"`` (torch CUDA events) or ``"cpu"`` (``time.perf_counter``).
        warmup: untimed calls first (compilation, autotuning, allocator warm-up), >= 0.
        repeats: timed calls, >= 1.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    if device == "gpu":
        import torch
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(repeats):
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e3)
    return Timing(statistics.median(samples), min(samples), max(samples), repeats)


def wall_ms(fn, sync=None, warmup: int = 3, repeats: int = 30) -> float:
    """Median host wall time in ms of ``fn()`` followed by ``sync()`` (when given), after ``warmup``
    untimed calls: what a loop that waits for each call sees, host and device together."""
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        samples.append((time.perf_counter() - t) * 1e3)
    return statistics.median(samples)


def loop_us(fn, n: int = 200, sync=None, sync_every: int | None = None, warmup: int = 1) -> float:
    """Mean host wall time in µs per call of ``n`` back-to-back calls of ``fn()`` (throughput: the host
    does not wait for each call). ``sync`` (e.g. ``torch.cuda.synchronize``) runs after the warm-up, every
    ``sync_every`` calls outside the timed part (keeps the launch queue short) and once at the end, timed."""
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    step = sync_every or n
    spent = 0.0
    for start in range(0, n, step):
        t = time.perf_counter()
        for _ in range(min(step, n - start)):
            fn()
        if sync is not None and start + step >= n:
            sync()
        spent += time.perf_counter() - t
        if sync is not None and start + step < n:
            sync()
    return spent / n * 1e6


def flops(pairs: int, c_in: int, c_out: int) -> float:
    """Multiply-adds of one pass over the pairs, counted as 2 FLOPs: ``2 * pairs * C_in * C_out``."""
    return 2.0 * pairs * c_in * c_out


def tflops(pairs: int, c_in: int, c_out: int, ms: float, passes: int = 1) -> float | None:
    """TFLOP/s of ``passes`` GEMM-equivalent passes (forward 1, forward+backward 3) taking ``ms``."""
    if not ms or ms <= 0 or pairs <= 0:
        return None
    return passes * flops(pairs, c_in, c_out) / (ms * 1e-3) / 1e12


class DenseReference:
    """TFLOP/s of a dense ``[rows, C_in] @ [C_in, C_out]`` matmul in a dtype, measured once per shape.

    On the GPU: ``torch.matmul`` (cuBLAS) with TF32 off for float32 unless the run opted in. On the CPU
    (dry runs): NumPy in float32 (NumPy has no fast float16 GEMM), which only checks the plumbing.
    """

    def __init__(self, device: str, warmup: int = 3, repeats: int = 20):
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self._cache: dict = {}

    def tflops(self, rows: int, c_in: int, c_out: int, dtype: str) -> float | None:
        if rows <= 0:
            return None
        key = (rows, c_in, c_out, dtype)
        if key not in self._cache:
            self._cache[key] = self._measure(rows, c_in, c_out, dtype)
        return self._cache[key]

    def _measure(self, rows, c_in, c_out, dtype):
        if self.device == "gpu":
            import torch
            dt = getattr(torch, dtype)
            a = torch.randn(rows, c_in, device="cuda", dtype=dt)
            b = torch.randn(c_in, c_out, device="cuda", dtype=dt)
            out = torch.empty(rows, c_out, device="cuda", dtype=dt)
            t = time_call(lambda: torch.matmul(a, b, out=out), "gpu", self.warmup, self.repeats)
            del a, b, out
        else:
            import numpy as np
            rng = np.random.default_rng(0)
            a = rng.standard_normal((rows, c_in), dtype=np.float32)
            b = rng.standard_normal((c_in, c_out), dtype=np.float32)
            t = time_call(lambda: a @ b, "cpu", 1, max(1, min(self.repeats, 5)))
        return tflops(rows, c_in, c_out, t.ms)


@contextlib.contextmanager
def timed_attrs(targets):
    """While inside, wrap each ``(owner, name, label)`` attribute (a function of a module, a method of a
    class or of one instance) with a timer; yields ``{label: seconds}``, the inclusive wall time spent in
    each (nested ones overlap). The attributes are put back as they were on exit."""
    spent: dict = {}
    saved = []
    for owner, name, label in targets:
        real = getattr(owner, name)

        def wrapper(*a, _real=real, _label=label, **k):
            t = time.perf_counter()
            try:
                return _real(*a, **k)
            finally:
                spent[_label] = spent.get(_label, 0.0) + time.perf_counter() - t
        own = vars(owner).get(name, _MISSING)  # an instance's wrapper shadows its class's method
        saved.append((owner, name, own))
        setattr(owner, name, wrapper)
    try:
        yield spent
    finally:
        for owner, name, own in reversed(saved):
            if own is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, own)


_MISSING = object()
