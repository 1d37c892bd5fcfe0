"""Network modules around the convolutions, as Flax NNX modules (the torch adapter's :mod:`layers`, with
the same names and arguments): a sequential container, normalisations and the residual block.

They work on features ``[N, C]``, not ``Voxels``: the geometry comes in as a :class:`LevelMaps` built
outside ``jit``. A module "takes maps" when it is a sparsevox convolution or has the class attribute
``takes_maps = True`` (every module here that needs geometry has it); :class:`SparseSequential` calls
such modules as ``module(x, maps)`` and any other callable as ``module(x)``, so plain feature-wise
modules and functions (``jax.nn.relu``, ``nnx.Dropout``, ``nnx.Linear``) can sit between convolutions.

Example::

    block = ResidualBlock(32, 64, rngs=nnx.Rngs(0))
    maps = block.kernel_maps(voxels)                        # outside jit: SubM k3 and k1 maps, batch column
    y = nnx.jit(lambda m, x, maps: m(x, maps))(block, voxels.feats, maps)     # [N, 64]
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparsevox.adapters import jax as svj
from sparsevox.geometry import BATCH_MAX

from .conv import SparseConv, SparseDepthwiseConv, _float_dtype, _positive
from .maps import LevelMaps, level_maps
from .pooling import AvgPool3d, MaxPool3d

__all__ = ["SparseSequential", "BatchNorm", "InstanceNorm", "ResidualBlock", "takes_maps"]

_CONVS = (SparseConv, SparseDepthwiseConv)
_SITE_MOVERS = (*_CONVS, MaxPool3d, AvgPool3d)  # strided ones put their output on other sites


def takes_maps(module) -> bool:
    """Whether ``module(x, maps)`` is the call (else :class:`SparseSequential` calls ``module(x)``)."""
    return isinstance(module, _CONVS) or bool(getattr(module, "takes_maps", False))


def _moves_sites(module) -> bool:
    return isinstance(module, _SITE_MOVERS) and (module.stride != (1, 1, 1) or module.transposed)


def _stats_dtype(dt):
    """Statistics in float32 at least (float16/bfloat16 features); float64 stays float64."""
    return jnp.promote_types(dt, jnp.float32)


class _KernelMaps:
    def kernel_maps(self, voxels, output_voxels=None) -> LevelMaps:
        """Every kernel map this module's convolutions need on ``voxels``, and the batch column (call
        outside ``jit``; pass the result as ``maps``). See :func:`level_maps`."""
        return level_maps(voxels, self, output_voxels=output_voxels)


class SparseSequential(_KernelMaps, nnx.Sequential):
    """``nnx.Sequential`` over sparse features: ``__call__(x, maps=None)`` calls modules that take maps
    (:func:`takes_maps`) as ``module(x, maps)`` and anything else as ``module(x)``; ``x`` is ``[N, C]``.

    All modules get the same ``maps`` (the :class:`LevelMaps` of the input sites), so a strided or
    transposed convolution may only be followed by modules that need no maps (as in conv + BN + ReLU);
    a later module that takes maps is a ``ValueError`` (split the sequence where the sites change).

    Example::

        net = SparseSequential(SparseConv(4, 32, 3, use_bias=False, rngs=rngs), BatchNorm(32, rngs=rngs),
                               jax.nn.relu, nnx.Linear(32, 20, rngs=rngs))
        logits = net(voxels.feats, net.kernel_maps(voxels))      # [N, 20]
    """

    takes_maps = True

    def __call__(self, x, maps=None):
        moved = None
        valid = _valid_rows(maps)  # bucketed maps: the real row count of the current sites
        for i, module in enumerate(self.layers):
            if takes_maps(module):
                if moved is not None:
                    raise ValueError(f"SparseSequential: layer {i} ({type(module).__name__}) takes kernel maps, but "
                                     f"layer {moved} changed the sites (strided or transposed convolution) and "
                                     f"every layer gets the maps of the input sites: split the sequence there")
                x = module(x, maps)
                if _moves_sites(module):
                    moved = i
                    if valid is not None:  # the output sites' real rows
                        kmap = maps[module.map_key] if isinstance(maps, LevelMaps) else maps
                        valid = kmap.valid[1]
            elif valid is not None and isinstance(module, BatchNorm):
                x = module(x, valid=valid)
            else:
                x = module(x)
        return x


def _valid_rows(maps):
    """The real input rows of bucketed maps (a :class:`LevelMaps`' ``valid``, a bucketed JaxKernelMap's
    ``valid[0]``), or None."""
    if isinstance(maps, LevelMaps):
        return maps.valid
    if isinstance(maps, svj.JaxKernelMap) and maps.bucketed:
        return maps.valid[0]
    return None


class BatchNorm(nnx.BatchNorm):
    """Batch normalisation of sparse features ``[N, C]`` (every voxel of the batch is one sample), with
    ``torch.nn.BatchNorm1d``'s arguments and arithmetic:

    - training (``use_running_average=False``): ``y = (x - mean) / sqrt(var + eps) * scale + bias`` with
      the batch mean and biased variance; the running statistics move by ``momentum`` towards the batch
      mean and the *unbiased* batch variance (as torch; ``nnx.BatchNorm`` uses the biased one);
    - evaluation (``use_running_average=True``, e.g. after ``model.eval()``): the running statistics.

    An ``nnx.BatchNorm`` (``model.eval()`` / ``model.train()`` / ``nnx.view`` switch it) with its names:
    ``scale``/``bias`` params (torch's ``weight``/``bias``), ``mean``/``var`` batch stats (torch's
    ``running_mean``/``running_var``). ``momentum`` has torch's meaning (the weight of the new batch
    statistic, default 0.1); the attribute ``self.momentum`` holds nnx's decay, ``1 - momentum``.
    Statistics are computed and kept in float32 at least (float64 params: float64); the result is in
    ``dtype``, else the promoted dtype of the input and ``param_dtype``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True, *,
                 use_running_average: bool = False, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if momentum is None or not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must be a float in [0, 1] (the weight of the batch statistic; torch's "
                             f"cumulative momentum=None is not supported), got {momentum!r}")
        super().__init__(_positive(num_features, "num_features"), use_running_average=use_running_average,
                         momentum=1.0 - float(momentum), epsilon=float(eps),
                         dtype=_float_dtype(dtype, "dtype", allow_none=True),
                         param_dtype=_float_dtype(param_dtype, "param_dtype", allow_none=False),
                         use_bias=bool(affine), use_scale=bool(affine), rngs=rngs)
        # nnx keeps batch stats in float32; torch in the module's dtype: float64 stays float64
        stats = _stats_dtype(self.param_dtype)
        self.mean = nnx.BatchStat(jnp.zeros(self.num_features, stats))
        self.var = nnx.BatchStat(jnp.ones(self.num_features, stats))

    def __call__(self, x, use_running_average: bool | None = None, *, valid=None):
        """``x`` ``[N, C]``; ``valid`` (bucketed maps, int32 scalar): only rows ``< valid`` are voxels, the
        rest padding: left out of the statistics, and zero in the result."""
        if valid is not None:
            return self._masked(x, use_running_average, valid)
        use_running, dt, sdt = self._setup_call(x, use_running_average)
        xf = x.astype(sdt)
        if use_running:
            mean, var = self.mean[...].astype(sdt), self.var[...].astype(sdt)
        else:
            n = x.shape[0]
            if n < 2:
                # torch raises for 1 row; for 0 rows it returns an empty result (statistics unchanged)
                torch_does = "as torch" if n == 1 else "torch's BatchNorm1d returns an empty result instead"
                raise ValueError(f"BatchNorm in training needs more than 1 voxel per channel, got {n} ({torch_does}); "
                                 f"use_running_average=True normalises with the running statistics")
            mean = xf.mean(0)
            var = jnp.square(xf - mean).mean(0)  # two passes: no cancellation
            decay = self.momentum
            self.mean[...] = jax.lax.stop_gradient(
                decay * self.mean[...] + (1 - decay) * mean.astype(self.mean.dtype))
            self.var[...] = jax.lax.stop_gradient(
                decay * self.var[...] + (1 - decay) * (var * (n / (n - 1))).astype(self.var.dtype))
        return self._affine(xf, mean, var, sdt).astype(dt)

    def _setup_call(self, x, use_running_average):
        """``(use running statistics, result dtype, statistics dtype)`` of a call, checking ``x``'s shape."""
        use_running = self.use_running_average if use_running_average is None else use_running_average
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm({self.num_features}) needs features [N, {self.num_features}], got "
                             f"{tuple(x.shape)}")
        params = [v[...] for v in (self.scale, self.bias) if v is not None]
        dt = self.dtype if self.dtype is not None else jnp.result_type(x.dtype, *(p.dtype for p in params))
        return use_running, dt, _stats_dtype(dt)

    def _affine(self, xf, mean, var, sdt):
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.scale is not None:
            y = y * self.scale[...].astype(sdt)
        if self.bias is not None:
            y = y + self.bias[...].astype(sdt)
        return y

    def _masked(self, x, use_running_average, valid):
        """:meth:`__call__` over the first ``valid`` rows of ``x`` (a traced count: one compiled program
        serves every count of a bucket); the padding rows come out as zeros, so no gradient reaches the
        statistics through them."""
        use_running, dt, sdt = self._setup_call(x, use_running_average)
        keep = (jnp.arange(x.shape[0]) < valid)[:, None]
        xf = jnp.where(keep, x.astype(sdt), 0)
        if use_running:
            mean, var = self.mean[...].astype(sdt), self.var[...].astype(sdt)
        else:
            # at least one row in the means (an empty level normalises to zeros); the running statistics
            # move only with two rows or more (the exact path raises below two: torch raises for one row)
            n = jnp.maximum(valid, 1).astype(sdt)
            mean = xf.sum(0) / n
            var = jnp.where(keep, jnp.square(xf - mean), 0).sum(0) / n
            decay = jnp.where(valid >= 2, self.momentum, 1.0)
            self.mean[...] = jax.lax.stop_gradient(
                decay * self.mean[...] + (1 - decay) * mean.astype(self.mean.dtype)).astype(self.mean.dtype)
            self.var[...] = jax.lax.stop_gradient(
                decay * self.var[...] + (1 - decay) * (var * (n / jnp.maximum(n - 1, 1))).astype(self.var.dtype)
            ).astype(self.var.dtype)
        return jnp.where(keep, self._affine(xf, mean, var, sdt), 0).astype(dt)


class InstanceNorm(nnx.Module):
    """Instance normalisation of sparse features: per batch item ``b`` (coords column 0) and channel
    ``c``, over the voxels of that item, ``y = (x - mean_bc) / sqrt(var_bc + eps)`` (biased variance), then
    ``* scale[c] + bias[c]`` when ``affine`` (torch's ``weight``/``bias``; ones and zeros). An item with
    one voxel gives zeros before the affine part. No running statistics. As the torch ``InstanceNorm``.

    ``__call__(x, maps)``: ``x`` ``[N, C]``; ``maps`` a :class:`LevelMaps` of these sites (its ``batch``
    column is used) or the batch indices int ``[N]`` themselves. Statistics in float32 at least; the
    result in ``dtype``, else the promoted dtype of the input and the params (the input's without them).
    """

    takes_maps = True

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = False, *, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.num_features, self.eps, self.affine = _positive(num_features, "num_features"), float(eps), bool(affine)
        self.dtype = _float_dtype(dtype, "dtype", allow_none=True)
        pdt = _float_dtype(param_dtype, "param_dtype", allow_none=False)
        self.scale = nnx.Param(jnp.ones(self.num_features, pdt)) if affine else nnx.data(None)
        self.bias = nnx.Param(jnp.zeros(self.num_features, pdt)) if affine else nnx.data(None)

    def kernel_maps(self, voxels, output_voxels=None) -> LevelMaps:
        """The :class:`LevelMaps` of ``voxels`` (no kernel maps: only the batch column is used)."""
        return level_maps(voxels)

    def __call__(self, x, maps):
        batch = maps.batch if isinstance(maps, LevelMaps) else maps
        if not hasattr(batch, "shape") or batch.ndim != 1:
            raise ValueError(f"InstanceNorm needs LevelMaps or the batch indices [N] (coords column 0), got "
                             f"{type(maps).__name__}")
        if x.ndim != 2 or x.shape[1] != self.num_features or batch.shape[0] != x.shape[0]:
            raise ValueError(f"InstanceNorm({self.num_features}) needs features [N, {self.num_features}] and "
                             f"{x.shape[0]} batch indices, got {tuple(x.shape)} and {batch.shape[0]}")
        params = [v[...] for v in (self.scale, self.bias) if v is not None]
        dt = self.dtype if self.dtype is not None else jnp.result_type(x.dtype, *(p.dtype for p in params))
        xf = x.astype(_stats_dtype(dt))
        rows = BATCH_MAX + 1  # the documented limit: a static segment count, whatever the batch
        count = jax.ops.segment_sum(jnp.ones(x.shape[0], xf.dtype), batch, rows)
        denom = jnp.maximum(count, 1)[:, None]
        mean = jax.ops.segment_sum(xf, batch, rows) / denom
        # padding rows of bucketed maps (batch -1) take no segment: zeros in, zeros out
        centred = xf - jnp.take(mean, batch, axis=0, mode="fill", fill_value=0)
        var = jax.ops.segment_sum(centred * centred, batch, rows) / denom
        y = centred * jnp.take(jax.lax.rsqrt(var + self.eps), batch, axis=0, mode="fill", fill_value=0)
        if self.affine:
            y = y * self.scale[...].astype(y.dtype) + self.bias[...].astype(y.dtype)
        return jnp.where((batch >= 0)[:, None], y, 0).astype(dt)


class ResidualBlock(_KernelMaps, nnx.Module):
    """The basic residual block of sparse ResNets/UNets (as the torch ``ResidualBlock``):
    ``relu(bn(conv(relu(bn(conv(x))))) + skip(x))`` with submanifold convolutions (no bias), where
    ``skip`` is the identity (``None``) when ``c_in == c_out`` and a 1×1 convolution + :class:`BatchNorm`
    otherwise. Output sites = input sites. ``__call__(x, maps)``: ``x`` ``[N, c_in]``, ``maps`` the
    :class:`LevelMaps` of the sites (:meth:`kernel_maps`) → ``[N, c_out]``.

    Args:
        c_in, c_out: channels in and out.
        kernel_size, dilation: of the two main convolutions.
        fwd_algo, bwd_algo: passed to every convolution.
        dtype, param_dtype: of every convolution and norm.
    """

    takes_maps = True

    def __init__(self, c_in: int, c_out: int, kernel_size=3, dilation=1, fwd_algo=None, bwd_algo=None, *,
                 dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        c_in, c_out = _positive(c_in, "c_in"), _positive(c_out, "c_out")  # else named as the convs' in_features
        kw = dict(fwd_algo=fwd_algo, bwd_algo=bwd_algo, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        bn = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.main = SparseSequential(
            SparseConv(c_in, c_out, kernel_size, dilation=dilation, use_bias=False, **kw), BatchNorm(c_out, **bn),
            jax.nn.relu,
            SparseConv(c_out, c_out, kernel_size, dilation=dilation, use_bias=False, **kw), BatchNorm(c_out, **bn))
        if c_in == c_out:
            self.skip = nnx.data(None)
        else:
            self.skip = SparseSequential(SparseConv(c_in, c_out, 1, use_bias=False, **kw), BatchNorm(c_out, **bn))

    def __call__(self, x, maps):
        skip = x if self.skip is None else self.skip(x, maps)
        return jax.nn.relu(self.main(x, maps) + skip)
