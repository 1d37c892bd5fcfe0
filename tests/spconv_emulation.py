"""A dense CPU emulation of the spconv 2.x layers that :mod:`benchmarks.spconv_minkunet` uses, written
from spconv 2.3.8's source (``spconv/pytorch/conv.py``, ``spconv/csrc/sparse/indices.py``), so the model
and its weight loader can be tested without spconv. It mirrors what the loader relies on:

- weights ``[C_out, kx, ky, kz, C_in]`` ("KRSC"), kernel axes in the order of the index columns;
- SubM: ``out[p] = sum_k in[p - k//2 + k] @ W[:, k, :]^T`` at the input sites, in their order;
- k-volume 1 SubM: ``features @ weight.view(C_in, C_out)`` (spconv's ``conv1x1`` reads the memory so);
- strided (padding 0): output sites ``floor(in / s)``, in an order of spconv's own (here: shuffled, so
  nothing may rely on sorted rows), ``out[o] = sum_k in[s o + k] @ W[:, k, :]^T``; the pair data is saved
  under ``indice_key`` with the input's indices and spatial shape;
- inverse (``SparseInverseConv3d``): outputs on the saved input indices of the strided layer with the same
  ``indice_key``, in their order: ``out[s c + k] += in[c] @ W[:, k, :]^T`` (a dense ``conv_transpose3d``).

Each layer is computed densely (``torch.nn.functional.conv3d``/``conv_transpose3d`` on the grid of the
spatial shape) and read at the output sites: an oracle of the semantics above, not of spconv's kernels.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SparseConvTensor:
    def __init__(self, features, indices, spatial_shape, batch_size, indice_dict=None):
        if indices.dtype != torch.int32:
            raise ValueError("spconv wants int32 indices")
        if len(indices) and ((indices[:, 1:] < 0).any()
                             or (indices[:, 1:] >= torch.tensor(list(spatial_shape), dtype=torch.int32)).any()):
            raise ValueError("indices outside the spatial shape (spconv would drop them)")
        self.features, self.indices = features, indices
        self.spatial_shape, self.batch_size = list(spatial_shape), int(batch_size)
        self.indice_dict = dict(indice_dict or {})

    def replace_feature(self, features):
        return SparseConvTensor(features, self.indices, self.spatial_shape, self.batch_size, self.indice_dict)

    def dense(self):
        c = self.features.shape[1]
        out = self.features.new_zeros(self.batch_size, *self.spatial_shape, c)
        i = self.indices.long()
        out[i[:, 0], i[:, 1], i[:, 2], i[:, 3]] = self.features
        return out.permute(0, 4, 1, 2, 3)


def _read(dense, indices):
    i = indices.long()
    return dense.permute(0, 2, 3, 4, 1)[i[:, 0], i[:, 1], i[:, 2], i[:, 3]]


class _Conv(nn.Module):
    def __init__(self, c_in, c_out, k, stride=1, bias=True, indice_key=None, subm=False, inverse=False):
        super().__init__()
        self.in_channels, self.out_channels, self.k, self.stride = c_in, c_out, k, stride
        self.subm, self.inverse, self.indice_key = subm, inverse, indice_key
        self.weight = nn.Parameter(torch.empty(c_out, k, k, k, c_in))
        bound = 1 / math.sqrt(c_in * k ** 3)
        nn.init.uniform_(self.weight, -bound, bound)
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None

    def _dense_weight(self):  # [C_out, C_in, kx, ky, kz] for conv3d
        return self.weight.permute(0, 4, 1, 2, 3)

    def forward(self, x):
        out = self._forward(x)
        if self.bias is not None:
            out = out.replace_feature(out.features + self.bias)
        return out

    def _forward(self, x):
        if self.subm and self.k == 1:
            return x.replace_feature(torch.mm(x.features, self.weight.view(self.in_channels, self.out_channels)))
        if self.subm:
            y = F.conv3d(x.dense(), self._dense_weight(), padding=self.k // 2)
            return x.replace_feature(_read(y, x.indices))
        if self.inverse:
            data = x.indice_dict[self.indice_key]
            y = F.conv_transpose3d(x.dense(), self.weight.permute(4, 0, 1, 2, 3), stride=self.stride)
            out = SparseConvTensor(_read(y, data["indices"]), data["indices"], data["spatial_shape"], x.batch_size,
                                   x.indice_dict)
            return out
        s = self.stride
        coarse = torch.cat([x.indices[:, :1], torch.div(x.indices[:, 1:], s, rounding_mode="floor")], 1)
        coarse = torch.unique(coarse, dim=0)
        g = torch.Generator().manual_seed(len(coarse))
        coarse = coarse[torch.randperm(len(coarse), generator=g)].contiguous()  # spconv's order is its own
        shape = [(n - self.k) // s + 1 for n in x.spatial_shape]
        y = F.conv3d(x.dense(), self._dense_weight(), stride=s)
        d = dict(x.indice_dict)
        if self.indice_key is not None:
            d[self.indice_key] = {"indices": x.indices, "spatial_shape": x.spatial_shape}
        return SparseConvTensor(_read(y, coarse), coarse, shape, x.batch_size, d)


class SubMConv3d(_Conv):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, indice_key=None):
        super().__init__(in_channels, out_channels, kernel_size, 1, bias, indice_key, subm=True)


class SparseConv3d(_Conv):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, indice_key=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, bias, indice_key)


class SparseInverseConv3d(_Conv):
    def __init__(self, in_channels, out_channels, kernel_size, indice_key=None, bias=True):
        super().__init__(in_channels, out_channels, kernel_size, kernel_size, bias, indice_key, inverse=True)

