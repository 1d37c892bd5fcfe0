"""Network modules that take and return ``Voxels`` with torch features: a sequential container,
normalisations, channel concatenation and the residual block of sparse ResNets/UNets.

A module "takes Voxels" when it is a sparsevox convolution or has the class attribute
``takes_voxels = True`` (every module here has it); :class:`SparseSequential` hands any other module the
features ``[N, C]`` alone and keeps the geometry, so plain feature-wise torch modules (``nn.ReLU``,
``nn.Dropout``, ``nn.Linear``, ``nn.BatchNorm1d``, ...) can sit between convolutions.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sparsevox.geometry import BATCH_MAX

from .functional import SparseConv3d, SpatiallySparseConv, SpatiallySparseDepthwiseConv

__all__ = ["SparseSequential", "BatchNorm", "InstanceNorm", "ResidualBlock", "cat_voxels", "takes_voxels"]

_VOXELS_MODULES = (SpatiallySparseConv, SpatiallySparseDepthwiseConv)


def takes_voxels(module: nn.Module) -> bool:
    """Whether ``module(voxels)`` is the call (else :class:`SparseSequential` calls ``module(voxels.feats)``)."""
    return isinstance(module, _VOXELS_MODULES) or bool(getattr(module, "takes_voxels", False))


def _same_coords(a, b) -> bool:
    if a is b:
        return True
    if tuple(a.shape) != tuple(b.shape):
        return False
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.device == b.device and torch.equal(a, b)
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))


def cat_voxels(*voxels):
    """Concatenate the features of ``Voxels`` of one geometry along channels: ``[N, C1 + C2 + ...]``.

    The inputs must share their coordinates: the same coords object (the fast case: a transposed
    convolution's output on the sites of ``output_voxels``, or ``v.replace(...)`` of one ``Voxels``) or
    equal coords, row for row; anything else is a ``ValueError``. The result keeps the first input's
    geometry and cached kernel maps.

    Example:
        >>> both = cat_voxels(up(coarse, output_voxels=fine), fine)   # the skip of a UNet decoder
    """
    if not voxels:
        raise ValueError("cat_voxels needs at least one Voxels")
    first = voxels[0]
    for i, v in enumerate(voxels[1:], 1):
        if not _same_coords(v.coords, first.coords):
            raise ValueError(f"cat_voxels: input {i} has other coordinates than input 0 ({v.num_voxels} vs "
                             f"{first.num_voxels} voxels, or other sites or order); concatenation needs one "
                             f"geometry")
    if len(voxels) == 1:
        return first
    return first.replace(torch.cat([v.feats for v in voxels], dim=1))


class SparseSequential(nn.Sequential):
    """``nn.Sequential`` over ``Voxels``: modules that take ``Voxels`` (:func:`takes_voxels`) get the
    ``Voxels``; any other module gets the features and its output replaces them (same sites, same
    cached kernel maps).

    Example:
        >>> net = SparseSequential(SparseConv3d(4, 32, 3, bias=False), nn.BatchNorm1d(32), nn.ReLU(True),
        ...                        nn.Dropout(0.1), nn.Linear(32, 20))
        >>> out = net(voxels)        # Voxels with feats [N, 20]
    """

    takes_voxels = True

    def forward(self, voxels):
        for module in self:
            if takes_voxels(module):
                voxels = module(voxels)
            else:
                voxels = voxels.replace(module(voxels.feats))
        return voxels


class BatchNorm(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` over the features of ``Voxels`` (every voxel of the batch is one sample):
    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` per channel. Same arguments and state as
    ``nn.BatchNorm1d``; returns ``Voxels`` on the input's sites."""

    takes_voxels = True

    def forward(self, voxels):
        return voxels.replace(super().forward(voxels.feats))


class InstanceNorm(nn.Module):
    """Instance normalisation of ``Voxels``: per batch item ``b`` (coords column 0) and channel ``c``,
    over the voxels of that item: ``y = (x - mean_bc) / sqrt(var_bc + eps)`` (biased variance, as
    ``nn.InstanceNorm1d``), then ``* weight[c] + bias[c]`` when ``affine``. An item with one voxel gives
    zeros (before the affine part). Statistics are computed in float32 for float16/bfloat16 features
    (float64 stays float64). No running statistics: training and evaluation compute the same.

    Args:
        num_features: channels C.
        eps: added to the variance.
        affine: learnable ``weight`` (ones) and ``bias`` (zeros) of shape ``[C]`` (default False, as
            ``nn.InstanceNorm1d``).
    """

    takes_voxels = True

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = False, device=None, dtype=None):
        super().__init__()
        self.num_features, self.eps, self.affine = int(num_features), float(eps), bool(affine)
        if affine:
            self.weight = nn.Parameter(torch.ones(self.num_features, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(self.num_features, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, voxels):
        x = voxels.feats
        if x.shape[1] != self.num_features:
            raise ValueError(f"InstanceNorm({self.num_features}) got features with {x.shape[1]} channels")
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        batch = torch.as_tensor(voxels.coords)[:, 0].to(device=x.device, dtype=torch.int64)
        # Segments by batch index: sums into BATCH_MAX + 1 rows (the documented limit), so no
        # device-to-host read of the largest index is needed.
        rows = BATCH_MAX + 1
        count = torch.zeros(rows, device=x.device, dtype=xf.dtype).index_add_(
            0, batch, torch.ones_like(batch, dtype=xf.dtype))
        denom = count.clamp_min(1).unsqueeze(1)
        mean = torch.zeros(rows, xf.shape[1], device=x.device, dtype=xf.dtype).index_add_(0, batch, xf) / denom
        centred = xf - mean.index_select(0, batch)
        var = torch.zeros_like(mean).index_add_(0, batch, centred * centred) / denom
        y = centred * torch.rsqrt(var + self.eps).index_select(0, batch)
        if self.affine:
            y = y * self.weight.to(y.dtype) + self.bias.to(y.dtype)
        return voxels.replace(y.to(x.dtype))

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


class ResidualBlock(nn.Module):
    """The basic residual block of sparse ResNets/UNets (TorchSparse's ``ResidualBlock``):
    ``relu(bn(conv3(relu(bn(conv3(x))))) + skip(x))`` with submanifold convolutions (no bias), where
    ``skip`` is the identity when ``c_in == c_out`` and a 1×1 convolution + :class:`BatchNorm` otherwise.
    Output sites = input sites.

    Args:
        c_in, c_out: channels in and out.
        kernel_size, dilation: of the two main convolutions.
        fwd_algo, bwd_algo: passed to every convolution.
    """

    takes_voxels = True

    def __init__(self, c_in: int, c_out: int, kernel_size=3, dilation=1, fwd_algo=None, bwd_algo=None):
        super().__init__()
        algos = dict(fwd_algo=fwd_algo, bwd_algo=bwd_algo)
        self.main = SparseSequential(
            SparseConv3d(c_in, c_out, kernel_size, dilation=dilation, bias=False, **algos), BatchNorm(c_out),
            nn.ReLU(inplace=True),
            SparseConv3d(c_out, c_out, kernel_size, dilation=dilation, bias=False, **algos), BatchNorm(c_out))
        if c_in == c_out:
            self.skip = nn.Identity()
        else:
            self.skip = SparseSequential(SparseConv3d(c_in, c_out, 1, bias=False, **algos), BatchNorm(c_out))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, voxels):
        main = self.main(voxels)
        skip = voxels.feats if isinstance(self.skip, nn.Identity) else self.skip(voxels).feats
        return voxels.replace(self.relu(main.feats + skip))
