"""One launch of each IMPLICIT_GEMM forward worth profiling, for ``ncu -k regex:igemm``: float16 LiDAR-like
scan, C=32 (64x32 tile, sorted and unsorted slots) and C=256 (64x128 tile)."""
import cupy
import numpy as np

import sparsevox as sv
from sparsevox.algorithms import implicit_gemm as ig
from sparsevox.synthetic import lidar_like_points

v = sv.Voxels.from_points(cupy.asarray(lidar_like_points(seed=0)[:, :3]), 0.05)
kmap = sv.kernel_map(v, 3)
runs = []
for c, p in [(32, dict(fwd_block_size=64, gemm_block_size=32)),
             (32, dict(fwd_block_size=64, gemm_block_size=32, sort_rows=False)),
             (256, dict(fwd_block_size=64, gemm_block_size=128))]:
    x = cupy.random.standard_normal((kmap.num_out, c), dtype=cupy.float32).astype("float16")
    w = (cupy.random.standard_normal((27, c, c), dtype=cupy.float32) / np.sqrt(27 * c)).astype("float16")
    ig.slot_table(kmap, False, p.get("sort_rows", True))
    ig.tile_masks(kmap, False, p["fwd_block_size"], p.get("sort_rows", True))
    runs.append((x, w, p))
cupy.cuda.Device().synchronize()
for x, w, p in runs:  # compile happens inside the first call (no launch of other igemm kernels)
    ig.forward(x, w, kmap, **p)
cupy.cuda.Device().synchronize()
print("profiled", [r[2] for r in runs])
