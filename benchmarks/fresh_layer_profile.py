"""Where a fresh scan's first SubM layer spends its host time (SemanticKITTI, else the built-in scan):
C=32 float16 forward through the torch adapter on new unvalidated ``Voxels`` each call, so the map is
built and first used inside the call. Prints the wall µs per call, then cProfile's top functions by
cumulative and by own time. ``python -m benchmarks.fresh_layer_profile [--algo implicit_gemm] [-n 30]``."""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats


def main(argv=None) -> int:
    import torch

    from benchmarks import scenes
    from benchmarks.runners import Geometry, Layers
    from benchmarks.timing import wall_ms
    ap = argparse.ArgumentParser()
    ap.add_argument("--algo", default="implicit_gemm")
    ap.add_argument("-n", type=int, default=30)
    args = ap.parse_args(argv)
    scene = (scenes.load_scenes(["semantickitti"]) or scenes.load_scenes(["lidar_synth"]))[0]
    lay = Layers(Geometry(scene.coords, "gpu", "torch"), 32, "float16")
    fn = lay.subm_fresh(args.algo)
    print(f"{scene.name} fresh first layer ({args.algo}): {wall_ms(fn, torch.cuda.synchronize) * 1e3:.1f} µs per call")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.n):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    for order in ("cumulative", "tottime"):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(order).print_stats(28)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
