"""Array interop: any DLPack array in, NumPy (CPU) or CuPy (GPU) in the core, the caller's library out.

The core never imports a framework at module level; libraries are recognised by the module of the
array's type, and imported only when an array of theirs is seen (einops' rule).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import MissingDependencyError


@dataclass(frozen=True)
class Origin:
    """Where an array came from, so results can be returned in the same library and device."""
    lib: str  # "numpy" | "cupy" | "torch" | "jax"
    device: object = None  # torch.device, jax Device, or CuPy device id
    dtype: object = None  # the caller's dtype when the core works in another (torch bfloat16 on CPU)

    @property
    def on_gpu(self) -> bool:
        if self.lib == "cupy":
            return True
        if self.lib == "torch":
            return self.device.type == "cuda"
        if self.lib == "jax":
            return self.device.platform == "gpu"
        return False


def library_of(x) -> str:
    mod = type(x).__module__.split(".")[0]
    if mod in ("jaxlib", "jax"):
        return "jax"
    if mod in ("numpy", "cupy", "torch"):
        return mod
    if isinstance(x, (list, tuple, int, float)):
        return "numpy"
    raise TypeError(
        f"expected a NumPy, CuPy, PyTorch or JAX array, got {type(x).__module__}.{type(x).__name__}")


def import_cupy():
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise MissingDependencyError(
            "GPU arrays need CuPy: pip install 'sparsevox[cuda12]' or 'sparsevox[cuda13]'") from e
    return cupy


def to_core(x):
    """Return ``(array, origin)``: a NumPy or CuPy view of ``x`` (zero-copy where the library allows)."""
    lib = library_of(x)
    if lib == "numpy":
        return np.asarray(x), Origin("numpy")
    if lib == "cupy":
        return x, Origin("cupy", int(x.device.id))
    if lib == "torch":
        import torch
        x = x.detach()
        if x.device.type == "cuda":
            cupy = import_cupy()
            return cupy.from_dlpack(x), Origin("torch", x.device)
        if x.dtype == torch.bfloat16:  # NumPy has no bfloat16 of its own: compute in float32
            return x.float().numpy(), Origin("torch", x.device, torch.bfloat16)
        return x.numpy(), Origin("torch", x.device)
    # jax
    dev = next(iter(x.devices()))
    if dev.platform == "gpu":
        cupy = import_cupy()
        return cupy.from_dlpack(x), Origin("jax", dev)
    return np.asarray(x), Origin("jax", dev)


def from_core(a, origin: Origin):
    """Convert a core array back to the caller's library and device."""
    if origin.lib in ("numpy", "cupy"):
        return a
    if origin.lib == "torch":
        import torch
        if origin.on_gpu:
            return torch.from_dlpack(a)
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.to(origin.dtype) if origin.dtype is not None else t
    import jax
    if origin.on_gpu:
        return jax.dlpack.from_dlpack(a)
    return jax.device_put(np.asarray(a), origin.device)


def array_module(a):
    """``numpy`` or ``cupy``, whichever owns the core array ``a``."""
    if type(a).__module__.split(".")[0] == "cupy":
        return import_cupy()
    return np


def to_host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)
