"""Flax NNX adapter, built on :mod:`sparsevox.adapters.jax`: sparse convolution modules (:mod:`.conv`),
network layers (:mod:`.layers`), pooling (:mod:`.pooling`), models (:mod:`.models`), kernel maps for whole
networks (:mod:`.maps`)
and weights to and from the torch twins (:mod:`.torch_weights`). The layer and model names and
arguments are those of :mod:`sparsevox.adapters.torch` (``SparseSequential``, ``BatchNorm``,
``InstanceNorm``, ``ResidualBlock``, ``MaxPool3d``, ``AvgPool3d``, ``GlobalPool``, ``Unpool``, ``MinkUNet``);
the modules take features ``[N, C]`` and kernel maps.

The JAX pattern: kernel maps decide output shapes, so they are built from concrete ``Voxels`` OUTSIDE
``jit`` and passed into the jitted step as a pytree. A network builds all of its maps at once,
``maps = model.kernel_maps(voxels)`` (for :class:`MinkUNet` a tuple of 5 :class:`LevelMaps`: per
level the SubM, 1×1, down and up maps and the batch column); ``model(feats, maps)`` then runs under
``nnx.jit`` and ``nnx.grad``. Maps are static to ``jit`` (their sizes decide shapes; their source is
hashed by identity), so every new ``Voxels``, even of equal coordinates, costs one trace and compile
(about a second for a small MinkUNet on a CPU); a ``Voxels`` reused across steps costs nothing, and
``kernel_maps`` of the same ``Voxels`` returns the same maps::

    import jax, jax.numpy as jnp, optax
    from flax import nnx
    import sparsevox as sv
    from sparsevox.adapters.flax import MinkUNet

    model = MinkUNet(4, 20, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, opt, feats, maps, labels):
        def loss_fn(model):
            logits = model(feats, maps)                       # BatchNorm on batch statistics
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    voxels = sv.Voxels(coords, feats)                         # jax arrays: coords int32 [N, 4], feats [N, 4]
    maps = model.kernel_maps(voxels)                          # outside jit, once per scene
    loss = train_step(model, opt, voxels.feats, maps, labels)
    model.eval()                                              # running statistics from here on
    logits = nnx.jit(lambda m, f, maps: m(f, maps))(model, voxels.feats, maps)

``python -m sparsevox.examples.flax_train`` runs such a loop. Weights of the torch ``MinkUNet`` load with
:func:`load_torch_state_dict`. This package imports flax; nothing else in sparsevox does (install with
``pip install sparsevox[flax]``).
"""
from __future__ import annotations

from . import conv
from .conv import SparseConv, SparseDepthwiseConv
from .layers import BatchNorm, InstanceNorm, ResidualBlock, SparseSequential, takes_maps
from .maps import LevelMaps, coarser, level_maps, map_key
from .models import MinkUNet
from .pooling import AvgPool3d, GlobalPool, MaxPool3d, Unpool
from .torch_weights import load_torch_state_dict, torch_state_dict

__all__ = list(conv.__all__) + ["SparseSequential", "BatchNorm", "InstanceNorm", "ResidualBlock", "takes_maps",
                                "MaxPool3d", "AvgPool3d", "GlobalPool", "Unpool", "MinkUNet", "LevelMaps", "level_maps", "coarser", "map_key",
                                "load_torch_state_dict", "torch_state_dict"]


def __getattr__(name):
    """The rest of :mod:`.conv` (its private helpers)."""
    try:
        return getattr(conv, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
