"""The one loader of CUDA sources in ``kernels_cu/``: CuPy ``RawModule``s, compiled lazily, per device.

The text compiled is the generated ``#define``s, then every header of ``kernels_cu/common/`` inlined
(in name order), then the ``.cu`` file, so CuPy's cache key (the source text) covers the headers.
``#include "common/..."`` lines in the ``.cu`` are dropped because the headers are already inlined.
Templates are instantiated through ``name_expressions``; nothing compiles at import.
"""
from __future__ import annotations

import functools
import re
from importlib import resources

_INCLUDE = re.compile(r'^\s*#include\s+"common/[^"]+"\s*$', re.M)


def _kernels_dir():
    return resources.files("sparsevox.kernels_cu")


@functools.lru_cache(maxsize=None)
def source(name: str, defines: tuple = ()) -> str:
    """The full text compiled for ``kernels_cu/<name>.cu`` with ``defines`` ((name, value) pairs)."""
    root = _kernels_dir()
    headers = sorted((p for p in root.joinpath("common").iterdir() if p.name.endswith(".cuh")),
                     key=lambda p: p.name)
    parts = [f"#define {k} {v}" for k, v in defines]
    parts += [f"// ---- common/{h.name}\n" + h.read_text() for h in headers]
    parts.append(f"// ---- {name}.cu\n" + _INCLUDE.sub("", root.joinpath(f"{name}.cu").read_text()))
    return "\n".join(parts)


@functools.lru_cache(maxsize=None)
def _module(name: str, name_expressions: tuple, defines: tuple, options: tuple, device_id: int):
    import cupy
    with cupy.cuda.Device(device_id):
        mod = cupy.RawModule(code=source(name, defines), options=("--std=c++17",) + options,
                             name_expressions=name_expressions or None)
        mod.compile()
    return mod


def get_function(name: str, kernel: str, name_expressions=(), defines=(), options=()):
    """The kernel ``kernel`` (a template instantiation listed in ``name_expressions`` or a plain
    ``extern "C"`` name) of ``kernels_cu/<name>.cu`` on the current device."""
    import cupy
    dev = cupy.cuda.Device().id
    mod = _module(name, tuple(name_expressions), tuple(defines), tuple(options), dev)
    return mod.get_function(kernel)
