"""Facts about the GPU, asked once: is one usable, and its name."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def gpu_available() -> tuple[bool, str]:
    """``(True, "")`` when CuPy is installed and a CUDA device answers, else ``(False, reason)``."""
    try:
        import cupy
    except ImportError:
        return False, "CuPy is not installed (pip install 'sparsevox[cuda12]' or 'sparsevox[cuda13]')"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # cudaErrorInsufficientDriver / no device: CuPy imports but cannot run
        return False, f"no usable CUDA device ({type(e).__name__}: {e})"
    if n == 0:
        return False, "no CUDA device"
    return True, ""


@functools.lru_cache(maxsize=None)
def device_name(device_id: int) -> str:
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


@functools.lru_cache(maxsize=None)
def compute_capability(device_id: int) -> tuple[int, int]:
    import cupy
    cc = cupy.cuda.Device(device_id).compute_capability
    return int(cc[:-1]), int(cc[-1])
