"""Models built from :mod:`.layers`: the MinkUNet (SparseResUNet42 of TorchSparse/SPVNAS), the same
network as the torch adapter's ``MinkUNet`` (same names, arguments, parameter shapes and arithmetic).

Its kernel maps are built outside ``jit`` for every level at once (:meth:`MinkUNet.kernel_maps`) and
passed into the jitted step as a pytree; see :mod:`sparsevox.adapters.flax` for a training step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsevox.unet import DEFAULT_WIDTHS, unet_shape
from sparsevox.voxels import Voxels

from .conv import SparseConv, _positive
from .layers import BatchNorm, ResidualBlock, SparseSequential
from .maps import LevelMaps, coarser, level_maps

__all__ = ["MinkUNet", "DownStage", "UpStage"]

def _kw(kw, conv: bool):
    keys = ("fwd_algo", "bwd_algo", "dtype", "param_dtype", "rngs") if conv else ("dtype", "param_dtype", "rngs")
    return {k: kw[k] for k in keys if k in kw}


def _conv_bn_relu(c_in, c_out, kernel_size, stride=1, **kw):
    return SparseSequential(SparseConv(c_in, c_out, kernel_size, stride=stride, use_bias=False, **_kw(kw, True)),
                            BatchNorm(c_out, **_kw(kw, False)), jax.nn.relu)


def _torch_uniform(fan_in: int):
    """``nn.Linear``'s initialisation: uniform in ``±1/sqrt(fan_in)``."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class DownStage(nnx.Module):
    """Encoder stage: k2 s2 convolution (``c_in → c_in``) + BN + ReLU, then residual blocks to ``c_out``.
    ``__call__(x, maps, coarse_maps)``: ``x`` on the finer sites (``maps``), result on the coarser ones."""

    def __init__(self, c_in: int, c_out: int, blocks: int = 2, **kw):
        self.down = _conv_bn_relu(c_in, c_in, 2, 2, **kw)
        self.blocks = SparseSequential(*[ResidualBlock(c_in if i == 0 else c_out, c_out, **_kw(kw, True))
                                         for i in range(blocks)])

    def __call__(self, x, maps: LevelMaps, coarse_maps: LevelMaps):
        return self.blocks(self.down(x, maps), coarse_maps)


class UpStage(nnx.Module):
    """Decoder stage: k2 s2 transposed convolution (``c_in → c_out``) onto the finer level's sites + BN +
    ReLU, concatenation with the finer level's encoder output (``c_skip`` channels), then residual blocks
    (``c_out + c_skip → c_out``). ``__call__(coarse, fine, coarse_maps, fine_maps)``."""

    def __init__(self, c_in: int, c_out: int, c_skip: int, blocks: int = 2, **kw):
        self.up = SparseConv(c_in, c_out, 2, stride=2, transposed=True, use_bias=False, **_kw(kw, True))
        self.norm = SparseSequential(BatchNorm(c_out, **_kw(kw, False)), jax.nn.relu)
        self.blocks = SparseSequential(*[ResidualBlock(c_out + c_skip if i == 0 else c_out, c_out, **_kw(kw, True))
                                         for i in range(blocks)])

    def __call__(self, coarse, fine, coarse_maps: LevelMaps, fine_maps: LevelMaps):
        up = self.norm(self.up(coarse, coarse_maps), fine_maps)  # fine_maps: bucketed rows of the output sites
        return self.blocks(jnp.concatenate([up, fine], axis=1), fine_maps)


class MinkUNet(nnx.Module):
    """A sparse residual UNet for per-voxel classification, by default the SparseResUNet42 shape of
    TorchSparse/SPVNAS ("MinkUNet"), as the torch adapter's ``MinkUNet``:

    - stem: two SubM k3 convolutions ``in_channels → w0 → w0``, each + BN + ReLU;
    - encoder stage i = 1..4: k2 s2 convolution ``w[i-1] → w[i-1]`` + BN + ReLU, then ``blocks``
      residual blocks ``→ w[i]`` (32, 64, 128, 256);
    - decoder stage i = 5..8: k2 s2 transposed convolution ``w[i-1] → w[i]`` back onto the sites of the
      matching encoder level + BN + ReLU, concatenation with that level's encoder output, then ``blocks``
      residual blocks ``→ w[i]`` (256, 128, 96, 96);
    - classifier: ``nnx.Linear(w8, num_classes)`` (initialised as ``torch.nn.Linear``).

    Convolutions have no bias (a :class:`BatchNorm` follows each).

    Usage: ``maps = net.kernel_maps(voxels)`` outside ``jit`` (a tuple of 5 :class:`LevelMaps`, levels
    0-4), then ``net(feats, maps)`` → logits ``[N, num_classes]``, row ``i`` for ``voxels.coords[i]``,
    under ``nnx.jit`` / ``nnx.grad``. Outside ``jit``, ``net(voxels)`` builds the maps itself.
    ``net.eval()`` / ``net.train()`` switch the batch norms to running / batch statistics.

    Args:
        in_channels, num_classes: input channels and classes.
        widths: 9 channel counts ``(w0, ..., w8)``: stem, encoder stages 1-4, decoder stages 1-4.
        blocks: residual blocks per stage (>= 1): an int for all eight stages, or 8 ints (encoder 1-4,
            decoder 1-4).
        fwd_algo, bwd_algo: algorithm inputs passed to every convolution.
        dtype, param_dtype: computation and parameter dtypes of every layer.
        rngs: ``nnx.Rngs`` for the initialisation.

    Example::

        net = MinkUNet(4, 20, rngs=nnx.Rngs(0))
        maps = net.kernel_maps(voxels)                               # outside jit
        logits = nnx.jit(lambda m, f, maps: m(f, maps))(net, voxels.feats, maps)   # [N, 20]
    """

    def __init__(self, in_channels: int, num_classes: int, widths=DEFAULT_WIDTHS, blocks=2, fwd_algo=None,
                 bwd_algo=None, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        # named here: num_classes reaches only nnx.Linear (which accepts 0), in_channels the stem's in_features
        self.in_channels = _positive(in_channels, "in_channels")
        self.num_classes = _positive(num_classes, "num_classes")
        w, b = unet_shape(widths, blocks)
        kw = dict(fwd_algo=fwd_algo, bwd_algo=bwd_algo, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.widths, self.blocks = w, b
        self.stem = SparseSequential(_conv_bn_relu(self.in_channels, w[0], 3, **kw), _conv_bn_relu(w[0], w[0], 3, **kw))
        self.encoder = nnx.List([DownStage(w[i - 1], w[i], b[i - 1], **kw) for i in range(1, 5)])
        # decoder stage j: up from w[4 + j - 1], concatenated with encoder level 3 - j (level 0 = stem)
        self.decoder = nnx.List([UpStage(w[4 + j], w[5 + j], w[3 - j], b[4 + j], **kw) for j in range(4)])
        self.classifier = nnx.Linear(w[8], self.num_classes, dtype=dtype, param_dtype=param_dtype,
                                     kernel_init=_torch_uniform(w[8]), bias_init=_torch_uniform(w[8]), rngs=rngs)

    def kernel_maps(self, voxels: Voxels, bucket: bool = False) -> tuple:
        """Every map the network needs for ``voxels``, per level (call outside ``jit``).

        Level 0 is ``voxels``' own sites, level ``l`` the output sites of ``l`` k2 s2 convolutions
        (``unique(floor(c / 2^l))`` per batch). Level ``l`` holds the maps whose input is that level:
        SubM k3 (``"k3"``), the 1×1 skips where channels change (``"k1"``), the map down (``"k2_s2"``,
        levels 0-3) and the transposed map up onto level ``l - 1`` (``"k2_s2_transposed"``, levels 1-4),
        and the batch column. Returns a tuple of 5 :class:`LevelMaps`, a pytree to pass to ``__call__``.

        ``bucket=True``: every level's rows and every map's pairs rounded up to buckets
        (:func:`sparsevox.adapters.jax.bucket_rows`), so a jitted step compiles once per bucket, not once per
        scan: pass ``maps[0].pad(feats)`` and mask the loss with ``maps[0].mask()`` (the padding rows'
        logits are not voxels). Results on the real rows equal the unbucketed ones.
        """
        levels = [voxels]
        for _ in range(4):
            levels.append(coarser(levels[-1]))
        out = []
        for lvl in range(5):
            users = [self.stem] if lvl == 0 else [self.encoder[lvl - 1].blocks, self.decoder[4 - lvl].up]
            if lvl < 4:
                users += [self.encoder[lvl].down, self.decoder[3 - lvl].blocks]
            out.append(level_maps(levels[lvl], *users, output_voxels=levels[lvl - 1] if lvl else None,
                                  bucket=bucket))
        return tuple(out)

    def __call__(self, x, maps=None):
        """Logits ``[N, num_classes]`` of features ``x`` ``[N, in_channels]`` with ``maps`` from
        :meth:`kernel_maps`; or of ``Voxels`` ``x`` (outside ``jit``, ``maps`` may then be None)."""
        if isinstance(x, Voxels):
            if maps is None:
                maps = self.kernel_maps(x)
            x = x.feats
        if not (isinstance(maps, (tuple, list)) and len(maps) == 5 and all(isinstance(m, LevelMaps) for m in maps)):
            raise ValueError(f"maps must be the 5 LevelMaps of MinkUNet.kernel_maps(voxels) (built outside jit), "
                             f"got {type(maps).__name__}")
        if x.ndim != 2 or x.shape != (maps[0].num_sites, self.in_channels):
            raise ValueError(f"features must have shape [N={maps[0].num_sites}, in_channels={self.in_channels}], "
                             f"got {tuple(x.shape)}")
        x = self.stem(x, maps[0])
        levels = [x]
        for i, stage in enumerate(self.encoder):
            x = stage(x, maps[i], maps[i + 1])
            levels.append(x)
        levels.pop()  # the coarsest level is x itself
        for j, stage in enumerate(self.decoder):
            x = stage(x, levels.pop(), maps[4 - j], maps[3 - j])
        return self.classifier(x)
