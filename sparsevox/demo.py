"""The demo: a built-in LiDAR-like scan through a small sparse encoder-decoder, forward and backward.

Runs on the best backend present: the GPU through CuPy when one is usable, else the NumPy reference.
It uses the core functions directly (``conv_forward``/``conv_backward``), which is also the pattern for
NumPy/CuPy users who differentiate by hand.
"""
from __future__ import annotations

import argparse
import logging
import time

import numpy as np

import sparsevox as sv
from sparsevox import conv
from sparsevox.cuda.gpu_info import gpu_available
from sparsevox.synthetic import lidar_like_points

# (name, C_in, C_out, kernel_size, stride, transposed)
LAYERS = [
    ("subm1", None, 16, 3, 1, False),
    ("down1", 16, 32, 2, 2, False),
    ("subm2", 32, 32, 3, 1, False),
    ("down2", 32, 64, 2, 2, False),
    ("subm3", 64, 64, 3, 1, False),
    ("up2", 64, 32, 2, 2, True),
    ("up1", 32, 16, 2, 2, True),
]


def _sync(xp):
    if xp.__name__ == "cupy":
        xp.cuda.get_current_stream().synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparsevox demo", description=__doc__)
    ap.add_argument("--cpu", action="store_true", help="use the NumPy backend even when a GPU is usable")
    ap.add_argument("--voxel-size", type=float, default=0.05, help="metres (default 0.05)")
    ap.add_argument("--dtype", default="float32", choices=["float16", "float32", "float64"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    ok, reason = gpu_available()
    use_gpu = ok and not args.cpu
    if use_gpu:
        import cupy as xp
        backend = f"GPU ({sv.cuda.gpu_info.device_name(xp.cuda.Device().id)}, CuPy)"
    else:
        xp = np
        backend = "CPU (NumPy reference)" + ("" if args.cpu else f" — {reason}")
    print(f"sparsevox {sv.__version__} demo on {backend}")

    points = lidar_like_points(seed=0)
    t = time.perf_counter()
    fine = sv.Voxels.from_points(xp.asarray(points), args.voxel_size)
    print(f"scan: {len(points):,} points → {fine.num_voxels:,} voxels at {args.voxel_size * 100:g} cm "
          f"({(time.perf_counter() - t) * 1e3:.1f} ms)")

    rng = np.random.default_rng(0)
    dtype = np.dtype(args.dtype)
    feats = fine.feats.astype(dtype)
    levels = {1: fine}
    v, level, saved = fine, 1, []
    print(f"{'layer':6} {'voxels in→out':>20} {'C':>9} {'pairs':>10} {'fwd algo':>14} {'fwd ms':>8} {'bwd ms':>8}")
    for name, c_in, c_out, ks, stride, transposed in LAYERS:
        c_in = feats.shape[1] if c_in is None else c_in
        w = xp.asarray((rng.standard_normal((ks ** 3, c_in, c_out)) / np.sqrt(c_in * ks ** 3)).astype(dtype))
        out_v = levels[level // 2] if transposed else None
        t = time.perf_counter()
        kmap = sv.kernel_map(v, ks, stride, 1, transposed, False, out_v)
        _sync(xp)
        t_map = time.perf_counter() - t
        t = time.perf_counter()
        out = sv.conv_forward(feats, w, kmap)
        _sync(xp)
        t_fwd = time.perf_counter() - t
        t = time.perf_counter()
        sv.conv_backward(xp.ones_like(out), feats, w, kmap)
        _sync(xp)
        t_bwd = time.perf_counter() - t
        algo = conv.last_plans[("conv", "fwd")][0]
        print(f"{name:6} {kmap.num_in:>9,} → {kmap.num_out:>8,} {c_in:>4}→{c_out:<4} {kmap.num_pairs:>10,} "
              f"{str(algo):>14} {t_fwd * 1e3:8.1f} {t_bwd * 1e3:8.1f}   (map {t_map * 1e3:.1f} ms)")
        saved.append(name)
        if transposed:
            level //= 2
            v = out_v
        elif stride > 1:
            level *= 2
            v = sv.Voxels.from_core_coords(kmap.out_coords, None, fine.origin)
            levels[level] = v
        feats = xp.maximum(out, 0)  # ReLU
    print(f"output: {feats.shape[0]:,} voxels × {feats.shape[1]} channels, "
          f"mean activation {float(feats.astype(np.float32).mean()):.4f}")
    return 0
