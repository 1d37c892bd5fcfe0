"""JAX adapter: sparse convolutions as ``jax.custom_vjp`` functions that work under ``jit`` and ``grad``.

Kernel maps are built outside ``jit`` (they decide output shapes) and passed in as a pytree,
:class:`JaxKernelMap`, whose arrays are traced and whose sizes are static::

    kmap = sparsevox.adapters.jax.kernel_map(voxels, kernel_size=3)      # outside jit
    @jax.jit
    def loss(feats, weight):
        return conv_features(feats, weight, kmap).sum()
    jax.grad(loss, argnums=(0, 1))(feats, weight)

A map may be closed over (as above: ``jit`` then embeds its arrays as constants) or passed as an
argument; either way the callback finds the core :class:`~sparsevox.KernelMap` and its cached tables
(through the map's static ``source``, comparing a copy with the map once).

The primal runs the sparsevox core inside ``jax.experimental.buffer_callback``: the callback sees
XLA's own buffers (NumPy views on the CPU, device addresses on the GPU, no host round trip) and launches
the GPU work on XLA's stream (``ctx.stream``). After the first call of a signature the GPU work is the
prepared launch of the chosen kernels (:func:`sparsevox.conv.prepared`), writing into XLA's output buffers.
Under ``vmap`` it runs once per batch element.

XLA FFI (issue 20): with ``libsparsevox_xla_ffi.so`` built (``python -m sparsevox
build-ffi``), a GPU backend, and the opt-in ``SPARSEVOX_JAX_FFI=1`` (off by default until the GPU tests
of ``tests/test_xla_ffi.py`` have passed on a GPU), a convolution forward whose plan is
IMPLICIT_GEMM is instead one ``sparsevox_launch`` custom call: its prepared launch is registered in the
library's table at trace time and XLA launches it on its stream with no Python (:func:`_ffi_forward`;
forward GPU-verified at ce287b0). Its backward likewise, as a dgrad and a wgrad call (:func:`_ffi_backward`,
written 2026-12-05 without a GPU: not yet verified there). Bucketed maps, depthwise and every other op
still use ``buffer_callback``. :func:`jax_call_path` says which is used.

Speed: jit the whole step (all layers, loss, gradient), not single layers. On an H100 host a jitted call
costs ~80 µs of XLA dispatch before any work, about what a whole small layer costs through torch, and
each layer's callback ~35 µs of our own host work plus XLA's share (``docs/performance.md``).

Network ops (pooling, unpooling, devoxelisation, dense grids) follow the same rule: their geometry is
computed outside ``jit`` from concrete coordinates and passed in as arrays that are traced but never
differentiated; the ``custom_vjp`` functions differentiate the features::

    pmap = sparsevox.adapters.jax.pool_kernel_map(voxels, 2)             # outside jit
    parent = sparsevox.adapters.jax.unpool_parents(coarse, voxels, 2)   # coarse: the pooled voxels
    @jax.jit
    def f(feats):
        return unpool_features(max_pool_features(feats, pmap), parent)  # [N, C] -> [N_out, C] -> [N, C]

- pooling: :func:`max_pool_features` / :func:`avg_pool_features` take the :class:`JaxKernelMap` of the
  pooling geometry (:func:`pool_kernel_map`: the strided convolution's map, so the output sites are the
  convolution's); the callback finds the core map again and derives the pool map from it
  (:func:`sparsevox.pooling.pool_map`, cached on that map). Max pooling's argmax is a residual.
- :func:`global_pool_features` takes the batch index of each row and the number of items (static).
- :func:`unpool_features` takes the parent row of each fine voxel (:func:`unpool_parents`).
- :func:`devoxelize_features` takes the 8 corner rows and weights of each point
  (:func:`devoxelize_weights`; the weights in JAX's default float: float32 unless ``jax_enable_x64``);
  it is differentiable in the weights too, but nothing differentiates the weights back to the points.
- :func:`to_dense_features` takes int32 coordinates; :func:`from_dense_features` gathers at the sites
  of :func:`active_sites` (which depend on the values: outside ``jit`` and ``grad``).

The ``Voxels`` forms (:func:`max_pool`, :func:`avg_pool`, :func:`global_pool`, :func:`unpool`,
:func:`devoxelize`, :func:`to_dense`, :func:`from_dense`; ``sparsevox.max_pool`` etc. route JAX
``Voxels`` here) build the geometry themselves from the coordinates, which must be concrete: they run
under ``jax.grad``, and under ``jit`` when the coordinates are closed over (constants) and only the
features are traced.

GPU memory: XLA preallocates most of the GPU; the kernels' scratch memory comes from CuPy's pool, so
leave room for it, e.g. ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.5`` or ``XLA_PYTHON_CLIENT_PREALLOCATE=false``.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import weakref
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.buffer_callback import buffer_callback

import sparsevox as sv
from sparsevox import dense as _dense, geometry, pooling, points as _points
from sparsevox.conv import output_voxels_of
from sparsevox._arrays import (array_module, cuda_interface_view, data_ptr, external_stream, on_device, to_core,
                               to_host)
from sparsevox.kernel_map import KernelMap, live_map, recall
from sparsevox.segments import FLOAT_DTYPES
from sparsevox.tuning import tune_cache
from sparsevox.tuning.algo_inputs import resolve_algos
from sparsevox.tuning.problem import n_bucket
from sparsevox.tuning.registry import token as registry_token
from sparsevox.voxels import Voxels

log = logging.getLogger("sparsevox.adapters.jax")

__all__ = ["JaxKernelMap", "bucket_rows", "kernel_map", "conv_features", "depthwise_features", "spatially_sparse_conv",
           "spatially_sparse_depthwise_conv", "init_conv", "apply_conv", "SpatiallySparseConv",
           "SpatiallySparseDepthwiseConv",
           # network ops: on Voxels, and on features with the geometry built outside jit
           "max_pool", "avg_pool", "global_pool", "unpool", "devoxelize", "to_dense", "from_dense",
           "pool_kernel_map", "max_pool_features", "avg_pool_features", "global_pool_features", "unpool_parents",
           "unpool_features", "devoxelize_weights", "devoxelize_features", "to_dense_features", "active_sites",
           "from_dense_features"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class JaxKernelMap:
    """A kernel map as a JAX pytree: ``in_maps``/``out_maps`` int32 ``[L]`` arrays; static sizes.

    A *bucketed* map (:meth:`bucketed_from_core`) has static sizes rounded up to buckets
    (:func:`bucket_rows`) so that maps of scans of similar size share one compiled program: its arrays
    are padded to ``L`` = the pair count's power of two (at least 256), ``num_in``/``num_out`` are the row buckets, ``offsets`` is
    ``(0, ..., 0, L)`` (only its length, K + 1, is read), and ``valid`` (int32 ``[2]``, a traced leaf)
    holds the real input and output row counts. Its convolutions read the leading real rows of the
    features and write zeros to the padding rows of their outputs."""
    in_maps: jax.Array
    out_maps: jax.Array
    offsets: tuple = dataclasses.field(metadata=dict(static=True))
    num_in: int = dataclasses.field(metadata=dict(static=True))
    num_out: int = dataclasses.field(metadata=dict(static=True))
    source: "_Source | None" = dataclasses.field(default=None, metadata=dict(static=True))
    valid: "jax.Array | None" = None
    bucketed: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @classmethod
    def bucketed_from_core(cls, kmap: KernelMap, num_in: int, num_out: int) -> "JaxKernelMap":
        """The map with its rows padded to ``num_in``/``num_out`` (>= the map's own; the caller's row
        buckets of its input and output sites) and its pairs to a power of two."""
        if num_in < kmap.num_in or num_out < kmap.num_out:
            raise ValueError(f"bucketed rows ({num_in}, {num_out}) must hold the map's own ({kmap.num_in}, "
                             f"{kmap.num_out})")
        key = ("jax.bucketed", num_in, num_out)
        t = kmap.derived.get(key)
        if t is None:
            # pairs to a power of two: the padding pairs cost only int32 memory (the callbacks read the real
            # ones), and the coarser buckets of the ~14 maps of a network change its signature less often
            length = max(256, n_bucket(kmap.num_pairs))
            arrays = []
            for a in (kmap.in_maps, kmap.out_maps):
                xp = array_module(a)
                padded = xp.zeros(length, dtype=xp.int32)
                padded[:kmap.num_pairs] = a
                arrays.append(_to_jax(padded))
            valid = jnp.asarray(np.array([kmap.num_in, kmap.num_out], dtype=np.int32))
            t = cls(arrays[0], arrays[1], (0,) * kmap.num_offsets + (length,), num_in, num_out, None, valid, True)
            object.__setattr__(t, "_core", kmap)  # as from_core: the user's map keeps the core map alive
            _register_bucketed(t, kmap)
            kmap.derived[key] = t
        return t

    @classmethod
    def from_core(cls, kmap: KernelMap) -> "JaxKernelMap":
        t = kmap.derived.get("jax.map")
        if t is None:
            t = cls(_to_jax(kmap.in_maps), _to_jax(kmap.out_maps),
                    tuple(int(v) for v in kmap.offsets_host), kmap.num_in, kmap.num_out, _Source(kmap))
            # The source is weak (jit's caches keep statics alive), so the map the user holds keeps the
            # core map alive: else a map made from a temporary Voxels loses its core map, and with it
            # the cached tables, and every call rebuilds them (measured: 3.3 ms instead of 0.3 ms).
            # Not a pytree field: copies made by jit/tree_map hold only the weak source.
            object.__setattr__(t, "_core", kmap)
            kmap.derived["jax.map"] = t
        return t


class _Source:
    """The core KernelMap a JaxKernelMap came from, held weakly. A static pytree field (hashed by
    identity), so the callback can find the map, and its derived tables, even when XLA hands it a copy
    of the arrays: ``jit`` embeds a closed-over map as constants, and on the CPU ``from_core`` copies
    the NumPy arrays onto the JAX device. Each new copy is compared with the map once."""
    __slots__ = ("ref", "verified", "__weakref__")

    def __init__(self, kmap: KernelMap):
        self.ref = weakref.ref(kmap)
        self.verified: set = set()  # (in address, out address) of copies found equal to the map

    def known(self, in_addr: int, out_addr: int) -> KernelMap | None:
        """The map, when arrays at these addresses were already found equal to it."""
        return self.ref() if (in_addr, out_addr) in self.verified else None

    def match(self, in_maps, out_maps) -> KernelMap | None:
        core = self.ref()
        if core is None or core.in_maps.shape[0] != in_maps.shape[0]:
            return None
        xp = array_module(in_maps)
        if array_module(core.in_maps) is not xp or (xp is not np and core.in_maps.device.id != in_maps.device.id):
            return None
        key = (data_ptr(in_maps), data_ptr(out_maps))
        if key not in self.verified:
            if not (bool(xp.array_equal(in_maps, core.in_maps)) and bool(xp.array_equal(out_maps, core.out_maps))):
                return None
            self.verified.add(key)
        return core


def bucket_rows(n: int) -> int:
    """``n`` rounded up to a bucket: 256 up to 256, else a multiple of ``2^(floor(log2 n) - 3)`` (eight
    buckets per power of two, at most 12.5 % padding), so scans of similar size share bucketed shapes."""
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n <= 256:
        return 256
    step = 1 << (n.bit_length() - 4)
    return -(-n // step) * step


# Bucketed maps by the device (or host) addresses of their padded JAX arrays: the callbacks receive those
# buffers and find the core map (its real sizes and cached tables) there; an entry goes with its arrays.
_bucketed: dict = {}


def _register_bucketed(t: "JaxKernelMap", core: KernelMap) -> None:
    key = (t.in_maps.unsafe_buffer_pointer(), t.out_maps.unsafe_buffer_pointer())
    _bucketed[key] = (weakref.ref(core), weakref.ref(t.in_maps), weakref.ref(t.out_maps))
    weakref.finalize(t.in_maps, _bucketed.pop, key, None)


def _bucketed_core(i, o, on_gpu: bool, kmap: "JaxKernelMap") -> KernelMap:
    """The core map of a bucketed map's buffers: by their addresses (the map passed into ``jit``), else
    (a map closed over by a jitted function: XLA made constants of copies) by comparing the buffers with
    every live bucketed map of that shape, on every call: a remembered address could later hold another
    map's constants."""
    ai, ao = (_addr(i), _addr(o)) if on_gpu else (i.__array_interface__["data"][0], o.__array_interface__["data"][0])

    def fits(c, a, b) -> bool:  # the entry's arrays alive at their registered size, its map the call's kind
        return (c is not None and a is not None and b is not None and not a.is_deleted() and not b.is_deleted()
                and a.shape == tuple(i.shape) and c.num_offsets == len(kmap.offsets) - 1
                and c.num_in <= kmap.num_in and c.num_out <= kmap.num_out)

    hit = _bucketed.get((ai, ao))
    if hit is not None:
        c, a, b = (r() for r in hit)
        if fits(c, a, b) and a.unsafe_buffer_pointer() == ai:
            return c
    xp = np
    if on_gpu:
        import cupy as xp
    iv, ov = (_view(i, True), _view(o, True)) if on_gpu else (i, o)
    for ref_core, ref_in, ref_out in list(_bucketed.values()):
        c, a, b = ref_core(), ref_in(), ref_out()
        if not fits(c, a, b):
            continue
        av, bv = _view(a, on_gpu), _view(b, on_gpu)
        if on_gpu and av.device.id != iv.device.id:
            continue
        if bool(xp.array_equal(iv, av)) and bool(xp.array_equal(ov, bv)):
            if not _bucketed_warned:
                _bucketed_warned.append(True)
                log.warning("a bucketed kernel map was closed over by a jitted function: each convolution compares "
                            "its pairs with the live maps (slow on the GPU); pass the maps into jit as arguments")
            return c
    raise RuntimeError("a bucketed kernel map reached a convolution after its map was freed (keep the "
                       "JaxKernelMap, or the LevelMaps holding it, alive while jitted code uses it)")


_bucketed_warned: list = []


def _to_jax(a):
    """A core index array as a JAX array: zero-copy from CuPy; NumPy arrays are copied onto the default device."""
    if type(a).__module__.split(".")[0] == "cupy":
        return jax.dlpack.from_dlpack(a)
    return jnp.asarray(to_host(a))


def kernel_map(voxels, kernel_size=3, stride=1, dilation=1, transposed=False, generative=False,
               output_voxels=None) -> JaxKernelMap:
    """:func:`sparsevox.kernel_map` as a :class:`JaxKernelMap` (call outside ``jit``)."""
    return JaxKernelMap.from_core(sv.kernel_map(voxels, kernel_size, stride, dilation, transposed, generative,
                                                output_voxels))


def _view(buf, on_gpu: bool):
    """A NumPy or CuPy view of an XLA buffer (no copy)."""
    if not on_gpu:
        return np.asarray(buf)
    import cupy
    view = cuda_interface_view(buf)  # ~5 µs against ~30 µs for DLPack's stream handshake; we run on XLA's stream
    if view is not None:
        return view
    try:
        return cupy.from_dlpack(buf)
    except Exception:  # dtypes some DLPack paths lack: the CUDA array interface also works
        return cupy.asarray(buf)


def _addr(buf) -> int:
    """Device address of an XLA GPU buffer."""
    return int(buf.__cuda_array_interface__["data"][0])


def _device_of(addr: int) -> int:
    import cupy
    if addr == 0:  # an empty buffer has no address: any device will do, nothing is launched for it
        return cupy.cuda.Device().id
    return int(cupy.cuda.runtime.pointerGetAttributes(addr).device)


def _call(fn, out_shapes, *args, fast=None):
    """Run ``fn(outs, ins, on_gpu)`` on XLA's buffers; on the GPU inside XLA's device and stream.

    ``fast(outs, ins, stream)``, when given, is tried first on the GPU, outside CuPy's device and stream
    contexts (a prepared launch on the raw stream); it returns False to fall back to ``fn``."""
    def callback(ctx, outs, ins):
        try:
            stream = ctx.stream
        except Exception:  # the CPU backend has no GPU context (UNIMPLEMENTED)
            stream = None
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        if stream is None:
            fn(outs, ins, False)
            return
        if fast is not None and fast(outs, ins, int(stream)):
            return
        import cupy
        dev = _device_of(_addr(outs[0]))
        with cupy.cuda.Device(dev), external_stream(int(stream), dev):
            fn(outs, ins, True)
    return buffer_callback(callback, out_shapes, vmap_method="sequential")(args)


def _core_map(in_maps, out_maps, kmap: JaxKernelMap) -> KernelMap:
    hit = live_map(data_ptr(in_maps), data_ptr(out_maps), in_maps.shape[0], kmap.num_in, kmap.num_out)
    if hit is None and kmap.source is not None:
        hit = kmap.source.match(in_maps, out_maps)
    return hit if hit is not None else recall(in_maps, out_maps, kmap.offsets, kmap.num_in, kmap.num_out)


def _map_of(i, o, kmap: JaxKernelMap, on_gpu: bool) -> KernelMap:
    """The core KernelMap of the map buffers: by address when it is known (no views), else via views."""
    if kmap.bucketed:
        return _bucketed_core(i if on_gpu else np.asarray(i), o if on_gpu else np.asarray(o), on_gpu, kmap)
    if on_gpu:
        ai, ao = _addr(i), _addr(o)
        hit = live_map(ai, ao, i.shape[0], kmap.num_in, kmap.num_out)
        if hit is None and kmap.source is not None:
            hit = kmap.source.known(ai, ao)
        if hit is not None:
            return hit
    return _core_map(_view(i, on_gpu), _view(o, on_gpu), kmap)


# Prepared launches (sparsevox.conv.prepared), as in the torch adapter: after one ordinary call of a
# signature on the GPU, later calls launch the chosen kernels on XLA's buffer addresses, writing the
# outputs in place (no CuPy views, no planning, no copy of the result into XLA's buffer). Kept on the
# core map; False marks a signature without one.

# --- the XLA FFI path (issue 20): a convolution's prepared launches as custom calls ----------------------
# The handler's checks and packing are tested on the CPU through its twin (tests/test_xla_ffi.py); the
# forward passed that file's GPU tests at ce287b0; the backward (2026-12-05) has not run on a GPU yet.

@functools.cache
def _ffi_path(setting: str) -> tuple[bool, str]:
    """``(True, "")`` when convolutions on exact maps go through the ``sparsevox_launch`` custom call, else
    ``(False, why)``; registers the handler with XLA (CUDA) the first time, and logs the choice once."""
    from sparsevox.cuda import ffi_lib
    if setting != "1":
        ok, why = False, f"SPARSEVOX_JAX_FFI={setting} (opt-in: set it to 1)"
    elif not any(d.platform == "gpu" for d in jax.devices()):
        ok, why = False, f"no GPU backend (jax runs on {jax.default_backend()})"
    else:
        ok, why = ffi_lib.available()
    if ok:
        try:
            jax.ffi.register_ffi_target(ffi_lib.TARGET, jax.ffi.pycapsule(ffi_lib.handler_address()), platform="CUDA")
        except Exception as e:  # an XLA without typed FFI, or a registration clash
            ok, why = False, f"registering {ffi_lib.TARGET} with XLA failed: {e}"
    log.info("sparsevox JAX convolutions: %s", "forward and backward through the XLA FFI custom call sparsevox_launch" if ok
             else f"buffer_callback (the XLA FFI path is off: {why})")
    return ok, why


def jax_call_path() -> tuple[str, str]:
    """``("ffi", "")`` or ``("buffer_callback", why)``: how this process runs convolutions (not depthwise) on
    exact maps, forward and backward (an algorithm without prepared launches, and bucketed maps, still take
    buffer_callback)."""
    ok, why = _ffi_path(os.environ.get("SPARSEVOX_JAX_FFI", "0"))
    return ("ffi", "") if ok else ("buffer_callback", why)


# What each direction's custom call takes: its XLA buffers (inputs, then outputs) by the shapes of the
# features [N_in, C_in], weight [K, C_in, C_out] and map, and which of them the Launch's holes a, b, out are.
#   fwd:   feats, weight -> out [N_out, C_out]
#   dgrad: grad_out [N_out, C_out], W^T [K, C_out, C_in] (offsets reversed when the Launch's flip_b) -> [N_in, C_in]
#   wgrad: feats, grad_out, a zero accumulator [K, C_in, C_out] -> that accumulator (aliased: the kernels add)
_FFI_BUFFERS = {"fwd": (2, (0, 1, 2)), "dgrad": (2, (0, 1, 2)), "wgrad": (3, (0, 1, 3))}


def _ffi_buffer_bytes(direction: str, num_out: int, f_shape, w_shape, itemsize: int, acc_itemsize: int):
    """The byte size of each buffer of a direction's custom call (see :data:`_FFI_BUFFERS`)."""
    k, c_in, c_out = (int(v) for v in w_shape)
    feats, weight = int(f_shape[0]) * c_in * itemsize, k * c_in * c_out * itemsize
    grad_out = int(num_out) * c_out * itemsize
    if direction == "fwd":
        return [feats, weight, grad_out]
    if direction == "dgrad":
        return [grad_out, weight, feats]
    acc = k * c_in * c_out * acc_itemsize
    return [feats, grad_out, acc, acc]


def _ffi_register(prep, direction: str, num_out: int, f_shape, w_shape, dtype: str) -> int:
    """Register a prepared Launch in the FFI library's table for a ``direction`` call: its holes ``a``,
    ``b``, ``out`` receive the buffers :data:`_FFI_BUFFERS` names, and every buffer is checked for the size
    :func:`_ffi_buffer_bytes` gives. Returns the launch id."""
    from sparsevox.cuda import ffi_lib
    n_args, buffers = _FFI_BUFFERS[direction]
    steps = [(*s, dict(zip(prep.holes, buffers))) for s in prep.raw_steps()]
    sizes = _ffi_buffer_bytes(direction, num_out, f_shape, w_shape, jnp.dtype(dtype).itemsize,
                              jnp.dtype(prep.acc_dtype or dtype).itemsize)
    return ffi_lib.register(steps, n_args, 1, sizes, int(prep.device_id), 16 if prep.vec else 1)


def _ffi_launch(core: KernelMap, direction: str, dtype: str, f_shape, w_shape, algo):
    """``(launch id, Launch)`` of this call's prepared IMPLICIT_GEMM launch in ``direction`` (``fwd``,
    ``dgrad``, ``wgrad``), registered once per map and signature, or None (the plan picked another
    algorithm, or the problem is empty). Plans, and for AUTO tunes, at trace time with one ordinary call on
    zeros of the call's shapes; forgotten when the map is freed."""
    key = ("jax.ffi." + direction, dtype, tuple(f_shape), tuple(w_shape), algo, sv.allow_tf32())
    hit = core.derived.get(key)
    if hit is None:
        import cupy
        from sparsevox.cuda import ffi_lib
        hit, prep = False, None
        try:
            with cupy.cuda.Device(core.in_maps.device.id):
                fv, wv = cupy.zeros(f_shape, jnp.dtype(dtype)), cupy.zeros(w_shape, jnp.dtype(dtype))
                if direction == "fwd":
                    sv.conv_forward(fv, wv, core, algo)
                else:
                    gv = cupy.zeros((core.num_out, w_shape[2]), jnp.dtype(dtype))
                    sv.conv_backward(gv, fv, wv, core, algo, direction == "dgrad", direction == "wgrad")
                prep = sv.conv.prepared("conv", direction, fv, wv, core, algo)
        except Exception as e:  # e.g. a CuPy without this dtype: buffer_callback handles it
            log.warning("sparsevox: no XLA FFI launch for a %s %s %s -> buffer_callback (%s: %s)", dtype, direction,
                        tuple(f_shape), type(e).__name__, e)
        if prep is not None and hasattr(prep, "raw_steps"):
            launch_id = _ffi_register(prep, direction, core.num_out, f_shape, w_shape, dtype)
            weakref.finalize(core, ffi_lib.forget, launch_id)
            hit = (launch_id, prep)  # the Launch keeps the tables its parameters point to
        core.derived[key] = hit
    return hit or None


def _ffi_core(kmap: JaxKernelMap):
    """The core map of an exact map on the GPU when the FFI path is on, else None (buffer_callback)."""
    if kmap.bucketed or not _ffi_path(os.environ.get("SPARSEVOX_JAX_FFI", "0"))[0]:
        return None
    core = kmap.source.ref() if kmap.source is not None else None
    return None if core is None or array_module(core.in_maps) is np else core


def _ffi_forward(feats, weight, kmap: JaxKernelMap, fwd_algo):
    """The convolution forward as one ``sparsevox_launch`` custom call, or None to use buffer_callback.

    Used only when the FFI library is built, jax has a GPU backend and ``SPARSEVOX_JAX_FFI`` is ``1``, for
    an exact map on the GPU whose planned algorithm is IMPLICIT_GEMM. XLA launches the prepared kernels on
    its own stream with no Python in the step (command buffers: not yet; the handler does not declare
    itself compatible)."""
    core = _ffi_core(kmap)
    hit = core and _ffi_launch(core, "fwd", jnp.dtype(feats.dtype).name, feats.shape, weight.shape, fwd_algo)
    if not hit:
        return None
    from sparsevox.cuda import ffi_lib
    out = jax.ShapeDtypeStruct((kmap.num_out, weight.shape[2]), feats.dtype)
    return jax.ffi.ffi_call(ffi_lib.TARGET, out, vmap_method="sequential")(feats, weight, launch_id=np.int64(hit[0]))


def _ffi_backward(feats, weight, kmap: JaxKernelMap, grad, bwd_algo):
    """The convolution's ``(grad_feats, grad_weight)`` as two ``sparsevox_launch`` custom calls (dgrad,
    wgrad), or None to use buffer_callback. NOT YET GPU-VERIFIED (written on a CPU-only machine; the GPU
    tests of tests/test_xla_ffi.py are the proof). Same conditions as :func:`_ffi_forward`, for both
    directions. The dgrad's transposed (for a mirrored submanifold map also offset-reversed) weight is an
    XLA transpose; the wgrad accumulates into a zeroed float32 (float64) buffer that the call takes as an
    input and returns aliased, cast to the weight's dtype by XLA: the weight gradient is the
    accumulator's, rounded once."""
    core = _ffi_core(kmap)
    if core is None or grad.dtype != feats.dtype:
        return None
    dt = jnp.dtype(feats.dtype).name
    d = _ffi_launch(core, "dgrad", dt, feats.shape, weight.shape, bwd_algo)
    w = d and _ffi_launch(core, "wgrad", dt, feats.shape, weight.shape, bwd_algo)
    if not w:
        return None
    from sparsevox.cuda import ffi_lib
    (did, dprep), (wid, wprep) = d, w
    wt = jnp.swapaxes(weight[::-1] if dprep.flip_b else weight, 1, 2)
    gf = jax.ffi.ffi_call(ffi_lib.TARGET, jax.ShapeDtypeStruct(feats.shape, feats.dtype), vmap_method="sequential")(
        grad, wt, launch_id=np.int64(did))
    acc = jax.ShapeDtypeStruct(tuple(wprep.out_shape), jnp.dtype(wprep.acc_dtype))
    gw = jax.ffi.ffi_call(ffi_lib.TARGET, acc, vmap_method="sequential", input_output_aliases={2: 0})(
        feats, grad, jnp.zeros(acc.shape, acc.dtype), launch_id=np.int64(wid))
    return gf, gw.astype(weight.dtype)


# --- bucketed maps: prepared launches on the real rows -------------------------------------------------
# A bucketed map is a fresh scan's map in a compiled step shared by scans of similar size: its first call
# of a layer signature would run the core call (planning, CuPy views, a new result copied into XLA's
# buffer and the padding rows zero-filled). The plan an earlier map of the same signature got is kept in
# ``tune_cache.plans`` (as the torch adapter does), so a fresh map's call makes its launch object from it
# and the kernels write the real rows into XLA's buffer directly; only the padding rows are zero-filled.

def _bucketed_signature(direction: str, dtype: str, c_in: int, w_shape, core_map: KernelMap, algo):
    """The key in ``tune_cache.plans`` of a bucketed call's ``(algorithm, params)``, without the map (its row
    counts bucketed as the autotuner buckets them)."""
    env = resolve_algos(None, "conv", "fwd" if direction == "fwd" else "bwd") if algo is None else None
    return ("jax.signature", direction, dtype, int(c_in), tuple(w_shape), algo, env, sv.allow_tf32(),
            n_bucket(core_map.num_in), n_bucket(core_map.num_out), core_map.num_offsets, core_map.kind,
            tuple(core_map.stride), registry_token("conv"), core_map.in_maps.device.id)


def _bucketed_prep(core_map: KernelMap, direction: str, dtype: str, c_in: int, w_shape, algo):
    """``(launch object, False or None, key)`` of a bucketed convolution's call on the GPU: the one kept on
    the map, else one made from the plan of an earlier map with the same signature (on the current device
    and stream: its tables are built there), else None (the core call runs, then :func:`_bucketed_remember`).
    False: the plan's algorithm has no launch object."""
    key = ("jax.bucketed." + direction, dtype, int(c_in), tuple(w_shape), algo, sv.allow_tf32())
    prep = core_map.derived.get(key)
    if prep is None:
        choice = tune_cache.plans.get(_bucketed_signature(direction, dtype, c_in, w_shape, core_map, algo))
        if choice is None:
            return None, key
        prep = sv.conv.prepare_choice(choice, direction, dtype, int(c_in), int(w_shape[2]), core_map,
                                      core_map.in_maps.device.id) or False
        core_map.derived[key] = prep
    return prep, key


def _bucketed_remember(core_map: KernelMap, key, direction: str, fv, wv, algo) -> None:
    """After a bucketed core call on the real rows ``fv`` (features ``[N_in, C_in]``) and weight ``wv``: keep
    its launch object on the map and its plan under the signature, for the next fresh maps."""
    choice = sv.conv.remember_prepared(core_map, key, "conv", direction, fv, wv, algo)
    if choice is not None:
        tune_cache.plans[_bucketed_signature(direction, str(fv.dtype), fv.shape[1], wv.shape, core_map, algo)] = choice


def _forward(op, feats, weight, kmap: JaxKernelMap, fwd_algo):
    if op == "conv":
        out = _ffi_forward(feats, weight, kmap, fwd_algo)
        if out is not None:
            return out
    c_out = weight.shape[2] if op == "conv" else weight.shape[1]
    core = sv.conv_forward if op == "conv" else sv.depthwise_forward

    def key_of(f, w):
        return ("jax.fwd", op, str(f.dtype), tuple(f.shape), tuple(w.shape), fwd_algo, sv.allow_tf32())

    def fast(outs, ins, stream):
        # Only a map known by its buffers' addresses: finding one otherwise compares arrays and may copy,
        # which must run inside XLA's device and stream (``run``).
        if kmap.bucketed:
            return False  # the prepared launch writes exact-size outputs
        f, w, i, o = ins
        ai, ao = _addr(i), _addr(o)
        core_map = live_map(ai, ao, i.shape[0], kmap.num_in, kmap.num_out)
        if core_map is None and kmap.source is not None:
            core_map = kmap.source.known(ai, ao)
        prep = core_map.derived.get(key_of(f, w)) if core_map is not None else None
        if not prep:
            return False
        with on_device(prep.device_id):
            return prep.launch(_addr(f), _addr(w), _addr(outs[0]), stream=stream)

    def run(outs, ins, on_gpu):
        f, w, i, o = ins
        core_map = _map_of(i, o, kmap, on_gpu)
        if kmap.bucketed:
            out = _view(outs[0], on_gpu)
            n_in, n_out = core_map.num_in, core_map.num_out
            bucketed_gpu_conv = on_gpu and op == "conv"
            if bucketed_gpu_conv:
                prep, key = _bucketed_prep(core_map, "fwd", str(f.dtype), f.shape[1], w.shape, fwd_algo)
                if prep and prep.launch(_addr(f), _addr(w), _addr(outs[0])):  # writes the n_out real rows
                    out[n_out:] = 0
                    return
            fv, wv = _view(f, on_gpu)[:n_in], _view(w, on_gpu)
            out[:n_out] = core(fv, wv, core_map, fwd_algo)
            out[n_out:] = 0
            if bucketed_gpu_conv and prep is None:
                _bucketed_remember(core_map, key, "fwd", fv, wv, fwd_algo)
            return
        key = key_of(f, w)
        prep = core_map.derived.get(key) if on_gpu else False
        if prep and prep.launch(_addr(f), _addr(w), _addr(outs[0])):
            return
        fv, wv = _view(f, on_gpu), _view(w, on_gpu)
        _view(outs[0], on_gpu)[...] = core(fv, wv, core_map, fwd_algo)
        if prep is None:
            sv.conv.remember_prepared(core_map, key, op, "fwd", fv, wv, fwd_algo)
    return _call(run, jax.ShapeDtypeStruct((kmap.num_out, c_out), feats.dtype),
                 feats, weight, kmap.in_maps, kmap.out_maps, fast=fast)


def _fast_backward(dprep, wprep, outs, g, f, w) -> bool:
    import cupy
    wv = _view(w, True)
    wt = cupy.ascontiguousarray((wv[::-1] if dprep.flip_b else wv).transpose(0, 2, 1))
    if not dprep.launch(_addr(g), wt.data.ptr, _addr(outs[0])):
        return False
    gw = _view(outs[1], True)
    if gw.dtype.name == wprep.acc_dtype:  # float32/float64: accumulate straight into XLA's buffer
        gw.fill(0)
        return wprep.launch(_addr(f), _addr(g), gw.data.ptr)
    acc = cupy.zeros(wprep.out_shape, dtype=wprep.acc_dtype)
    if not wprep.launch(_addr(f), _addr(g), acc.data.ptr):
        return False
    gw[...] = acc
    return True


def _backward(op, feats, weight, kmap: JaxKernelMap, grad, bwd_algo):
    if op == "conv":
        got = _ffi_backward(feats, weight, kmap, grad, bwd_algo)
        if got is not None:
            return got
    core = sv.conv_backward if op == "conv" else sv.depthwise_backward

    def run(outs, ins, on_gpu):
        g, f, w, i, o = ins
        core_map = _map_of(i, o, kmap, on_gpu)
        if kmap.bucketed:
            n_in, n_out = core_map.num_in, core_map.num_out
            gf_out = _view(outs[0], on_gpu)
            preps = None
            if on_gpu and op == "conv" and str(g.dtype) == str(f.dtype):
                preps = [_bucketed_prep(core_map, d, str(f.dtype), f.shape[1], w.shape, bwd_algo) for d in ("dgrad", "wgrad")]
                (dprep, _), (wprep, _) = preps
                # dgrad writes the n_in real rows of XLA's buffer, wgrad the whole (exact-size) weight gradient
                if dprep and wprep and _fast_backward(dprep, wprep, outs, g, f, w):
                    gf_out[n_in:] = 0
                    return
            gv, fv, wv = _view(g, on_gpu)[:n_out], _view(f, on_gpu)[:n_in], _view(w, on_gpu)
            gf, gw = core(gv, fv, wv, core_map, bwd_algo)
            gf_out[:n_in] = gf
            gf_out[n_in:] = 0
            _view(outs[1], on_gpu)[...] = gw
            for direction, (prep, key) in zip(("dgrad", "wgrad"), preps or ()):
                if prep is None:
                    _bucketed_remember(core_map, key, direction, fv, wv, bwd_algo)
            return
        base = (op, str(f.dtype), tuple(f.shape), tuple(w.shape), bwd_algo, sv.allow_tf32())
        dkey, wkey = ("jax.dgrad",) + base, ("jax.wgrad",) + base
        dprep = core_map.derived.get(dkey) if on_gpu else False
        wprep = core_map.derived.get(wkey) if on_gpu else False
        if dprep and wprep and str(g.dtype) == str(f.dtype) and _fast_backward(dprep, wprep, outs, g, f, w):
            return
        gv, fv, wv = (_view(b, on_gpu) for b in (g, f, w))
        gf, gw = core(gv, fv, wv, core_map, bwd_algo)
        _view(outs[0], on_gpu)[...] = gf
        _view(outs[1], on_gpu)[...] = gw
        if dprep is None:
            sv.conv.remember_prepared(core_map, dkey, op, "dgrad", fv, wv, bwd_algo)
        if wprep is None:
            sv.conv.remember_prepared(core_map, wkey, op, "wgrad", fv, wv, bwd_algo)
    shapes = (jax.ShapeDtypeStruct(feats.shape, feats.dtype), jax.ShapeDtypeStruct(weight.shape, weight.dtype))
    return _call(run, shapes, grad, feats, weight, kmap.in_maps, kmap.out_maps)


def _make(op):
    @partial(jax.custom_vjp, nondiff_argnums=(3, 4))
    def f(feats, weight, kmap, fwd_algo=None, bwd_algo=None):
        return _forward(op, feats, weight, kmap, fwd_algo)

    def f_fwd(feats, weight, kmap, fwd_algo, bwd_algo):
        return _forward(op, feats, weight, kmap, fwd_algo), (feats, weight, kmap)

    def f_bwd(fwd_algo, bwd_algo, res, grad):
        feats, weight, kmap = res
        gf, gw = _backward(op, feats, weight, kmap, grad, bwd_algo)
        zeros = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, jax.dtypes.float0), kmap)
        return gf, gw, zeros

    f.defvjp(f_fwd, f_bwd)
    return f


_conv = _make("conv")
_depthwise = _make("depthwise")


def _algo_key(value):
    """Algorithm inputs must be hashable to be static: lists become tuples."""
    return tuple(value) if isinstance(value, list) else value


def _check_algos(op: str, fwd_algo, bwd_algo) -> None:
    """A misspelt algorithm name fails here, at trace time, not inside the callback (an XLA runtime error)."""
    for value, direction in ((fwd_algo, "fwd"), (bwd_algo, "bwd")):
        if value is not None:
            resolve_algos(value, op, direction)


def _check_map_feats(feats, kmap) -> None:
    """feats ``[kmap.num_in, C]`` of a float dtype: static facts, checked before the callback sees them."""
    if not isinstance(kmap, JaxKernelMap):
        raise ValueError(f"kmap must be a JaxKernelMap (sparsevox.adapters.jax.kernel_map, built outside jit), "
                         f"got {type(kmap).__name__}")
    _check_feats(feats, kmap.num_in)


def conv_features(feats, weight, kmap: JaxKernelMap, fwd_algo=None, bwd_algo=None):
    """Differentiable features ``[N_out, C_out]`` of a convolution: feats ``[N_in, C_in]``, weight ``[K, C_in, C_out]``."""
    _check_map_feats(feats, kmap)
    _check_algos("conv", fwd_algo, bwd_algo)
    if weight.dtype != feats.dtype:
        raise ValueError(f"weight dtype ({weight.dtype}) must equal the features dtype ({feats.dtype})")
    if weight.ndim != 3 or weight.shape[0] != len(kmap.offsets) - 1 or weight.shape[1] != feats.shape[1]:
        raise ValueError(f"weight must have shape [K={len(kmap.offsets) - 1}, C_in={feats.shape[1]}, C_out], "
                         f"got {tuple(weight.shape)}")
    return _conv(feats, weight, kmap, _algo_key(fwd_algo), _algo_key(bwd_algo))


def depthwise_features(feats, weight, kmap: JaxKernelMap, fwd_algo=None, bwd_algo=None):
    """Differentiable depthwise features ``[N_out, C]``: feats ``[N_in, C]``, weight ``[K, C]``."""
    _check_map_feats(feats, kmap)
    _check_algos("depthwise", fwd_algo, bwd_algo)
    if weight.dtype != feats.dtype:
        raise ValueError(f"depthwise_weight dtype ({weight.dtype}) must equal the features dtype ({feats.dtype})")
    if weight.ndim != 2 or weight.shape != (len(kmap.offsets) - 1, feats.shape[1]):
        raise ValueError(f"depthwise_weight must have shape [K={len(kmap.offsets) - 1}, C={feats.shape[1]}], "
                         f"got {tuple(weight.shape)}")
    return _depthwise(feats, weight, kmap, _algo_key(fwd_algo), _algo_key(bwd_algo))


def spatially_sparse_conv(voxels, weight, kernel_size=3, stride=1, dilation=1, transposed=False,
                          generative=False, output_voxels=None, fwd_algo=None, bwd_algo=None):
    """:func:`sparsevox.spatially_sparse_conv` for JAX ``Voxels``; differentiable in feats and weight
    (outside ``jit``: it builds the kernel map; inside ``jit`` use :func:`conv_features`)."""
    core_map = sv.kernel_map(voxels, kernel_size, stride, dilation, transposed, generative, output_voxels)
    out = conv_features(voxels.feats, weight, JaxKernelMap.from_core(core_map), fwd_algo, bwd_algo)
    return output_voxels_of(voxels, core_map, out, output_voxels)


def spatially_sparse_depthwise_conv(input_features, depthwise_weight, kernel_map, num_out_coords,
                                    fwd_algo=None, bwd_algo=None):
    """The guide's depthwise signature; ``kernel_map`` is a JaxKernelMap, a KernelMap or a CSR tuple."""
    if not isinstance(kernel_map, JaxKernelMap):
        from sparsevox.depthwise import _as_kmap
        kernel_map = JaxKernelMap.from_core(_as_kmap(kernel_map, input_features.shape[0], int(num_out_coords)))
    if kernel_map.num_out != int(num_out_coords):
        raise ValueError(f"num_out_coords ({num_out_coords}) differs from the kernel map's {kernel_map.num_out}")
    return depthwise_features(input_features, depthwise_weight, kernel_map, fwd_algo, bwd_algo)


# --- a minimal module API: init / apply ----------------------------------------------------------

def init_conv(key, in_channels, out_channels, kernel_size=3, bias=True, dtype=jnp.float32):
    """Parameters ``{"weight": [K, C_in, C_out], "bias": [C_out]}``, Kaiming-uniform like ``torch.nn.Conv3d``."""
    in_channels = geometry.positive_int(in_channels, "in_channels")
    out_channels = geometry.positive_int(out_channels, "out_channels")
    k = int(np.prod(geometry.triple(kernel_size, "kernel_size")))
    bound = 1.0 / np.sqrt(in_channels * k)
    kw, kb = jax.random.split(key)
    params = {"weight": jax.random.uniform(kw, (k, in_channels, out_channels), dtype, -bound, bound)}
    if bias:
        params["bias"] = jax.random.uniform(kb, (out_channels,), dtype, -bound, bound)
    return params


def apply_conv(params, feats, kmap: JaxKernelMap, fwd_algo=None, bwd_algo=None):
    """Apply a conv layer's ``params`` to features with a prebuilt kernel map (jit-friendly)."""
    out = conv_features(feats, params["weight"], kmap, fwd_algo, bwd_algo)
    return out + params["bias"] if "bias" in params else out


class SpatiallySparseConv:
    """A conv layer as an ``init``/``apply`` pair (no framework beyond JAX).

    ``layer = SpatiallySparseConv(16, 32)``; ``params = layer.init(key)``;
    ``feats_out = layer.apply(params, feats, kmap)`` inside ``jit``; the kernel map (a
    :class:`JaxKernelMap`) is built outside ``jit`` with this layer's geometry
    (``kernel_map(voxels, layer.kernel_size, layer.stride, ...)``).
    """

    _op = "conv"

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, dilation=1, transposed=False,
                 generative=False, bias=True, fwd_algo=None, bwd_algo=None, dtype=jnp.float32):
        # checked here, not at init/apply: a float would be truncated, a bad size fail inside XLA
        self.in_channels = geometry.positive_int(in_channels, "in_channels")
        self.out_channels = geometry.positive_int(out_channels, "out_channels")
        self.kernel_size = geometry.triple(kernel_size, "kernel_size")
        self.stride = geometry.triple(stride, "stride")
        self.dilation = geometry.triple(dilation, "dilation")
        _check_algos(self._op, fwd_algo, bwd_algo)
        self.transposed, self.generative, self.bias, self.dtype = transposed, generative, bias, dtype
        self.fwd_algo, self.bwd_algo = fwd_algo, bwd_algo

    def kernel_map(self, voxels, output_voxels=None) -> JaxKernelMap:
        return kernel_map(voxels, self.kernel_size, self.stride, self.dilation, self.transposed, self.generative,
                          output_voxels)

    def init(self, key):
        return init_conv(key, self.in_channels, self.out_channels, self.kernel_size, self.bias, self.dtype)

    def apply(self, params, feats, kmap: JaxKernelMap):
        return apply_conv(params, feats, kmap, self.fwd_algo, self.bwd_algo)


class SpatiallySparseDepthwiseConv(SpatiallySparseConv):
    """Depthwise conv layer: params ``{"weight": [K, C], "bias": [C]}``; same ``init``/``apply`` pattern."""

    _op = "depthwise"

    def __init__(self, channels, kernel_size=3, stride=1, dilation=1, transposed=False, generative=False,
                 bias=True, fwd_algo=None, bwd_algo=None, dtype=jnp.float32):
        geometry.positive_int(channels, "channels")  # the error names this layer's argument
        super().__init__(channels, channels, kernel_size, stride, dilation, transposed, generative, bias,
                         fwd_algo, bwd_algo, dtype)

    def init(self, key):
        k = int(np.prod(self.kernel_size))
        bound = 1.0 / np.sqrt(k)
        kw, kb = jax.random.split(key)
        params = {"weight": jax.random.uniform(kw, (k, self.in_channels), self.dtype, -bound, bound)}
        if self.bias:
            params["bias"] = jax.random.uniform(kb, (self.in_channels,), self.dtype, -bound, bound)
        return params

    def apply(self, params, feats, kmap: JaxKernelMap):
        out = depthwise_features(feats, params["weight"], kmap, self.fwd_algo, self.bwd_algo)
        return out + params["bias"] if "bias" in params else out


# --- network ops: pooling, unpooling, devoxelisation, dense grids --------------------------------------
# Each op: a callback running the core's *_forward (and one running its *_backward) on XLA's buffers, a
# custom_vjp over the features, and a Voxels form. Geometry arrays (kernel maps, batch indices, parent
# rows, corner rows, coordinates) are inputs of the callbacks with zero (float0) cotangents. On the GPU
# some of the core's steps read sizes back to the host (CuPy's bincount, the batch-range checks); that
# is allowed because buffer_callback is not captured into XLA command buffers (command_buffer_compatible
# stays False), and the work runs on XLA's stream as for the convolutions.

def _store(buf, value, on_gpu: bool, pad_rows: bool = False) -> None:
    """Write a core array into an XLA output buffer, as raw bits (not every CuPy copies bfloat16).
    ``pad_rows``: ``value`` may have fewer rows than the buffer (a bucketed map's real rows): they fill
    the head and the padding rows are zeroed."""
    dst = _view(buf, on_gpu)
    if dst.size:
        bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[dst.dtype.itemsize]
        n = value.shape[0] if pad_rows and value.shape[0] < dst.shape[0] else dst.shape[0]
        dst[:n].view(bits)[...] = value.reshape((n,) + dst.shape[1:]).view(bits)
        if n < dst.shape[0]:
            dst[n:].view(bits)[...] = 0


def _no_grad(tree):
    """Zero cotangents (float0) for the geometry inputs of a custom_vjp."""
    return jax.tree_util.tree_map(lambda a: np.zeros(a.shape, jax.dtypes.float0), tree)


def _concrete(x, what: str, hint: str) -> None:
    if isinstance(x, jax.core.Tracer):
        raise ValueError(f"{what} must be a concrete array, got a traced one: {hint}")


def _check_feats(feats, rows=None, what: str = "feats") -> None:
    """2-D float features; ``rows``: the map's ``num_in`` (a bucketed map's: its padded row bucket)."""
    if feats.ndim != 2 or (rows is not None and feats.shape[0] != rows):
        want = "[N, C]" if rows is None else f"[{rows}, C] (kmap.num_in rows)"
        raise ValueError(f"{what} must have shape {want}, got {tuple(feats.shape)}")
    if jnp.dtype(feats.dtype).name not in FLOAT_DTYPES:
        raise ValueError(f"{what} dtype must be one of {FLOAT_DTYPES}, got {jnp.dtype(feats.dtype).name}")


def _as_index(a, what: str, shape: tuple):
    """An int32 JAX array (traced ones pass through) of ``shape`` (None: any size on that axis)."""
    if not isinstance(a, jax.Array):
        a, _ = to_core(a)
        xp = array_module(a)
        a = _to_jax(xp.ascontiguousarray(a, dtype=xp.int32))
    if a.ndim != len(shape) or any(s is not None and a.shape[i] != s for i, s in enumerate(shape)):
        want = ", ".join("_" if s is None else str(s) for s in shape)
        raise ValueError(f"{what} must have shape [{want}], got {tuple(a.shape)}")
    if not jnp.issubdtype(a.dtype, jnp.integer):
        raise ValueError(f"{what} must be an integer array, got {a.dtype}")
    return a if a.dtype == jnp.int32 else a.astype(jnp.int32)


def _item_count(value, name: str, rows: int) -> int:
    """A static batch item count: an integer (int() would truncate 2.5), >= 1 when there are rows (each
    row belongs to an item); 0 only without rows, as ``Voxels.batch_size`` of empty voxels."""
    return geometry.positive_int(value, name, minimum=1 if rows else 0)


def _is_jax_voxels(voxels, name: str = "voxels") -> bool:
    """Whether ``voxels`` holds JAX arrays (else the core computes); ``ValueError`` for a non-Voxels."""
    if not isinstance(voxels, Voxels):
        raise ValueError(f"{name} must be a sparsevox.Voxels, got {type(voxels).__name__}")
    return voxels.origin.lib == "jax"


def _shape(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(int(v) for v in shape), dtype)


# -- local pooling --

def _pool_call(kind: str, feats, kmap: JaxKernelMap):
    """Forward callback: ``out`` (avg) or ``(out, argmax)`` (max). A bucketed map pools the real input
    rows and writes zeros on the padding output rows (as the convolutions do)."""

    def run(outs, ins, on_gpu):
        f, i, o = ins
        core_map = _map_of(i, o, kmap, on_gpu)
        pmap = pooling.pool_map(core_map)
        fv = _view(f, on_gpu)[:core_map.num_in]
        if kind == "max":
            out, arg = pooling.max_pool_forward(fv, pmap)
            _store(outs[1], arg, on_gpu, pad_rows=True)
        else:
            out = pooling.avg_pool_forward(fv, pmap)
        _store(outs[0], out, on_gpu, pad_rows=True)
    out = _shape((kmap.num_out, feats.shape[1]), feats.dtype)
    shapes = (out, _shape(out.shape, jnp.int32)) if kind == "max" else out
    return _call(run, shapes, feats, kmap.in_maps, kmap.out_maps)


def _pool_grad_call(grad, argmax, kmap: JaxKernelMap):
    """Backward callback: ``grad_in [num_in, C]`` (max when ``argmax`` is given, else avg)."""
    def run(outs, ins, on_gpu):
        g, i, o = ins[0], ins[-2], ins[-1]
        core_map = _map_of(i, o, kmap, on_gpu)
        pmap = pooling.pool_map(core_map)
        n_out = core_map.num_out  # a bucketed map's padding rows carry no gradient back
        gv = _view(g, on_gpu)[:n_out]
        gi = pooling.avg_pool_backward(gv, pmap) if argmax is None else \
            pooling.max_pool_backward(gv, _view(ins[1], on_gpu)[:n_out], pmap)
        _store(outs[0], gi, on_gpu, pad_rows=True)
    extra = () if argmax is None else (argmax,)
    return _call(run, _shape((kmap.num_in, grad.shape[1]), grad.dtype), grad, *extra, kmap.in_maps, kmap.out_maps)


@jax.custom_vjp
def _max_pool(feats, kmap):
    return _pool_call("max", feats, kmap)[0]


def _max_pool_fwd(feats, kmap):
    out, arg = _pool_call("max", feats, kmap)
    return out, (arg, kmap)


def _max_pool_bwd(res, grad):
    arg, kmap = res
    return _pool_grad_call(grad, arg, kmap), _no_grad(kmap)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


@jax.custom_vjp
def _avg_pool(feats, kmap):
    return _pool_call("avg", feats, kmap)


def _avg_pool_fwd(feats, kmap):
    return _pool_call("avg", feats, kmap), kmap


def _avg_pool_bwd(kmap, grad):
    return _pool_grad_call(grad, None, kmap), _no_grad(kmap)


_avg_pool.defvjp(_avg_pool_fwd, _avg_pool_bwd)


def pool_kernel_map(voxels, kernel_size=2, stride=None) -> JaxKernelMap:
    """The :class:`JaxKernelMap` of a pooling geometry (``stride`` default ``kernel_size``), for
    :func:`max_pool_features` / :func:`avg_pool_features`; call outside ``jit``. It is the strided
    convolution's map (``kernel_map(voxels, kernel_size, stride)``), so a convolution of the same
    geometry shares it and its output sites."""
    ks, st = pooling._pool_geometry(kernel_size, stride)
    return kernel_map(voxels, ks, st)


def max_pool_features(feats, kmap: JaxKernelMap):
    """Differentiable max pooling of feats ``[num_in, C]`` over the map of :func:`pool_kernel_map`:
    ``[num_out, C]``, the channel-wise maximum over each output's active inputs (0 for none). Gradient:
    to the winning input (ties: the lowest row). Runs under ``jit``, ``grad`` and ``vmap``."""
    _check_map_feats(feats, kmap)
    return _max_pool(feats, kmap)


def avg_pool_features(feats, kmap: JaxKernelMap):
    """Differentiable average pooling (the mean over each output's active inputs); see
    :func:`max_pool_features`."""
    _check_map_feats(feats, kmap)
    return _avg_pool(feats, kmap)


def _pool(voxels, kernel_size, stride, features, core_op):
    if not _is_jax_voxels(voxels):
        return core_op(voxels, kernel_size, stride)
    ks, st = pooling._pool_geometry(kernel_size, stride)
    core_map = sv.kernel_map(voxels, ks, st)
    out = features(voxels.feats, JaxKernelMap.from_core(core_map))
    return output_voxels_of(voxels, core_map, out)


def max_pool(voxels, kernel_size=2, stride=None) -> Voxels:
    """:func:`sparsevox.max_pool` for JAX ``Voxels``, differentiable in the features (concrete coords)."""
    return _pool(voxels, kernel_size, stride, max_pool_features, pooling.max_pool)


def avg_pool(voxels, kernel_size=2, stride=None) -> Voxels:
    """:func:`sparsevox.avg_pool` for JAX ``Voxels``, differentiable in the features (concrete coords)."""
    return _pool(voxels, kernel_size, stride, avg_pool_features, pooling.avg_pool)


# -- global pooling --

def _global_call(feats, batch, num_batches: int, mode: str):
    """Forward callback: ``(out [B, C], argmax [B, C] or None)``."""
    def run(outs, ins, on_gpu):
        out, arg = pooling.global_pool_forward(_view(ins[0], on_gpu), _view(ins[1], on_gpu), num_batches, mode)
        _store(outs[0], out, on_gpu)
        if arg is not None:
            _store(outs[1], arg, on_gpu)
    out = _shape((num_batches, feats.shape[1]), feats.dtype)
    if mode == "max":
        return _call(run, (out, _shape(out.shape, jnp.int32)), feats, batch)
    return _call(run, out, feats, batch), None


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _global_pool(feats, batch, num_batches, mode):
    return _global_call(feats, batch, num_batches, mode)[0]


def _global_pool_fwd(feats, batch, num_batches, mode):
    out, arg = _global_call(feats, batch, num_batches, mode)
    return out, (batch, arg)


def _global_pool_bwd(num_batches, mode, res, grad):
    batch, arg = res

    def run(outs, ins, on_gpu):
        a = _view(ins[2], on_gpu) if arg is not None else None
        _store(outs[0], pooling.global_pool_backward(_view(ins[0], on_gpu), _view(ins[1], on_gpu), mode, a), on_gpu)
    extra = () if arg is None else (arg,)
    gf = _call(run, _shape((batch.shape[0], grad.shape[1]), grad.dtype), grad, batch, *extra)
    return gf, _no_grad(batch)


_global_pool.defvjp(_global_pool_fwd, _global_pool_bwd)


def global_pool_features(feats, batch, num_batches: int, mode: str = "avg"):
    """Differentiable global pooling: ``[num_batches, C]``, per item the mean / max / sum of its rows of
    feats ``[N, C]`` (an item with no rows gives zeros). ``batch``: int ``[N]`` in ``[0, num_batches)``
    (e.g. ``voxels.batch_index()``, may be traced); ``num_batches`` static."""
    pooling._check_mode(mode)
    _check_feats(feats)
    num_batches = _item_count(num_batches, "num_batches", feats.shape[0])
    batch = _as_index(batch, "batch", (feats.shape[0],))
    return _global_pool(feats, batch, num_batches, mode)


def global_pool(voxels, mode: str = "avg"):
    """:func:`sparsevox.global_pool` for JAX ``Voxels`` (``[B, C]``, B = largest batch index + 1),
    differentiable in the features (concrete coords)."""
    if not _is_jax_voxels(voxels):
        return pooling.global_pool(voxels, mode)
    pooling._check_mode(mode)
    return global_pool_features(voxels.feats, voxels.coords[:, 0], voxels.batch_size, mode)


# -- unpooling --

def _unpool_call(feats, parent):
    def run(outs, ins, on_gpu):
        _store(outs[0], pooling.unpool_forward(_view(ins[0], on_gpu), _view(ins[1], on_gpu)), on_gpu)
    return _call(run, _shape((parent.shape[0], feats.shape[1]), feats.dtype), feats, parent)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _unpool(feats, parent, num_coarse):
    return _unpool_call(feats, parent)


def _unpool_fwd(feats, parent, num_coarse):
    return _unpool_call(feats, parent), parent


def _unpool_bwd(num_coarse, parent, grad):
    def run(outs, ins, on_gpu):
        g = pooling.unpool_backward(_view(ins[0], on_gpu), _view(ins[1], on_gpu), num_coarse)
        _store(outs[0], g, on_gpu)
    return _call(run, _shape((num_coarse, grad.shape[1]), grad.dtype), grad, parent), _no_grad(parent)


_unpool.defvjp(_unpool_fwd, _unpool_bwd)


def unpool_parents(coarse, fine, stride=2):
    """int32 ``[N_fine]`` JAX array: the row in ``coarse`` of each fine voxel's parent ``floor(c / stride)``
    (outside ``jit``; ``ValueError`` naming a fine voxel whose parent is missing)."""
    return _to_jax(pooling.parent_rows(coarse, fine, stride))


def unpool_features(feats, parent):
    """Differentiable unpooling: ``out[i] = feats[parent[i]]`` (``[N_fine, C]``) from coarse feats
    ``[M, C]`` and ``parent`` (:func:`unpool_parents`). Gradient: each coarse row gets the sum over its
    children."""
    _check_feats(feats)
    return _unpool(feats, _as_index(parent, "parent", (None,)), int(feats.shape[0]))


def unpool(coarse, fine, stride=2) -> Voxels:
    """:func:`sparsevox.unpool` for JAX ``Voxels``: ``fine``'s sites and rows with their parents'
    features, differentiable in ``coarse.feats`` (concrete coords)."""
    if not isinstance(fine, Voxels) or not _is_jax_voxels(coarse, "coarse"):
        return pooling.unpool(coarse, fine, stride)
    geometry.triple(stride, "stride")
    return fine.replace(unpool_features(coarse.feats, unpool_parents(coarse, fine, stride)))


# -- devoxelisation --

def _devoxelize_call(feats, idx, w):
    def run(outs, ins, on_gpu):
        f, i, wv = (_view(b, on_gpu) for b in ins)
        _store(outs[0], _points.devoxelize_forward(f, i, wv), on_gpu)
    return _call(run, _shape((idx.shape[0], feats.shape[1]), feats.dtype), feats, idx, w)


@jax.custom_vjp
def _devoxelize(feats, idx, w):
    return _devoxelize_call(feats, idx, w)


def _devoxelize_fwd(feats, idx, w):
    return _devoxelize_call(feats, idx, w), (feats, idx, w)


def _devoxelize_bwd(res, grad):
    feats, idx, w = res

    def run(outs, ins, on_gpu):
        g, i, wv = (_view(b, on_gpu) for b in ins)
        _store(outs[0], _points.devoxelize_backward(g, i, wv, feats.shape[0]), on_gpu)
    gf = _call(run, _shape(feats.shape, grad.dtype), grad, idx, w)
    # d out[p] / d w[p, j] = feats[idx[p, j]] (0 where idx is -1): cheap in JAX, dropped by XLA when unused
    if feats.shape[0] == 0:  # no voxels: every idx is -1 (and there is nothing to gather from)
        return gf, _no_grad(idx), jnp.zeros_like(w)
    acc = jnp.promote_types(w.dtype, jnp.float32)
    corner = feats[jnp.maximum(idx, 0)].astype(acc)  # [P, 8, C]
    gw = jnp.where(idx >= 0, jnp.sum(corner * grad.astype(acc)[:, None, :], axis=-1), 0).astype(w.dtype)
    return gf, _no_grad(idx), gw


_devoxelize.defvjp(_devoxelize_fwd, _devoxelize_bwd)


def devoxelize_weights(voxels, points, voxel_size, batch=None):
    """``(idx int32 [P, 8], w [P, 8])`` JAX arrays: the rows of the 8 voxels around each point (-1 where
    absent) and their renormalised trilinear weights (JAX's default float: float64 under
    ``jax_enable_x64``, else float32), by :func:`sparsevox.points.devoxelize_weights`. Outside ``jit``
    and ``grad``: points and batch must be concrete."""
    hint = "the interpolation weights are geometry, computed outside jit/grad (devoxelize_weights)"
    _concrete(points, "points", hint)
    _concrete(batch, "batch", hint)
    idx, w = _points.devoxelize_weights(voxels, points, voxel_size, batch)
    return _to_jax(idx), _to_jax(w.astype(jax.dtypes.canonicalize_dtype(np.float64)))


def devoxelize_features(feats, idx, w):
    """Differentiable devoxelisation: ``out[p] = sum_j w[p, j] * feats[idx[p, j]]`` over ``idx >= 0``
    (``[P, C]``), with ``idx``/``w`` from :func:`devoxelize_weights`. Gradients: to feats, and to ``w``
    (``feats[idx[p, j]] . grad[p]``; ``idx`` is not differentiated)."""
    _check_feats(feats)
    idx = _as_index(idx, "idx", (None, 8))
    w = jnp.asarray(w)
    if w.shape != idx.shape or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"w must be a float array of shape {tuple(idx.shape)}, got {w.dtype} {tuple(w.shape)}")
    return _devoxelize(feats, idx, w)


def devoxelize(voxels, points, voxel_size, batch=None):
    """:func:`sparsevox.devoxelize` for JAX ``Voxels``: ``[P, C]``, differentiable in the features
    (concrete coords and points)."""
    if not _is_jax_voxels(voxels):
        return _points.devoxelize(voxels, points, voxel_size, batch)
    idx, w = devoxelize_weights(voxels, points, voxel_size, batch)
    return devoxelize_features(voxels.feats, idx, w)


# -- dense grids --

def _to_dense_call(feats, coords, spatial_shape, batch_size):
    def run(outs, ins, on_gpu):
        d = _dense.to_dense_forward(_view(ins[0], on_gpu), _view(ins[1], on_gpu), spatial_shape, batch_size)
        _store(outs[0], d, on_gpu)
    shape = (batch_size, feats.shape[1]) + tuple(spatial_shape)
    return _call(run, _shape(shape, feats.dtype), feats, coords)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _to_dense(feats, coords, spatial_shape, batch_size):
    return _to_dense_call(feats, coords, spatial_shape, batch_size)


def _to_dense_fwd(feats, coords, spatial_shape, batch_size):
    return _to_dense_call(feats, coords, spatial_shape, batch_size), coords


def _gather_call(dense, coords):
    """``dense[b, :, x, y, z]`` for each row of coords: ``[N, C]``."""
    def run(outs, ins, on_gpu):
        _store(outs[0], _dense.from_dense_forward(_view(ins[0], on_gpu), _view(ins[1], on_gpu)), on_gpu)
    return _call(run, _shape((coords.shape[0], dense.shape[1]), dense.dtype), dense, coords)


def _to_dense_bwd(spatial_shape, batch_size, coords, grad):
    return _gather_call(grad, coords), _no_grad(coords)


_to_dense.defvjp(_to_dense_fwd, _to_dense_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _from_dense(dense, coords, dense_shape):
    return _gather_call(dense, coords)


def _from_dense_fwd(dense, coords, dense_shape):
    return _gather_call(dense, coords), coords


def _from_dense_bwd(dense_shape, coords, grad):
    def run(outs, ins, on_gpu):
        g = _dense.from_dense_backward(_view(ins[0], on_gpu), _view(ins[1], on_gpu), dense_shape)
        _store(outs[0], g, on_gpu)
    return _call(run, _shape(dense_shape, grad.dtype), grad, coords), _no_grad(coords)


_from_dense.defvjp(_from_dense_fwd, _from_dense_bwd)


def to_dense_features(feats, coords, spatial_shape, batch_size: int):
    """Differentiable scatter of feats ``[N, C]`` at int ``coords`` ``[N, 4]`` ``(b, x, y, z)`` into zeros
    ``[batch_size, C, X, Y, Z]``. Coordinates outside the grid are a ``ValueError`` of the core raised
    inside the callback (an XLA runtime error carrying it); :func:`to_dense` checks them before."""
    _check_feats(feats)
    batch_size = _item_count(batch_size, "batch_size", feats.shape[0])
    coords = _as_index(coords, "coords", (feats.shape[0], 4))
    return _to_dense(feats, coords, _dense._shape3(spatial_shape), batch_size)


def to_dense(voxels, spatial_shape, batch_size: int | None = None):
    """:func:`sparsevox.to_dense` for JAX ``Voxels``: ``[B, C, X, Y, Z]``, differentiable in the features
    (concrete coords; checked against the grid here, outside any callback)."""
    if not _is_jax_voxels(voxels):
        return _dense.to_dense(voxels, spatial_shape, batch_size)
    shp = _dense._shape3(spatial_shape)
    bsz = voxels.batch_size if batch_size is None else _item_count(batch_size, "batch_size", voxels.num_voxels)
    _dense._sites(voxels.core_coords()[0], shp, bsz)
    return to_dense_features(voxels.feats, voxels.coords, shp, bsz)


def active_sites(dense, mask=None):
    """int32 ``[N, 4]`` JAX array of the sites ``(b, x, y, z)`` of ``dense`` ``[B, C, X, Y, Z]`` nonzero in
    any channel (or of ``mask`` ``[B, X, Y, Z]``), sorted: :func:`sparsevox.dense.active_sites`. They
    depend on the values, so this runs outside ``jit`` and ``grad``."""
    return _to_jax(_active_sites(dense, mask))


def _active_sites(dense, mask):
    """:func:`active_sites` as a core array."""
    hint = "the active sites depend on the values; find them outside jit/grad (active_sites) and gather " \
           "inside with from_dense_features"
    _concrete(dense, "dense", hint)
    _concrete(mask, "mask", hint)
    d, _ = to_core(dense)
    return _dense.active_sites(d, None if mask is None else to_core(mask)[0])


def from_dense_features(dense, coords):
    """Differentiable gather: ``dense[b, :, x, y, z]`` for each row of int ``coords`` ``[N, 4]`` →
    ``[N, C]``. Gradient: scattered back into zeros of dense's shape."""
    if dense.ndim != 5:
        raise ValueError(f"dense must have shape [B, C, X, Y, Z], got {tuple(dense.shape)}")
    if jnp.dtype(dense.dtype).name not in FLOAT_DTYPES:
        raise ValueError(f"dense dtype must be one of {FLOAT_DTYPES}, got {jnp.dtype(dense.dtype).name}")
    coords = _as_index(coords, "coords", (None, 4))
    return _from_dense(dense, coords, tuple(int(v) for v in dense.shape))


def from_dense(dense, mask=None) -> Voxels:
    """:func:`sparsevox.from_dense` for JAX arrays: ``Voxels`` of the nonzero (or masked) sites,
    differentiable in ``dense`` through :func:`from_dense_features` (``dense`` concrete: the sites depend
    on its values)."""
    if not isinstance(dense, jax.Array):
        return _dense.from_dense(dense, mask)
    _dense.check_dense_shape(dense.shape)
    coords = _active_sites(dense, mask)
    origin = dataclasses.replace(to_core(dense)[1], dtype=None)
    return Voxels.from_core_coords(coords, from_dense_features(dense, _to_jax(coords)), origin)


def _voxels_flatten(v: Voxels):
    return (v.coords, v.feats), None


def _voxels_unflatten(aux, children):
    return Voxels(children[0], children[1], check=False)


jax.tree_util.register_pytree_node(Voxels, _voxels_flatten, _voxels_unflatten)
