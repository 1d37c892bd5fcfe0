"""A dense CPU emulation of spconv 2.x's PyTorch layers, written from spconv 2.3.8's source
(``spconv/pytorch/{core,conv,pool,modules,__init__}.py``, ``spconv/pytorch/ops.py``,
``spconv/csrc/sparse/{indices,maxpool}.py``), so that models written against spconv (and
:mod:`benchmarks.spconv_minkunet`'s weight loader) can be tested without spconv. It is the "spconv" of
the CPU tests; every layer is computed densely (``conv{1,2,3}d`` / ``conv_transpose{1,2,3}d`` / window
gathers on the grid of the spatial shape) and read at the output sites: an oracle of spconv's semantics,
not of its kernels. What it mirrors:

- ``SparseConvTensor(features, indices, spatial_shape, batch_size, grid, voxel_num, indice_dict, ...)``:
  indices int32 ``[N, ndim + 1]`` (batch first), ``replace_feature`` (shares ``indice_dict``),
  ``shadow_copy``, ``dense(channels_first=True)`` (``scatter_nd``), ``from_dense`` (channels-last input,
  ``to_sparse``), ``find_indice_pair``; ``features`` cannot be assigned.
- weights ``[C_out, *kernel_size, C_in]`` ("KRSC"), the kernel axes in the order of the index columns;
  ``bias`` ``[C_out]`` added after the convolution.
- 1×1 layers (kernel volume 1; for non-SubM layers also stride 1): ``features @ weight.view(C_in, C_out)``
  (``conv1x1``, ``FILTER_HWIO = False``: the memory of the ``[C_out, 1, 1, 1, C_in]`` parameter read as
  ``[C_in, C_out]``); same sites, no pairs, nothing stored under ``indice_key``.
- SubM (odd sizes only, ``generate_subm_conv_inds``): stride and padding ignored, ``p = k // 2 * d``;
  ``out[o] = sum_r in[o - p + r d] @ W[:, r, :]^T`` at the input sites, in their order.
- regular convolution (``query_npq``): output spatial shape ``(in + 2p - d(k-1) - 1) // s + 1``
  (``get_conv_output_size``); pairs ``in = out * s - p + r * d`` with ``0 <= out < out_shape`` (inputs
  whose every ``out`` falls outside are dropped); output sites = every ``out`` reached, in an order of
  spconv's own (here: shuffled, so nothing may rely on sorted rows).
- transposed convolution (``SparseConvTranspose``, ``query_nhw_out``): output spatial shape
  ``(in - 1) * s - 2p + k + output_padding`` (``get_deconv_output_size``: no dilation in it); pairs
  ``out = in * s - p + r * d`` inside it; ``out[o] += in[i] @ W[:, r, :]^T`` (a dense
  ``conv_transpose`` without a kernel flip).
- inverse convolution (``SparseInverseConv``, ``inverse=True``): the pairs of the regular
  convolution or pool stored under its ``indice_key``, swapped: outputs on that layer's input indices, in
  their order, with its spatial shape; ``out[in] += x[out] @ W[:, r, :]^T`` (its own weight, same ``r``).
- ``indice_key``: a regular/transposed convolution or pool stores its pairs under the key (an existing key
  is an error: "only support reuse subm indices"); a SubM layer stores them or, when the key exists,
  reuses them after spconv's checks (same kernel size, dilation, spatial shape, number of indices).
  A layer's output gets a copy of its input's ``indice_dict`` with the new entry.
- ``SparseMaxPool``: ``max(0, max of the active inputs of the window)`` (spconv initialises its output
  with 0: ``lowest = T(0)`` in ``maxpool.py``, zeros in the Native path); ``SparseAvgPool``: the mean over
  the active inputs (``count``). Same sites and stored pairs as the convolution of that geometry.
  (spconv's GPU avg-pool backward kernel multiplies by the count instead of dividing; the emulation's
  gradient is the true gradient of the forward.)
- ``SparseGlobalMaxPool``: ``[B, C]``, the max per batch item; ``SparseGlobalAvgPool``: ``[B]``, the mean
  of *channel 0* per batch item (spconv 2.3.8 writes ``torch.mean(features, dim=0)[0]``).
- ``SparseSequential``: spconv modules get the tensor; any other module gets ``x.features`` (skipped
  when there are no indices); ``ToDense``.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


def expand_nd(ndim, val):
    res = [val] * ndim if isinstance(val, int) else list(val)
    assert len(res) == ndim
    return [int(v) for v in res]


class IndiceData:
    def __init__(self, out_indices, indices, spatial_shape, out_spatial_shape, is_subm, ksize, stride, dilation,
                 padding):
        self.out_indices, self.indices = out_indices, indices
        self.spatial_shape, self.out_spatial_shape, self.is_subm = spatial_shape, out_spatial_shape, is_subm
        self.ksize, self.stride, self.dilation, self.padding = ksize, stride, dilation, padding


class SparseConvTensor:
    def __init__(self, features, indices, spatial_shape, batch_size, grid=None, voxel_num=None, indice_dict=None,
                 benchmark=False, permanent_thrust_allocator=False, enable_timer=False, force_algo=None):
        ndim = indices.shape[1] - 1
        assert features.ndim == 2 and indices.ndim == 2
        assert len(spatial_shape) == ndim, "spatial shape must equal to ndim"
        assert indices.dtype == torch.int32, "only support int32"
        assert batch_size > 0
        if len(indices) and ((indices[:, 1:] < 0).any()
                             or (indices[:, 1:] >= torch.tensor(list(spatial_shape), dtype=torch.int32)).any()):
            raise ValueError("indices outside the spatial shape (the dense emulation cannot place them)")
        self._features, self.indices = features, indices
        self.spatial_shape, self.batch_size = [int(v) for v in spatial_shape], batch_size
        self.indice_dict = {} if indice_dict is None else indice_dict
        self.grid, self.voxel_num, self.benchmark = grid, voxel_num, benchmark

    @property
    def features(self):
        return self._features

    @features.setter
    def features(self, val):
        raise ValueError("you can't set feature directly, use 'x = x.replace_feature(your_new_feature)'")

    def replace_feature(self, feature):
        return SparseConvTensor(feature, self.indices, self.spatial_shape, self.batch_size, self.grid,
                                self.voxel_num, self.indice_dict)

    def shadow_copy(self):
        return SparseConvTensor(self.features, self.indices, self.spatial_shape, self.batch_size, self.grid,
                                self.voxel_num, self.indice_dict, self.benchmark)

    def find_indice_pair(self, key):
        return None if key is None else self.indice_dict.get(key)

    @property
    def spatial_size(self):
        return math.prod(self.spatial_shape)

    @classmethod
    def from_dense(cls, x):
        x_sp = x.to_sparse(x.ndim - 1)
        return cls(x_sp.values(), x_sp.indices().permute(1, 0).contiguous().int(), x_sp.shape[1:-1], x_sp.shape[0])

    def dense(self, channels_first=True):
        shape = [self.batch_size] + list(self.spatial_shape) + [self.features.shape[1]]
        res = self.features.new_zeros(shape)
        res[tuple(self.indices.long().T)] = self.features
        return res.movedim(-1, 1).contiguous() if channels_first else res

    def __add__(self, other):
        return self.replace_feature(self.features + (other if isinstance(other, torch.Tensor) else other.features))

    __radd__ = __add__


# --- dense helpers ---------------------------------------------------------------------------------

def _read(dense, indices):
    """Rows of ``dense`` ``[B, C, *S]`` at ``indices`` ``[M, 1 + nd]``."""
    return dense.movedim(1, -1)[tuple(indices.long().T)]


def _mask(x):
    m = torch.zeros([x.batch_size, 1] + x.spatial_shape, dtype=torch.float64)
    m[(x.indices[:, 0].long(), 0) + tuple(x.indices[:, 1:].long().T)] = 1.0
    return m


def _sites(occupancy, seed):
    """Active sites of ``occupancy`` ``[B, 1, *S]`` as int32 indices, in a shuffled order."""
    idx = torch.nonzero(occupancy[:, 0] > 0.5).int()
    g = torch.Generator().manual_seed(seed)
    return idx[torch.randperm(len(idx), generator=g)].contiguous()  # spconv's order is its own


def _crop(y, start, size):
    """``y[..., start[a]:start[a] + size[a]]`` on the trailing axes, zero-padded where ``y`` ends."""
    pads = []
    for a in reversed(range(len(size))):
        pads += [-start[a], start[a] + size[a] - y.shape[2 + a]]
    return F.pad(y, pads)


def conv_dense(x, w, stride, padding, dilation):
    """``F.conv{nd}d`` with a KRSC weight: ``y[o] = sum_r x[o s - p + r d] @ W[:, r, :]^T``."""
    nd = w.ndim - 2
    return getattr(F, f"conv{nd}d")(x, w.movedim(-1, 1), stride=stride, padding=padding, dilation=dilation)


def conv_transpose_dense(x, w, stride, padding, dilation, out_shape):
    """``y[i s - p + r d] += x[i] @ W[:, r, :]^T`` on the grid ``out_shape`` (sites outside are dropped)."""
    nd = w.ndim - 2
    full = getattr(F, f"conv_transpose{nd}d")(x, w.movedim(-1, 0), stride=stride, dilation=dilation)
    return _crop(full, padding, out_shape)  # with padding 0, full[o + p] is spconv's out o


def windows(x, ksize, stride, padding, dilation, out_shape, fill):
    """``[B, C, K, *out]``: ``x[o s - p + r d]`` for every kernel offset ``r`` (K = prod(ksize), the last
    axis fastest), ``fill`` outside the grid."""
    nd = len(ksize)
    need = [(o - 1) * s + (k - 1) * d + 1 for o, s, k, d in zip(out_shape, stride, ksize, dilation)]
    pads = []
    for a in reversed(range(nd)):  # padded index = index + padding
        pads += [padding[a], max(0, need[a] - padding[a] - x.shape[2 + a])]
    xp = F.pad(x, pads, value=fill)
    out = []
    for r in torch.cartesian_prod(*[torch.arange(k) for k in ksize]).reshape(-1, nd).tolist():
        sl = tuple(slice(r[a] * dilation[a], r[a] * dilation[a] + (out_shape[a] - 1) * stride[a] + 1, stride[a])
                   for a in range(nd))
        out.append(xp[(slice(None), slice(None)) + sl])
    return torch.stack(out, 2)


def conv_output_size(shape, k, s, p, d):
    return [(n + 2 * pp - dd * (kk - 1) - 1) // ss + 1 for n, kk, ss, pp, dd in zip(shape, k, s, p, d)]


def deconv_output_size(shape, k, s, p, op):
    return [(n - 1) * ss - 2 * pp + kk + o for n, kk, ss, pp, o in zip(shape, k, s, p, op)]


def _store(indice_dict, key, data):
    if key is not None:
        assert key not in indice_dict, f"your indice key {key} already exists in this sparse tensor."
        indice_dict[key] = data


# --- modules ------------------------------------------------------------------------------------------

class SparseModule(nn.Module):
    def __init__(self, name=None):
        super().__init__()
        self.name = name


class SparseSequential(SparseModule):
    def __init__(self, *args, **kwargs):
        super().__init__()
        if len(args) == 1 and isinstance(args[0], OrderedDict):
            for key, module in args[0].items():
                self.add_module(key, module)
        else:
            for idx, module in enumerate(args):
                self.add_module(str(idx), module)
        for name, module in kwargs.items():
            self.add_module(name, module)

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, idx):
        return list(self._modules.values())[idx]

    def forward(self, input):
        for module in self._modules.values():
            if isinstance(module, SparseModule):
                input = module(input)
            elif isinstance(input, SparseConvTensor):
                if input.indices.shape[0] != 0:
                    input = input.replace_feature(module(input.features))
            else:
                input = module(input)
        return input


class ToDense(SparseModule):
    def forward(self, x):
        return x.dense()


class SparseConvolution(SparseModule):
    def __init__(self, ndim, in_channels, out_channels, kernel_size=3, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, subm=False, output_padding=0, transposed=False, inverse=False, indice_key=None,
                 algo=None, fp32_accum=None, record_voxel_count=False, large_kernel_fast_algo=False, name=None):
        super().__init__(name)
        assert groups == 1
        self.ndim, self.in_channels, self.out_channels = ndim, in_channels, out_channels
        self.kernel_size, self.stride = expand_nd(ndim, kernel_size), expand_nd(ndim, stride)
        self.padding, self.dilation = expand_nd(ndim, padding), expand_nd(ndim, dilation)
        self.output_padding = expand_nd(ndim, output_padding)
        self.subm, self.transposed, self.inverse, self.indice_key = subm, transposed, inverse, indice_key
        kv = math.prod(self.kernel_size)
        self.conv1x1 = kv == 1 and (subm or math.prod(self.stride) == 1)
        self.weight = nn.Parameter(torch.empty(out_channels, *self.kernel_size, in_channels))
        bound = math.sqrt(3.0) * math.sqrt(2.0 / (1 + 5)) / math.sqrt(in_channels * kv)  # kaiming, a = sqrt(5)
        nn.init.uniform_(self.weight, -bound, bound)
        self.bias = nn.Parameter(torch.empty(out_channels).uniform_(-1, 1) / math.sqrt(in_channels * kv)) \
            if bias else None

    def forward(self, x, add_input=None):
        assert x.features.shape[1] == self.in_channels, "channel size mismatch"
        k, s, p, d = self.kernel_size, self.stride, self.padding, self.dilation
        if self.subm:
            out_shape = x.spatial_shape
        elif self.transposed:
            out_shape = deconv_output_size(x.spatial_shape, k, s, p, self.output_padding)
        else:
            out_shape = conv_output_size(x.spatial_shape, k, s, p, d)
        if self.conv1x1:
            f = torch.mm(x.features, self.weight.view(self.in_channels, self.out_channels))
            if self.bias is not None:
                f = f + self.bias
            out = x.shadow_copy().replace_feature(f)
            out.spatial_shape = out_shape
            return out
        indice_dict = dict(x.indice_dict)
        datas = x.find_indice_pair(self.indice_key)
        if self.inverse:
            assert datas is not None and not datas.is_subm
            assert k == datas.ksize and x.spatial_shape == datas.out_spatial_shape
            assert len(x.indices) == len(datas.out_indices)
            y = conv_transpose_dense(x.dense(), self.weight, datas.stride, datas.padding, datas.dilation,
                                     datas.spatial_shape)
            outids, out_shape = datas.indices, datas.spatial_shape
        elif self.subm:
            if datas is not None:
                assert datas.is_subm, "only support reuse subm indices"
                assert k == datas.ksize and d == datas.dilation and x.spatial_shape == datas.spatial_shape
                assert len(x.indices) == len(datas.indices)
                outids = datas.out_indices
            else:
                assert all(v % 2 == 1 for v in k), "subm only support odd ksize"
                outids = x.indices
                _store(indice_dict, self.indice_key, IndiceData(outids, x.indices, x.spatial_shape, out_shape, True,
                                                                k, s, d, p))
            y = conv_dense(x.dense(), self.weight, 1, [kk // 2 * dd for kk, dd in zip(k, d)], d)
        else:
            assert datas is None, "only support reuse subm indices"
            if any(v <= 0 for v in out_shape):
                raise ValueError(f"your out spatial shape {out_shape} reach zero!!! input shape: {x.spatial_shape}")
            ones = torch.ones([1] + k + [1], dtype=torch.float64)
            if self.transposed:
                y = conv_transpose_dense(x.dense(), self.weight, s, p, d, out_shape)
                occ = conv_transpose_dense(_mask(x), ones, s, p, d, out_shape)
            else:
                y = conv_dense(x.dense(), self.weight, s, p, d)
                occ = conv_dense(_mask(x), ones, s, p, d)
            outids = _sites(occ, len(x.indices))
            _store(indice_dict, self.indice_key, IndiceData(outids, x.indices, x.spatial_shape, out_shape, False,
                                                            k, s, d, p))
        f = _read(y, outids)
        if self.bias is not None:
            f = f + self.bias
        out = SparseConvTensor(f, outids, out_shape, x.batch_size, x.grid, x.voxel_num, indice_dict)
        if add_input is not None:
            out = out.replace_feature(out.features + add_input.features)
        return out


class _Pool(SparseModule):
    def __init__(self, ndim, kernel_size=3, stride=1, padding=0, dilation=1, indice_key=None, subm=False,
                 algo=None, record_voxel_count=False, name=None, is_max=True):
        super().__init__(name)
        self.ndim, self.kernel_size = ndim, expand_nd(ndim, kernel_size)
        self.stride = list(self.kernel_size) if stride is None else expand_nd(ndim, stride)
        self.padding, self.dilation = expand_nd(ndim, padding), expand_nd(ndim, dilation)
        self.indice_key, self.subm, self.is_max = indice_key, subm, is_max

    def forward(self, x):
        k, s, p, d = self.kernel_size, self.stride, self.padding, self.dilation
        if self.subm:
            out_shape, s, p = x.spatial_shape, [1] * self.ndim, [kk // 2 * dd for kk, dd in zip(k, d)]
        else:
            out_shape = conv_output_size(x.spatial_shape, k, s, p, d)
        occ = windows(_mask(x), k, s, p, d, out_shape, 0.0).sum(2)
        outids = x.indices if self.subm else _sites(occ, len(x.indices))
        indice_dict = dict(x.indice_dict)
        _store(indice_dict, self.indice_key, IndiceData(outids, x.indices, x.spatial_shape, out_shape, self.subm,
                                                        k, s, d, p))
        if self.is_max:
            dense = x.dense()
            dense = torch.where(_mask(x).bool(), dense, torch.full_like(dense, -math.inf))
            y = windows(dense, k, s, p, d, out_shape, -math.inf).max(2)[0].clamp_min(0)
        else:
            y = windows(x.dense(), k, s, p, d, out_shape, 0.0).sum(2) / occ.clamp_min(1).to(x.features.dtype)
        return SparseConvTensor(_read(y, outids), outids, out_shape, x.batch_size, x.grid, x.voxel_num, indice_dict)


class _GlobalPool(SparseModule):
    def __init__(self, is_mean, name=None):
        super().__init__(name)
        self.is_mean = is_mean

    def forward(self, x):
        res = []
        for i in range(x.batch_size):
            f = x.features[x.indices[:, 0] == i]
            res.append(torch.mean(f, dim=0)[0] if self.is_mean else torch.max(f, dim=0)[0])
        return torch.stack(res)


def _layer(name, ndim, **fixed):
    if fixed.get("inverse"):
        def init(self, in_channels, out_channels, kernel_size, indice_key, bias=True, algo=None, fp32_accum=None,
                 large_kernel_fast_algo=False, name=None):
            SparseConvolution.__init__(self, ndim, in_channels, out_channels, kernel_size, bias=bias, inverse=True,
                                       indice_key=indice_key, name=name)
    else:
        def init(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 indice_key=None, algo=None, fp32_accum=None, record_voxel_count=False,
                 large_kernel_fast_algo=False, name=None):
            SparseConvolution.__init__(self, ndim, in_channels, out_channels, kernel_size, stride, padding, dilation,
                                       groups, bias, indice_key=indice_key, name=name, **fixed)
    return type(name, (SparseConvolution,), {"__init__": init})


def _pool(name, ndim, is_max):
    def init(self, kernel_size, stride=None, padding=0, dilation=1, indice_key=None, algo=None,
             record_voxel_count=False, name=None):
        _Pool.__init__(self, ndim, kernel_size, stride, padding, dilation, indice_key, name=name, is_max=is_max)
    return type(name, (_Pool,), {"__init__": init})


for _nd in (1, 2, 3):
    for _name, _fixed in (("SubMConv", {"subm": True}), ("SparseConv", {}),
                          ("SparseConvTranspose", {"transposed": True}), ("SparseInverseConv", {"inverse": True})):
        globals()[f"{_name}{_nd}d"] = _layer(f"{_name}{_nd}d", _nd, **_fixed)
    globals()[f"SparseMaxPool{_nd}d"] = _pool(f"SparseMaxPool{_nd}d", _nd, True)
    globals()[f"SparseAvgPool{_nd}d"] = _pool(f"SparseAvgPool{_nd}d", _nd, False)


class SparseGlobalMaxPool(_GlobalPool):
    def __init__(self, name=None):
        super().__init__(False, name)


class SparseGlobalAvgPool(_GlobalPool):
    def __init__(self, name=None):
        super().__init__(True, name)
