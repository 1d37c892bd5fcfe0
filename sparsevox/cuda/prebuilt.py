"""Finding and opening the libraries built ahead of time (CUTLASS, XLA FFI): one place for the path rule,
the load and the ABI check, so both bindings refuse a missing, broken or stale library the same way."""
from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("sparsevox.prebuilt")


def library_path(env_var: str, lib_name: str) -> Path:
    """``$env_var`` when set, else ``sparsevox/_lib/<lib_name>`` (where ``python -m sparsevox build*`` puts it)."""
    env = os.environ.get(env_var)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[1] / "_lib" / lib_name


def open_library(path: Path, what: str, abi_symbol: str, abi_version: int, build_hint: str,
                 signatures: dict | None = None) -> tuple[ctypes.CDLL | None, str]:
    """``(library, "")``, or ``(None, reason)`` naming ``what`` and how to build it: not built, does not
    load, or an ABI version (``int abi_symbol(void)``) other than ``abi_version``. ``signatures``:
    ``{function name: (restype, argtypes)}`` set on the library's functions."""
    if not path.is_file():
        return None, f"the {what} {path} is not built; {build_hint}"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"the {what} {path} does not load ({e}); rebuild it: {build_hint}"
    try:
        fn = getattr(lib, abi_symbol)
        fn.restype, fn.argtypes = ctypes.c_int, []
        version = fn()
    except AttributeError:
        version = None
    if version != abi_version:
        return None, (f"the {what} {path} has ABI version {version}, this sparsevox needs {abi_version}; "
                      f"rebuild it: {build_hint}")
    for name, (restype, argtypes) in (signatures or {}).items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    log.debug("loaded %s", path)
    return lib, ""


def run_build(log: logging.Logger, prefix: str, build) -> int:
    """Run ``build()`` for a ``python -m sparsevox build-*`` command: its log lines to stderr as
    ``<prefix>: ...``, a ``RuntimeError`` reported there; returns the exit status."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prefix}: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        build()
    except RuntimeError as e:
        log.error("%s", e)
        return 1
    finally:
        log.removeHandler(handler)
    return 0
