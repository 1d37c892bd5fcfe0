"""The MinkUNet of :class:`sparsevox.adapters.torch.MinkUNet` written in spconv 2.x, and a weight loader
that copies a sparsevox model's weights into it, so both compute the same logits.

Every function takes the spconv module (``spconv.pytorch``) as its first argument: nothing here imports
spconv (it is installed only on the GPU machine; the CPU tests pass a dense emulation of its layers).

Structure (module and parameter names equal the sparsevox model's, so ``state_dict`` keys match):
``stem`` two ``SubMConv3d(k3, indice_key="subm0")`` + BatchNorm1d + ReLU; ``encoder[i]`` (level i + 1):
``down`` = ``SparseConv3d(c, c, 2, 2, indice_key="down{i+1}")`` + BN + ReLU, ``blocks`` = residual blocks
with ``SubMConv3d(k3, indice_key="subm{i+1}")`` and a 1×1 ``SubMConv3d`` + BN on the skip where the
width changes; ``decoder[j]`` (back to level 3 - j): ``up`` = ``SparseInverseConv3d(c_in, c_out, 2,
indice_key="down{4-j}")`` (outputs on the saved indices of that down layer's input, in their order) +
``norm`` (BN + ReLU), feature concatenation ``[up, skip]`` with that level's encoder output, residual
blocks reusing ``"subm{3-j}"``; ``classifier`` = ``nn.Linear``. Containers are spconv's ``SparseSequential``
(BatchNorm and ReLU get ``x.features``), residual blocks ``SparseModule`` subclasses, as spconv models
are written.

Weight layouts (the reasoning the GPU run checks by comparing logits, :mod:`benchmarks.end_to_end`):

- sparsevox ``[K, C_in, C_out]``, K lexicographic over (x, y, z), z fastest; spconv 2.x (its default
  ``MaskImplicitGemm``) stores ``[C_out, kx, ky, kz, C_in]`` ("KRSC") with the kernel axes in the order
  of the index columns (we pass ``(batch, x, y, z)``). Its pair builder (``calc_conv_indices_stage2_mask``
  in ``spconv/csrc/sparse/indices.py``) flattens the kernel offset row-major over the kernel axes, and a
  SubM/strided layer applies ``W[:, k, :]`` to input ``out * s - p + k * d`` (SubM: p = k // 2, so offset
  ``k - 1`` for k3, as sparsevox's odd kernels; the k2 s2 layer: p = 0, offset ``k``, as sparsevox's even
  kernels). So ``spconv = sv.reshape(kx, ky, kz, C_in, C_out).permute(4, 0, 1, 2, 3)``; for SubM k3
  the layer benchmark measured agreement (float32 relative error 2e-7).
- ``SparseInverseConv3d`` (``inverse=True``) runs the forward GEMM with the paired strided layer's
  *backward* pairs (``pair_fwd = datas.pair_bwd``), which the same kernel writes with the same filter
  offset ``k`` (``indice_pairs_bwd[k][in] = out`` beside ``indice_pairs_fwd[k][out] = in``). So the fine
  output ``f = 2 c + k`` gets ``coarse[c] @ W[:, k, :]^T`` with its own weight ``[C_out, kx, ky, kz,
  C_in]``: a dense ``conv_transpose3d`` without a kernel flip — exactly sparsevox's transposed layer
  (``out = s * in + offset_k``). Same conversion as above, no flip.
- A 1×1 SubM layer (``conv1x1``: kernel volume 1) skips the pairs and computes
  ``features @ weight.view(C_in, C_out)`` (``FILTER_HWIO = False`` in ``spconv/pytorch/conv.py``): it reads
  the memory of its ``[C_out, 1, 1, 1, C_in]`` parameter as ``[C_in, C_out]``. So its parameter gets
  sparsevox's ``W[0]`` (``[C_in, C_out]``, row-major) reinterpreted: ``W[0].contiguous().view(C_out, 1, 1,
  1, C_in)`` (a plain transpose would be wrong).
"""
from __future__ import annotations

import numpy as np

from sparsevox.unet import DEFAULT_WIDTHS, unet_shape

_SPATIAL_MULTIPLE = 16  # 2 ** (number of stride-2 levels): keeps every level's shape even


def spatial_frame(coords: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """``(shift, spatial_shape)`` for spconv: ``coords[:, 1:] - shift`` is non-negative with ``shift`` a
    multiple of 16 per axis (so ``floor(c / 2)`` at every level picks the same parents as on the
    unshifted coordinates), and ``spatial_shape`` = largest shifted coordinate + 2, rounded up to a
    multiple of 16, so spconv's strided layers (padding 0, output size ``in / 2``) keep every site."""
    c = np.asarray(coords)[:, 1:].astype(np.int64)
    m = _SPATIAL_MULTIPLE
    shift = np.floor_divide(c.min(axis=0), m) * m
    hi = (c - shift).max(axis=0)
    shape = [int(-(-(v + 2) // m) * m) for v in hi]
    return shift, shape


def build(sp, in_channels: int, num_classes: int, widths=DEFAULT_WIDTHS, blocks=2):
    """The spconv MinkUNet (``torch.nn.Module``); ``forward(SparseConvTensor) -> logits [N, num_classes]``
    with row ``i`` for ``input.indices[i]``. ``sp``: the ``spconv.pytorch`` module."""
    import torch
    from torch import nn

    # spconv's SparseSequential, as spconv models are written (OpenPCDet, mmdetection3d): its spconv
    # modules get the tensor, every other module x.features. (A hand-rolled nn.Sequential did the same for
    # spconv, but kept sparsevox.compat.spconv's container from fusing evaluation BatchNorm + ReLU.)
    Seq = sp.SparseSequential

    def conv_bn_relu(c_in, c_out, k, key, stride=1):
        if stride == 1:
            conv = sp.SubMConv3d(c_in, c_out, k, bias=False, indice_key=key)
        else:
            conv = sp.SparseConv3d(c_in, c_out, k, stride, bias=False, indice_key=key)
        return Seq(conv, nn.BatchNorm1d(c_out), nn.ReLU(inplace=True))

    class ResidualBlock(sp.SparseModule):  # a spconv module: SparseSequential hands it the tensor
        def __init__(self, c_in, c_out, key):
            super().__init__()
            self.main = Seq(sp.SubMConv3d(c_in, c_out, 3, bias=False, indice_key=key), nn.BatchNorm1d(c_out),
                            nn.ReLU(inplace=True),
                            sp.SubMConv3d(c_out, c_out, 3, bias=False, indice_key=key), nn.BatchNorm1d(c_out))
            self.skip = nn.Identity() if c_in == c_out else Seq(sp.SubMConv3d(c_in, c_out, 1, bias=False),
                                                                 nn.BatchNorm1d(c_out))
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            main = self.main(x)
            skip = x.features if isinstance(self.skip, nn.Identity) else self.skip(x).features
            return main.replace_feature(self.relu(main.features + skip))

    class DownStage(nn.Module):
        def __init__(self, c_in, c_out, n, level):
            super().__init__()
            self.down = conv_bn_relu(c_in, c_in, 2, f"down{level}", stride=2)
            self.blocks = Seq(*[ResidualBlock(c_in if i == 0 else c_out, c_out, f"subm{level}") for i in range(n)])

        def forward(self, x):
            return self.blocks(self.down(x))

    class UpStage(nn.Module):
        def __init__(self, c_in, c_out, c_skip, n, level):
            super().__init__()
            # the inverse of encoder stage `level + 1`'s down layer: outputs on level `level`'s indices
            self.up = sp.SparseInverseConv3d(c_in, c_out, 2, indice_key=f"down{level + 1}", bias=False)
            self.norm = Seq(nn.BatchNorm1d(c_out), nn.ReLU(inplace=True))
            self.blocks = Seq(*[ResidualBlock(c_out + c_skip if i == 0 else c_out, c_out, f"subm{level}")
                                for i in range(n)])

        def forward(self, coarse, fine):
            up = self.norm(self.up(coarse))
            return self.blocks(up.replace_feature(torch.cat([up.features, fine.features], dim=1)))

    class SpconvMinkUNet(nn.Module):
        def __init__(self):
            super().__init__()
            w, b = unet_shape(widths, blocks)
            self.stem = Seq(conv_bn_relu(in_channels, w[0], 3, "subm0"), conv_bn_relu(w[0], w[0], 3, "subm0"))
            self.encoder = nn.ModuleList(DownStage(w[i - 1], w[i], b[i - 1], i) for i in range(1, 5))
            self.decoder = nn.ModuleList(UpStage(w[4 + j], w[5 + j], w[3 - j], b[4 + j], 3 - j) for j in range(4))
            self.classifier = nn.Linear(w[8], num_classes)

        def forward(self, x):
            x = self.stem(x)
            levels = [x]
            for stage in self.encoder:
                x = stage(x)
                levels.append(x)
            levels.pop()
            for stage in self.decoder:
                x = stage(x, levels.pop())
            return self.classifier(x.features)

    return SpconvMinkUNet()


def convert_weight(w, target_shape):
    """A sparsevox convolution weight ``[K, C_in, C_out]`` as the spconv parameter of shape
    ``target_shape`` = ``[C_out, kx, ky, kz, C_in]`` (see the module docstring; K = 1: the memory of
    ``W[0]`` reinterpreted, because spconv's 1×1 layers read it as ``[C_in, C_out]``)."""
    k, c_in, c_out = (int(s) for s in w.shape)
    t = tuple(int(s) for s in target_shape)
    if len(t) != 5 or t[0] != c_out or t[4] != c_in or t[1] * t[2] * t[3] != k:
        raise ValueError(f"sparsevox weight {tuple(w.shape)} does not fit the spconv weight {t}")
    w = w.detach()
    if k == 1:
        return w[0].contiguous().view(t)
    return w.reshape(t[1], t[2], t[3], c_in, c_out).permute(4, 0, 1, 2, 3).contiguous()


def copy_into(model, tensors: dict) -> None:
    """Copy ``{name: tensor}`` into ``model``'s parameters and buffers of those names (all of them must be
    given), bypassing ``load_state_dict``: spconv's convolutions have a load pre-hook that permutes the
    weight when ``SPCONV_SAVED_WEIGHT_LAYOUT`` is set in the environment."""
    import torch
    own = dict(model.named_parameters())
    own.update(model.named_buffers())
    if set(own) != set(tensors):
        raise ValueError(f"names differ: missing {sorted(set(own) - set(tensors))[:5]}, unexpected "
                         f"{sorted(set(tensors) - set(own))[:5]}")
    with torch.no_grad():
        for name, t in tensors.items():
            if tuple(own[name].shape) != tuple(t.shape):
                raise ValueError(f"{name}: shape {tuple(t.shape)} does not fit {tuple(own[name].shape)}")
            own[name].copy_(t)


def load_from_sparsevox(spconv_model, sv_model) -> None:
    """Copy every parameter and buffer of a sparsevox :class:`MinkUNet` into :func:`build`'s model of the
    same widths and blocks (convolution weights converted by :func:`convert_weight`, BatchNorm and the
    classifier copied as they are). Raises ``ValueError`` naming any key or shape that does not match."""
    src = dict(sv_model.named_parameters())
    src.update(sv_model.named_buffers())
    dst = dict(spconv_model.named_parameters())
    dst.update(spconv_model.named_buffers())
    if set(src) != set(dst):
        raise ValueError(f"the models differ: only in sparsevox {sorted(set(src) - set(dst))[:5]}, only in "
                         f"spconv {sorted(set(dst) - set(src))[:5]}")
    out = {}
    for name, t in src.items():
        target = dst[name]
        if t.ndim == 3 and target.ndim == 5:
            v = convert_weight(t, target.shape)
        elif tuple(t.shape) == tuple(target.shape):
            v = t.detach()
        else:
            raise ValueError(f"{name}: sparsevox shape {tuple(t.shape)} vs spconv {tuple(target.shape)}")
        out[name] = v.to(device=target.device, dtype=target.dtype)
    copy_into(spconv_model, out)
