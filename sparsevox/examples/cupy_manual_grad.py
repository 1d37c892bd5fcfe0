"""NumPy/CuPy scripting with hand-written gradients: ``conv_forward`` and ``conv_backward``.

    python -m sparsevox.examples.cupy_manual_grad   # CuPy on the GPU when one is usable, else NumPy

Fits the weight of one submanifold layer to a target layer's output by gradient descent.
"""
from __future__ import annotations

import numpy as np

import sparsevox as sv
from sparsevox.cuda.gpu_info import gpu_available
from sparsevox.synthetic import lidar_like_points


def main(steps: int = 30) -> float:
    xp = np
    if gpu_available()[0]:
        import cupy as xp
    pts = lidar_like_points(seed=1)
    pts = pts[(np.abs(pts[:, 0]) < 5) & (np.abs(pts[:, 1]) < 5)]
    v = sv.Voxels.from_points(xp.asarray(pts), 0.1)
    kmap = sv.kernel_map(v, kernel_size=3)
    rng = np.random.default_rng(0)
    feats = xp.asarray(rng.standard_normal((v.num_voxels, 8)).astype(np.float32))
    w_true = xp.asarray(rng.standard_normal((27, 8, 4)).astype(np.float32) / 8)
    target = sv.conv_forward(feats, w_true, kmap)
    w = xp.zeros_like(w_true)
    first = None
    for i in range(steps):
        out = sv.conv_forward(feats, w, kmap)
        resid = out - target
        loss = float((resid ** 2).mean())
        first = first or loss
        _, grad_w = sv.conv_backward(2 * resid / resid.size, feats, w, kmap, feats_grad=False)
        w -= 2.0 * grad_w  # below 2/λ_max of this quadratic (4.0 diverges)
        if i % 10 == 0 or i == steps - 1:
            print(f"step {i:3d}  loss {loss:.6f}  ({xp.__name__}, {v.num_voxels:,} voxels)")
    return loss / first


if __name__ == "__main__":
    main()
