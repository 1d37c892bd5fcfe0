"""GPU map build on SemanticKITTI (else the built-in scan), SubM k3, for the probe and compact tile size this
process was started with (``SPARSEVOX_KMAP_ITEMS``): builder wall µs per call (back to back), the GPU time
of each kernel, the whole build's device time with the host hidden (the stream held by a sleeping kernel
while the build queues), and the event time of one build (host and device, as the layer benchmark
times it). ``for i in 1 2 4 8; do SPARSEVOX_KMAP_ITEMS=$i python -m benchmarks.probes.map_build_sweep; done``
prints one JSON line each."""
from __future__ import annotations

import json
import time

import numpy as np


def kernel_times(build, n: int) -> dict:
    """Median GPU µs of each kernel the GPU map builder launches, over ``n`` calls of ``build()``
    (CUDA events around every launch of the builder's device object)."""
    import cupy

    from sparsevox.cuda import gpu_kernel_map as gkm
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


def build_device_us(build, hide_host: bool, n: int = 30) -> float:
    """Median µs between CUDA events around one ``build()``; with ``hide_host`` a sleeping kernel holds
    the stream while the build queues, so the figure is the device time of its memsets, kernels and copy."""
    import cupy
    import torch  # its sleeping kernel, on the legacy default stream the CuPy build also runs on
    got = []
    for _ in range(n):
        s, e = cupy.cuda.Event(), cupy.cuda.Event()
        if hide_host:
            torch.cuda._sleep(2_000_000)  # ~1 ms
        s.record()
        build()
        e.record()
        e.synchronize()
        got.append(cupy.cuda.get_elapsed_time(s, e) * 1e3)
    return float(np.median(got))


def main() -> int:
    import cupy

    from benchmarks import scenes
    from sparsevox.cuda import gpu_kernel_map as gkm
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
                      "kernel_us": per, "device_us": round(build_device_us(build, True), 1),
                      "event_us": round(build_device_us(build, False), 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
