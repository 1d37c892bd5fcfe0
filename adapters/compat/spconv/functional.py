"""``spconv.pytorch.functional``: ``sparse_add`` (and its hash-based twin) on sparsevox; spconv's autograd
functions on its pair tensors import but raise ``NotImplementedError`` when used (the layers run sparsevox's
own)."""
from __future__ import annotations

import math

import torch

from ._unsupported import attribute_error
from .core import SparseConvTensor

__all__ = ["sparse_add", "sparse_add_hash_based"]
_SPCONV_NAMES = ("SparseConvFunction", "SparseInverseConvFunction", "SparseImplicitGemmFunction", "SubMConvFunction",
                 "SparseMaxPoolFunction", "SparseMaxPoolImplicitGemmFunction", "SparseAvgPoolImplicitGemmFunction",
                 "indice_conv", "implicit_gemm", "indice_inverse_conv", "indice_subm_conv", "indice_maxpool",
                 "indice_maxpool_implicit_gemm", "indice_avgpool_implicit_gemm")
__getattr__ = attribute_error(__name__, "spconv.pytorch.functional", _SPCONV_NAMES)


def sparse_add(*tens: SparseConvTensor) -> SparseConvTensor:
    """The sum of sparse tensors with different sites (spconv's ``sparse_add``): every site of any operand,
    features summed where sites coincide; differentiable in every operand's features. The operands must
    share ``spatial_shape``, ``batch_size`` and channel count (``ValueError`` otherwise).

    As in spconv, when the largest operand holds every site of the sum, the result keeps its ``indice_dict``
    (later SubM layers with its keys reuse its kernel maps); its rows are then that operand's rows in that
    operand's order (spconv sorts them and keeps the dictionary, whose maps then follow another row order
    unless the operand's rows were sorted). Otherwise rows are sorted by (batch, coordinates), as spconv's
    coalesced sum, and the dictionary is empty."""
    if not tens:
        raise ValueError("sparse_add needs at least one SparseConvTensor")
    first = tens[0]
    for k, t in enumerate(tens):
        if not isinstance(t, SparseConvTensor):
            raise ValueError(f"sparse_add operand {k} must be a SparseConvTensor, got {type(t).__name__}")
        if list(t.spatial_shape) != list(first.spatial_shape) or t.batch_size != first.batch_size \
                or t.features.shape[1] != first.features.shape[1]:
            raise ValueError(f"sparse_add operand {k} has spatial_shape {list(t.spatial_shape)}, batch_size "
                             f"{t.batch_size}, {t.features.shape[1]} channels; operand 0 has "
                             f"{list(first.spatial_shape)}, {first.batch_size}, {first.features.shape[1]}")
    largest = max(range(len(tens)), key=lambda k: (tens[k].features.shape[0], -k))  # the first of the largest
    shape = [first.batch_size, *first.spatial_shape]
    strides = torch.tensor([math.prod(shape[i + 1:]) for i in range(len(shape))], dtype=torch.long,
                           device=first.indices.device)
    idx = torch.cat([t.indices.long() for t in tens])
    keys, inv = torch.unique((idx * strides).sum(1), return_inverse=True)  # sorted: the coalesced order
    feats = torch.cat([t.features for t in tens])
    out = torch.zeros((len(keys), feats.shape[1]), dtype=feats.dtype, device=feats.device).index_add(0, inv, feats)
    big = tens[largest]
    if len(keys) == big.features.shape[0]:  # the largest operand's sites are the sum's: its rows, its maps
        start = sum(t.features.shape[0] for t in tens[:largest])
        return big.replace_feature(out[inv[start:start + len(keys)]])
    rows = torch.stack([torch.div(keys, s, rounding_mode="floor") % n for s, n in zip(strides.tolist(), shape)], 1)
    return SparseConvTensor(out, rows.to(torch.int32), list(first.spatial_shape), first.batch_size)


def sparse_add_hash_based(*tens: SparseConvTensor) -> SparseConvTensor:
    """spconv's hash-based ``sparse_add``: the same sum (its rows in another order in spconv; here sorted)."""
    return sparse_add(*tens)
