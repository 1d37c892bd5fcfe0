"""Which process state makes the XLA FFI library's plain C entry points crash (issue 20: on the H200
machine ``ffi_lib.check`` segfaulted inside pytest; on the CI machine it passes).

``python -m benchmarks.probes.ffi_load_diag [LIB]``: in a fresh subprocess each, load the library with
ctypes and call ``sparsevox_ffi_check`` (an unknown id: it must answer with a message), after importing
nothing, jax, torch, or all of numpy, torch, cupy and jax (and starting jax's backends); prints each subprocess's exit code (-11: segfault) and
output, then ``readelf -d`` and the C++ runtime symbols the library takes from outside.
"""
from __future__ import annotations

import subprocess
import sys

CALL = """
import ctypes
{imports}
lib = ctypes.CDLL({path!r})
f = lib.sparsevox_ffi_check
f.restype, f.argtypes = ctypes.c_int, [ctypes.c_int64, ctypes.c_int32, ctypes.c_int32, ctypes.c_char_p, ctypes.c_size_t]
msg = ctypes.create_string_buffer(512)
print("check ->", f(987654, 2, 1, msg, 512), msg.value.decode())
"""


def main(argv=None) -> int:
    from sparsevox.cuda import ffi_lib
    path = (argv or sys.argv[1:] or [str(ffi_lib.library_path())])[0]
    for imports in ("", "import jax", "import torch", "import numpy, torch, cupy, jax; jax.devices()"):
        r = subprocess.run([sys.executable, "-c", CALL.format(imports=imports, path=path)], capture_output=True,
                           text=True, timeout=120)
        print(f"[{imports or 'nothing'}] exit {r.returncode}: {(r.stdout + r.stderr).strip()[-400:]}", flush=True)
    for cmd in (["readelf", "-d", path], ["bash", "-c", f"nm -D --undefined-only {path} | grep -i 'GLIBCXX\\|CXXABI\\|_ZNS' | head -20"]):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            print("$", " ".join(cmd), "\n", r.stdout[-1500:], r.stderr[-300:], flush=True)
        except FileNotFoundError as e:
            print(f"$ {' '.join(cmd)}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
