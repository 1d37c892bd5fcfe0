"""A/B of the forward's 16-row fragment skip (``SVX_IGEMM_FRAG_SKIP``): device time of the float16 SubM
forward per scene, C and tile, compiled with and without it, each checked against the other's output.

``python -m benchmarks.frag_skip_ab [--scenes semantickitti lidar_synth] [--out DIR --stem S]``. Each
setting runs in its own process (``SPARSEVOX_IGEMM_FRAG_SKIP`` is read at import); device time is a CUDA
graph of one forward replayed (``benchmarks.implicit_dev.gpu_ms``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

TILES = {32: [(64, 32), (128, 32)], 64: [(64, 64), (128, 64)], 128: [(128, 128), (64, 128)],
         256: [(128, 128), (64, 128), (256, 128)]}


def child(scenes_names, out_path):
    import cupy
    import numpy as np

    import sparsevox as sv
    from benchmarks import scenes
    from benchmarks.implicit_dev import gpu_ms
    from sparsevox import implicit_gemm as ig
    rows = []
    for scene in scenes.load_scenes(scenes_names):
        kmap = sv.kernel_map(sv.Voxels(cupy.asarray(scene.coords), None), 3)
        rng = np.random.default_rng(0)
        for c, tiles in TILES.items():
            x = cupy.asarray(rng.standard_normal((scene.n_voxels, c), dtype=np.float32) * 0.5).astype("float16")
            w = cupy.asarray(rng.standard_normal((27, c, c), dtype=np.float32) / np.sqrt(27 * c)).astype("float16")
            for bm, bn in tiles:
                out = ig.forward(x, w, kmap, bm, bn)
                us = gpu_ms(lambda: ig.forward(x, w, kmap, bm, bn), reps=30) * 1e3
                rows.append({"scene": scene.name, "c": c, "tile": [bm, bn], "us": us,
                             "checksum": float(cupy.abs(out.astype(cupy.float32)).sum())})
                print(json.dumps(rows[-1]), flush=True)
            np.save(f"{out_path}.{scene.name}.{c}.npy", cupy.asnumpy(out))  # last tile's output
    Path(out_path).write_text(json.dumps(rows))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenes", nargs="+", default=["semantickitti", "lidar_synth"])
    ap.add_argument("--out", default="/tmp")
    ap.add_argument("--stem", default="frag_skip_ab")
    ap.add_argument("--child", default=None)
    a = ap.parse_args(argv)
    if a.child:
        return child(a.scenes, a.child)
    import numpy as np
    res = {}
    for skip in ("0", "1"):
        path = f"/tmp/frag_skip_{skip}.json"
        env = dict(os.environ, SPARSEVOX_IGEMM_FRAG_SKIP=skip)
        subprocess.run([sys.executable, "-m", "benchmarks.frag_skip_ab", "--child", path, "--scenes", *a.scenes],
                       env=env, check=True)
        res[skip] = {(r["scene"], r["c"], tuple(r["tile"])): r for r in json.loads(Path(path).read_text())}
    lines = []
    for key, off in res["0"].items():
        on = res["1"].get(key)
        if on is None:
            continue
        lines.append(f"{key[0]} C={key[1]} tile {key[2]}: {off['us']:.1f} -> {on['us']:.1f} us "
                     f"({on['us'] / off['us']:.3f}); checksum {off['checksum']:.6g} vs {on['checksum']:.6g}")
    for scene in a.scenes:
        for c in TILES:
            f0, f1 = (Path(f"/tmp/frag_skip_{s}.json.{scene}.{c}.npy") for s in ("0", "1"))
            if f0.exists() and f1.exists():
                same = np.array_equal(np.load(f0), np.load(f1))
                lines.append(f"{scene} C={c}: outputs bitwise equal with and without the skip: {same}")
    text = "\n".join(lines)
    print(text)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / f"{a.stem}-frag_skip_ab.log").write_text(text + "\n")


if __name__ == "__main__":
    main()
