"""The one algorithm registry: canonical name → Algorithm, for each op (``conv`` and ``depthwise``).

Each module of :mod:`sparsevox.algorithms` registers its algorithms here when imported; the first
:func:`algorithms` call imports that package. GPU modules import CuPy only when first called, so
registering them costs nothing on a machine without a GPU.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Algorithm:
    """One algorithm of one op.

    forward(feats, weight, kmap, **params) -> out
    dgrad(grad_out, weight, kmap, **params) -> grad_feats
    wgrad(feats, grad_out, kmap, num_offsets, out_dtype=None, **params) -> grad_weight in ``out_dtype``
        (None: the features' dtype; a wider one, e.g. float32 for 16-bit features, gets the accumulator
        without a rounding to the features' dtype first)
    params(direction, problem) -> list of parameter dicts to search (``[{}]`` when nothing to tune)
    available(problem) -> (ok, reason): can it run on this device and dtype?
    prepare(direction, dtype_name, c_in, c_out, kmap, device_id, **params) -> a launch object with
        ``launch(a, b, out)`` on raw device addresses, or None (optional: GPU kernels that adapters may
        call without wrapping tensors; see :func:`sparsevox.conv.prepared`)
    roundings(direction, params) -> how many times a result element is rounded to the output dtype
        (optional, default 1): the accuracy check allows each rounding after the first one unit of
        roundoff of the summed magnitudes (:mod:`sparsevox.tuning.check`)
    scratch(direction, problem, params) -> bytes of device memory a call holds beyond its inputs and its
        output (optional, None: not declared): between candidates whose times are within
        :data:`sparsevox.tuning.autotune.MEMORY_TIE` of the fastest, the autotuner takes the one that
        declares the least (:func:`sparsevox.tuning.autotune.with_less_scratch`)
    """
    name: str
    forward: Callable
    dgrad: Callable
    wgrad: Callable
    params: Callable
    available: Callable
    prepare: Callable | None = None
    roundings: Callable | None = None
    scratch: Callable | None = None


_REGISTRY: dict[str, dict[str, Algorithm]] = {"conv": {}, "depthwise": {}}


def register(op: str, algo: Algorithm) -> None:
    _REGISTRY[op][algo.name] = algo


def token(op: str) -> tuple:
    """Changes when ``op``'s registry or any algorithm in it is replaced, or it grows: part of the memo
    keys of choices made from it. Loads the backends first: a key taken before the first load would never
    match again (2507569: a process's first call signature was re-planned, and the JAX FFI path found no
    memoised plan for it)."""
    _load_backends()
    d = _REGISTRY[op]
    return id(d), tuple(map(id, d.values()))


def algorithms(op: str) -> dict[str, Algorithm]:
    _load_backends()
    return _REGISTRY[op]


_loaded = False
_load_lock = threading.Lock()


def _load_backends() -> None:
    # Frameworks call in from several threads (JAX runs each device's callback on its own thread): the
    # flag is set only after the import, under a lock, so no thread sees a half-filled registry.
    global _loaded
    if _loaded:
        return
    with _load_lock:
        if not _loaded:
            from .. import algorithms  # noqa: F401  (registers every algorithm)
            _loaded = True


def availability(op: str, names, problem) -> tuple[list[Algorithm], dict[str, str]]:
    """Split requested names into runnable algorithms and ``{name: reason}`` for the others."""
    table = algorithms(op)
    ok, why = [], {}
    for name in names:
        algo = table.get(name)
        if algo is None:
            why[name] = "not part of this build of sparsevox"
            continue
        good, reason = algo.available(problem)
        if good:
            ok.append(algo)
        else:
            why[name] = reason
    return ok, why


def gpu_unavailable(problem, name: str) -> str | None:
    """Why a GPU-only algorithm ``name`` cannot run for ``problem`` (CPU arrays, no usable GPU), or None."""
    if problem.device != "gpu":
        return f"{name} runs on CUDA GPUs only (CPU arrays use the explicit algorithm)"
    from ..cuda.gpu_info import gpu_available
    ok, reason = gpu_available()
    return None if ok else reason


def dtype_name(a) -> str:
    return np.dtype(a.dtype).name if not hasattr(a.dtype, "name") else a.dtype.name
