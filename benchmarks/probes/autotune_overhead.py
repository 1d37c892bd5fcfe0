"""What the autotuner costs: first-call tuning time per layer, and the per-call overhead of a cached choice.

For each SubM k3 layer of the built-in LiDAR-like scan (5 cm) × C × dtype, in a fresh temporary cache:

- ``autotune_first_call`` records, per direction (fwd, dgrad, wgrad): ``first_call_ms``, the first call
  through ``conv_forward``/``conv_backward`` with ``auto`` (kernel compilation + checking + timing every
  candidate + the call itself), and ``tune_ms``, the same again after the in-memory cache is forgotten
  (kernels already compiled: the tuning alone, as a second process with a cold cache file would pay).
- ``autotune_overhead`` records, for the forward: ``dispatch_us``, the host time of everything
  ``conv_forward`` does besides running the kernel (argument checks, problem description, algorithm
  resolution, cached choice) — the target is ≤ 10 µs; and ``call_us`` vs ``direct_us``, the host time per
  call of ``conv_forward`` against calling the chosen algorithm's ``forward`` directly with its
  parameters (``n`` calls back to back, one synchronisation), whose difference is ``overhead_us``.

Usage on the GPU machine: ``python -m benchmarks.probes.autotune_overhead`` (writes
``benchmarks/results/<stem>-autotune.json``); ``--cpu`` is a plumbing dry run on NumPy. Without a GPU
the GPU run prints why and writes nothing.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parents[1] / "results"
TARGET_US = 10.0


def _layer_inputs(xp, c: int, dtype: str, voxel_size: float = 0.05):
    """SubM k3 layer on the LiDAR-like scan: ``(feats [N, C], weight [27, C, C], kmap, n_voxels)``."""
    import sparsevox
    from sparsevox.synthetic import lidar_like_points
    pts = lidar_like_points(0)
    v = sparsevox.Voxels.from_points(pts[:, :3], voxel_size)
    coords = xp.asarray(np.asarray(v.coords))
    rng = np.random.default_rng(0)
    n = coords.shape[0]
    feats = xp.asarray(rng.standard_normal((n, c)).astype(dtype))
    weight = xp.asarray((rng.standard_normal((27, c, c)) / np.sqrt(27 * c)).astype(dtype))
    vox = sparsevox.Voxels(coords, feats)
    return feats, weight, sparsevox.kernel_map(vox, 3), n


def _host_us(fn, n: int, sync) -> float:
    """Median over 5 rounds of the host time per call of ``n`` back-to-back calls of ``fn`` (µs)."""
    rounds = []
    for _ in range(5):
        sync()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        rounds.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(rounds)


def _measure_layer(xp, sync, c, dtype, scene, voxel_size, n):
    from sparsevox import conv
    from sparsevox.tuning import autotune, tune_cache
    feats, weight, kmap, n_vox = _layer_inputs(xp, c, dtype, voxel_size)
    grad = xp.asarray(np.random.default_rng(1).standard_normal((kmap.num_out, c)).astype(dtype))
    base = {"scene": scene, "n_voxels": n_vox, "pairs": kmap.num_pairs, "c_in": c, "c_out": c, "dtype": dtype}
    calls = {
        "fwd": lambda: conv.conv_forward(feats, weight, kmap, "auto"),
        "dgrad": lambda: conv.conv_backward(grad, feats, weight, kmap, "auto", weight_grad=False),
        "wgrad": lambda: conv.conv_backward(grad, feats, weight, kmap, "auto", feats_grad=False),
    }
    records = []
    for direction, call in calls.items():
        times = []
        for _ in range(2):  # cold (compiles), then warm kernels with the in-memory choices forgotten
            tune_cache.reset()
            for p in tune_cache.cache_dir().glob("autotune.json*"):
                p.unlink()
            sync()
            t = time.perf_counter()
            call()
            sync()
            times.append((time.perf_counter() - t) * 1e3)
        problem = conv.problem_of("conv", direction, feats, weight, kmap)
        entry = tune_cache.get(autotune.cache_key(problem)) or {"times_ms": {}, "dropped": {}}
        algo, params = conv.select(problem, "auto", lambda a, p: None)  # cached: nothing runs
        records.append(dict(base, op="autotune_first_call", direction=direction, first_call_ms=times[0],
                            tune_ms=times[1], ms=times[1], candidates=len(entry["times_ms"]),
                            dropped=entry["dropped"], algo={"name": algo.name, "params": params}))

    algo, params = conv.select(conv.problem_of("conv", "fwd", feats, weight, kmap), "auto", lambda a, p: None)

    def dispatch():  # what conv_forward adds around the kernel call: the memoised per-call plan
        return conv.plan("conv", "fwd", feats, weight, kmap, "auto", lambda a, p: None)

    dispatch_us = _host_us(dispatch, 10 * n, lambda: None)
    call_us = _host_us(lambda: conv.conv_forward(feats, weight, kmap, "auto"), n, sync)
    direct_us = _host_us(lambda: algo.forward(feats, weight, kmap, **params), n, sync)
    records.append(dict(base, op="autotune_overhead", direction="fwd", algo={"name": algo.name, "params": params},
                        dispatch_us=dispatch_us, call_us=call_us, direct_us=direct_us,
                        overhead_us=call_us - direct_us, target_us=TARGET_US, ok=dispatch_us <= TARGET_US))
    return records


def run(device: str = "gpu", channels=(32, 64, 128, 256), dtypes=("float16", "float32"), out_path=None,
        voxel_size: float = 0.05, n: int = 200):
    """Measure every layer; write ``{"device", "date", "commit", "records"}`` JSON; return the records.

    ``device="gpu"`` needs a CUDA GPU and CuPy (returns ``[]`` after printing why when there is none);
    ``device="cpu"`` is a dry run on NumPy (one candidate, so no tuning). ``n``: back-to-back calls per
    overhead round. The autotune cache is a temporary directory, so the user's own cache is neither
    read nor changed.
    """
    from sparsevox.tuning import tune_cache
    if device == "gpu":
        from sparsevox.cuda.gpu_info import device_name, gpu_available
        ok, why = gpu_available()
        if not ok:
            print(f"autotune_overhead: skipped: {why}", file=sys.stderr)
            return []
        import cupy
        xp, sync, name = cupy, lambda: cupy.cuda.Device().synchronize(), device_name(cupy.cuda.Device().id)
    else:
        xp, sync, name = np, lambda: None, "cpu"
    saved = os.environ.get("SPARSEVOX_CACHE_DIR")
    scene = f"lidar_like_{round(voxel_size * 100)}cm"
    records = []
    with tempfile.TemporaryDirectory(prefix="sparsevox-autotune-bench-") as tmp:
        os.environ["SPARSEVOX_CACHE_DIR"] = tmp
        try:
            for dtype in dtypes:
                for c in channels:
                    for r in _measure_layer(xp, sync, c, dtype, scene, voxel_size, n):
                        records.append(r)
                        print(json.dumps(r), flush=True)
        finally:
            tune_cache.reset()
            if saved is None:
                os.environ.pop("SPARSEVOX_CACHE_DIR", None)
            else:
                os.environ["SPARSEVOX_CACHE_DIR"] = saved
    _write(records, name, device, out_path)
    return records


def _write(records, device_name, device, out_path):
    try:
        from benchmarks import provenance
        header, stem = provenance.header(device_name), provenance.stem(device)
    except ImportError:  # run as a loose script: minimal provenance
        import datetime
        header = {"device": device_name, "date": datetime.date.today().isoformat(), "commit": "unknown"}
        stem = f"{header['date']}-{device}-unknown"
    path = Path(out_path) if out_path else RESULTS / f"{stem}-autotune.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(header, records=records), indent=1))
    print(f"wrote {path}", file=sys.stderr)


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    device = "cpu" if "--cpu" in args else "gpu"
    out = next((a.split("=", 1)[1] for a in args if a.startswith("--out=")), None)
    if device == "cpu":  # plumbing only: a coarse scan, one layer, few calls
        run("cpu", channels=(16,), dtypes=("float32",), out_path=out, voxel_size=0.5, n=5)
    else:
        run("gpu", out_path=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
