"""Depthwise forward: IMPLICIT vs EXPLICIT, and IMPLICIT's share of the copy bandwidth (issue 7).

SubM k = 3, C = 256, float16 by default, on the LiDAR-like scene (5 cm) and the ScanNet scan (2 cm).
Per scene and algorithm one ``depthwise_fwd`` record:

- ``ms``: median CUDA-event time of one call with L2 flushed before it (a 256 MiB read outside the
  events), so the inputs come from HBM; ``ms_warm``: median per call of back-to-back
  batches (L2 may still hold part of the previous call's data).
- ``bytes``: what the layer must move: features in once + out once + the map once (CSR pairs,
  ``8 * pairs``); ``bytes_read``: what IMPLICIT streams with the chosen parameters (features plus its
  ``[K, N]`` int32 neighbour table, or its per-row list: ``4 (N + 1) + 8 * pairs``).
- ``gbps`` = bytes / ms, ``copy_fraction`` = gbps / 3000 (the H100's 3.0 TB/s device copy,
  MEASUREMENTS.md), ``copy_fraction_measured`` against a device-to-device copy timed in this run.
- IMPLICIT: every parameter combination is timed; the record holds the best, all of them in ``sweep``.
- ``call_ms``: the whole public call ``sparsevox.depthwise_forward(..., "implicit")`` with the choice
  cached (host overhead included), back-to-back.

``--backward`` adds ``depthwise_dgrad`` and ``depthwise_wgrad`` records.

Usage on the GPU machine: ``python -m benchmarks.probes.depthwise [--out DIR_OR_FILE.json] [--quick]``.
``--out`` ending in ``.json`` is the result file; otherwise a folder that gets ``<stem>-depthwise.json``.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("sparsevox.benchmarks.depthwise")

COPY_TBPS = 3.0  # H100 device-to-device copy, bytes read + written (MEASUREMENTS.md)
RESULTS = Path(__file__).resolve().parents[1] / "results"


def scene_coords(names):
    """``[(name, voxel_size, coords int32 [N, 4], source)]`` from ``benchmarks.scenes`` when it exists."""
    try:
        from benchmarks.scenes import load_scenes
    except ImportError:
        load_scenes = None
    if load_scenes is not None:
        return [(s.name, s.voxel_size, s.coords, s.source) for s in load_scenes(names)]
    # Fallback: the built-in LiDAR-like generator only.
    import sparsevox
    from sparsevox.synthetic import lidar_like_points
    v = sparsevox.Voxels.from_points(lidar_like_points(seed=0)[:, :3], 0.05)
    log.warning("benchmarks.scenes not importable: only the synthetic LiDAR-like scene is measured")
    return [("lidar_synth", 0.05, np.asarray(v.coords, np.int32), "sparsevox.synthetic.lidar_like_points(seed=0)")]


class Timer:
    """CUDA-event timings on CuPy's current stream, with an optional L2 flush before each call."""

    def __init__(self, flush_mib: int = 256):
        import cupy
        self.cupy = cupy
        self.scratch = cupy.ones((flush_mib << 20) // 8, dtype=cupy.uint64)
        cupy.cuda.get_current_stream().synchronize()

    def flush(self):
        """Read (not write) 256 MiB, so L2 (50 MiB on the H100) ends up full of clean lines: no dirty
        write-backs are left to steal DRAM bandwidth from the call that is timed next."""
        self.scratch.max()

    def cold(self, fn, repeats: int) -> list[float]:
        cp = self.cupy
        start, end = cp.cuda.Event(), cp.cuda.Event()
        out = []
        for _ in range(repeats):
            self.flush()
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(cp.cuda.get_elapsed_time(start, end))
        return out

    def warm(self, fn, repeats: int, batch: int = 20) -> list[float]:
        cp = self.cupy
        start, end = cp.cuda.Event(), cp.cuda.Event()
        out = []
        for _ in range(repeats):
            start.record()
            for _ in range(batch):
                fn()
            end.record()
            end.synchronize()
            out.append(cp.cuda.get_elapsed_time(start, end) / batch)
        return out


def copy_tbps(timer: Timer, mib: int = 1024) -> float:
    """Measured device-to-device copy rate, TB/s (bytes read + written)."""
    cp = timer.cupy
    a = cp.empty(mib << 20, dtype=cp.uint8)
    b = cp.empty_like(a)
    for _ in range(3):
        b[...] = a
    ms = statistics.median(timer.warm(lambda: b.__setitem__(Ellipsis, a), 5, batch=5))
    return 2 * a.nbytes / (ms * 1e-3) / 1e12


def _record(op, scene, n_in, n_out, pairs, c, dtype, algo, ms, ms_warm, bytes_, bytes_read, copy_meas, **extra):
    gbps = bytes_ / (ms * 1e-3) / 1e9
    return {"op": op, "scene": scene, "n_voxels": n_in, "n_out": n_out, "pairs": pairs, "c_in": c, "c_out": c,
            "dtype": dtype, "algo": algo, "ms": ms, "ms_warm": ms_warm, "peer": {},
            "tflops": 2.0 * pairs * c / (ms * 1e-3) / 1e12, "cublas_fraction": None,
            "bytes": bytes_, "bytes_read": bytes_read, "gbps": gbps, "copy_fraction": gbps / (COPY_TBPS * 1e3),
            "copy_fraction_measured": gbps / (copy_meas * 1e3), **extra}


def bench_scene(name, voxel_size, coords_np, source, c, dtype, repeats, timer, copy_meas, backward):
    import cupy

    import sparsevox as sv
    from sparsevox.algorithms import depthwise_implicit as dwi
    from sparsevox.algorithms.explicit_gemm import depthwise_dgrad as ex_dgrad
    from sparsevox.algorithms.explicit_gemm import depthwise_forward as ex_forward
    from sparsevox.algorithms.explicit_gemm import depthwise_wgrad as ex_wgrad

    dt = np.dtype(dtype) if dtype != "bfloat16" else __import__("ml_dtypes").bfloat16
    v = sv.Voxels(cupy.asarray(coords_np), None)
    kmap = sv.kernel_map(v, 3)
    n, pairs, k = kmap.num_in, kmap.num_pairs, kmap.num_offsets
    rng = np.random.default_rng(0)
    x = cupy.asarray(rng.standard_normal((n, c)).astype(dt))
    w = cupy.asarray((rng.standard_normal((k, c)) / np.sqrt(k)).astype(dt))
    g = cupy.asarray(rng.standard_normal((kmap.num_out, c)).astype(dt))
    item = x.dtype.itemsize
    feat_bytes = (n + kmap.num_out) * c * item
    need = feat_bytes + 8 * pairs
    for reverse in (False, True):  # derived once per map (cached on it), not timed
        dwi.neighbour_table(kmap, reverse)
        dwi.neighbour_list(kmap, reverse)

    def streamed(rows, p):
        """Bytes IMPLICIT forward/dgrad reads and writes with parameters ``p`` (its neighbour source)."""
        return feat_bytes + (4 * k * rows if p.get("nbr") == "table" else 4 * (rows + 1) + 8 * pairs)

    label = f"{name} {n:,} voxels {voxel_size * 100:g} cm, {pairs / max(n, 1):.2f} neighbours"
    print(f"[depthwise] {label} ({source})", flush=True)
    base = {"scene": name, "n_in": n, "n_out": kmap.num_out, "pairs": pairs, "c": c, "dtype": dtype,
            "copy_meas": copy_meas}

    def med(xs):
        return statistics.median(xs)

    # direction -> (op, IMPLICIT call with params, EXPLICIT call, bytes IMPLICIT streams with params p)
    runs = {
        "fwd": ("depthwise_fwd", lambda p: dwi.forward(x, w, kmap, **p), lambda: ex_forward(x, w, kmap),
                lambda p: streamed(kmap.num_out, p)),
        "dgrad": ("depthwise_dgrad", lambda p: dwi.dgrad(g, w, kmap, **p), lambda: ex_dgrad(g, w, kmap),
                  lambda p: streamed(kmap.num_in, p)),
        "wgrad": ("depthwise_wgrad", lambda p: dwi.wgrad(x, g, kmap, k, **p), lambda: ex_wgrad(x, g, kmap, k),
                  lambda p: need),
    }
    records = []
    for direction in ["fwd", "dgrad", "wgrad"] if backward else ["fwd"]:
        op, imp, exp, read_extra = runs[direction]
        sweep = []
        for p in dwi._params(direction, None):
            imp(p)  # compile + warm
            cold = med(timer.cold(lambda imp=imp, p=p: imp(p), repeats))
            sweep.append({"params": p, "ms": cold})
        best = min(sweep, key=lambda s: s["ms"])
        p = best["params"]
        warm = med(timer.warm(lambda imp=imp, p=p: imp(p), max(3, repeats // 4)))
        extra = {"sweep": sweep}
        if direction == "fwd":
            sv.depthwise_forward(x, w, kmap, "implicit")  # tune once, then time the public call
            call = med(timer.warm(lambda: sv.depthwise_forward(x, w, kmap, "implicit"), max(3, repeats // 4)))
            extra["call_ms"] = call
        records.append(_record(op, algo={"name": "implicit", **p}, ms=best["ms"], ms_warm=warm, bytes_=need,
                               bytes_read=read_extra(p), **base, **extra))
        exp()
        e_cold = med(timer.cold(exp, max(3, repeats // 2)))
        e_warm = med(timer.warm(exp, max(3, repeats // 4)))
        records.append(_record(op, algo={"name": "explicit"}, ms=e_cold, ms_warm=e_warm, bytes_=need,
                               bytes_read=None, **base))
        r_i, r_e = records[-2], records[-1]
        print(f"  {op:16s} implicit {r_i['ms'] * 1e3:8.1f} us ({r_i['gbps']:6.0f} GB/s, "
              f"{r_i['copy_fraction']:.0%} of {COPY_TBPS:g} TB/s) {p} | explicit {r_e['ms'] * 1e3:8.1f} us "
              f"| x{r_e['ms'] / r_i['ms']:.1f}", flush=True)
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS), help="result folder, or a .json file path")
    ap.add_argument("--stem", default=None, help="file-name stem <yyyy-mm-dd>-<gpu>-<short commit>")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--budget-s", type=float, default=0.0, help="stop starting scenes after this many seconds")
    ap.add_argument("--scenes", default="lidar_synth,scannet", help="comma-separated benchmarks.scenes names")
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32", "float64"])
    ap.add_argument("--backward", action="store_true", help="also time dgrad and wgrad")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    from sparsevox.cuda.gpu_info import device_name, gpu_available
    ok, why = gpu_available()
    if not ok:
        print(f"[depthwise] no GPU ({why}); nothing measured, nothing written")
        return 0
    try:
        from benchmarks import provenance
        header = provenance.header(device_name(0))
        stem = args.stem or provenance.stem("gpu")
    except ImportError:
        header = {"device": device_name(0), "date": time.strftime("%Y-%m-%d"), "commit": "unknown"}
        stem = args.stem or f"{header['date']}-gpu-unknown"
    out = Path(args.out)
    path = out if out.suffix == ".json" else out / f"{stem}-depthwise.json"

    timer = Timer()
    copy_meas = copy_tbps(timer)
    print(f"[depthwise] {header['device']}: device copy {copy_meas:.2f} TB/s measured", flush=True)
    repeats = 10 if args.quick else 40
    t0 = time.perf_counter()
    records = []
    for name, size, coords, source in scene_coords([s for s in args.scenes.split(",") if s]):
        if args.budget_s and time.perf_counter() - t0 > args.budget_s:
            log.warning("budget of %.0f s spent: scene %s not measured", args.budget_s, name)
            continue
        records += bench_scene(name, size, coords, source, args.channels, args.dtype, repeats, timer, copy_meas,
                               args.backward)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {**header, "copy_tbps_measured": copy_meas, "records": records}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"[depthwise] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
