"""Algorithm enums and the one function that resolves ``fwd_algo``/``bwd_algo`` inputs.

An algorithm input is a *filter on the search space* (reference guide, "Unified Benchmarking System"):
one member, its lower-case name, a list of either (mixed is fine), ``AUTO``, or ``None``. ``None`` reads
``SPARSEVOX_<OP>_ALGO_MODE`` and, when that is unset, ``WARPCONVNET_<OP>_ALGO_MODE``; unset everywhere
means ``auto``. Environment values are ``auto``, a name, or ``[name,name]``.
"""
from __future__ import annotations

import enum
import os


class _AlgoEnum(str, enum.Enum):
    def __str__(self) -> str:
        return self.value


class SPARSE_CONV_FWD_ALGO_MODE(_AlgoEnum):
    EXPLICIT_GEMM = "explicit_gemm"
    IMPLICIT_GEMM = "implicit_gemm"
    CUTLASS_IMPLICIT_GEMM = "cutlass_implicit_gemm"
    AUTO = "auto"


class SPARSE_CONV_BWD_ALGO_MODE(_AlgoEnum):
    EXPLICIT_GEMM = "explicit_gemm"
    IMPLICIT_GEMM = "implicit_gemm"
    CUTLASS_IMPLICIT_GEMM = "cutlass_implicit_gemm"
    AUTO = "auto"


class SPARSE_DEPTHWISE_CONV_FWD_ALGO_MODE(_AlgoEnum):
    EXPLICIT = "explicit"
    IMPLICIT = "implicit"
    AUTO = "auto"


class SPARSE_DEPTHWISE_CONV_BWD_ALGO_MODE(_AlgoEnum):
    EXPLICIT = "explicit"
    IMPLICIT = "implicit"
    AUTO = "auto"


# Spellings accepted besides the canonical names (the guide itself writes explicit_gemm for depthwise).
_ALIASES = {
    "conv": {"explicit": "explicit_gemm", "implicit": "implicit_gemm", "cutlass": "cutlass_implicit_gemm"},
    "depthwise": {"explicit_gemm": "explicit", "implicit_gemm": "implicit"},
}

_ENV = {
    ("conv", "fwd"): "FWD_ALGO_MODE",
    ("conv", "bwd"): "BWD_ALGO_MODE",
    ("depthwise", "fwd"): "DEPTHWISE_CONV_FWD_ALGO_MODE",
    ("depthwise", "bwd"): "DEPTHWISE_CONV_BWD_ALGO_MODE",
}

_ENUMS = {
    ("conv", "fwd"): SPARSE_CONV_FWD_ALGO_MODE,
    ("conv", "bwd"): SPARSE_CONV_BWD_ALGO_MODE,
    ("depthwise", "fwd"): SPARSE_DEPTHWISE_CONV_FWD_ALGO_MODE,
    ("depthwise", "bwd"): SPARSE_DEPTHWISE_CONV_BWD_ALGO_MODE,
}


def env_value(op: str, direction: str) -> tuple[str | None, str | None]:
    """``(value, variable name)`` of the first set variable, SPARSEVOX_* before WARPCONVNET_*."""
    suffix = _ENV[(op, direction)]
    for prefix in ("SPARSEVOX_", "WARPCONVNET_"):
        name = prefix + suffix
        value = os.environ.get(name)
        if value is not None and value.strip():
            return value, name
    return None, None


def _split_env(value: str) -> list[str]:
    v = value.strip()
    if v.startswith("[") and v.endswith("]"):
        v = v[1:-1]
    return [p.strip().strip("'\"") for p in v.split(",") if p.strip()]


_memo: dict = {}


def resolve_algos(value, op: str, direction: str) -> tuple[tuple[str, ...], bool]:
    """Memoised :func:`_resolve` (it runs on every layer call; keyed by the input and the environment)."""
    try:
        key = (op, direction, tuple(value) if isinstance(value, list) else value,
               env_value(op, direction)[0] if value is None else None)
        hit = _memo.get(key)
    except TypeError:  # unhashable input: resolve without the memo
        return _resolve(value, op, direction)
    if hit is None:
        hit = _memo[key] = _resolve(value, op, direction)
    return hit


def _resolve(value, op: str, direction: str) -> tuple[tuple[str, ...], bool]:
    """Resolve an algorithm input to ``(names, explicit)``.

    ``names`` are the canonical lower-case algorithm names allowed (AUTO expanded to all of them);
    ``explicit`` is False when the user left the choice to ``auto`` (then unavailable algorithms are
    dropped silently rather than being an error).
    """
    enum_cls = _ENUMS[(op, direction)]
    source = "fwd_algo" if direction == "fwd" else "bwd_algo"
    if value is None:
        env, var = env_value(op, direction)
        if env is None:
            value = "auto"
        else:
            value, source = _split_env(env), var
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ValueError(f"{source}: an empty algorithm list allows nothing; use 'auto' or name one")
    valid = [m.value for m in enum_cls]
    names: list[str] = []
    auto = False
    for item in items:
        if isinstance(item, enum.Enum):
            name = str(item.value)
        elif isinstance(item, str):
            name = item.strip().lower()
        else:
            raise ValueError(f"{source}: expected an algorithm enum or name, got {item!r}; valid: {valid}")
        name = _ALIASES[op].get(name, name)
        if name not in valid:
            raise ValueError(f"{source}: unknown algorithm {item!r}; valid names are {valid}")
        if name == "auto":
            auto = True
        elif name not in names:
            names.append(name)
    if auto:
        return tuple(m.value for m in enum_cls if m.value != "auto"), False
    return tuple(names), True
