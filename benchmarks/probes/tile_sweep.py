"""Forward tile sweep for small channel counts (issue 4, the smallest layer): device time of the SubM k3
forward per CTA tile, warp tile and pipeline depth, each checked against the default tile's output.

``python -m benchmarks.probes.tile_sweep [--scenes lidar_synth semantickitti] [--c 32 64] [--out DIR --stem S]``.
Device time is a CUDA graph of one forward replayed (``benchmarks.probes.implicit_dev.gpu_ms``), so the host is
not in it. Variants are ``(BM, BN, WM, WN, STAGES[, BK])``; the tables in ``sparsevox.algorithms.implicit_gemm`` are not
changed by this script.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

VARIANTS = [  # (BM, BN, WM, WN, STAGES) for BN = 32
    (64, 32, 32, 16, 4), (64, 32, 32, 16, 3), (64, 32, 32, 16, 2), (64, 32, 16, 32, 4), (64, 32, 32, 32, 4),
    (64, 32, 16, 16, 4), (64, 32, 16, 16, 2), (64, 32, 64, 32, 3),
    (32, 32, 16, 16, 4), (32, 32, 16, 16, 2), (32, 32, 32, 16, 4), (32, 32, 32, 32, 4), (32, 32, 32, 32, 2),
    (16, 32, 16, 16, 4), (16, 32, 16, 32, 4), (16, 32, 16, 32, 2),
    (128, 32, 32, 32, 3), (128, 32, 32, 16, 3), (128, 32, 64, 32, 2), (128, 32, 16, 32, 2),
]
BIG = [  # (BM, BN, WM, WN, STAGES, BK) for C >= 128 (BN <= C)
    (128, 128, 64, 32, 3, 32), (128, 128, 64, 32, 4, 32), (128, 128, 64, 32, 3, 64), (128, 128, 64, 32, 2, 64),
    (128, 128, 64, 64, 3, 32), (128, 128, 64, 64, 4, 32), (128, 128, 64, 64, 3, 64), (128, 128, 32, 64, 3, 32),
    (64, 128, 32, 64, 4, 32), (64, 128, 32, 64, 3, 64), (64, 128, 32, 32, 4, 32), (64, 128, 32, 32, 3, 64),
    (256, 128, 64, 64, 3, 32), (256, 128, 64, 64, 4, 32), (256, 128, 64, 32, 3, 32),
    (128, 256, 64, 64, 3, 32), (128, 256, 64, 64, 4, 32), (128, 256, 64, 64, 2, 64),
    (64, 256, 32, 64, 3, 32), (64, 256, 32, 64, 3, 64), (64, 64, 32, 32, 4, 64), (128, 64, 64, 32, 3, 64),
]


def _variants(c):
    """``(BM, BN, WM, WN, STAGES[, BK])`` tiles to time at ``C = c``."""
    if c >= 128:
        return [v for v in BIG if v[1] <= c]
    if c == 32:
        return list(VARIANTS)
    return [(bm, 64, wm, wn * 2, st) for bm, _, wm, wn, st in VARIANTS]  # BN = 64: twice the warp tile's N


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenes", nargs="+", default=["lidar_synth", "semantickitti"])
    ap.add_argument("--c", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--out", default=None)
    ap.add_argument("--stem", default="tile_sweep")
    ap.add_argument("--budget-s", type=float, default=300, help="stop starting variants after this long")
    a = ap.parse_args(argv)

    import cupy
    import numpy as np

    import sparsevox as sv
    from benchmarks import scenes
    from benchmarks.probes.implicit_dev import gpu_ms
    from sparsevox.algorithms import implicit_gemm as ig

    rows = []
    t0 = time.time()
    for scene in scenes.load_scenes(a.scenes):
        coords = cupy.asarray(scene.coords)
        kmap = sv.kernel_map(sv.Voxels(coords, None), 3)
        rng = np.random.default_rng(0)
        for c in a.c:
            x = cupy.asarray(rng.standard_normal((scene.n_voxels, c), dtype=np.float32) * 0.5).astype(a.dtype)
            w = cupy.asarray(rng.standard_normal((27, c, c), dtype=np.float32) / np.sqrt(27 * c)).astype(a.dtype)
            ref = ig.forward(x, w, kmap).astype(cupy.float32)
            scale = float(cupy.abs(ref).max()) or 1.0
            base = gpu_ms(lambda: ig.forward(x, w, kmap), reps=50)
            print(f"{scene.name} C={c} default tile: {base * 1e3:.1f} us", flush=True)
            for bm, bn, *variant in _variants(c):
                if time.time() - t0 > a.budget_s:
                    print("budget spent: skipping the rest", flush=True)
                    break
                rec = {"scene": scene.name, "c": c, "tile": [bm, bn, *variant]}
                try:
                    def fn():
                        return ig.forward(x, w, kmap, bm, bn, variant=tuple(variant))
                    err = float(cupy.abs(fn().astype(cupy.float32) - ref).max()) / scale
                    rec["rel_err"] = err
                    rec["us"] = gpu_ms(fn, reps=50) * 1e3 if err < 1e-2 else None
                except Exception as e:  # noqa: BLE001 - a variant that does not build is reported
                    rec["error"] = f"{type(e).__name__}: {e}"[:160]
                rows.append(rec)
                print(json.dumps(rec), flush=True)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / f"{a.stem}-tile_sweep.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
