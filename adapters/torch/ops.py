"""PyTorch adapter: the core's network ops, differentiable in the features.

``max_pool``, ``avg_pool``, ``global_pool``, ``unpool``, ``devoxelize``, ``to_dense`` and ``from_dense``
take and return what the core functions of the same names do (``sparsevox.max_pool`` etc. route torch
``Voxels`` here); their results carry autograd. Each is a thin ``torch.autograd.Function`` over the
core's ``*_forward`` / ``*_backward`` functions: the tensors cross zero-copy (:mod:`sparsevox._arrays`),
the work runs on torch's current device and stream (NumPy for CPU tensors, CuPy kernels for CUDA
tensors), and what the backward needs (max's argmax, unpooling's parent rows, the interpolation corners
and weights, the coordinates) stays on ``ctx`` as core arrays on the data's device.

Gradients flow to the features (and to the dense tensor of ``from_dense``); coordinates, points, batch
indices and masks are geometry, never differentiated (``devoxelize`` refuses points that require grad
rather than detaching them). The backward functions are not themselves differentiable.

Example:
    >>> coarse = sparsevox.max_pool(voxels, 2)          # voxels.feats requires grad
    >>> logits = head(sparsevox.global_pool(coarse, "avg"))
    >>> logits.sum().backward()                          # voxels.feats.grad: routed to the maxima
"""
from __future__ import annotations

import dataclasses

import torch
from torch.autograd.function import once_differentiable

from sparsevox import _arrays, dense as _dense, geometry, pooling, points as _points
from sparsevox.conv import output_voxels_of
from sparsevox.kernel_map import kernel_map
from sparsevox.voxels import Voxels

__all__ = ["max_pool", "avg_pool", "global_pool", "unpool", "devoxelize", "to_dense", "from_dense"]


def _function(name: str, forward, backward):
    """A ``torch.autograd.Function`` named ``name`` over core functions of the first input ``x``:
    ``forward(x, *args) -> (out, saved)`` and ``backward(grad_out, saved, *args) -> grad_x`` (core
    arrays; ``args`` are geometry: core arrays and Python values, passed unchanged)."""

    def fwd(ctx, x, *args):
        xc, origin = _arrays.to_core(x.contiguous())
        with _arrays.on_caller_stream(origin):
            out, saved = forward(xc, *args)
            out = _arrays.from_core(out, origin)
        ctx.saved, ctx.args = saved, args
        return out

    @once_differentiable
    def bwd(ctx, grad):
        g, origin = _arrays.to_core(grad.contiguous())
        with _arrays.on_caller_stream(origin):
            gx = _arrays.from_core(backward(g, ctx.saved, *ctx.args), origin)
        return (gx,) + (None,) * len(ctx.args)

    cls = type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})
    cls.__module__ = __name__
    return cls


_MaxPool = _function("MaxPool", pooling.max_pool_forward,
                     lambda g, argmax, pmap: pooling.max_pool_backward(g, argmax, pmap))
_AvgPool = _function("AvgPool", lambda f, pmap: (pooling.avg_pool_forward(f, pmap), None),
                     lambda g, _, pmap: pooling.avg_pool_backward(g, pmap))
_GlobalPool = _function("GlobalPool", pooling.global_pool_forward,
                        lambda g, argmax, batch, nb, mode: pooling.global_pool_backward(g, batch, mode, argmax))
_Unpool = _function("Unpool", lambda f, parent, n: (pooling.unpool_forward(f, parent), None),
                    lambda g, _, parent, n: pooling.unpool_backward(g, parent, n))
_Devoxelize = _function("Devoxelize", lambda f, idx, w, n: (_points.devoxelize_forward(f, idx, w), None),
                        lambda g, _, idx, w, n: _points.devoxelize_backward(g, idx, w, n))
_ToDense = _function("ToDense", lambda f, c, shp, b: (_dense.to_dense_forward(f, c, shp, b), None),
                     lambda g, _, c, shp, b: _dense.to_dense_backward(g, c))
_FromDense = _function("FromDense", lambda d, c, shape: (_dense.from_dense_forward(d, c), None),
                       lambda g, _, c, shape: _dense.from_dense_backward(g, c, shape))


def _torch_voxels(voxels, name: str = "voxels") -> bool:
    """Whether ``voxels`` holds torch tensors (else the core computes); ``ValueError`` for a non-Voxels."""
    if not isinstance(voxels, Voxels):
        raise ValueError(f"{name} must be a sparsevox.Voxels, got {type(voxels).__name__}")
    return voxels.origin.lib == "torch"


def _pool(voxels, kernel_size, stride, function, core_op):
    if not _torch_voxels(voxels):
        return core_op(voxels, kernel_size, stride)
    ks, st = pooling._pool_geometry(kernel_size, stride)
    kmap = kernel_map(voxels, ks, st)
    with _arrays.on_caller_stream(voxels.origin):
        pmap = pooling.pool_map(kmap)
    return output_voxels_of(voxels, kmap, function.apply(voxels.feats, pmap))


def max_pool(voxels, kernel_size=2, stride=None) -> Voxels:
    """Differentiable :func:`sparsevox.max_pool` (same arguments, sites and rows: those of the strided
    convolution of the same geometry). Gradient: ``grad_out[o, c]`` to the winning input row of output
    ``o`` in channel ``c`` (ties: the lowest row)."""
    return _pool(voxels, kernel_size, stride, _MaxPool, pooling.max_pool)


def avg_pool(voxels, kernel_size=2, stride=None) -> Voxels:
    """Differentiable :func:`sparsevox.avg_pool`: the mean over each window's active inputs. Gradient:
    ``grad_out[o] / count[o]`` to each active input of the window."""
    return _pool(voxels, kernel_size, stride, _AvgPool, pooling.avg_pool)


def global_pool(voxels, mode: str = "avg"):
    """Differentiable :func:`sparsevox.global_pool`: ``[B, C]`` (B = largest batch index + 1; an item
    with no voxels gives zeros), ``mode`` ``"avg"``, ``"max"`` or ``"sum"``."""
    if not _torch_voxels(voxels):
        return pooling.global_pool(voxels, mode)
    pooling._check_mode(mode)
    c, _ = voxels.core_coords()
    return _GlobalPool.apply(voxels.feats, c[:, 0], voxels.batch_size, mode)


def unpool(coarse, fine, stride=2) -> Voxels:
    """Differentiable :func:`sparsevox.unpool`: ``Voxels`` on ``fine``'s sites and rows, each taking
    its parent's (``floor(c / stride)`` in ``coarse``) features. Gradient: each coarse row gets the sum
    over its children."""
    if not isinstance(fine, Voxels) or not _torch_voxels(coarse, "coarse"):
        return pooling.unpool(coarse, fine, stride)
    geometry.triple(stride, "stride")
    with _arrays.on_caller_stream(coarse.origin):
        parent = pooling.parent_rows(coarse, fine, stride)
    return fine.replace(_Unpool.apply(coarse.feats, parent, coarse.num_voxels))


def devoxelize(voxels, points, voxel_size, batch=None):
    """Differentiable :func:`sparsevox.devoxelize`: ``[P, C]`` features at the points, trilinear between
    voxel centres. Differentiable in the voxel features only: points requiring grad are refused
    (``NotImplementedError``) rather than silently detached."""
    if not _torch_voxels(voxels):
        return _points.devoxelize(voxels, points, voxel_size, batch)
    if isinstance(points, torch.Tensor) and points.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("devoxelize is differentiable in the voxel features only, not in the point "
                                  "positions; pass points.detach()")
    with _arrays.on_caller_stream(voxels.origin):
        idx, w = _points.devoxelize_weights(voxels, points, voxel_size, batch)
    return _Devoxelize.apply(voxels.feats, idx, w, voxels.num_voxels)


def to_dense(voxels, spatial_shape, batch_size: int | None = None):
    """Differentiable :func:`sparsevox.to_dense`: ``[B, C, X, Y, Z]``, inactive sites 0. Gradient: the
    dense gradient read back at the voxels."""
    if not _torch_voxels(voxels):
        return _dense.to_dense(voxels, spatial_shape, batch_size)
    shp = _dense._shape3(spatial_shape)
    bsz = voxels.batch_size if batch_size is None else int(batch_size)
    c, _ = voxels.core_coords()
    return _ToDense.apply(voxels.feats, c, shp, bsz)


def from_dense(dense, mask=None) -> Voxels:
    """Differentiable :func:`sparsevox.from_dense`: ``Voxels`` of the sites of ``dense`` ``[B, C, X, Y, Z]``
    nonzero in any channel (or of ``mask`` ``[B, X, Y, Z]``). Gradient: scattered back into the dense
    shape (zero at the other sites; the choice of sites is not differentiated)."""
    if not isinstance(dense, torch.Tensor):
        return _dense.from_dense(dense, mask)
    _dense.check_dense_shape(dense.shape)
    d, origin = _arrays.to_core(dense)
    with _arrays.on_caller_stream(origin):
        coords = _dense.active_sites(d, None if mask is None else _arrays.to_core(mask)[0])
    feats = _FromDense.apply(dense, coords, tuple(dense.shape))
    return Voxels.from_core_coords(coords, feats, dataclasses.replace(origin, dtype=None))
