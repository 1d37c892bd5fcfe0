"""A convolution and the evaluation BatchNorm (+ residual add) (+ ReLU) after it as one launch: the
IMPLICIT_GEMM forward applies them at its store (``kernels_cu/implicit_gemm.cu``: epilogue). What
:class:`~.layers.SparseSequential` and :class:`~.layers.ResidualBlock` run in inference in place of the
convolution and :func:`~.norm_act.batchnorm_act` (issue 19: a float16 inference step is host-bound, and every
BatchNorm was one more launch and its Python). Where it does not apply (:func:`conv_bn_act` returns None),
the modules run as before, so the fused path is never the only one a model has."""
from __future__ import annotations

import torch

import sparsevox as sv
from sparsevox.algorithms.implicit_gemm import epilogue_args
from sparsevox.conv import output_voxels_of

from sparsevox import _arrays

from .functional import (SparseConv3d, SpatiallySparseConv, _algo_str, _autocast, _forward_launch, _fwd_key,
                         _needs_function)
from .norm_act import plain_batchnorm, unhooked

_CONV_TYPES = (SpatiallySparseConv, SparseConv3d)


def plain_conv(conv) -> bool:
    """Whether ``conv`` may run fused: a sparsevox convolution module of exactly these classes (a subclass's
    forward may differ), without bias, not transposed or generative, not hooked."""
    return (type(conv) in _CONV_TYPES and conv.bias is None and not conv.transposed and not conv.generative
            and unhooked(conv))


def _bn_stats(bn, x: torch.Tensor, c_out: int):
    """``(mean, var, weight or None, bias or None)`` of an evaluation BatchNorm the epilogue can read (float32
    ``[c_out]`` contiguous tensors on ``x``'s device), else None."""
    if bn.training or not plain_batchnorm(bn) or bn.num_features != c_out:
        return None
    mean, var, w, b = bn.running_mean, bn.running_var, bn.weight, bn.bias
    if mean is None or var is None or _needs_function(w, b):
        return None
    for p in (mean, var, w, b):
        if p is not None and (p.dtype != torch.float32 or p.device != x.device or not p.is_contiguous()
                              or p.numel() != c_out):
            return None
    return mean, var, w, b


def conv_bn_act(conv, voxels, bn, residual: torch.Tensor | None = None, relu: bool = False):
    """``Voxels`` with features ``act(bn(conv(voxels)) + residual)`` from one launch, or None where that does not
    apply: a gradient wanted, torch.compile, CPU tensors, a 1x1 layer (a matmul, no map), BatchNorm in training
    or with statistics other than float32, a residual of another shape or dtype, or no prepared IMPLICIT_GEMM
    forward for the layer yet (its first call on a signature plans it through the modules' path; the next
    ones fuse). ``residual``: ``[N_out, C_out]`` like the output (under autocast, of the autocast dtype).

    Arithmetic: the convolution's float32 accumulator goes through the BatchNorm, the add and the ReLU
    before the one rounding at the store (the modules round the convolution's output to the features'
    dtype before the BatchNorm reads it, and the BatchNorm's output again before the add)."""
    feats, weight = voxels.feats, conv.weight
    if not (isinstance(feats, torch.Tensor) and feats.is_cuda) or torch.compiler.is_compiling() \
            or weight.device != feats.device or weight.shape[0] == 1 or _needs_function(feats, weight, residual):
        return None
    if torch.is_autocast_enabled("cuda"):
        feats, weight = _autocast(feats, weight)
    if weight.dtype != feats.dtype or weight.ndim != 3 or feats.dim() != 2:
        return None
    stats = _bn_stats(bn, feats, weight.shape[2])
    if stats is None:
        return None
    kmap = sv.kernel_map(voxels, conv.kernel_size, conv.stride, conv.dilation)
    if residual is not None and (residual.dtype != feats.dtype or tuple(residual.shape) != (kmap.num_out, weight.shape[2])
                                 or residual.device != feats.device):
        return None
    algo = _algo_str(conv.fwd_algo)
    prep, _ = _forward_launch(kmap, _fwd_key("conv", feats, weight, algo), "conv", feats, weight, algo)
    if not getattr(prep, "fusable", False) or not (feats.is_contiguous() and weight.is_contiguous()):
        return None
    residual = None if residual is None else residual.contiguous()
    mean, var, w, b = stats
    epilogue = epilogue_args(mean.data_ptr(), var.data_ptr(), 0 if w is None else w.data_ptr(),
                             0 if b is None else b.data_ptr(), 0 if residual is None else residual.data_ptr(),
                             bn.eps, relu)
    dev = feats.get_device()
    with _arrays.on_device(dev):
        out = torch.empty(prep.out_shape, dtype=feats.dtype, device=feats.device)
        if not prep.launch(feats.data_ptr(), weight.data_ptr(), out.data_ptr(), _arrays.torch_stream_handle(torch, dev),
                           epilogue):
            return None
    return output_voxels_of(voxels, kmap, out)
