"""spconv's pooling layers (``spconv/pytorch/pool.py`` of spconv 2.3.8) on sparsevox's pooling kernels.

Local pooling has the sites and pairs of the regular convolution of its geometry (any kernel size,
stride, padding, dilation; :mod:`.maps`), computed by sparsevox's segment reductions
(:func:`sparsevox.pooling.max_pool_forward` / ``avg_pool_forward`` on the layer's kernel map):

- ``SparseMaxPool``: ``out[o] = max(0, max of the active inputs of o's window)``. spconv initialises its
  output with 0 (``lowest = T(0)`` in ``spconv/csrc/sparse/maxpool.py``, zeros in its Native path), so a
  window of negative values gives 0; reproduced. Gradient as spconv's kernel: every input of the window
  equal to the output gets the output's gradient.
- ``SparseAvgPool``: the mean over the active inputs. Gradient: ``grad_out[o] / count[o]`` to each
  active input (the gradient of the forward; spconv 2.3.8's backward kernel multiplies by the count).

Global pooling reproduces spconv 2.3.8 as written: ``SparseGlobalMaxPool`` gives ``[B, C]``, the max per
batch item; ``SparseGlobalAvgPool`` gives ``[B]``, the mean of **channel 0** per batch item (spconv's
``torch.mean(features, dim=0)[0]``). A batch item without sites fails as in spconv (max of nothing) or
gives NaN (mean).
"""
from __future__ import annotations

import torch

from sparsevox import _arrays, pooling
from sparsevox.adapters.torch.functional import kernel_map_tensors

from . import maps
from .core import ConvAlgo, IndiceData, SparseConvTensor, checked_nd
from .modules import SparseModule

__all__ = ["SparseMaxPool", "SparseAvgPool", "SparseGlobalMaxPool", "SparseGlobalAvgPool"] + \
    [f"Sparse{kind}Pool{nd}d" for nd in (1, 2, 3, 4) for kind in ("Max", "Avg")]

_MAX_NUM_VOXELS_DURING_TRAINING = "max_num_voxels_during_training"


class _MaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feats, kmap):
        f, origin = _arrays.to_core(feats)
        with _arrays.on_caller_stream(origin):
            out, _ = pooling.max_pool_forward(f, pooling.pool_map(kmap))
        out = _arrays.from_core(out, origin).clamp_min_(0)
        ctx.save_for_backward(feats, out)
        ctx.kmap = kmap
        return out

    @staticmethod
    def backward(ctx, grad):
        feats, out = ctx.saved_tensors
        ins, outs, _ = kernel_map_tensors(ctx.kmap)
        ins, outs = ins.long(), outs.long()
        hit = feats.index_select(0, ins) == out.index_select(0, outs)
        contrib = grad.index_select(0, outs) * hit.to(grad.dtype)
        return torch.zeros_like(feats).index_add_(0, ins, contrib), None


class _AvgPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feats, kmap):
        f, origin = _arrays.to_core(feats)
        with _arrays.on_caller_stream(origin):
            out = pooling.avg_pool_forward(f, pooling.pool_map(kmap))
        ctx.kmap, ctx.shape = kmap, feats.shape
        return _arrays.from_core(out, origin)

    @staticmethod
    def backward(ctx, grad):
        g, origin = _arrays.to_core(grad.contiguous())
        with _arrays.on_caller_stream(origin):
            gin = pooling.avg_pool_backward(g, pooling.pool_map(ctx.kmap))
        return _arrays.from_core(gin, origin), None


class _LocalPool(SparseModule):
    is_max = True

    def __init__(self, ndim, kernel_size=3, stride=1, padding=0, dilation=1, indice_key=None, subm=False, algo=None,
                 record_voxel_count=False, name=None):
        super().__init__(name=name)
        if ndim not in (1, 2, 3):
            raise NotImplementedError(f"{ndim}D sparse pooling: sparsevox.compat.spconv supports 1D, 2D and 3D")
        self.ndim = ndim
        # checked by name as the convolutions' (0 was a ZeroDivisionError in forward); padding any integer
        # (negative crops, as in spconv); stride None is the kernel size (spconv's)
        self.kernel_size = checked_nd("kernel_size", ndim, kernel_size, 1)
        self.stride = list(self.kernel_size) if stride is None else checked_nd("stride", ndim, stride, 1)
        self.padding = checked_nd("padding", ndim, padding)
        self.dilation = checked_nd("dilation", ndim, dilation, 1)
        self.subm, self.indice_key, self.record_voxel_count = subm, indice_key, record_voxel_count
        if record_voxel_count and not subm:
            self.register_buffer(_MAX_NUM_VOXELS_DURING_TRAINING, torch.zeros(1, dtype=torch.int32))
        self.algo = ConvAlgo.MaskImplicitGemm if algo is None else algo

    def extra_repr(self):
        s = f"kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != [0] * self.ndim:
            s += f", padding={self.padding}"
        if self.dilation != [1] * self.ndim:
            s += f", dilation={self.dilation}"
        return s

    def get_max_num_voxels(self):
        return getattr(self, _MAX_NUM_VOXELS_DURING_TRAINING, None)

    def forward(self, input: SparseConvTensor):
        if not isinstance(input, SparseConvTensor):
            raise ValueError(f"{type(self).__name__} takes a SparseConvTensor, got {type(input).__name__}")
        if input.indices.shape[1] - 1 != self.ndim:
            raise ValueError(f"a {self.ndim}D pool got indices with {input.indices.shape[1] - 1} spatial columns")
        shape = input.spatial_shape
        k3, d3 = maps.lift(self.kernel_size, 1), maps.lift(self.dilation, 1)
        geom = maps.geometry(input)
        with maps.planned(self, input):
            if self.subm:
                out_shape = shape
                kmap, outids, out_geom = maps.subm_map(geom, k3, d3), input.indices, geom
            else:
                out_shape = maps.conv_output_size(shape, self.kernel_size, self.stride, self.padding, self.dilation)
                maps.check_output_size(out_shape, shape)
                kmap, rows, out_geom = maps.strided_map(geom, k3, maps.lift(self.stride, 1),
                                                        maps.lift(self.padding, 0), d3, maps.lift(out_shape, 1),
                                                        in_shape=maps.lift(shape, 1))
                outids = maps.user_rows(rows, self.ndim)
        indice_dict = input.indice_dict.copy()
        if self.indice_key is not None:
            if self.indice_key in indice_dict:
                raise ValueError(f"indice key {self.indice_key} exists")
            indice_dict[self.indice_key] = IndiceData(outids, input.indices, kmap, shape, out_shape, self.subm,
                                                      self.algo, self.kernel_size, self.stride, self.dilation,
                                                      self.padding, in_geom=geom, out_geom=out_geom)
        features = input.features
        if features.is_cuda and torch.is_autocast_enabled("cuda"):  # as the convolutions (spconv: float16)
            features = features.to(torch.get_autocast_dtype("cuda"))
        out_features = (_MaxPool if self.is_max else _AvgPool).apply(features, kmap)
        if not self.subm and self.record_voxel_count:
            getattr(self, _MAX_NUM_VOXELS_DURING_TRAINING).clamp_(min=int(outids.shape[0]))
        out_tensor = input.replace_feature(out_features)
        out_tensor.indices, out_tensor.indice_dict, out_tensor.spatial_shape = outids, indice_dict, out_shape
        out_tensor._sv_geom = maps.geometry_entry(outids, out_geom)
        return out_tensor


class SparseMaxPool(_LocalPool):
    """spconv's ``SparseMaxPool(ndim, kernel_size=3, stride=1, padding=0, dilation=1, indice_key=None,
    subm=False, algo=None, record_voxel_count=False, name=None)``: ``max(0, max over the window)``.
    ``kernel_size``, ``stride`` and ``dilation`` must be integers >= 1, ``padding`` integers (else
    ``ValueError`` naming the argument)."""
    is_max = True


class SparseAvgPool(_LocalPool):
    """spconv's ``SparseAvgPool`` (same arguments): the mean over the active inputs of the window."""
    is_max = False


def _named(base, name: str, nd: int):
    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, indice_key=None, algo=None,
                 record_voxel_count=False, name=None):
        base.__init__(self, nd, kernel_size, stride, padding, dilation, indice_key, algo=algo,
                      record_voxel_count=record_voxel_count, name=name)
    doc = f"spconv's ``{name}`` (stride defaults to kernel_size); see :class:`{base.__name__}`."
    return type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


for _nd in (1, 2, 3, 4):
    globals()[f"SparseMaxPool{_nd}d"] = _named(SparseMaxPool, f"SparseMaxPool{_nd}d", _nd)
    globals()[f"SparseAvgPool{_nd}d"] = _named(SparseAvgPool, f"SparseAvgPool{_nd}d", _nd)
del _nd


class SparseGlobalMaxOrAvgPool(SparseModule):
    """Per batch item: ``torch.max(features, dim=0)[0]`` (``[B, C]``) or ``torch.mean(features, dim=0)[0]``
    (``[B]``: channel 0 only), as spconv 2.3.8 computes them."""

    def __init__(self, is_mean: bool, name=None):
        super().__init__(name=name)
        self.is_mean = is_mean

    def forward(self, input: SparseConvTensor):
        if not isinstance(input, SparseConvTensor):
            raise ValueError(f"{type(self).__name__} takes a SparseConvTensor, got {type(input).__name__}")
        batch = input.indices[:, 0].to(input.features.device)
        res = []
        for i in range(input.batch_size):
            rows = input.features[batch == i]
            res.append(torch.mean(rows, dim=0)[0] if self.is_mean else torch.max(rows, dim=0)[0])
        return torch.stack(res)


class SparseGlobalAvgPool(SparseGlobalMaxOrAvgPool):
    def __init__(self, name=None):
        super().__init__(is_mean=True, name=name)


class SparseGlobalMaxPool(SparseGlobalMaxOrAvgPool):
    def __init__(self, name=None):
        super().__init__(is_mean=False, name=name)
