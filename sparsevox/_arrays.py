"""Array interop: any DLPack array in, NumPy (CPU) or CuPy (GPU) in the core, the caller's library out.

The core never imports a framework at module level; libraries are recognised by the module of the
array's type, and imported only when an array of theirs is seen (einops' rule).

GPU arrays cross without a copy through DLPack (``cupy.from_dlpack``, ``torch.from_dlpack``,
``jax.dlpack.from_dlpack``); each side passes its stream, so the producer's pending work is ordered
before the consumer's. Work for a caller runs on the caller's device and stream: wrap it in
:func:`on_caller_stream` (torch: ``torch.cuda.current_stream()``; CuPy: CuPy's current stream; JAX: the
stream XLA hands a callback, passed explicitly). Inside it the DLPack hand-overs need no extra events,
because producer and consumer stream are the same.
"""
from __future__ import annotations

import collections
import contextlib
import math
import threading
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


_cupy = None  # the module once imported (an import statement costs ~1 µs, and this runs per call)


def import_cupy():
    global _cupy
    if _cupy is None:
        try:
            import cupy
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise MissingDependencyError(
                "GPU arrays need CuPy: pip install 'sparsevox[cuda12]' or 'sparsevox[cuda13]'") from e
        _cupy = cupy
    return _cupy


def to_core(x):
    """Return ``(array, origin)``: a NumPy or CuPy view of ``x`` (zero-copy where the library allows)."""
    lib = library_of(x)
    if lib == "numpy":
        return np.asarray(x), Origin("numpy")
    if lib == "cupy":
        return x, Origin("cupy", int(x.device.id))
    if lib == "torch":
        import torch
        if x.requires_grad:  # DLPack and .numpy() refuse such tensors; a view by address does not care
            x = x.detach()
        if x.device.type == "cuda":
            cupy = import_cupy()
            fast = _wrap_torch_cuda(x, cupy, torch)
            if fast is not None:
                return fast, Origin("torch", x.device)
            try:
                return cupy.from_dlpack(x), Origin("torch", x.device)
            except (TypeError, NotImplementedError, BufferError):
                if x.dtype != torch.bfloat16:
                    raise
                # a CuPy without bfloat16 DLPack: compute on a float32 copy, return bfloat16
                return cupy.from_dlpack(x.float()), Origin("torch", x.device, torch.bfloat16)
        if x.dtype == torch.bfloat16:  # NumPy has no bfloat16 of its own: compute in float32
            return x.float().numpy(), Origin("torch", x.device, torch.bfloat16)
        return x.numpy(), Origin("torch", x.device)
    # jax
    dev = next(iter(x.devices()))
    if dev.platform == "gpu":
        cupy = import_cupy()
        return cupy.from_dlpack(x), Origin("jax", dev)
    return np.asarray(x), Origin("jax", dev)


_torch_dtypes: dict = {}


def _wrap_torch_cuda(x, cupy, torch):
    """A CuPy view of a contiguous CUDA tensor built from its pointer, or None.

    This skips DLPack's per-call stream negotiation (MEASUREMENTS.md: ~28 µs per ``cupy.from_dlpack``
    of a torch tensor, several per layer). Ordering is kept because sparsevox runs its work on torch's
    current stream (:func:`on_caller_stream`), where the tensor's producers were queued.
    """
    if not _torch_dtypes:
        _torch_dtypes.update({torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64,
                              torch.int32: np.int32, torch.int64: np.int64})
        try:
            import ml_dtypes
            _torch_dtypes[torch.bfloat16] = ml_dtypes.bfloat16
        except ImportError:
            pass
    dt = _torch_dtypes.get(x.dtype)
    if dt is None or x.numel() == 0 or not x.is_contiguous():
        return None
    return wrap_device_pointer(cupy, x.data_ptr(), tuple(x.shape), dt, x, x.device.index,
                               x.numel() * x.element_size())


def wrap_device_pointer(cupy, ptr: int, shape: tuple, dtype, owner, device_id: int = -1, nbytes: int | None = None):
    """A C-contiguous CuPy view of ``shape``/``dtype`` at device address ``ptr``; ``owner`` is kept alive
    with it. No stream handshake: the caller runs on the stream that produced the memory."""
    if nbytes is None:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    mem = cupy.cuda.UnownedMemory(ptr, nbytes, owner, device_id)
    return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(mem, 0))


def cuda_interface_view(obj):
    """A CuPy view of a C-contiguous object exposing ``__cuda_array_interface__``, or None when it is
    strided or of a dtype NumPy cannot name (then use DLPack). Skips CuPy's own interface import,
    which synchronises on the producer's stream when the interface names one."""
    cupy = import_cupy()
    try:
        cai = obj.__cuda_array_interface__
        dt = np.dtype(cai["typestr"])
    except (AttributeError, TypeError, KeyError):
        return None
    if cai.get("strides") is not None or dt.kind == "V":
        return None
    return wrap_device_pointer(cupy, int(cai["data"][0]), tuple(cai["shape"]), dt, obj)


def from_core(a, origin: Origin):
    """Convert a core array back to the caller's library and device (zero-copy on the GPU)."""
    if origin.lib in ("numpy", "cupy"):
        return a
    if origin.lib == "torch":
        import torch
        if origin.on_gpu:
            t = _torch_from_cupy(a, torch)
            return t.to(origin.dtype) if origin.dtype is not None and t.dtype != origin.dtype else t
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.to(origin.dtype) if origin.dtype is not None else t
    import jax
    if origin.on_gpu:
        return _jax_from_cupy(a, jax)
    return jax.device_put(np.asarray(a), origin.device)


def _torch_from_cupy(a, torch):
    try:
        return torch.from_dlpack(a)
    except (TypeError, BufferError, NotImplementedError, RuntimeError):
        if a.dtype.name != "bfloat16":
            raise
        # a CuPy that cannot export bfloat16: hand over the bits as int16 and reinterpret (no copy)
        return torch.from_dlpack(a.view(import_cupy().int16)).view(torch.bfloat16)


def _jax_from_cupy(a, jax):
    try:
        return jax.dlpack.from_dlpack(a)
    except (TypeError, BufferError, NotImplementedError, RuntimeError, ValueError) as e:
        cupy = import_cupy()
        if a.dtype.name == "bfloat16":  # bits as uint16, reinterpreted by XLA
            return jax.lax.bitcast_convert_type(jax.dlpack.from_dlpack(a.view(cupy.uint16)), jax.numpy.bfloat16)
        if "align" in str(e):  # XLA wants aligned buffers; a fresh CuPy allocation is
            return jax.dlpack.from_dlpack(cupy.ascontiguousarray(a).copy())
        raise


# --- the caller's device and stream ---------------------------------------------------------------

_streams: dict = {}  # (device id, stream handle) -> CuPy stream object


def gpu_device_id(origin: Origin) -> int:
    """The CUDA device ordinal of a GPU origin."""
    if origin.lib == "cupy":
        return int(origin.device)
    if origin.lib == "torch":
        idx = origin.device.index
        if idx is None:
            import torch
            idx = torch.cuda.current_device()
        return int(idx)
    hw = getattr(origin.device, "local_hardware_id", None)  # jax: the CUDA ordinal in this process
    return int(origin.device.id if hw is None else hw)


def external_stream(handle: int, device_id: int):
    """A CuPy stream object for a raw ``cudaStream_t`` handle, cached (creating one costs ~7 µs).

    Handle 0 is the legacy default stream (what torch's default stream is): CuPy's null stream.
    The wrapper owns nothing, so caching it is safe even if the stream is destroyed and its handle
    reused: the wrapper only ever names the handle.
    """
    key = (device_id, handle)
    s = _streams.get(key)
    if s is None:
        cupy = import_cupy()
        if handle == 0:
            s = cupy.cuda.Stream.null
        elif hasattr(cupy.cuda.Stream, "from_external"):  # CuPy >= 14 (ExternalStream is deprecated)
            s = cupy.cuda.Stream.from_external(_StreamHandle(handle))
        else:
            s = cupy.cuda.ExternalStream(handle, device_id)
        _streams[key] = s
    return s


class _StreamHandle:
    """A raw ``cudaStream_t`` in the CUDA stream protocol, which ``cupy.cuda.Stream.from_external`` reads."""
    __slots__ = ("handle",)

    def __init__(self, handle: int):
        self.handle = handle

    def __cuda_stream__(self):
        return (0, self.handle)


def caller_stream(origin: Origin):
    """The CuPy stream the caller's pending work is ordered on, or None for CuPy's current stream
    (CuPy callers, and JAX arrays outside a callback: DLPack orders XLA's work before ours)."""
    if origin.lib != "torch" or not origin.on_gpu:
        return None
    import torch
    dev = gpu_device_id(origin)
    return external_stream(torch_stream_handle(torch, dev), dev)


def torch_stream_handle(torch, device_id: int) -> int:
    """torch's current ``cudaStream_t`` on ``device_id`` (the raw getter costs ~0.3 µs against ~5 µs for
    ``torch.cuda.current_stream``, which builds a Stream object; Triton and Inductor use the same getter)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return int(raw(device_id))
    return int(torch.cuda.current_stream(device_id).cuda_stream)


@contextlib.contextmanager
def on_caller_stream(origin: Origin, stream: int | None = None):
    """Run the enclosed CuPy work on the caller's device and stream.

    Args:
        origin: where the inputs came from (:func:`to_core`). CPU origins make this a no-op.
        stream: an explicit ``cudaStream_t`` handle (e.g. the one XLA gives a ``buffer_callback``);
            default: torch's current stream on the tensor's device for torch, CuPy's current stream
            otherwise.

    Yields the CuPy stream in use (None on the CPU). Example::

        with on_caller_stream(origin):
            f, origin = to_core(feats)
            out = from_core(conv_forward(f, w, kmap), origin)
    """
    if not origin.on_gpu:
        yield None
        return
    cupy = import_cupy()
    dev = gpu_device_id(origin)
    with cupy.cuda.Device(dev):
        s = external_stream(int(stream), dev) if stream is not None else caller_stream(origin)
        if s is None:
            yield cupy.cuda.get_current_stream()
            return
        with s:
            yield s


def data_ptr(a) -> int:
    """Address of a core (NumPy or CuPy) array's first element."""
    return int(a.data.ptr) if hasattr(a.data, "ptr") else int(a.ctypes.data)


def array_module(a):
    """``numpy`` or ``cupy``, whichever owns the core array ``a``."""
    if type(a).__module__.startswith("cupy"):
        return import_cupy()
    return np


def to_host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else np.asarray(a)


# A prepared launch checks the current device instead of entering a context every call.
_cuda_runtime = None  # cupy.cuda.runtime, imported on the first prepared launch


def on_device(dev: int):
    """A context making ``dev`` the current CUDA device; a shared null context when it already is
    (cudaGetDevice is a fraction of a µs, a ``cupy.cuda.Device`` context several)."""
    global _cuda_runtime
    if _cuda_runtime is None:
        import cupy
        _cuda_runtime = cupy.cuda.runtime
    if _cuda_runtime.getDevice() == dev:
        return _SAME_DEVICE
    import cupy
    return cupy.cuda.Device(dev)


_SAME_DEVICE = contextlib.nullcontext()


# Objects that queued device work still uses (a pinned buffer a kernel writes, a table a kernel reads)
# but whose owner was dropped: kept until the event recorded after that work is done. CuPy's pools hand
# freed memory out again at once (pinned memory to anyone, device memory to other streams).
# hold_until_done only appends to a deque (atomic, no lock): it runs from __del__, which the cyclic GC may
# call on a thread that is inside the locked section below (a list built there can start a collection),
# where taking the lock again would hang. The list is pruned by whoever gets the lock without waiting.
_incoming: collections.deque = collections.deque()  # (event, objects) not yet in _held
_held: list = []  # (event, objects)
_held_lock = threading.Lock()


def hold_until_done(event, objects) -> None:
    """Keep ``objects`` alive until ``event`` (a CuPy event) has completed; also lets go of earlier
    held objects whose events are done. Safe from any thread and from ``__del__``."""
    if not event.done:
        _incoming.append((event, objects))
    release_held()


def release_held() -> None:
    """Let go of held objects whose events are done (called on the hot paths that allocate). Skips the
    pruning when another caller (or this thread, re-entered from a ``__del__``) is doing it."""
    if not (_held or _incoming) or not _held_lock.acquire(blocking=False):
        return
    try:
        while _incoming:
            _held.append(_incoming.popleft())
        _held[:] = [h for h in _held if not h[0].done]
    finally:
        _held_lock.release()


class Hold:
    """``objects`` that work queued before ``event`` uses; when this is dropped they are kept until the
    event is done (:func:`hold_until_done`)."""
    __slots__ = ("event", "objects")

    def __init__(self, event, objects):
        self.event, self.objects = event, objects

    def __del__(self):
        hold_until_done(self.event, self.objects)
