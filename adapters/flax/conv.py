"""Flax NNX modules for sparse convolutions: thin wrappers over :mod:`sparsevox.adapters.jax`.

Parameters are ``nnx.Param`` s shaped and initialised like the JAX layer classes; the math is the JAX
adapter's ``custom_vjp`` functions, so the modules run under ``nnx.jit`` and ``nnx.grad``. Kernel maps
decide output shapes, so build them outside ``jit`` and pass them in (a :class:`JaxKernelMap` pytree)::

    conv = SparseConv(16, 32, kernel_size=3, rngs=nnx.Rngs(0))
    kmap = conv.kernel_map(voxels)                     # outside jit
    @nnx.jit
    def step(conv, feats, kmap):
        return conv(feats, kmap)                       # feats [N, 16] -> [N, 32]

Re-exported by :mod:`sparsevox.adapters.flax`.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

import sparsevox as sv
from sparsevox.adapters import jax as svj
from sparsevox.tuning.algo_inputs import resolve_algos
from sparsevox.conv import output_voxels_of
from sparsevox.geometry import triple
from sparsevox.kernel_map import KernelMap
from sparsevox.voxels import Voxels

from .maps import LevelMaps, map_key

__all__ = ["SparseConv", "SparseDepthwiseConv"]

_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _float_dtype(value, name: str, allow_none: bool):
    if value is None and allow_none:
        return None
    try:
        ok = jnp.dtype(value).name in _DTYPES
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {_DTYPES}" + (" or None" if allow_none else "") + f", got {value!r}")
    return jnp.dtype(value)


class _SparseLayer(nnx.Module):
    """Geometry, algorithm inputs and the call shared by both layers."""

    _op = "conv"

    def _setup(self, kernel_size, stride, dilation, transposed, generative, fwd_algo, bwd_algo, dtype,
               param_dtype) -> None:
        self.kernel_size = triple(kernel_size, "kernel_size")
        self.stride = triple(stride, "stride")
        self.dilation = triple(dilation, "dilation")
        if generative and not transposed:
            raise ValueError("generative=True is a transposed convolution that creates its output sites; "
                             "pass transposed=True with it")
        self.transposed, self.generative = bool(transposed), bool(generative)
        for value, direction in ((fwd_algo, "fwd"), (bwd_algo, "bwd")):
            if value is not None:
                resolve_algos(value, self._op, direction)  # a ValueError naming fwd_algo/bwd_algo
        # static attributes must be hashable (nnx.jit keys on them): lists become tuples
        self.fwd_algo = tuple(fwd_algo) if isinstance(fwd_algo, list) else fwd_algo
        self.bwd_algo = tuple(bwd_algo) if isinstance(bwd_algo, list) else bwd_algo
        self.dtype = _float_dtype(dtype, "dtype", allow_none=True)
        self.param_dtype = _float_dtype(param_dtype, "param_dtype", allow_none=False)

    def _set_params(self, params) -> None:
        self.weight = nnx.Param(params["weight"])
        self.bias = nnx.Param(params["bias"]) if "bias" in params else nnx.data(None)

    @property
    def map_key(self) -> str:
        """This layer's geometry as a key of :attr:`LevelMaps.maps` (``"k3"``, ``"k2_s2"``, ...)."""
        return map_key(self.kernel_size, self.stride, self.dilation, self.transposed, self.generative)

    def kernel_map(self, voxels, output_voxels=None) -> svj.JaxKernelMap:
        """This layer's kernel map for ``voxels`` (call outside ``jit``; pass the result to ``__call__``)."""
        return svj.kernel_map(voxels, self.kernel_size, self.stride, self.dilation, self.transposed,
                              self.generative, output_voxels)

    def __call__(self, x, kmap=None, output_voxels=None):
        """Apply the layer.

        Args:
            x: features ``[N_in, C_in]`` (float16, bfloat16, float32, float64) or :class:`~sparsevox.Voxels`.
            kmap: a :class:`JaxKernelMap` from :meth:`kernel_map`, or a :class:`LevelMaps` holding one
                under this layer's :attr:`map_key` (required for feature arrays and under ``jit``).
                ``None`` with concrete ``Voxels`` builds the map here (outside ``jit`` only).
            output_voxels: the output sites of a non-generative transposed layer (the finer ``Voxels``).

        Returns features ``[N_out, C_out]`` for an array input, ``Voxels`` for a ``Voxels`` input. The
        computation runs in ``dtype``, else in the promoted dtype of the input and ``param_dtype``.
        """
        if isinstance(kmap, LevelMaps):
            kmap = kmap[self.map_key]
        if isinstance(x, Voxels):
            core = None
            if kmap is None:
                core = sv.kernel_map(x, self.kernel_size, self.stride, self.dilation, self.transposed,
                                     self.generative, output_voxels)
                kmap = svj.JaxKernelMap.from_core(core)
            out = self(x.feats, kmap)
            if core is not None:
                return output_voxels_of(x, core, out, output_voxels)
            if output_voxels is not None:
                return output_voxels.replace(out)
            if self.stride == (1, 1, 1) and not self.transposed:
                return x.replace(out)
            raise ValueError("a strided or transposed layer given Voxels and a prebuilt kmap cannot know its "
                             "output coordinates: pass output_voxels=, call it on voxels.feats, or pass kmap=None "
                             "outside jit")
        if isinstance(kmap, KernelMap):
            kmap = svj.JaxKernelMap.from_core(kmap)
        if not isinstance(kmap, svj.JaxKernelMap):
            raise ValueError(f"kmap must be a JaxKernelMap (layer.kernel_map(voxels), built outside jit) when x is "
                             f"a features array, got {type(kmap).__name__}")
        if x.ndim != 2 or x.shape[0] != kmap.num_in:
            raise ValueError(f"features must have shape [N_in={kmap.num_in}, C], got {tuple(x.shape)}")
        weight = self.weight[...]
        bias = None if self.bias is None else self.bias[...]
        dt = self.dtype if self.dtype is not None else jnp.result_type(x.dtype, weight.dtype)
        fn = svj.conv_features if self._op == "conv" else svj.depthwise_features
        out = fn(x.astype(dt), weight.astype(dt), kmap, self.fwd_algo, self.bwd_algo)
        return out if bias is None else out + bias.astype(dt)


class SparseConv(_SparseLayer):
    """Sparse convolution ``[N_in, in_features] -> [N_out, out_features]`` as a Flax NNX module.

    Params: ``weight`` ``[K, in_features, out_features]`` (K = kx·ky·kz, offset index z fastest) and, with
    ``use_bias``, ``bias`` ``[out_features]``; both ``param_dtype``, uniform in ``±1/sqrt(in_features·K)``
    (Kaiming-uniform as ``torch.nn.Conv3d`` and :func:`sparsevox.adapters.jax.init_conv`).
    ``out[p] = sum_k x[stride·p + offset_k] @ weight[k] + bias``. Stride 1, not transposed: submanifold.
    ``generative=True`` (with ``transposed=True``) creates the output sites; a non-generative transposed
    layer needs them (``kernel_map(voxels, output_voxels=finer)``).
    """

    def __init__(self, in_features: int, out_features: int, kernel_size=3, stride=1, dilation=1,
                 transposed: bool = False, generative: bool = False, use_bias: bool = True, fwd_algo=None,
                 bwd_algo=None, dtype=None, param_dtype=jnp.float32, *, rngs: nnx.Rngs):
        self.in_features = _positive(in_features, "in_features")
        self.out_features = _positive(out_features, "out_features")
        self.use_bias = bool(use_bias)
        self._setup(kernel_size, stride, dilation, transposed, generative, fwd_algo, bwd_algo, dtype, param_dtype)
        self._set_params(svj.init_conv(rngs.params(), self.in_features, self.out_features, self.kernel_size,
                                       self.use_bias, self.param_dtype))


class SparseDepthwiseConv(_SparseLayer):
    """Depthwise sparse convolution ``[N_in, features] -> [N_out, features]`` as a Flax NNX module.

    Params: ``weight`` ``[K, features]`` and, with ``use_bias``, ``bias`` ``[features]``; uniform in
    ``±1/sqrt(K)`` as :class:`sparsevox.adapters.jax.SpatiallySparseDepthwiseConv`.
    ``out[p, c] = sum_k x[stride·p + offset_k, c] * weight[k, c] + bias[c]``.
    """

    _op = "depthwise"

    def __init__(self, features: int, kernel_size=3, stride=1, dilation=1, transposed: bool = False,
                 generative: bool = False, use_bias: bool = True, fwd_algo=None, bwd_algo=None, dtype=None,
                 param_dtype=jnp.float32, *, rngs: nnx.Rngs):
        self.features = _positive(features, "features")
        self.use_bias = bool(use_bias)
        self._setup(kernel_size, stride, dilation, transposed, generative, fwd_algo, bwd_algo, dtype, param_dtype)
        init = svj.SpatiallySparseDepthwiseConv(self.features, self.kernel_size, bias=self.use_bias,
                                                dtype=self.param_dtype).init
        self._set_params(init(rngs.params()))
