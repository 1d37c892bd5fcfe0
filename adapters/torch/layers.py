"""Network modules that take and return ``Voxels`` with torch features: a sequential container,
normalisations, channel concatenation, pooling and unpooling, and the residual block of sparse
ResNets/UNets.

A module "takes Voxels" when it is a sparsevox convolution or has the class attribute
``takes_voxels = True`` (every module here has it); :class:`SparseSequential` hands any other module the
features ``[N, C]`` alone and keeps the geometry, so plain feature-wise torch modules (``nn.ReLU``,
``nn.Dropout``, ``nn.Linear``, ``nn.BatchNorm1d``, ...) can sit between convolutions. Once a module
has returned a plain tensor (:class:`GlobalPool`'s ``[B, C]``), the modules after it get that tensor,
so a classification head can follow in the same container.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from sparsevox.geometry import BATCH_MAX, positive_int, triple
from sparsevox.pooling import GLOBAL_MODES
from sparsevox.voxels import Voxels

from . import ops
from .functional import SparseConv3d, SpatiallySparseConv, SpatiallySparseDepthwiseConv
from .fused import conv_bn_act, plain_conv
from .norm_act import batchnorm_act, fuses, plain_batchnorm, unhooked

__all__ = ["SparseSequential", "BatchNorm", "InstanceNorm", "ResidualBlock", "cat_voxels", "takes_voxels",
           "MaxPool3d", "AvgPool3d", "GlobalPool", "Unpool"]

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
    cached kernel maps). After a module that returns a plain tensor (:class:`GlobalPool`), every later
    module gets that tensor.

    Example:
        >>> net = SparseSequential(SparseConv3d(4, 32, 3, bias=False), nn.BatchNorm1d(32), nn.ReLU(True),
        ...                        nn.Dropout(0.1), nn.Linear(32, 20))
        >>> out = net(voxels)        # Voxels with feats [N, 20]
    """

    takes_voxels = True

    def forward(self, voxels):
        return self._run(voxels, tuple(self._modules.values()))

    @staticmethod
    def _run(voxels, modules):
        i, n = 0, len(modules)
        while i < n:
            module = modules[i]
            if i + 1 < n and isinstance(voxels, Voxels) and plain_conv(module) and plain_batchnorm(modules[i + 1]):
                relu = i + 2 < n and type(modules[i + 2]) is nn.ReLU and unhooked(modules[i + 2])
                y = conv_bn_act(module, voxels, modules[i + 1], relu=relu)  # inference: one launch
                if y is not None:
                    voxels = y
                    i += 3 if relu else 2
                    continue
            if i + 1 < n and isinstance(voxels, Voxels) and fuses(module, modules[i + 1]):
                y = batchnorm_act(module, voxels.feats, relu=True)  # evaluation on CUDA: BN + ReLU in one launch
                if y is not None:
                    voxels = voxels.replace(y)
                    i += 2
                    continue
            if takes_voxels(module) or not isinstance(voxels, Voxels):
                voxels = module(voxels)
            else:
                voxels = voxels.replace(module(voxels.feats))
            i += 1
        return voxels


class BatchNorm(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` over the features of ``Voxels`` (every voxel of the batch is one sample):
    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` per channel. Same arguments and state as
    ``nn.BatchNorm1d``; returns ``Voxels`` on the input's sites.

    In evaluation with running statistics on CUDA, when nothing is differentiated, it runs as one launch
    of ``kernels_cu/norm_act.cu`` (:mod:`.norm_act`), which :class:`SparseSequential` and
    :class:`ResidualBlock` also use to apply the ReLU and residual add that follow it in the same pass."""

    takes_voxels = True

    def forward(self, voxels):
        y = self.fused(voxels.feats)
        return voxels.replace(super().forward(voxels.feats) if y is None else y)

    def fused(self, x, residual=None, relu: bool = False):
        """``act(bn(x) + residual)`` in one launch, or None where it does not apply
        (:func:`sparsevox.adapters.torch.norm_act.batchnorm_act`)."""
        return batchnorm_act(self, x, residual, relu)



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
        self.num_features, self.eps, self.affine = positive_int(num_features, "num_features"), float(eps), bool(affine)
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
        skip = voxels.feats if isinstance(self.skip, nn.Identity) else self.skip(voxels).feats
        modules = tuple(self.main._modules.values())
        bn = modules[-1]
        if not bn.training and type(self.main) is SparseSequential and fuses(bn, self.relu) and unhooked(self.main):
            # evaluation on CUDA: the last convolution, BatchNorm, the residual add and the ReLU in one launch,
            # else the last three in one (after the convolution's own)
            mid = SparseSequential._run(voxels, modules[:-2])
            y = conv_bn_act(modules[-2], mid, bn, residual=skip, relu=True) if plain_conv(modules[-2]) else None
            if y is not None:
                return voxels.replace(y.feats)
            pre = SparseSequential._run(mid, modules[-2:-1])
            y = batchnorm_act(bn, pre.feats, residual=skip, relu=True)
            if y is None:  # (CPU, a gradient wanted): the modules, the BatchNorm given features or Voxels
                y = self.relu(SparseSequential._run(pre, (bn,)).feats + skip)
            return voxels.replace(y)
        main = self.main(voxels)
        return voxels.replace(self.relu(main.feats + skip))


# --- pooling and unpooling ----------------------------------------------------------------------------

class _Pool3d(nn.Module):
    takes_voxels = True
    _op = None

    def __init__(self, kernel_size=2, stride=None):
        super().__init__()
        self.kernel_size = triple(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else triple(stride, "stride")

    def forward(self, voxels):
        return type(self)._op(voxels, self.kernel_size, self.stride)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class MaxPool3d(_Pool3d):
    """Sparse max pooling, ``Voxels [N, C] -> Voxels [N_out, C]`` (:func:`sparsevox.max_pool`): each
    output takes the channel-wise maximum over the active inputs of its window. The output sites and rows
    are those of a strided convolution with the same ``kernel_size`` and ``stride`` (default
    ``kernel_size``, as ``torch.nn.MaxPool3d``), so skip connections line up. Gradient: to the winning
    input (ties: the lowest row).

    Example:
        >>> net = SparseSequential(SparseConv3d(4, 16), nn.ReLU(), MaxPool3d(2), SparseConv3d(16, 32))
    """
    _op = staticmethod(ops.max_pool)


class AvgPool3d(_Pool3d):
    """Sparse average pooling (:func:`sparsevox.avg_pool`): the mean over the *active* inputs of each
    window (not over its volume). Same arguments, sites and rows as :class:`MaxPool3d`."""
    _op = staticmethod(ops.avg_pool)


class GlobalPool(nn.Module):
    """Pool each batch item to one vector: ``Voxels [N, C] -> [B, C]`` (a tensor; B = largest batch
    index + 1, an item with no voxels gives zeros). ``mode``: ``"avg"``, ``"max"`` or ``"sum"``.

    Example:
        >>> classifier = SparseSequential(SparseConv3d(4, 32), nn.ReLU(), MaxPool3d(2), GlobalPool("max"),
        ...                               nn.Linear(32, 10))   # Voxels -> [B, 10]
    """

    takes_voxels = True

    def __init__(self, mode: str = "avg"):
        super().__init__()
        if mode not in GLOBAL_MODES:
            raise ValueError(f"mode must be one of {GLOBAL_MODES}, got {mode!r}")
        self.mode = mode

    def forward(self, voxels):
        return ops.global_pool(voxels, self.mode)

    def extra_repr(self):
        return f"mode={self.mode!r}"


class Unpool(nn.Module):
    """Nearest-neighbour unpooling: ``forward(coarse, fine)`` gives ``Voxels`` on ``fine``'s sites and
    rows, each fine voxel taking its parent's (``floor(c / stride)`` in ``coarse``) features
    (:func:`sparsevox.unpool`; a missing parent is a ``ValueError``). Pass the ``stride`` of the layer
    that made ``coarse``; it is not inferred. It needs the finer level as a second argument, so it is
    called directly (a UNet decoder), not as a step of :class:`SparseSequential`.

    Example:
        >>> up = Unpool(2)(MaxPool3d(2)(fine), fine)   # fine's sites, each with its window's maximum
    """

    takes_voxels = True

    def __init__(self, stride=2):
        super().__init__()
        self.stride = triple(stride, "stride")

    def forward(self, coarse, fine):
        return ops.unpool(coarse, fine, self.stride)

    def extra_repr(self):
        return f"stride={self.stride}"
