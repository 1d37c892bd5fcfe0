"""GPU map build on SemanticKITTI (else the built-in scan), SubM k3: builder wall µs per call and the GPU
time of each kernel, for the query_compact tile size this process was started with
(``SPARSEVOX_KMAP_ITEMS``). ``for i in 1 2 4 8; do SPARSEVOX_KMAP_ITEMS=$i python -m benchmarks.map_build_sweep; done``
prints one JSON line each."""
from __future__ import annotations

import json
import time

import numpy as np


def kernel_times(build, n: int) -> dict:
    """Median GPU µs of each kernel the GPU map builder launches, over ``n`` calls of ``build()``
    (CUDA events around every launch of the builder's device object)."""
    import cupy

    from sparsevox import gpu_kernel_map as gkm
    dev = gkm._cupy_device()
    plain, pending = dev.launch, []

    def timed(name, grid, block, args):
        s, e = cupy.cuda.Event(), cupy.cuda.Event()
        s.record()
        plain(name, grid, block, args)
        e.record()
        pending.append((name, s, e))
    dev.launch = timed
    try:
        for _ in range(n):
            build()
        cupy.cuda.Device().synchronize()
    finally:
        dev.launch = plain
    per: dict = {}
    for name, s, e in pending:
        per.setdefault(name, []).append(cupy.cuda.get_elapsed_time(s, e) * 1e3)
    return {k: round(float(np.median(v)), 1) for k, v in per.items()}


def main() -> int:
    import cupy

    from benchmarks import scenes
    from sparsevox import gpu_kernel_map as gkm
    scene = (scenes.load_scenes(["semantickitti"]) or scenes.load_scenes(["lidar_synth"]))[0]
    coords = cupy.asarray(np.asarray(scene.coords))
    build = lambda: gkm.build_kernel_map(coords, None, 3, 1, 1, False, False)  # noqa: E731
    for _ in range(5):
        build()
    cupy.cuda.Device().synchronize()
    t = time.perf_counter()
    for _ in range(200):
        build()
    cupy.cuda.Device().synchronize()
    wall = (time.perf_counter() - t) / 200 * 1e6
    per = kernel_times(build, 50)
    print(json.dumps({"scene": scene.name, "items": gkm.ITEMS, "builder_us": round(wall, 1),
                      "kernel_us": per}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
