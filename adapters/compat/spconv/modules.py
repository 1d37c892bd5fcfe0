"""spconv's containers and small modules (``spconv/pytorch/{modules,tables,identity,__init__}.py`` of
spconv 2.3.8): :class:`SparseModule` (modules that take a ``SparseConvTensor``), :class:`SparseSequential`,
the feature-wise ``SparseBatchNorm``/``SparseReLU``/``SparseIdentity``, ``ToDense``, the tables."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from sparsevox.adapters.torch.norm_act import batchnorm_act, fuses, plain_batchnorm

from .core import SparseConvTensor

__all__ = ["SparseModule", "SparseSequential", "SparseBatchNorm", "SparseSyncBatchNorm", "SparseReLU",
           "SparseIdentity", "is_spconv_module", "is_sparse_conv", "assign_name_for_sparse_modules", "ToDense",
           "RemoveGrid", "Identity", "JoinTable", "AddTable", "ConcatTable", "AddTableMisaligned"]


class SparseModule(nn.Module):
    """Base of the modules that :class:`SparseSequential` hands the ``SparseConvTensor`` (any other module
    gets its features)."""

    def __init__(self, name=None):
        super().__init__()
        self.name = name
        self._sparse_unique_name = ""


class SparseBatchNorm(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` on the features of a ``SparseConvTensor`` (or on a tensor)."""

    def forward(self, input):
        if isinstance(input, SparseConvTensor):
            return input.replace_feature(super().forward(input.features))
        return super().forward(input)


class SparseSyncBatchNorm(nn.SyncBatchNorm):
    def forward(self, input):
        if isinstance(input, SparseConvTensor):
            return input.replace_feature(super().forward(input.features))
        return super().forward(input)


class SparseReLU(nn.ReLU):
    def forward(self, input):
        if isinstance(input, SparseConvTensor):
            return input.replace_feature(super().forward(input.features))
        return super().forward(input)


class SparseIdentity(nn.Identity):
    def forward(self, input):
        if isinstance(input, SparseConvTensor):
            return input.replace_feature(super().forward(input.features))
        return super().forward(input)


def is_spconv_module(module) -> bool:
    return isinstance(module, (SparseModule, SparseBatchNorm, SparseReLU))


def is_sparse_conv(module) -> bool:
    from .conv import SparseConvolution
    return isinstance(module, SparseConvolution)


class SparseSequential(SparseModule):
    """A sequential container (spconv's): :func:`is_spconv_module` modules get the ``SparseConvTensor``,
    any other module (``nn.BatchNorm1d``, ``nn.ReLU``, ...) gets ``x.features`` and its output replaces
    them; such a module is skipped when the tensor has no sites. Takes modules, one ``OrderedDict`` or
    keyword arguments."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        if len(args) == 1 and isinstance(args[0], OrderedDict):
            for key, module in args[0].items():
                self.add_module(key, module)
        else:
            for idx, module in enumerate(args):
                self.add_module(str(idx), module)
        for name, module in kwargs.items():
            if name in self._modules:
                raise ValueError("name exists.")
            self.add_module(name, module)

    def __getitem__(self, idx):
        if not (-len(self) <= idx < len(self)):
            raise IndexError(f"index {idx} is out of range")
        return list(self._modules.values())[idx]

    def __len__(self):
        return len(self._modules)

    def add(self, module, name=None):
        if name is None:
            name = str(len(self._modules))
            if name in self._modules:
                raise KeyError("name exists")
        self.add_module(name, module)

    def forward(self, input):
        modules = tuple(self._modules.values())
        i, n = 0, len(modules)
        while i < n:
            module = modules[i]
            if is_spconv_module(module):
                input = module(input)
            elif isinstance(input, SparseConvTensor):
                if input.indices.shape[0] != 0:
                    relu = i + 1 < n and fuses(module, modules[i + 1])
                    if relu or plain_batchnorm(module):
                        # evaluation on CUDA: nn.BatchNorm1d (+ nn.ReLU) in one launch
                        y = batchnorm_act(module, input.features, relu=relu)
                        if y is not None:
                            input = input.replace_feature(y)
                            i += 2 if relu else 1
                            continue
                    input = input.replace_feature(module(input.features))
            else:
                input = module(input)
            i += 1
        return input


def assign_name_for_sparse_modules(module: nn.Module) -> None:
    for k, n in module.named_modules():
        if isinstance(n, SparseModule):
            n._sparse_unique_name = k


class ToDense(SparseModule):
    """``SparseConvTensor`` → dense ``[B, C, *spatial_shape]`` (``x.dense()``)."""

    def forward(self, x: SparseConvTensor):
        return x.dense()


class RemoveGrid(SparseModule):
    def forward(self, x: SparseConvTensor):
        x.grid = None
        return x


class Identity(SparseModule):
    def forward(self, input, *args, **kwargs):
        return input

    def input_spatial_size(self, out_size):
        return out_size


def _same_layout(tensors, what: str) -> None:
    first = tensors[0]
    for t in tensors:
        if (t.spatial_shape != first.spatial_shape or t.batch_size != first.batch_size
                or t.indices.shape[0] != first.indices.shape[0]):
            raise ValueError(f"you can't use {what} in two sptensor with different indices.")


class JoinTable(SparseModule):
    """Concatenate the features of tensors on the same indices (the first one's)."""

    def forward(self, input):
        _same_layout(input, "JoinTable")
        return input[0].replace_feature(torch.cat([t.features for t in input], 1))

    def input_spatial_size(self, out_size):
        return out_size


class AddTable(SparseModule):
    """Sum the features of tensors on the same indices (the first one's)."""

    def forward(self, input):
        _same_layout(input, "AddTable")
        return input[0].replace_feature(sum(t.features for t in input))

    def input_spatial_size(self, out_size):
        return out_size


class ConcatTable(SparseModule):
    def forward(self, input):
        return [module(input) for module in self._modules.values()]

    def add(self, module):
        self._modules[str(len(self._modules))] = module
        return self


class AddTableMisaligned(SparseModule):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("AddTableMisaligned (spconv's hash-based sum of tensors on different indices) is "
                                  "not supported by sparsevox.compat.spconv")

