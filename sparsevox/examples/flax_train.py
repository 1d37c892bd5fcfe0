"""Train a small Flax NNX MinkUNet for per-voxel segmentation: kernel maps outside jit, the step inside.

    python -m sparsevox.examples.flax_train [--steps 20] [--sgd] [--new-scans]

The pattern: voxelise, build every map the network needs once per scene (``model.kernel_maps(voxels)``,
outside ``jit``: maps decide shapes), then pass the maps into the ``nnx.jit``-ed train step as a pytree.
Uses optax's Adam when it is installed (and ``--sgd`` is not given), else plain SGD on the params.
``--new-scans``: a different crop every step, as training on a dataset does; the maps are then bucketed
(``kernel_maps(voxels, bucket=True)``: features padded to the bucket, the loss masked), so the step
compiles once per bucket instead of once per scan; the number of compilations is printed.
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


def cross_entropy(logits, labels, mask=None):
    """Mean cross-entropy over the rows, or over the rows where ``mask`` is True (bucketed maps' padding)."""
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
    return ce.mean() if mask is None else jnp.where(mask, ce, 0).sum() / mask.sum()


def _loss(m, feats, maps, labels):
    return cross_entropy(m(feats, maps), labels, maps[0].mask() if maps[0].valid is not None else None)


TRACES = [0]  # compilations of the train step in this process


def make_step(model: MinkUNet, use_optax: bool, lr: float):
    """``(step, state)``: ``step(model, state, feats, maps, labels) -> loss``, jitted, updating in place."""
    if use_optax:
        import optax
        opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

        @nnx.jit
        def step(model, opt, feats, maps, labels):
            TRACES[0] += 1  # once per compilation
            loss, grads = nnx.value_and_grad(lambda m: _loss(m, feats, maps, labels))(model)
            opt.update(model, grads)
            return loss
        return step, opt

    @nnx.jit
    def sgd_step(model, _, feats, maps, labels):
        TRACES[0] += 1
        loss, grads = nnx.value_and_grad(lambda m: _loss(m, feats, maps, labels))(model)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads))
        return loss
    return sgd_step, None


def main(argv=None) -> float:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--crop", type=float, default=4.0, help="keep points with |x| below this, |y| below 2.5x (m)")
    ap.add_argument("--sgd", action="store_true", help="plain SGD even when optax is installed")
    ap.add_argument("--new-scans", action="store_true",
                    help="a different crop every step, with bucketed maps (one compilation per bucket)")
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
    compiled = TRACES[0]
    for i in range(args.steps):
        if args.new_scans:  # a new scan: bucketed maps, features and labels padded to the bucket
            v, labels = scene(args.crop * (1.0 + 0.01 * (i % 7)))
            maps = model.kernel_maps(v, bucket=True)
            losses.append(float(step(model, state, maps[0].pad(v.feats), maps, maps[0].pad(labels))))
        else:
            losses.append(float(step(model, state, v.feats, maps, labels)))
        if i % 5 == 0 or i == args.steps - 1:
            print(f"step {i:3d}  loss {losses[-1]:.4f}  ({v.num_voxels:,} voxels, "
                  f"{'adam' if use_optax else 'sgd'}, backend {jax.default_backend()})")
    if args.new_scans:
        print(f"{args.steps} scans, {TRACES[0] - compiled} compilations of the train step (bucketed maps)")
        maps = model.kernel_maps(v)
    model.eval()
    acc = float((jnp.argmax(nnx.jit(lambda m, f, maps: m(f, maps))(model, v.feats, maps), 1) == labels).mean())
    print(f"accuracy with running statistics: {acc:.3f}")
    return losses[-1] / losses[0]


if __name__ == "__main__":
    main()
