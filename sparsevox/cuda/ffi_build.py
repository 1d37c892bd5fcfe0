"""Build ``libsparsevox_xla_ffi.so``: the XLA FFI custom call that launches prepared kernels (JAX).

``python -m sparsevox build-ffi [--output PATH] [--xla-include DIR] [--cuda-include DIR] [--cxx PATH]``

Compiles ``kernels_cu/xla_ffi/launch_handler.cc`` (host-only C++17) with g++ (``$CXX``, ``g++``, ``c++``)
or else nvcc, against XLA's FFI headers, which jaxlib ships (``jax.ffi.include_dir()``: found here through
jaxlib's package location without importing jax; ``--xla-include`` or ``$SPARSEVOX_XLA_FFI_INCLUDE``
overrides), and ``cuda.h`` of the CUDA toolkit for the driver types only (without a toolkit, a few
typedefs stand in). Links nothing from CUDA: the handler opens ``libcuda.so.1`` at its first launch, so the
library builds and loads without a GPU. Output: ``sparsevox/_lib/libsparsevox_xla_ffi.so`` (or
``$SPARSEVOX_XLA_FFI_LIB``, or ``--output``), replaced atomically. A few seconds on one core.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from . import prebuilt

log = logging.getLogger("sparsevox.ffi_build")

# --exclude-libs: where the compiler links its C++ runtime statically (a wrapper may), keep that copy's
# symbols out of the export table, so the process's own libstdc++ and ours never resolve into each other.
FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-Wl,--exclude-libs,ALL")


def source_file() -> Path:
    try:  # the installed package data
        return Path(str(resources.files("sparsevox.kernels_cu").joinpath("xla_ffi", "launch_handler.cc")))
    except ModuleNotFoundError:  # a source checkout that is not installed
        return Path(__file__).resolve().parents[2] / "kernels_cu" / "xla_ffi" / "launch_handler.cc"


def xla_include(explicit: str | None = None) -> Path:
    """The directory holding ``xla/ffi/api/ffi.h`` (jaxlib's ``include``, what ``jax.ffi.include_dir()`` is)."""
    given = explicit or os.environ.get("SPARSEVOX_XLA_FFI_INCLUDE")
    if given:
        inc = Path(given).expanduser()
    else:
        spec = importlib.util.find_spec("jaxlib")  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("XLA FFI headers not found: install jax (`pip install sparsevox[jax]`) or pass "
                               "--xla-include DIR (a directory with xla/ffi/api/ffi.h)")
        inc = Path(list(spec.submodule_search_locations)[0]) / "include"
    if not (inc / "xla" / "ffi" / "api" / "ffi.h").is_file():
        raise RuntimeError(f"{inc} has no xla/ffi/api/ffi.h; point --xla-include at jax.ffi.include_dir()")
    return inc


def cuda_include(explicit: str | None = None) -> Path | None:
    """A directory with ``cuda.h``, or None (the handler then declares the few driver types it uses)."""
    given = explicit or os.environ.get("SPARSEVOX_CUDA_INCLUDE")
    if given:
        if not (Path(given) / "cuda.h").is_file():
            raise RuntimeError(f"{given} has no cuda.h")
        return Path(given)
    cands = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.join(os.path.dirname(os.path.realpath(nvcc)), "..", "include"))
    cands += sorted(glob.glob("/usr/local/cuda-*/include"), reverse=True)
    for c in cands:
        if os.path.isfile(os.path.join(c, "cuda.h")):
            return Path(c).resolve()
    return None


def find_compiler(explicit: str | None = None) -> str:
    """A C++17 compiler: ``--cxx``/``$CXX``, g++, c++, else nvcc (host code only)."""
    given = explicit or os.environ.get("CXX")
    if given:
        found = shutil.which(given)
        if not found:
            raise RuntimeError(f"compiler {given!r} (from --cxx or $CXX) is not an executable")
        return found
    for name in ("g++", "c++", "nvcc"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("no compiler: install g++ (or the CUDA toolkit's nvcc), or set CXX")


def command(compiler: str, src: Path, out: Path, xla_inc: Path, cuda_inc: Path | None) -> list[str]:
    incs = [f"-isystem{xla_inc}"] + ([f"-isystem{cuda_inc}"] if cuda_inc else [])
    defines = [] if cuda_inc else ["-DSPARSEVOX_NO_CUDA_H"]
    if os.path.basename(compiler).startswith("nvcc"):
        flags = ["-O2", "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-x", "c++"]
    else:
        flags = list(FLAGS)
    return [compiler, *flags, *incs, *defines, str(src), "-o", str(out), "-ldl"]


def build(output: str | Path | None = None, xla_inc: str | None = None, cuda_inc: str | None = None,
          cxx: str | None = None) -> Path:
    """Compile the library; returns its path. Raises ``RuntimeError`` with the compiler's output."""
    from .ffi_lib import library_path
    t0 = time.perf_counter()
    out = Path(output) if output else library_path()
    compiler = find_compiler(cxx)
    xinc, cinc = xla_include(xla_inc), cuda_include(cuda_inc)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    cmd = command(compiler, source_file(), tmp, xinc, cinc)
    log.info("%s; XLA FFI headers: %s; cuda.h: %s", compiler, xinc, cinc or "none (own typedefs)")
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"building {out.name} failed:\n{' '.join(cmd)}\n{(r.stdout + r.stderr).strip()}")
    os.replace(tmp, out)
    log.info("built %s in %.1f s", out, time.perf_counter() - t0)
    return out


def cli(argv) -> int:
    """``python -m sparsevox build-ffi``: returns the process exit status."""
    p = argparse.ArgumentParser(prog="python -m sparsevox build-ffi", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", "-o", default=None,
                   help="library path (default: $SPARSEVOX_XLA_FFI_LIB or sparsevox/_lib/libsparsevox_xla_ffi.so)")
    p.add_argument("--xla-include", default=None, help="directory with xla/ffi/api/ffi.h (default: jaxlib's)")
    p.add_argument("--cuda-include", default=None, help="directory with cuda.h (default: the CUDA toolkit's)")
    p.add_argument("--cxx", default=None, help="C++ compiler (default: $CXX, g++, c++, nvcc)")
    a = p.parse_args(list(argv))
    return prebuilt.run_build(log, "build-ffi", lambda: build(a.output, a.xla_include, a.cuda_include, a.cxx))


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
