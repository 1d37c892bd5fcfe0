"""Train a small Flax NNX MinkUNet for per-voxel segmentation: kernel maps outside jit, the step inside.

    python -m sparsevox.examples.flax_train [--steps 20] [--sgd]

The pattern: voxelise, build every map the network needs once per scene (``model.kernel_maps(voxels)``,
outside ``jit``: maps decide shapes), then pass the maps into the ``nnx.jit``-ed train step as a pytree.
Uses optax's Adam when it is installed (and ``--sgd`` is not given), else plain SGD on the params.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sparsevox as sv
from sparsevox.adapters.flax import MinkUNet
from sparsevox.synthetic import lidar_like_points

SMALL = (16, 16, 16, 32, 32, 32, 16, 16, 16)


def scene(crop: float, voxel_size: float = 0.2):
    """A cropped street scan as ``Voxels`` (features: mean x, y, z, intensity) and 3 labels per voxel:
    ground, wall, other (cars and poles), read from the voxel's position."""
    pts = lidar_like_points(seed=0)
    pts = pts[(np.abs(pts[:, 0]) < crop) & (np.abs(pts[:, 1]) < 2.5 * crop)]
    v = sv.Voxels.from_points(jnp.asarray(pts[:, :3]), voxel_size, features=jnp.asarray(pts))
    xyz = (np.asarray(v.coords)[:, 1:] + 0.5) * voxel_size
    labels = np.where(xyz[:, 2] < -1.5, 0, np.where(np.abs(xyz[:, 1]) > 8.5, 1, 2))
    return v, jnp.asarray(labels, jnp.int32)


def cross_entropy(logits, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1).mean()


def make_step(model: MinkUNet, use_optax: bool, lr: float):
    """``(step, state)``: ``step(model, state, feats, maps, labels) -> loss``, jitted, updating in place."""
    if use_optax:
        import optax
        opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

        @nnx.jit
        def step(model, opt, feats, maps, labels):
            loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(feats, maps), labels))(model)
            opt.update(model, grads)
            return loss
        return step, opt

    @nnx.jit
    def sgd_step(model, _, feats, maps, labels):
        loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(feats, maps), labels))(model)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads))
        return loss
    return sgd_step, None


def main(argv=None) -> float:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--crop", type=float, default=4.0, help="keep points with |x| below this, |y| below 2.5x (m)")
    ap.add_argument("--sgd", action="store_true", help="plain SGD even when optax is installed")
    args = ap.parse_args(argv)

    v, labels = scene(args.crop)
    model = MinkUNet(4, 3, widths=SMALL, blocks=1, rngs=nnx.Rngs(0))
    maps = model.kernel_maps(v)  # outside jit: every level's maps and batch column, once per scene
    try:
        use_optax = not args.sgd and bool(__import__("optax"))
    except ImportError:
        use_optax = False
    step, state = make_step(model, use_optax, 1e-2 if use_optax else 0.1)

    losses = []
    for i in range(args.steps):
        losses.append(float(step(model, state, v.feats, maps, labels)))
        if i % 5 == 0 or i == args.steps - 1:
            print(f"step {i:3d}  loss {losses[-1]:.4f}  ({v.num_voxels:,} voxels, "
                  f"{'adam' if use_optax else 'sgd'}, backend {jax.default_backend()})")
    model.eval()
    acc = float((jnp.argmax(nnx.jit(lambda m, f, maps: m(f, maps))(model, v.feats, maps), 1) == labels).mean())
    print(f"accuracy with running statistics: {acc:.3f}")
    return losses[-1] / losses[0]


if __name__ == "__main__":
    main()
