"""Models built from :mod:`.layers`: the MinkUNet (SparseResUNet42 of TorchSparse/SPVNAS)."""
from __future__ import annotations

import math

from torch import nn

import sparsevox as sv
from sparsevox.geometry import positive_int
from sparsevox.unet import DEFAULT_WIDTHS, unet_shape

from .functional import SparseConv3d, SpatiallySparseConv
from .layers import BatchNorm, ResidualBlock, SparseSequential, cat_voxels

__all__ = ["MinkUNet", "DownStage", "UpStage"]



def _conv_bn_relu(c_in, c_out, kernel_size, stride=1, **algos):
    return SparseSequential(SparseConv3d(c_in, c_out, kernel_size, stride=stride, bias=False, **algos),
                            BatchNorm(c_out), nn.ReLU(inplace=True))


class DownStage(nn.Module):
    """Encoder stage: k2 s2 convolution (``c_in → c_in``) + BN + ReLU, then residual blocks to ``c_out``."""

    takes_voxels = True

    def __init__(self, c_in: int, c_out: int, blocks: int = 2, **algos):
        super().__init__()
        self.down = _conv_bn_relu(c_in, c_in, 2, 2, **algos)
        self.blocks = SparseSequential(*[ResidualBlock(c_in if i == 0 else c_out, c_out, **algos)
                                         for i in range(blocks)])

    def forward(self, voxels):
        return self.blocks(self.down(voxels))


class UpStage(nn.Module):
    """Decoder stage: k2 s2 transposed convolution (``c_in → c_out``) onto the finer level's sites + BN
    + ReLU, concatenation with the finer level's encoder output (``c_skip`` channels), then residual
    blocks (``c_out + c_skip → c_out``). ``forward(coarse, fine)``."""

    takes_voxels = True

    def __init__(self, c_in: int, c_out: int, c_skip: int, blocks: int = 2, **algos):
        super().__init__()
        self.up = SparseConv3d(c_in, c_out, 2, stride=2, transposed=True, bias=False, **algos)
        self.norm = SparseSequential(BatchNorm(c_out), nn.ReLU(inplace=True))
        self.blocks = SparseSequential(*[ResidualBlock(c_out + c_skip if i == 0 else c_out, c_out, **algos)
                                         for i in range(blocks)])

    def forward(self, coarse, fine):
        up = self.norm(self.up(coarse, output_voxels=fine))
        return self.blocks(cat_voxels(up, fine))


class MinkUNet(nn.Module):
    """A sparse residual UNet for per-voxel classification (semantic segmentation), by default the
    SparseResUNet42 shape of TorchSparse/SPVNAS ("MinkUNet"):

    - stem: two SubM k3 convolutions ``in_channels → w0 → w0``, each + BN + ReLU;
    - encoder stage i = 1..4: k2 s2 convolution ``w[i-1] → w[i-1]`` + BN + ReLU, then ``blocks``
      residual blocks ``→ w[i]`` (32, 64, 128, 256);
    - decoder stage i = 5..8: k2 s2 transposed convolution ``w[i-1] → w[i]`` back onto the sites of the
      matching encoder level + BN + ReLU, concatenation with that level's encoder output, then ``blocks``
      residual blocks ``→ w[i]`` (256, 128, 96, 96);
    - classifier: ``nn.Linear(w8, num_classes)``.

    Convolutions have no bias (BatchNorm follows each). ``forward(voxels)`` takes ``Voxels`` with torch
    features ``[N, in_channels]`` (CPU tensors run on the NumPy backend, CUDA tensors on the GPU) and
    returns the logits ``[N, num_classes]`` as a tensor, row ``i`` for ``voxels.coords[i]``.

    Args:
        in_channels, num_classes: input channels and classes.
        widths: 9 channel counts ``(w0, ..., w8)``: stem, encoder stages 1-4, decoder stages 1-4.
        blocks: residual blocks per stage (>= 1): an int for all eight stages, or 8 ints (encoder 1-4,
            decoder 1-4).
        fwd_algo, bwd_algo: algorithm inputs passed to every convolution.

    Example:
        >>> net = MinkUNet(4, 20)
        >>> logits = net(sv.Voxels(coords, feats))        # [N, 20]
    """

    def __init__(self, in_channels: int, num_classes: int, widths=DEFAULT_WIDTHS, blocks=2, fwd_algo=None,
                 bwd_algo=None):
        super().__init__()
        w, b = unet_shape(widths, blocks)
        algos = dict(fwd_algo=fwd_algo, bwd_algo=bwd_algo)
        self.in_channels, self.num_classes = positive_int(in_channels, "in_channels"), positive_int(num_classes, "num_classes")
        self.widths, self.blocks = w, b
        self.stem = SparseSequential(_conv_bn_relu(in_channels, w[0], 3, **algos),
                                     _conv_bn_relu(w[0], w[0], 3, **algos))
        self.encoder = nn.ModuleList(DownStage(w[i - 1], w[i], b[i - 1], **algos) for i in range(1, 5))
        # decoder stage j: up from w[4 + j - 1], concatenated with encoder level 3 - j (level 0 = stem)
        self.decoder = nn.ModuleList(UpStage(w[4 + j], w[5 + j], w[3 - j], b[4 + j], **algos) for j in range(4))
        self.classifier = nn.Linear(w[8], num_classes)

    def build_maps(self, voxels) -> list:
        """Build every kernel map :meth:`forward` uses on ``voxels`` and wait for them all; returns the
        sites of levels 0-4 (``voxels``, then feature-less ``Voxels`` of each strided map's outputs, on
        which the maps of that level are cached; each strided layer's output shares its level's sites
        while they live, see ``sv.strided_output_voxels``). :meth:`forward` calls it first: the host waits for
        each map's pair counts here, with only map work queued on the device, instead of once per level
        in the middle of the layers, where each wait drained the convolutions queued before it. The
        hash table that validating ``voxels`` built on the GPU is dropped then (a map built on these sites
        later makes its own)."""
        levels = [voxels]
        for stage in self.encoder:
            down = stage.down[0]
            levels.append(sv.strided_output_voxels(levels[-1], down.kernel_size, down.stride, down.dilation))
        maps = [sv.kernel_map(v, *self._level_down(i)) for i, v in enumerate(levels[:-1])]
        for v, sites in zip(levels, self._subm_geometries()):
            maps += [sv.kernel_map(v, ks, 1, dl) for ks, dl in sites]
        for kmap in maps:
            kmap.wait()
        for v in levels:  # every map of these sites is built and its kernels are done (wait):
            v._hash = None  # validation's hash table goes (16 MiB at SemanticKITTI's 183,534 voxels)
        return levels

    def _level_down(self, i: int) -> tuple:
        down = self.encoder[i].down[0]
        return down.kernel_size, down.stride, down.dilation

    def _subm_geometries(self) -> list:
        """Per level 0-4: sorted ``(kernel_size, dilation)`` of its stride-1 convolutions with more than one
        offset (a 1x1x1 one runs as a matmul, without a map; where it cannot, as with a named algorithm,
        it builds its map when it runs, as a replaced layer does). Found once (walking the modules took ~0.5 ms
        per step): a convolution replaced later still builds its own map when it runs, only not up front."""
        plan = self.__dict__.get("_subm_plan")
        if plan is None:
            plan = self.__dict__["_subm_plan"] = self._find_subm_geometries()
        return plan

    def _find_subm_geometries(self) -> list:
        def sites(*modules):
            return sorted({(m.kernel_size, m.dilation) for mod in modules for m in mod.modules()
                           if isinstance(m, SpatiallySparseConv) and not m.transposed
                           and m.stride == (1, 1, 1) and math.prod(m.kernel_size) > 1})
        # level 0: the stem and the last decoder stage; level i: encoder stage i and decoder stage 3 - i
        return [sites(self.stem, self.decoder[3])] + [
            sites(self.encoder[i - 1], *([self.decoder[3 - i]] if i < 4 else [])) for i in range(1, 5)]

    def forward(self, voxels):
        if not isinstance(voxels, sv.Voxels):
            raise ValueError(f"MinkUNet takes sparsevox.Voxels (coords [N, 4], feats [N, in_channels]), got "
                             f"{type(voxels).__name__}")
        # kept for the forward: each strided layer's output shares its level's sites, and the maps on them
        sites = self.build_maps(voxels)  # noqa: F841
        x = self.stem(voxels)
        levels = [x]
        for stage in self.encoder:
            x = stage(x)
            levels.append(x)
        levels.pop()  # the coarsest level is x itself
        for stage in self.decoder:
            x = stage(x, levels.pop())
        return self.classifier(x.feats)
