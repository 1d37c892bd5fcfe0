"""Backends of the segment reductions for the network-op tests (pooling, points, dense).

``backend`` fixture values: ``"numpy"`` (the vectorised NumPy path) and ``"emulated"`` (the GPU path's
Python code and ``kernels_cu/pooling.cu`` run on NumPy arrays by ``pooling_cpu_emulator``, outputs
poisoned). On a GPU, :func:`poison_gpu` poisons the outputs CuPy allocates for the kernels.
"""
import numpy as np
import pytest

from sparsevox import segments

# per-dtype relative tolerance of a result computed from inputs already quantised to that dtype
TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
DTYPES = ["float64", "float32", "float16", "bfloat16"]


def np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def quantise(a, dtype: str) -> np.ndarray:
    """float64 values exactly representable in ``dtype``."""
    return np.asarray(a, dtype=np.float64).astype(np_dtype(dtype)).astype(np.float64)


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    if np.isnan(a).any() and not np.isnan(b).any():
        return float("inf")
    denom = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (denom if denom > 0 else 1.0))


def use_emulator(monkeypatch):
    """Route NumPy arrays through the GPU path with the CPU emulator; returns the emulated device."""
    import pooling_cpu_emulator as emu
    ok, why = emu.available()
    if not ok:
        pytest.skip(f"CUDA CPU emulator unavailable: {why}")
    dev = emu.EmulatedDevice(poison=True)
    monkeypatch.setattr(segments, "_device_of", lambda a: dev)
    return dev


@pytest.fixture(params=["numpy", "emulated"])
def backend(request, monkeypatch):
    if request.param == "emulated":
        use_emulator(monkeypatch)
    return request.param


class _PoisonedCupy:
    """CuPy, except that ``empty`` returns arrays filled with NaN bits (floats) or -7 (ints)."""

    def __init__(self, cupy):
        self._cp = cupy

    def __getattr__(self, name):
        return getattr(self._cp, name)

    def empty(self, shape, dtype=float):
        dt = np.dtype(dtype)
        a = self._cp.empty(shape, dtype=dt)
        if dt.kind in "iu":
            a.fill(-7)
        else:  # all-ones bits: a NaN in every float format
            u = {2: np.uint16, 4: np.uint32, 8: np.uint64}[dt.itemsize]
            a.view(u).fill(u(np.iinfo(u).max))
        return a


def poison_gpu(monkeypatch, cupy):
    """Make the GPU path allocate its kernel outputs poisoned (an element left unwritten is NaN / -7)."""
    dev = segments._device_of(cupy.zeros(1))
    monkeypatch.setattr(dev, "xp", _PoisonedCupy(cupy))
    return dev


def to_gpu(a, dtype: str):
    import cupy
    return cupy.asarray(np.asarray(a, dtype=np.float64 if dtype == "float64" else np.float32)).astype(dtype)


def host(a) -> np.ndarray:
    return np.asarray(a.astype("float64").get()) if hasattr(a, "get") else np.asarray(a, dtype=np.float64)
