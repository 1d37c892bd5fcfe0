"""sparsevox's CuPy allocations (kernel maps, slot tables, temporaries) through torch's caching allocator.

By default CuPy allocates from its own memory pool, which ``torch.cuda.max_memory_allocated`` does not see
and ``torch.cuda.empty_cache`` does not empty: a torch user's peak-memory figures then leave out every
kernel map, and two pools hold cached blocks side by side. :func:`use_torch_allocator` routes CuPy's
device allocations of this process through ``torch.cuda``'s caching allocator instead (on CuPy's current
stream, which sparsevox sets to torch's current stream for its work), so torch accounts for all of it.

It is process-wide (CuPy has one allocator per process and thread), **on by default** at import of
:mod:`sparsevox.adapters.torch` (``SPARSEVOX_TORCH_ALLOCATOR=0`` leaves CuPy's pool in place), and it never
replaces an allocator someone else installed (only CuPy's default pool). Measured on an H200 (f9d08e8,
SemanticKITTI MinkUNet, spconv in the same process): step-time ratios to spconv 1.17/1.09/1.22/1.38 with it
and 1.07/1.15/1.08/1.46 with CuPy's pool (float16 inference/training, float32 inference/training), the
same within the runs' noise; with it, torch's peak-memory figures include every map and table.
"""
from __future__ import annotations

import ctypes
import importlib.util
import itertools
import logging
import os
import sys
import threading

import torch

log = logging.getLogger("sparsevox.torch_memory")

ENV_VAR = "SPARSEVOX_TORCH_ALLOCATOR"
_state: dict = {}  # "previous": CuPy's allocator before ours; "ours": the malloc we installed


def _malloc_free(cupy):
    raw_alloc = getattr(torch._C, "_cuda_cudaCachingAllocator_raw_alloc", None)
    raw_delete = getattr(torch._C, "_cuda_cudaCachingAllocator_raw_delete", None)

    def malloc(size: int, device_id: int) -> int:
        stream = cupy.cuda.get_current_stream().ptr
        if raw_alloc is not None and torch.cuda.current_device() == device_id:
            return raw_alloc(size, stream)  # the public call below, without its device switch (~5 µs)
        return torch.cuda.caching_allocator_alloc(size, device_id, stream)

    def free(ptr: int, device_id: int) -> None:
        if raw_delete is not None:
            raw_delete(ptr)
        else:
            torch.cuda.caching_allocator_delete(ptr)

    return malloc, free


# C signatures of CuPy's CFunctionAllocator: void* malloc(void* param, size_t size, int device) and
# void free(void* param, void* ptr, int device)
_C_MALLOC = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_C_FREE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)


_tls = threading.local()  # .failure: the exception of this thread's last failed allocation
# param -> (malloc, free): the Python functions behind the C callbacks, one pair per allocator made, found by
# the ``param`` CuPy hands back to the callbacks. Per allocator, not one global pair: a memory object frees
# through the routes of the allocator that made it, so installing another (a test's stand-in CuPy did, on
# the GPU at 7d24ce6) cannot send the live allocator's blocks to someone else's free. Never removed (a
# memory object can outlive its allocator); a pair per use_torch_allocator(True) call.
_routes: dict = {}
_params = itertools.count(1)


def _c_malloc(param, size, device_id, _routes=_routes, _tls=_tls):
    try:
        return _routes[param][0](size, device_id)
    except BaseException as e:  # noqa: BLE001 -- a C callback cannot raise: allocate() raises it
        _tls.failure = e
        return None


def _c_free(param, ptr, device_id, _routes=_routes, _sys=sys, _log=log):
    # (what it uses is bound as defaults: at interpreter exit the module's globals may be gone first)
    try:
        _routes[param][1](ptr, device_id)
    except Exception:  # noqa: BLE001 -- torch or CUDA torn down at exit: the block goes with the process
        if not _sys.is_finalizing():
            _log.warning("sparsevox: a block could not be given back to torch's allocator", exc_info=True)


# Made once and never freed: every CuPy memory object keeps the raw address of the free callback (not the
# allocator), so a callback freed while such memory lives (after use_torch_allocator(False), at exit)
# would be a jump into a freed closure.
_CALLBACKS = (_C_MALLOC(_c_malloc), _C_FREE(_c_free))
_ADDRESSES = tuple(ctypes.cast(c, ctypes.c_void_p).value for c in _CALLBACKS)
for _c in _CALLBACKS:
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(_c))
del _c


def _torch_allocator(cupy):
    """CuPy's allocator callable (size -> MemoryPointer) backed by torch's caching allocator.

    Built on CuPy's CFunctionAllocator, not its PythonFunctionAllocator: the latter's memory objects keep
    the free function as a Python attribute, which the cyclic garbage collector clears before their
    ``__dealloc__`` runs, so a CuPy array freed as part of a reference cycle was never given back to torch
    (``TypeError: 'NoneType' object is not callable`` in ``__dealloc__``, seen in every e2e log up to
    c4684e4). CFunctionAllocator's memory objects hold only C pointers and are never cleared.
    The C callbacks cannot raise, so a failed allocation is kept per thread and raised here."""
    param = next(_params)
    _routes[param] = _malloc_free(cupy)
    inner = cupy.cuda.memory.CFunctionAllocator(param, _ADDRESSES[0], _ADDRESSES[1], _CALLBACKS)

    def allocate(size: int):
        _tls.failure = None
        mem = inner.malloc(size)
        if size and not mem.ptr:
            failure, _tls.failure = _tls.failure, None
            raise failure if failure is not None else MemoryError(f"torch's allocator returned no memory for "
                                                                  f"{size} bytes")
        return mem

    return allocate


def _is_cupy_default(cupy, allocator) -> bool:
    pool = cupy.get_default_memory_pool()
    return getattr(allocator, "__self__", None) is pool


def use_torch_allocator(enabled: bool = True) -> bool:
    """Route CuPy's device allocations through torch's caching allocator (``enabled``), or give CuPy back
    the allocator it had before. Returns whether torch's allocator is in use afterwards.

    Raises ``ValueError`` when ``enabled`` is not a bool, and ``RuntimeError`` when CuPy's allocator is
    neither its default pool nor ours (someone else installed one: sparsevox does not replace it).
    Without CuPy or CUDA there is nothing to route: returns False."""
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled must be True or False, got {enabled!r}")
    try:
        import cupy
    except ImportError:
        return False
    current = cupy.cuda.get_allocator()
    ours = _state.get("ours")
    if enabled:
        if ours is not None and current is ours:
            return True
        if not _is_cupy_default(cupy, current):
            raise RuntimeError("CuPy's allocator is not its default memory pool (another library or the user set "
                               "one); sparsevox leaves it in place: call use_torch_allocator after restoring it")
        allocator = _torch_allocator(cupy)
        cupy.cuda.set_allocator(allocator)
        _state.update(previous=current, ours=allocator)
        log.info("sparsevox: CuPy allocations go through torch's caching allocator")
        return True
    if ours is not None and current is ours:
        cupy.cuda.set_allocator(_state["previous"])
    _state.clear()
    return False


def torch_allocator_in_use() -> bool:
    """Whether :func:`use_torch_allocator` is in effect (CuPy's current allocator is ours)."""
    ours = _state.get("ours")
    if ours is None:
        return False
    import cupy
    return cupy.cuda.get_allocator() is ours


def _from_env() -> None:
    """At import: torch's allocator unless ``SPARSEVOX_TORCH_ALLOCATOR`` is 0 (and only with CuPy installed:
    without it there is nothing to route; CUDA is not initialised here, ``torch.cuda.is_available()`` would,
    which breaks CUDA in forked workers). By default an allocator someone else installed in CuPy is left
    in place with a warning; asked for explicitly (``=1``), that is an error."""
    env = os.environ.get(ENV_VAR)
    raw = "1" if env is None else env.strip().lower()
    if raw not in ("0", "1", "true", "false", "yes", "no", ""):
        raise ValueError(f"{ENV_VAR} must be 0 or 1, got {raw!r}")
    if raw in ("0", "false", "no") or importlib.util.find_spec("cupy") is None:
        return
    try:
        use_torch_allocator(True)
    except RuntimeError as e:
        if env is not None and raw != "":
            raise
        log.warning("sparsevox: CuPy's allocations stay in its own pool: %s", e)
