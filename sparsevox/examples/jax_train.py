"""Train a small two-layer sparse network with JAX: kernel maps outside jit, the step inside.

    python -m sparsevox.examples.jax_train [--steps 20]

The pattern: voxelise, build each layer's kernel map once (outside ``jit``: maps decide shapes), then
pass the maps into the jitted train step as pytrees. Uses optax when it is installed, else plain SGD.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import sparsevox as sv
from sparsevox.adapters import jax as svj
from sparsevox.synthetic import lidar_like_points


def main(argv=None) -> float:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--crop", type=float, default=6.0, help="keep points with |x|, |y| below this (metres)")
    args = ap.parse_args(argv)

    pts = lidar_like_points(seed=0)
    pts = pts[(np.abs(pts[:, 0]) < args.crop) & (np.abs(pts[:, 1]) < args.crop)]
    v = sv.Voxels.from_points(jnp.asarray(pts), 0.1)  # features: mean intensity per voxel
    target = jnp.asarray(np.asarray(v.coords)[:, 3:4] > np.median(np.asarray(v.coords)[:, 3]), jnp.float32)

    conv1 = svj.SpatiallySparseConv(1, 16, kernel_size=3)
    conv2 = svj.SpatiallySparseConv(16, 1, kernel_size=3)
    kmap = conv1.kernel_map(v)  # both layers are submanifold k3: one map serves both
    params = {"c1": conv1.init(jax.random.PRNGKey(0)), "c2": conv2.init(jax.random.PRNGKey(1))}

    def loss_fn(params, feats, kmap):
        h = jax.nn.relu(conv1.apply(params["c1"], feats, kmap))
        logits = conv2.apply(params["c2"], h, kmap)
        return jnp.mean(jnp.logaddexp(0.0, logits) - target * logits)  # binary cross-entropy

    try:
        import optax
        opt = optax.adam(1e-2)
        opt_state = opt.init(params)

        @jax.jit
        def step(params, opt_state, feats, kmap):
            loss, grads = jax.value_and_grad(loss_fn)(params, feats, kmap)
            updates, opt_state = opt.update(grads, opt_state)
            return optax.apply_updates(params, updates), opt_state, loss
    except ImportError:
        opt_state = None

        @jax.jit
        def step(params, opt_state, feats, kmap):
            loss, grads = jax.value_and_grad(loss_fn)(params, feats, kmap)
            return jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, grads), opt_state, loss

    losses = []
    for i in range(args.steps):
        params, opt_state, loss = step(params, opt_state, v.feats, kmap)
        losses.append(float(loss))
        if i % 5 == 0 or i == args.steps - 1:
            print(f"step {i:3d}  loss {losses[-1]:.4f}  ({v.num_voxels:,} voxels, backend {jax.default_backend()})")
    return losses[-1] / losses[0]


if __name__ == "__main__":
    main()
