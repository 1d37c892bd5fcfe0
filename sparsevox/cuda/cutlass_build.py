"""Build ``libsparsevox_cutlass.so``: the CUTLASS_IMPLICIT_GEMM kernels, compiled ahead of time with nvcc.

``python -m sparsevox build-cutlass [--jobs N] [--output PATH] [--cutlass-include DIR] [--nvcc PATH]``

What it does:

1. Finds the CUTLASS C++ headers, a build-time dependency pinned to ``nvidia-cutlass==4.2.0.0`` (the
   PyPI wheel carries them under ``cutlass_library/source/include``). When they are not cached yet it
   runs ``pip download --no-deps nvidia-cutlass==4.2.0.0``, checks the wheel's SHA-256 and unpacks only
   the headers into ``<cache>/cutlass-4.2.0.0/`` (``<checkout>/build/`` in a source checkout, else
   ``$SPARSEVOX_CACHE_DIR`` or ``~/.cache/sparsevox``). No CUTLASS runtime dependency is installed.
   Offline: pass ``--cutlass-include DIR`` (or set ``SPARSEVOX_CUTLASS_INCLUDE``) to a directory
   holding ``cutlass/`` and ``cute/``.
2. Compiles ``kernels_cu/cutlass/sparse_gemm.cu`` once per (dtype, mma_tile) -- 3 x 4 instantiation
   units of three GEMMs each, plus one dispatch unit -- in parallel nvcc jobs, for sm_80 (which also
   runs on sm_86/sm_89) and sm_90 machine code.
3. Links them into ``sparsevox/_lib/libsparsevox_cutlass.so`` (or ``$SPARSEVOX_CUTLASS_LIB``, or
   ``--output``), replacing the old file atomically.

Needs nvcc (CUDA 12 or 13) and no GPU. About 5 minutes on 2 cores (each unit takes 20-45 s).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from importlib import resources
from pathlib import Path

from . import prebuilt

log = logging.getLogger("sparsevox.cutlass_build")

CUTLASS_VERSION = "4.2.0.0"
CUTLASS_WHEEL = "nvidia_cutlass-4.2.0.0-py3-none-any.whl"
CUTLASS_WHEEL_SHA256 = "f9599ada45c7bcb6bf53f7d3f0a7d154183e53451c01bfa59eecd37dd4a693f6"
_HEADER_PREFIX = "cutlass_library/source/include/"

DTYPES = {0: "float16", 1: "bfloat16", 2: "tf32"}  # codes of sparse_gemm.cu's DType
TILES = (0, 1, 2, 3)
ARCHS = ("80", "90")
FLAGS = ("-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC,-fvisibility=hidden",
         "-diag-suppress", "177")  # 177: a constant unused in one of the units


def source_file() -> Path:
    try:  # the installed package data
        return Path(str(resources.files("sparsevox.kernels_cu").joinpath("cutlass", "sparse_gemm.cu")))
    except ModuleNotFoundError:  # a source checkout that is not installed
        return Path(__file__).resolve().parents[2] / "kernels_cu" / "cutlass" / "sparse_gemm.cu"


def cache_root() -> Path:
    """``<checkout>/build`` when running from a source checkout, else the user cache directory."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "kernels_cu").is_dir() and os.access(checkout, os.W_OK):
        return checkout / "build"
    return Path(os.environ.get("SPARSEVOX_CACHE_DIR") or "~/.cache/sparsevox").expanduser()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_headers(dest: Path, wheel: Path | None = None) -> Path:
    """Download (unless ``wheel`` is given) the pinned wheel and unpack its headers into ``dest``."""
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            log.info("fetching nvidia-cutlass==%s headers (pip download --no-deps)", CUTLASS_VERSION)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   f"nvidia-cutlass=={CUTLASS_VERSION}", "-d", tmp, "--quiet"]
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{r.stderr.strip()}\nWithout internet, pass "
                                   "--cutlass-include DIR (a directory with cutlass/ and cute/) instead.")
            wheel = Path(tmp) / CUTLASS_WHEEL
        digest = _sha256(wheel)
        if digest != CUTLASS_WHEEL_SHA256:
            raise RuntimeError(f"{wheel.name}: SHA-256 {digest} is not the pinned {CUTLASS_WHEEL_SHA256}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))  # same filesystem as dest
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.startswith(_HEADER_PREFIX) and not name.endswith("/"):
                    target = staging / "include" / name[len(_HEADER_PREFIX):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(z.read(name))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    return dest / "include"


def cutlass_include(explicit: str | None = None, wheel: str | None = None) -> Path:
    """The include directory holding ``cutlass/`` and ``cute/``, fetched into the cache when absent."""
    given = explicit or os.environ.get("SPARSEVOX_CUTLASS_INCLUDE")
    if given:
        inc = Path(given).expanduser()
        if not (inc / "cutlass" / "cutlass.h").is_file():
            raise RuntimeError(f"{inc} has no cutlass/cutlass.h; point it at CUTLASS's include directory")
        return inc
    dest = cache_root() / f"cutlass-{CUTLASS_VERSION}"
    inc = dest / "include"
    if (inc / "cutlass" / "cutlass.h").is_file() and (inc / "cute").is_dir():
        return inc
    return fetch_headers(dest, Path(wheel) if wheel else None)


def find_nvcc(explicit: str | None = None) -> str:
    explicit = explicit or os.environ.get("NVCC")
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit
        raise RuntimeError(f"nvcc {explicit!r} (from --nvcc or $NVCC) is not an executable file")
    for cand in (shutil.which("nvcc"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise RuntimeError("nvcc not found: install the CUDA toolkit (12.x or 13.x), put nvcc on PATH, "
                       "or set NVCC / CUDA_HOME")


def units() -> list[tuple[str, list[str]]]:
    """``(name, defines)`` of every compilation unit; biggest (TF32, large tiles) first."""
    inst = [(f"{DTYPES[d]}_tile{t}", [f"-DSPARSEVOX_DTYPE={d}", f"-DSPARSEVOX_TILE={t}"])
            for d in sorted(DTYPES, reverse=True) for t in TILES]
    return inst + [("dispatch", [])]


def _gencode(archs) -> list[str]:
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def _run(cmd: list[str]) -> tuple[int, str, float]:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    return r.returncode, (r.stdout + r.stderr).strip(), time.perf_counter() - t


def build(output: str | Path | None = None, jobs: int | None = None, include: str | None = None,
          wheel: str | None = None, nvcc: str | None = None, archs=ARCHS) -> Path:
    """Compile and link the library; returns its path. Raises ``RuntimeError`` with nvcc's output."""
    from .cutlass_lib import library_path
    t0 = time.perf_counter()
    out = Path(output) if output else library_path()
    nvcc = find_nvcc(nvcc)
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    version = version.strip().splitlines()[-1]
    inc = cutlass_include(include, wheel)
    src = source_file()
    jobs = max(1, int(jobs or os.cpu_count() or 1))
    todo = units()
    log.info("nvcc: %s (%s); CUTLASS headers: %s", nvcc, version, inc)
    log.info("compiling %d units of %s for sm_%s with %d parallel jobs", len(todo), src.name,
             ", sm_".join(archs), jobs)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sparsevox-cutlass-") as objdir:
        objs, failures = [], []
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            futures = {}
            for name, defines in todo:
                obj = os.path.join(objdir, name + ".o")
                cmd = [nvcc, *FLAGS, *_gencode(archs), f"-I{inc}", *defines, "-c", str(src), "-o", obj]
                futures[pool.submit(_run, cmd)] = (name, obj, cmd)
                objs.append(obj)
            for done, fut in enumerate(concurrent.futures.as_completed(futures), 1):
                name, obj, cmd = futures[fut]
                rc, text, secs = fut.result()
                log.info("[%d/%d] %-16s %5.1f s%s", done, len(todo), name, secs, "" if rc == 0 else "  FAILED")
                if rc != 0:
                    failures.append(f"{' '.join(cmd)}\n{text}")
                    for f in futures:
                        f.cancel()
        if failures:
            raise RuntimeError("CUTLASS build failed:\n" + "\n\n".join(failures))
        tmp_lib = out.with_name(out.name + f".tmp{os.getpid()}")
        rc, text, secs = _run([nvcc, "-shared", *_gencode(archs), "-o", str(tmp_lib), *objs])
        if rc != 0:
            raise RuntimeError(f"linking {out.name} failed:\n{text}")
        os.replace(tmp_lib, out)
    log.info("built %s (%.1f MB; CUTLASS %s, %s, sm_%s) in %.1f s", out, out.stat().st_size / 1e6,
             CUTLASS_VERSION, version, ", sm_".join(archs), time.perf_counter() - t0)
    return out


def cli(argv) -> int:
    """``python -m sparsevox build-cutlass``: returns the process exit status."""
    p = argparse.ArgumentParser(prog="python -m sparsevox build-cutlass", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", "-j", type=int, default=None, help="parallel nvcc jobs (default: CPU count)")
    p.add_argument("--output", "-o", default=None,
                   help="library path (default: $SPARSEVOX_CUTLASS_LIB or sparsevox/_lib/libsparsevox_cutlass.so)")
    p.add_argument("--cutlass-include", default=None, help="CUTLASS include dir (skips the download)")
    p.add_argument("--cutlass-wheel", default=None, help=f"a local {CUTLASS_WHEEL} (skips the download)")
    p.add_argument("--nvcc", default=None, help="nvcc to use (default: $NVCC, PATH, $CUDA_HOME/bin)")
    p.add_argument("--arch", action="append", default=None, help="SM version, repeatable (default: 80 and 90)")
    a = p.parse_args(list(argv))
    return prebuilt.run_build(log, "build-cutlass", lambda: build(a.output, a.jobs, a.cutlass_include,
                                                                  a.cutlass_wheel, a.nvcc, tuple(a.arch or ARCHS)))


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
