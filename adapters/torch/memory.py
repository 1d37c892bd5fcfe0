"""sparsevox's CuPy allocations (kernel maps, slot tables, temporaries) through torch's caching allocator.

By default CuPy allocates from its own memory pool, which ``torch.cuda.max_memory_allocated`` does not see
and ``torch.cuda.empty_cache`` does not empty: a torch user's peak-memory figures then leave out every
kernel map, and two pools hold cached blocks side by side. :func:`use_torch_allocator` routes CuPy's
device allocations of this process through ``torch.cuda``'s caching allocator instead (on CuPy's current
stream, which sparsevox sets to torch's current stream for its work), so torch accounts for all of it.

It is process-wide (CuPy has one allocator per process and thread), **off by default** until measured
on a GPU (``SPARSEVOX_TORCH_ALLOCATOR=1`` switches it on at import of :mod:`sparsevox.adapters.torch`),
and it never replaces an allocator someone else installed (only CuPy's default pool).
"""
from __future__ import annotations

import logging
import os

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
        malloc, free = _malloc_free(cupy)
        allocator = cupy.cuda.PythonFunctionAllocator(malloc, free).malloc
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
    raw = os.environ.get(ENV_VAR, "0").strip().lower()
    if raw not in ("0", "1", "true", "false", "yes", "no", ""):
        raise ValueError(f"{ENV_VAR} must be 0 or 1, got {raw!r}")
    if raw in ("1", "true", "yes"):
        use_torch_allocator(True)
