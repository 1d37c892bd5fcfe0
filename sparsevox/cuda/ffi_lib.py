"""The one ctypes binding of ``libsparsevox_xla_ffi.so`` (the ``sparsevox_launch`` XLA FFI custom call).

The library (``kernels_cu/xla_ffi/launch_handler.cc``, built by ``python -m sparsevox build-ffi``) is
looked for at ``$SPARSEVOX_XLA_FFI_LIB`` or ``sparsevox/_lib/libsparsevox_xla_ffi.so``, opened once and
checked for its ABI version. It holds a process-local launch table: :func:`register` stores a prepared
kernel sequence under an id, and the custom call, given that id as its ``launch_id`` attribute and
XLA's buffers, launches it on XLA's stream. This module knows no framework: the JAX adapter registers
the handler with XLA (:func:`handler_address` is the function it wraps in a PyCapsule).

A step is ``(func, grid, block, smem, args, slots)``: a CUfunction address, 1-D grid/block (or 3-tuples),
the shared-memory bytes, the kernel's arguments as :func:`sparsevox.cuda.driver.box` takes them (None
for a slot), and ``slots`` ``{argument index: buffer index}`` (buffers: the call's inputs, then its
outputs) naming which argument receives which buffer's address.
"""
from __future__ import annotations

import ctypes
import functools
import itertools
import threading
from pathlib import Path

from . import driver, prebuilt


ABI_VERSION = 2
LIB_NAME = "libsparsevox_xla_ffi.so"
ENV_VAR = "SPARSEVOX_XLA_FFI_LIB"
BUILD_HINT = "build it with `python -m sparsevox build-ffi` (needs g++ or nvcc and jax; no GPU needed)"
TARGET = "sparsevox_launch"  # the CUDA handler's symbol and custom-call name
DRYRUN_TARGET = "sparsevox_launch_dryrun"  # its CPU twin: every check and the packing, no launch
_MSG = 1024


class _Step(ctypes.Structure):
    _fields_ = [("func", ctypes.c_void_p), ("grid", ctypes.c_uint32 * 3), ("block", ctypes.c_uint32 * 3),
                ("smem", ctypes.c_uint32), ("params", ctypes.c_void_p), ("params_size", ctypes.c_uint32),
                ("n_params", ctypes.c_uint32), ("param_offsets", ctypes.POINTER(ctypes.c_uint32)),
                ("param_sizes", ctypes.POINTER(ctypes.c_uint32)),
                ("n_slots", ctypes.c_uint32), ("slot_param", ctypes.POINTER(ctypes.c_uint32)),
                ("slot_buffer", ctypes.POINTER(ctypes.c_int32))]


def library_path() -> Path:
    return prebuilt.library_path(ENV_VAR, LIB_NAME)


_SIGNATURES = {
    "sparsevox_ffi_abi_version": (ctypes.c_int, []),
    "sparsevox_ffi_register_launch": (ctypes.c_int, [ctypes.c_int64, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32,
                                                     ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint64), ctypes.c_int32,
                                                     ctypes.POINTER(_Step), ctypes.c_char_p, ctypes.c_size_t]),
    "sparsevox_ffi_forget_launch": (ctypes.c_int, [ctypes.c_int64]),
    "sparsevox_ffi_launch_count": (ctypes.c_int64, []),
    "sparsevox_ffi_check": (ctypes.c_int, [ctypes.c_int64, ctypes.c_int32, ctypes.c_int32, ctypes.c_char_p,
                                           ctypes.c_size_t]),
    "sparsevox_ffi_pack": (ctypes.c_int64, [ctypes.c_int64, ctypes.c_int32, ctypes.POINTER(ctypes.c_uint64),
                                            ctypes.POINTER(ctypes.c_uint64), ctypes.c_int32, ctypes.c_int32,
                                            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]),
    "sparsevox_ffi_last_params": (ctypes.c_int64, [ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p, ctypes.c_size_t]),
    "sparsevox_ffi_driver_available": (ctypes.c_int, [ctypes.c_char_p, ctypes.c_size_t]),
}


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    path = library_path()
    return prebuilt.open_library(path, "XLA FFI library", "sparsevox_ffi_abi_version", ABI_VERSION, BUILD_HINT,
                                 _SIGNATURES)


def available() -> tuple[bool, str]:
    """``(True, "")`` when the library is built and loads, else ``(False, reason with the build command)``."""
    lib, reason = _load()
    return lib is not None, reason


def reset() -> None:
    """Forget the loaded library (tests; after rebuilding or changing ``SPARSEVOX_XLA_FFI_LIB``)."""
    _load.cache_clear()


def _lib() -> ctypes.CDLL:
    lib, reason = _load()
    if lib is None:
        raise RuntimeError(reason)
    return lib


def handler_address(name: str = TARGET) -> int:
    """The address of an exported FFI handler (``sparsevox_launch`` or ``sparsevox_launch_dryrun``)."""
    if name not in (TARGET, DRYRUN_TARGET):
        raise ValueError(f"no FFI handler {name!r}; the library exports {TARGET!r} and {DRYRUN_TARGET!r}")
    return ctypes.cast(getattr(_lib(), name), ctypes.c_void_p).value


def layout(args) -> tuple[bytes, list[int], list[int]]:
    """The packed bytes of a kernel's arguments, each one's offset (native alignment, as in a C struct)
    and size."""
    blob, offsets, sizes = bytearray(), [], []
    for v in args:
        b = driver.box(v)
        size = ctypes.sizeof(b)
        blob += bytes(-len(blob) % size)
        offsets.append(len(blob))
        sizes.append(size)
        blob += bytes(b)
    return bytes(blob), offsets, sizes


_ids = itertools.count(1)
_ids_lock = threading.Lock()


def register(steps, n_args: int, n_rets: int, buffer_bytes=None, device: int = -1, align: int = 1) -> int:
    """Store a launch in the table; returns its id (the custom call's ``launch_id``).

    ``buffer_bytes``: the size each buffer must have (inputs, then outputs; 0 or None: unchecked);
    ``device``: the GPU the functions are loaded on (-1: any); ``align``: the alignment every buffer
    address needs (16 for kernels with 16-byte vector loads)."""
    lib = _lib()
    n_buf = n_args + n_rets
    keep, structs = [], []
    for func, grid, block, smem, args, slots in steps:
        blob, offsets, psizes = layout(args)
        params = ctypes.create_string_buffer(blob, max(1, len(blob)))
        offs = (ctypes.c_uint32 * max(1, len(offsets)))(*offsets)
        psz = (ctypes.c_uint32 * max(1, len(psizes)))(*psizes)
        sp = (ctypes.c_uint32 * max(1, len(slots)))(*slots.keys())
        sb = (ctypes.c_int32 * max(1, len(slots)))(*slots.values())
        keep += [params, offs, psz, sp, sb]
        dims = [tuple(int(v) for v in (d if isinstance(d, (tuple, list)) else (d, 1, 1))) for d in (grid, block)]
        structs.append(_Step(int(func), (ctypes.c_uint32 * 3)(*dims[0]), (ctypes.c_uint32 * 3)(*dims[1]), int(smem),
                             ctypes.cast(params, ctypes.c_void_p), len(blob), len(offsets), offs, psz, len(slots), sp, sb))
    arr = (_Step * len(structs))(*structs)
    sizes = (ctypes.c_uint64 * max(1, n_buf))(*(int(b or 0) for b in (buffer_bytes or [0] * n_buf)))
    msg = ctypes.create_string_buffer(_MSG)
    with _ids_lock:
        launch_id = next(_ids)
    if lib.sparsevox_ffi_register_launch(launch_id, n_args, n_rets, device, align, sizes, len(structs), arr,
                                         msg, _MSG) != 0:
        raise ValueError(msg.value.decode(errors="replace"))
    return launch_id


def forget(launch_id: int) -> bool:
    """Remove a launch (a later call naming it fails with an error); whether it was registered."""
    lib, _ = _load()
    return bool(lib.sparsevox_ffi_forget_launch(int(launch_id))) if lib is not None else False


def count() -> int:
    return int(_lib().sparsevox_ffi_launch_count())


def check(launch_id: int, n_args: int, n_rets: int) -> str:
    """The error the handler would give a call with these buffer counts, or "" when it would go ahead."""
    msg = ctypes.create_string_buffer(_MSG)
    _lib().sparsevox_ffi_check(int(launch_id), n_args, n_rets, msg, _MSG)
    return msg.value.decode(errors="replace")


def pack(launch_id: int, step: int, addrs, sizes, n_args: int) -> bytes:
    """The parameter bytes the handler would pass step ``step`` for buffers at ``addrs`` of ``sizes`` bytes
    (inputs, then outputs); ``ValueError`` with the handler's message when it would refuse them."""
    n = len(addrs)
    a, s = (ctypes.c_uint64 * max(1, n))(*addrs), (ctypes.c_uint64 * max(1, n))(*sizes)
    msg = ctypes.create_string_buffer(_MSG)
    out = ctypes.create_string_buffer(4096)
    got = _lib().sparsevox_ffi_pack(int(launch_id), step, a, s, n_args, n - n_args, out, 4096, msg, _MSG)
    if got < 0:
        raise ValueError(msg.value.decode(errors="replace"))
    return out.raw[:got]


def last_params(launch_id: int, step: int = 0) -> bytes | None:
    """The bytes packed for ``step`` by the last ``sparsevox_launch_dryrun`` call of this id (tests)."""
    out = ctypes.create_string_buffer(4096)
    got = _lib().sparsevox_ffi_last_params(int(launch_id), step, out, 4096)
    return None if got < 0 else out.raw[:got]


def driver_available() -> tuple[bool, str]:
    """Whether the handler can resolve ``cuLaunchKernel`` here (opens ``libcuda.so.1``), with the reason."""
    msg = ctypes.create_string_buffer(_MSG)
    ok = bool(_lib().sparsevox_ffi_driver_available(msg, _MSG))
    return ok, msg.value.decode(errors="replace")
