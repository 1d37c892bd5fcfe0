"""``python -m sparsevox <command>``: demo | cache show|clear|path | build | build-cutlass | build-ffi."""
from __future__ import annotations

import sys

USAGE = """usage: python -m sparsevox <command>

commands:
  demo [--cpu] [--voxel-size M] [--dtype D]
                                voxelise the built-in LiDAR-like scan and run a small sparse network
  cache show | clear | path     inspect or reset the autotuner's cache
  build                         build-ffi, then build-cutlass; says which path JAX calls take
  build-cutlass                 compile the CUTLASS shared object (needs nvcc)
  build-ffi                     compile the XLA FFI custom call for JAX (needs g++ or nvcc, and jax)
"""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from .demo import main as demo
        return demo(rest)
    if cmd == "cache":
        from .tuning.tune_cache import cli
        return cli(rest)
    if cmd == "build-cutlass":
        from .cuda.cutlass_build import cli
        return cli(rest)
    if cmd == "build-ffi":
        from .cuda.ffi_build import cli
        return cli(rest)
    if cmd == "build":
        return build(rest)
    print(f"unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def build(rest) -> int:
    """Both native libraries (the FFI one first: seconds, against minutes), then one line on the JAX path.
    Arguments go to build-cutlass."""
    from .cuda import cutlass_build, ffi_build
    status = ffi_build.cli([])
    status = cutlass_build.cli(rest) or status
    print(f"build: JAX convolutions use {jax_path()}", file=sys.stderr)
    return status


def jax_path() -> str:
    """How JAX calls run in this process: the XLA FFI custom call, or buffer_callback with the reason."""
    try:
        import jax  # noqa: F401
    except ImportError:
        return "nothing (jax is not installed)"
    from .adapters import jax as adapter
    path, why = adapter.jax_call_path()
    return "the XLA FFI custom call sparsevox_launch (forward)" if path == "ffi" else f"buffer_callback ({why})"


if __name__ == "__main__":
    sys.exit(main())
