"""Host cost of ``sparsevox.compat.spconv`` over native sparsevox, on the CPU (issue 21: compat ≤ 5 % over
native end to end; on the GPU the float16 steps are host-bound, so host time per step is what compat adds).

    python -m benchmarks.probes.compat_host [--steps N] [--profile] [--train]

The MinkUNet of the end-to-end benchmark on a patch of the ``tiny`` scene's points (|x|, |y| < ``--extent``,
~100 voxels, every level ``--width`` channels: the NumPy backend's arithmetic is small beside the Python
around it), native and spconv-API with the same weights, a fresh input every step, median ms per step over
``--steps`` after 5 warm-ups, interleaved in 4 rounds; ``--profile``: the top functions of each under
cProfile (by own time), to see what compat adds.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--train", action="store_true", help="training steps (backward, SGD) instead of inference")
    ap.add_argument("--extent", type=float, default=5.0, help="keep points with |x|, |y| below this (m)")
    ap.add_argument("--voxel", type=float, default=1.0, help="voxel size (m)")
    ap.add_argument("--width", type=int, default=4, help="every level's channels (small: host time dominates)")
    ap.add_argument("--plan", action="store_true", help="compat under plan_maps")
    args = ap.parse_args(argv)

    import torch

    import sparsevox.compat.spconv as compat
    from benchmarks import end_to_end as e2e
    from benchmarks import spconv_minkunet as spm
    from sparsevox.adapters.torch import MinkUNet, plan_maps
    from sparsevox.synthetic import lidar_like_points

    pts = lidar_like_points(seed=0, n_points=12_000)
    pts = pts[np.abs(pts[:, :2]).max(axis=1) < args.extent]
    xyz, feats, index = e2e.batch_points(pts, 2)
    vox = e2e.Voxeliser(xyz, feats, index, args.voxel, "cpu")
    widths = [args.width] * 9
    libs = e2e.Libraries(None, vox, widths, compat)
    coords0, feats0 = vox()
    labels = torch.randint(0, e2e.NUM_CLASSES, (len(coords0),))
    native = MinkUNet(vox.channels, e2e.NUM_CLASSES, widths=widths)
    e2e.calibrate_batchnorm(native, libs.make_input("sparsevox", coords0, feats0))
    model = libs.build_compat()
    spm.load_from_sparsevox(model, native)
    if args.plan:
        model = plan_maps(model)
    mode = "fp32_train" if args.train else "fp32_infer"
    steps = {lib: e2e.make_step(lib, m, mode, libs, labels, "cpu")[0]
             for lib, m in (("sparsevox", native), ("compat", model))}
    for step in steps.values():
        for _ in range(5):
            step()
    times = {lib: [] for lib in steps}
    for _ in range(4):
        for lib, step in steps.items():
            for _ in range(max(1, args.steps // 4)):
                t0 = time.perf_counter()
                step()
                times[lib].append(time.perf_counter() - t0)
    med = {lib: 1e3 * statistics.median(t) for lib, t in times.items()}
    print(f"{mode}, {len(coords0)} voxels, CPU: native {med['sparsevox']:.2f} ms, "
          f"compat {med['compat']:.2f} ms, compat - native {med['compat'] - med['sparsevox']:+.2f} ms per step")
    if args.profile:
        for lib, step in steps.items():
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(20):
                step()
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
            print(f"==== {lib} (20 steps)\n{out.getvalue()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
