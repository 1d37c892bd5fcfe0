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

Speed: jit the whole step (all layers, loss, gradient), not single layers. On an H100 host a jitted call
costs ~80 µs of XLA dispatch before any work, about what a whole small layer costs through torch, and
each layer's callback ~35 µs of our own host work plus XLA's share (``docs/performance.md``).

GPU memory: XLA preallocates most of the GPU; the kernels' scratch memory comes from CuPy's pool, so
leave room for it, e.g. ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.5`` or ``XLA_PYTHON_CLIENT_PREALLOCATE=false``.
"""
from __future__ import annotations

import dataclasses
import weakref
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.buffer_callback import buffer_callback

import sparsevox as sv
from sparsevox.conv import output_voxels_of
from sparsevox._arrays import array_module, cuda_interface_view, data_ptr, external_stream, on_device, to_host
from sparsevox.kernel_map import KernelMap, live_map, recall
from sparsevox.voxels import Voxels

__all__ = ["JaxKernelMap", "kernel_map", "conv_features", "depthwise_features", "spatially_sparse_conv",
           "spatially_sparse_depthwise_conv", "init_conv", "apply_conv", "SpatiallySparseConv",
           "SpatiallySparseDepthwiseConv"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class JaxKernelMap:
    """A kernel map as a JAX pytree: ``in_maps``/``out_maps`` int32 ``[L]`` arrays; static sizes."""
    in_maps: jax.Array
    out_maps: jax.Array
    offsets: tuple = dataclasses.field(metadata=dict(static=True))
    num_in: int = dataclasses.field(metadata=dict(static=True))
    num_out: int = dataclasses.field(metadata=dict(static=True))
    source: "_Source | None" = dataclasses.field(default=None, metadata=dict(static=True))

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

def _forward(op, feats, weight, kmap: JaxKernelMap, fwd_algo):
    c_out = weight.shape[2] if op == "conv" else weight.shape[1]
    core = sv.conv_forward if op == "conv" else sv.depthwise_forward

    def key_of(f, w):
        return ("jax.fwd", op, str(f.dtype), tuple(f.shape), tuple(w.shape), fwd_algo, sv.allow_tf32())

    def fast(outs, ins, stream):
        # Only a map known by its buffers' addresses: finding one otherwise compares arrays and may copy,
        # which must run inside XLA's device and stream (``run``).
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
    wt = cupy.ascontiguousarray(_view(w, True).transpose(0, 2, 1))
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
    core = sv.conv_backward if op == "conv" else sv.depthwise_backward

    def run(outs, ins, on_gpu):
        g, f, w, i, o = ins
        core_map = _map_of(i, o, kmap, on_gpu)
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


def conv_features(feats, weight, kmap: JaxKernelMap, fwd_algo=None, bwd_algo=None):
    """Differentiable features ``[N_out, C_out]`` of a convolution: feats ``[N_in, C_in]``, weight ``[K, C_in, C_out]``."""
    if weight.dtype != feats.dtype:
        raise ValueError(f"weight dtype ({weight.dtype}) must equal the features dtype ({feats.dtype})")
    if weight.ndim != 3 or weight.shape[0] != len(kmap.offsets) - 1 or weight.shape[1] != feats.shape[1]:
        raise ValueError(f"weight must have shape [K={len(kmap.offsets) - 1}, C_in={feats.shape[1]}, C_out], "
                         f"got {tuple(weight.shape)}")
    return _conv(feats, weight, kmap, _algo_key(fwd_algo), _algo_key(bwd_algo))


def depthwise_features(feats, weight, kmap: JaxKernelMap, fwd_algo=None, bwd_algo=None):
    """Differentiable depthwise features ``[N_out, C]``: feats ``[N_in, C]``, weight ``[K, C]``."""
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
    k = int(np.prod(np.broadcast_to(kernel_size, 3)))
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

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, dilation=1, transposed=False,
                 generative=False, bias=True, fwd_algo=None, bwd_algo=None, dtype=jnp.float32):
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
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

    def __init__(self, channels, kernel_size=3, stride=1, dilation=1, transposed=False, generative=False,
                 bias=True, fwd_algo=None, bwd_algo=None, dtype=jnp.float32):
        super().__init__(channels, channels, kernel_size, stride, dilation, transposed, generative, bias,
                         fwd_algo, bwd_algo, dtype)

    def init(self, key):
        k = int(np.prod(np.broadcast_to(self.kernel_size, 3)))
        bound = 1.0 / np.sqrt(k)
        kw, kb = jax.random.split(key)
        params = {"weight": jax.random.uniform(kw, (k, self.in_channels), self.dtype, -bound, bound)}
        if self.bias:
            params["bias"] = jax.random.uniform(kb, (self.in_channels,), self.dtype, -bound, bound)
        return params

    def apply(self, params, feats, kmap: JaxKernelMap):
        out = depthwise_features(feats, params["weight"], kmap, self.fwd_algo, self.bwd_algo)
        return out + params["bias"] if "bias" in params else out


def _voxels_flatten(v: Voxels):
    return (v.coords, v.feats), None


def _voxels_unflatten(aux, children):
    return Voxels(children[0], children[1], check=False)


jax.tree_util.register_pytree_node(Voxels, _voxels_flatten, _voxels_unflatten)
