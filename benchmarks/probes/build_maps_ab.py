"""A/B of ``MinkUNet.build_maps``' order in one process (issue 19, memory): the current one (every map
queued, then all taken) against the one tried at ea920b6 (each level's submanifold maps taken before the
next level's are queued, so that at most one level's upper-bound pair buffers are alive), alternating, on
fresh scans: median step ms and peak allocated MiB per variant (``SPARSEVOX_TORCH_ALLOCATOR=1`` so the maps
count). Measured at 4fc84c9 (H200, SemanticKITTI): no lower peak (459.4 vs 458.9 MiB float16 inference,
711.8 vs 710.8 float32) and 0.3-1 ms slower, so ea920b6 was reverted: the step's peak is not in the map
build.

Usage on the GPU machine: ``python -m benchmarks.probes.build_maps_ab [--scene semantickitti] [--modes
fp16_infer fp32_infer] [--rounds 2] [--steps 8]``; prints a table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import sparsevox as sv


def level_by_level(self, voxels) -> list:
    """``MinkUNet.build_maps`` as ea920b6 had it: a level's submanifold maps queued before the next
    level's sites (whose output-size read waits for the device) and taken right after them."""
    levels, geometries = [voxels], self._subm_geometries()
    for i, stage in enumerate(self.encoder):
        subm = [sv.kernel_map(levels[i], ks, 1, dl) for ks, dl in geometries[i]]
        down = stage.down[0]
        levels.append(sv.strided_output_voxels(levels[i], down.kernel_size, down.stride, down.dilation))
        for kmap in subm:
            kmap.wait()
    maps = [sv.kernel_map(v, *self._level_down(i)) for i, v in enumerate(levels[:-1])]
    maps += [sv.kernel_map(levels[-1], ks, 1, dl) for ks, dl in geometries[-1]]
    for kmap in maps:
        kmap.wait()
    return levels


def main(argv=None) -> int:
    import torch

    from benchmarks import end_to_end as e2e
    from sparsevox.adapters.torch import MinkUNet
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scene", default="semantickitti", choices=list(e2e.SCENES))
    ap.add_argument("--modes", nargs="+", default=["fp16_infer", "fp32_infer"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("build_maps_ab: no GPU", file=sys.stderr)
        return 2
    libs, labels, model = e2e.sparsevox_scene_model(a.scene)
    variants = {"level by level (ea920b6)": level_by_level, "all queued, then taken": MinkUNet.build_maps}
    rows = {}
    for mode in a.modes:
        step, _, cleanup = e2e.make_step("sparsevox", model, mode, libs, labels, "cuda")
        try:
            for _ in range(3):
                step()
            for _ in range(a.rounds):
                for name, fn in variants.items():
                    MinkUNet.build_maps = fn
                    step()
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    times = []
                    for _ in range(a.steps):
                        t0 = time.perf_counter()
                        step()
                        torch.cuda.synchronize()
                        times.append((time.perf_counter() - t0) * 1e3)
                    r = rows.setdefault((mode, name), {"ms": [], "peak": []})
                    r["ms"].append(statistics.median(times))
                    r["peak"].append(torch.cuda.max_memory_allocated() / 2 ** 20)
        finally:
            MinkUNet.build_maps = variants["all queued, then taken"]
            cleanup()
    print(f"| mode | build_maps | median step ms per round | peak MiB per round |\n|---|---|---|---|")
    for (mode, name), r in rows.items():
        print(f"| {mode} | {name} | {', '.join(f'{v:.2f}' for v in r['ms'])} | "
              f"{', '.join(f'{v:.1f}' for v in r['peak'])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
