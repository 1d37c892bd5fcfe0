"""Process-wide switches."""
from __future__ import annotations

import os

_tf32 = os.environ.get("SPARSEVOX_ALLOW_TF32", "0").lower() in ("1", "true", "yes")


def allow_tf32(enabled: bool | None = None) -> bool:
    """Get, or set with ``enabled``, whether float32 convolutions may use TF32 tensor cores.

    Off by default (float32 stays exact, as with ``torch.backends.cuda.matmul.allow_tf32 = False``);
    also switched on by the environment variable ``SPARSEVOX_ALLOW_TF32=1``.
    """
    global _tf32
    if enabled is not None:
        _tf32 = bool(enabled)
    return _tf32


_SORT_CHOICES = {"auto": "auto", "1": True, "true": True, "yes": True, "always": True,
                 "0": False, "false": False, "no": False, "never": False}


def _sort_from_env():
    raw = os.environ.get("SPARSEVOX_SORT_ROWS", "auto").strip().lower()
    if raw not in _SORT_CHOICES:
        raise ValueError(f"SPARSEVOX_SORT_ROWS must be one of auto, 1, 0 (always, never), got {raw!r}")
    return _SORT_CHOICES[raw]


_sort_rows = _sort_from_env()


def sort_rows(enabled=None, dtype_name: str | None = None) -> bool | str:
    """Get, or set with ``enabled`` (True, False or ``"auto"``), whether IMPLICIT_GEMM orders a map's rows
    by neighbour bitmask before tiling (the slot sort of :func:`sparsevox.algorithms.implicit_gemm.slot_table`).

    With ``dtype_name``: the decision for that dtype. ``"auto"`` (the default, or the environment
    variable ``SPARSEVOX_SORT_ROWS=auto|1|0``) sorts for the SIMT dtypes (float32, float64) only: a sort
    costs ~0.3-0.5 ms of host time per fresh map (keys, a radix sort of ~12 launches, a gather), which a
    float16 network step, bound by the host, pays in full, while it saves only tens of microseconds of
    tensor-core time per layer; the exact SIMT kernels are bound by the device, where the sort's saved
    multiply-adds pay.
    """
    global _sort_rows
    if enabled is not None:
        if enabled != "auto" and not isinstance(enabled, bool):
            raise ValueError(f"enabled must be True, False or 'auto', got {enabled!r}")
        if enabled != _sort_rows:
            # the process's memo of choices and plans was made under the old order (a mask split tuned on
            # sorted rows): forget it; launches already prepared on a map keep the order they were made with
            _forget_choices()
        _sort_rows = enabled
    if dtype_name is None:
        return _sort_rows
    if _sort_rows == "auto":
        return dtype_name not in ("float16", "bfloat16")
    return _sort_rows


_tf32x3 = os.environ.get("SPARSEVOX_ALLOW_TF32X3", "1").strip().lower() not in ("0", "false", "no")


def allow_tf32x3(enabled: bool | None = None) -> bool:
    """Get, or set with ``enabled``, whether float32 convolutions may run the 3xTF32 tensor-core kernels
    (IMPLICIT_GEMM ``tf32x3``: float32-level error, judged by the autotuner's float32 check like the exact
    SIMT kernels; not bit-identical to them, and an infinite input gives NaN where they give Inf).

    On by default; ``False`` (or ``SPARSEVOX_ALLOW_TF32X3=0``) keeps float32 on the SIMT kernels. A change
    forgets this process's tuned choices (the tuning cache file keeps both kinds under distinct keys).
    """
    global _tf32x3
    if enabled is not None:
        if not isinstance(enabled, bool):
            raise ValueError(f"enabled must be True or False, got {enabled!r}")
        if enabled != _tf32x3:
            _forget_choices()
        _tf32x3 = enabled
    return _tf32x3


def _forget_choices() -> None:
    from .tuning import tune_cache
    with tune_cache._lock:
        tune_cache.choices.clear()
        tune_cache.plans.clear()
