"""``python -m sparsevox <command>``: demo | cache show|clear|path | build-cutlass."""
from __future__ import annotations

import sys

USAGE = """usage: python -m sparsevox <command>

commands:
  demo [--cpu] [--channels C]   voxelise the built-in LiDAR-like scan and run a small sparse network
  cache show | clear | path     inspect or reset the autotuner's cache
  build-cutlass                 compile the CUTLASS shared object (needs nvcc)
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
    print(f"unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
