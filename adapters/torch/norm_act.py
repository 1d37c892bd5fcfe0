"""Evaluation BatchNorm with the ReLU and residual add after it in one launch (``kernels_cu/norm_act.cu``
through :mod:`sparsevox.cuda.norm_act`): what :class:`~.layers.SparseSequential`,
:class:`~.layers.ResidualBlock` and the spconv-compatible ``SparseSequential`` run in place of
``nn.BatchNorm1d`` (+ add) + ``nn.ReLU`` when it applies. A float16 inference step is host-bound, and
the module chain costs ~80 µs of host time per BatchNorm on the H200 host (7b3ec93)."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module

from sparsevox import _arrays
from sparsevox.cuda import norm_act

from .functional import _needs_function

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                torch.float64: "float64"}


def unhooked(*modules) -> bool:
    """Whether calling past these modules' ``__call__`` skips no hook (theirs or the global ones)."""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return False
    return not any(x._forward_hooks or x._forward_pre_hooks for x in modules)


def fuses(bn, act) -> bool:
    """Whether ``bn`` then ``act`` may run as :func:`batchnorm_act` with ``relu=True``: an
    ``nn.BatchNorm1d`` (or sparsevox's ``BatchNorm``, not another subclass, whose forward may differ), then
    exactly ``nn.ReLU``, neither hooked."""
    return type(act) is nn.ReLU and plain_batchnorm(bn) and unhooked(act)


_BN_TYPES = None


def plain_batchnorm(bn) -> bool:
    """Whether ``bn`` may run as :func:`batchnorm_act` without an activation: an ``nn.BatchNorm1d`` (or
    sparsevox's ``BatchNorm``, no other subclass), not hooked."""
    global _BN_TYPES
    if _BN_TYPES is None:
        from .layers import BatchNorm  # (layers imports this module)
        _BN_TYPES = (nn.BatchNorm1d, BatchNorm)
    return type(bn) in _BN_TYPES and unhooked(bn)


def batchnorm_act(bn: nn.BatchNorm1d, x: torch.Tensor, residual: torch.Tensor | None = None, relu: bool = False):
    """``act(bn(x) + residual)`` as a new tensor of ``x``'s dtype in one launch, or None where it does not
    apply: training, no running statistics, a CPU tensor, a gradient to compute, torch.compile, dtypes the
    kernel lacks; the caller then runs the modules.

    ``x`` and ``residual`` (optional): ``[N, C]`` float16/bfloat16/float32/float64 of one dtype on one
    device, C = ``bn.num_features``; the statistics and affine parameters float32 or ``x``'s dtype.
    ``relu``: apply ReLU. Arithmetic in float32 (float64 for float64 ``x``) with one rounding at the
    end: the residual is added before the output is rounded, where the module chain rounds the BatchNorm
    output first. The running statistics and parameters are read at every call (nothing derived is
    cached, so writes through ``.data`` are seen)."""
    mean, var, w, b = bn.running_mean, bn.running_var, bn.weight, bn.bias
    if bn.training or mean is None or var is None or not x.is_cuda or x.dim() != 2 \
            or x.shape[1] != bn.num_features or torch.compiler.is_compiling() or _needs_function(x, w, b, residual):
        return None
    fdt, pdt = _DTYPE_NAMES.get(x.dtype), _DTYPE_NAMES.get(mean.dtype)
    if fdt is None or pdt is None or not norm_act.param_type_ok(fdt, pdt) or var.dtype != mean.dtype \
            or mean.device != x.device or var.device != x.device \
            or any(p is not None and (p.dtype != mean.dtype or p.device != x.device) for p in (w, b)) \
            or any(p is not None and (not p.is_contiguous() or p.numel() != x.shape[1]) for p in (mean, var, w, b)):
        return None  # (the kernel reads p[c] for c < C: a strided or short parameter is the module chain's)
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.device != x.device):
        return None
    x = x.contiguous()
    residual = None if residual is None else residual.contiguous()
    out = torch.empty_like(x)
    dev = x.get_device()
    with _arrays.on_device(dev):
        norm_act.batchnorm_eval(x.data_ptr(), mean.data_ptr(), var.data_ptr(), 0 if w is None else w.data_ptr(),
                                0 if b is None else b.data_ptr(), 0 if residual is None else residual.data_ptr(),
                                out.data_ptr(), x.shape[0], x.shape[1], bn.eps, fdt, pdt, relu,
                                _arrays.torch_stream_handle(torch, dev))
    return out
