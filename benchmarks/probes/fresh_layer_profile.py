"""Where a fresh scan's first SubM layer spends its host time (SemanticKITTI, else the built-in scan):
C=32 float16 forward through the torch adapter on new unvalidated ``Voxels`` each call, so the map is
built and first used inside the call. Prints the wall µs per call, then cProfile's top functions by
cumulative and by own time. ``python -m benchmarks.probes.fresh_layer_profile [--algo implicit_gemm] [-n 30]``."""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import time

# (module, attribute) of the functions whose inclusive wall time ``phases`` reports
PHASES = [("sparsevox", "kernel_map"), ("sparsevox.adapters.torch", "kernel_map_tensors"),
          ("sparsevox.kernel_map", "KernelMap.wait"), ("sparsevox.conv", "plan"),
          ("sparsevox.conv", "remember_prepared"), ("sparsevox.algorithms.implicit_gemm", "slot_table"),
          ("sparsevox.algorithms.implicit_gemm", "tile_masks"),
          ("sparsevox.algorithms.implicit_gemm", "_prepare_gather_gemm"),
          ("cupy", "empty"), ("cupy", "argsort"), ("torch", "from_dlpack")]


def phases(fn, n: int) -> dict:
    """Inclusive wall µs per call of ``fn`` spent in each of :data:`PHASES` (nested phases overlap),
    the calls synchronised one by one."""
    import importlib

    import torch

    from benchmarks.timing import timed_attrs
    targets = []
    for mod_name, attr in PHASES:
        owner = importlib.import_module(mod_name)
        *path, name = attr.split(".")
        for p in path:
            owner = getattr(owner, p)
        targets.append((owner, name, attr))
    with timed_attrs(targets) as spent:
        fn()
        torch.cuda.synchronize()
        spent.clear()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
    out = {"call_synced": total / n * 1e6}
    out.update({k: round(v / n * 1e6, 1) for k, v in spent.items()})
    return out


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
    print("inclusive host µs per call:", json.dumps(phases(fn, args.n)))
    gc.disable()
    try:
        print(f"with the cyclic GC off: {wall_ms(fn, torch.cuda.synchronize) * 1e3:.1f} µs per call")
    finally:
        gc.enable()
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
