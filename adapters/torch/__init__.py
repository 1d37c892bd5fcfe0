"""PyTorch adapter: differentiable sparse convolutions (:mod:`.functional`), differentiable network ops
(:mod:`.ops`: pooling, unpooling, devoxelisation, dense grids; ``sparsevox.max_pool`` etc. route torch
``Voxels`` there), network modules that take and return ``Voxels`` (:mod:`.layers`), models
(:mod:`.models`) and :func:`tune_model` (:mod:`.tune`: tune a whole model up front on an example batch).

Everything :mod:`sparsevox.adapters.torch` exported when it was one module is still importable from
here. Module-level settings of :mod:`.functional` (such as ``SPARE_OUTPUT_MAX_BYTES``) may be set
through this package too: assigning one here assigns it in :mod:`.functional`, where the code reads it
(so ``monkeypatch.setattr(sparsevox.adapters.torch, ...)`` keeps working).

Example:
    >>> import torch, sparsevox as sv
    >>> from sparsevox.adapters.torch import MinkUNet
    >>> coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 1]], dtype=torch.int32)
    >>> logits = MinkUNet(4, 20)(sv.Voxels(coords, torch.randn(3, 4)))
    >>> logits.shape
    torch.Size([3, 20])
"""
from __future__ import annotations

import sys
import types

from . import functional
from .functional import (SPARE_OUTPUT_MAX_BYTES, SparseConv3d, SpatiallySparseConv,  # noqa: F401
                         SpatiallySparseDepthwiseConv, conv_features, conv_tensors, kernel_map_tensors,
                         spatially_sparse_conv, spatially_sparse_depthwise_conv)
from . import ops
from .layers import (AvgPool3d, BatchNorm, GlobalPool, InstanceNorm, MaxPool3d, ResidualBlock, SparseSequential,
                     Unpool, cat_voxels)
from .models import MinkUNet
from .ops import avg_pool, devoxelize, from_dense, global_pool, max_pool, to_dense, unpool
from . import memory
from .memory import torch_allocator_in_use, use_torch_allocator
from .plan import plan_maps
from .tune import tune_model

__all__ = list(functional.__all__) + list(ops.__all__) + [
    "SparseSequential", "BatchNorm", "InstanceNorm", "ResidualBlock", "cat_voxels", "MaxPool3d", "AvgPool3d",
    "GlobalPool", "Unpool", "MinkUNet", "tune_model", "plan_maps", "use_torch_allocator", "torch_allocator_in_use"]


def __getattr__(name):
    """The rest of :mod:`.functional` (its private helpers, used by diagnostics and tests)."""
    try:
        return getattr(functional, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


class _Package(types.ModuleType):
    """Assignments of :mod:`.functional`'s own names go to :mod:`.functional` as well."""

    def __setattr__(self, name, value):
        own = vars(functional).get(name, _MISSING)
        if own is not _MISSING and not isinstance(own, types.ModuleType):
            setattr(functional, name, value)
        super().__setattr__(name, value)


_MISSING = object()
sys.modules[__name__].__class__ = _Package
memory._from_env()  # CuPy's allocations through torch's allocator unless SPARSEVOX_TORCH_ALLOCATOR=0
