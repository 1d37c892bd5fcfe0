"""IMPLICIT_GEMM development benchmark: checks then times every tile of every direction on the LiDAR-like scan.

Run on the GPU machine (one call): ``python3 benchmarks/probes/implicit_dev.py [--dtypes float16,float32] [--out DIR]``.
For each C in {32, 64, 128, 256}: forward / dgrad / wgrad of each parameter set (checked against
EXPLICIT_GEMM in float32 first: a failing kernel is reported FAIL and not timed), EXPLICIT_GEMM, and
a dense cupy matmul of the same ``[pairs x C] @ [C x C]`` shape. Prints a table; writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def gpu_ms(fn, reps=20, warm=3):
    """Device time of one call in ms: a CUDA graph of ``fn`` replayed ``reps`` times between two events
    (no host launch gaps). Falls back to back-to-back calls between events (then host time counts too)."""
    import cupy
    for _ in range(warm):
        fn()
    stream = cupy.cuda.Stream(non_blocking=True)
    try:
        with stream:
            stream.begin_capture()
            try:
                fn()
            finally:
                graph = stream.end_capture()
            graph.launch(stream)
            s, e = cupy.cuda.Event(), cupy.cuda.Event()
            s.record(stream)
            for _ in range(reps):
                graph.launch(stream)
            e.record(stream)
            e.synchronize()
        return cupy.cuda.get_elapsed_time(s, e) / reps
    except Exception as exc:  # noqa: BLE001 - timing fallback
        print(f"    (graph capture failed: {type(exc).__name__}: {exc}; timing back-to-back calls)")
        return batched_ms(fn, reps)


def batched_ms(fn, reps=20):
    """Events around ``reps`` back-to-back calls: max(host, device) per call, ms."""
    import cupy
    fn()
    s, e = cupy.cuda.Event(), cupy.cuda.Event()
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    e.synchronize()
    return cupy.cuda.get_elapsed_time(s, e) / reps


def call_us(fn, n=300):
    """Steady-state time per Python call (host and device overlapped), µs."""
    import cupy
    for _ in range(10):
        fn()
    cupy.cuda.Device().synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    cupy.cuda.Device().synchronize()
    return (time.perf_counter() - t) / n * 1e6


def rel(a, b) -> float:
    a = a.astype("float64")
    b = b.astype("float64")
    import cupy
    if bool(cupy.isnan(a).any()):
        return float("inf")
    return float(cupy.linalg.norm(a - b) / max(float(cupy.linalg.norm(b)), 1e-30))


def main():
    import cupy

    import sparsevox as sv
    from sparsevox.algorithms import explicit_gemm as eg
    from sparsevox.algorithms import implicit_gemm as ig
    from sparsevox.synthetic import lidar_like_points

    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", default="float16")
    ap.add_argument("--channels", default="32,64,128,256")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sweep", action="store_true", help="also time (WM, WN, STAGES) variants of the float16 forward")
    ap.add_argument("--no-main", action="store_true", help="skip the per-parameter table (sweep only)")
    args = ap.parse_args()

    pts = lidar_like_points(seed=0)
    v = sv.Voxels.from_points(cupy.asarray(pts[:, :3]), 0.05)
    t0 = time.perf_counter()
    kmap = sv.kernel_map(v, 3)
    cupy.cuda.Device().synchronize()
    n, pairs = kmap.num_out, kmap.num_pairs
    print(f"scene: {n} voxels, {pairs} pairs ({pairs / n:.2f} per voxel), map {1e3 * (time.perf_counter() - t0):.0f} ms")
    for sort in (False, True):
        for bm in (32, 64, 128):
            m = ig.tile_masks(kmap, False, bm, sort).get()
            act = sum(bin(int(x)).count("1") for x in m.ravel())
            print(f"  sort_rows={sort} BM={bm}: MMA rows / pairs = {act * bm / pairs:.2f}")

    records = []
    tol = {"float16": 1e-2, "bfloat16": 2e-2, "float32": 1e-5, "float64": 1e-12}
    if args.sweep:
        sweep(kmap, records)
    for dt in ([] if args.no_main else args.dtypes.split(",")):
        for c in [int(x) for x in args.channels.split(",")]:
            rng = cupy.random.default_rng(c)
            x = rng.standard_normal((n, c), dtype=cupy.float32).astype(dt)
            w = (rng.standard_normal((27, c, c), dtype=cupy.float32) / np.sqrt(27 * c)).astype(dt)
            g = rng.standard_normal((n, c), dtype=cupy.float32).astype(dt)
            x32, w32, g32 = (a.astype(cupy.float32) for a in (x, w, g))
            if dt == "float64":
                x32, w32, g32 = x, w, g
            refs = {"fwd": eg.forward(x32, w32, kmap), "dgrad": eg.dgrad(g32, w32, kmap),
                    "wgrad": eg.wgrad(x32, g32, kmap, 27)}
            runs = {"fwd": lambda p: ig.forward(x, w, kmap, **p), "dgrad": lambda p: ig.dgrad(g, w, kmap, **p),
                    "wgrad": lambda p: ig.wgrad(x, g, kmap, 27, **p)}
            plist = {"fwd": ig.fwd_params(dt, c) + [dict(ig.fwd_params(dt, c)[-1], sort_rows=False)],
                     "dgrad": ig.fwd_params(dt, c), "wgrad": ig.wgrad_params(dt, c, c)}
            flops = 2.0 * pairs * c * c
            best = {}
            for d in ("fwd", "dgrad", "wgrad"):
                for p in plist[d]:
                    err = rel(runs[d](p), refs[d])
                    ok = err < tol[dt]
                    ms = gpu_ms(lambda: runs[d](p)) if ok else float("nan")
                    rec = dict(dtype=dt, c=c, direction=d, params=p, rel_err=err, ok=ok, ms=ms,
                               tflops=flops / ms / 1e9 if ok else 0.0)
                    records.append(rec)
                    print(f"  {dt} C={c:3d} {d:5s} {json.dumps(p):60s} err={err:.2e} "
                          f"{'OK ' if ok else 'FAIL'} {ms:.4f} ms {rec['tflops']:.1f} TFLOP/s", flush=True)
                    if ok and (d not in best or ms < best[d][0]):
                        best[d] = (ms, p)
            ex = {"fwd": gpu_ms(lambda: eg.forward(x, w, kmap), reps=10),
                  "dgrad": gpu_ms(lambda: eg.dgrad(g, w, kmap), reps=10),
                  "wgrad": gpu_ms(lambda: eg.wgrad(x, g, kmap, 27), reps=10)}
            a = rng.standard_normal((pairs, c), dtype=cupy.float32).astype(dt)
            b = rng.standard_normal((c, c), dtype=cupy.float32).astype(dt)
            dense = gpu_ms(lambda: a @ b)
            call = None
            if "fwd" in best:
                p = best["fwd"][1]
                out = ig.forward(x, w, kmap, **p)
                call = {"ig.forward": call_us(lambda: ig.forward(x, w, kmap, **p)),
                        "ig.forward(out=)": call_us(lambda: ig.forward(x, w, kmap, out=out, **p)),
                        "sv.conv_forward": call_us(lambda: sv.conv_forward(x, w, kmap, fwd_algo="implicit_gemm")),
                        "fwd batched ms": batched_ms(lambda: ig.forward(x, w, kmap, **p))}
            rec = dict(dtype=dt, c=c, summary=True, best={k: v for k, v in best.items()}, explicit=ex,
                       dense_ms=dense, dense_tflops=flops / dense / 1e9, call_us=call)
            records.append(rec)
            print(f"SUMMARY {dt} C={c}: " + " ".join(
                f"{d}={best[d][0]:.4f}ms({flops / best[d][0] / 1e9:.0f}TF, {json.dumps(best[d][1])})"
                for d in best) + f" | explicit " + " ".join(f"{d}={ex[d]:.3f}" for d in ex)
                + f" | dense {dense:.4f}ms {flops / dense / 1e9:.0f}TF" + (" | calls(us) " + " ".join(f"{k}={v:.3f}" if "ms" in k else f"{k}={v:.1f}" for k, v in call.items()) if call else ""),
                flush=True)

    print("\n| dtype | C | fwd ms | dgrad ms | wgrad ms | fwd+bwd ms | fwd TF/s | dense ms | fwd/dense | explicit fwd | explicit f+b |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in records:
        if not r.get("summary"):
            continue
        b = r["best"]
        if not all(d in b for d in ("fwd", "dgrad", "wgrad")):
            print(f"| {r['dtype']} | {r['c']} | missing: {sorted(set(('fwd', 'dgrad', 'wgrad')) - set(b))} |")
            continue
        f, dg, wg = b["fwd"][0], b["dgrad"][0], b["wgrad"][0]
        ex = r["explicit"]
        print(f"| {r['dtype']} | {r['c']} | {f:.4f} | {dg:.4f} | {wg:.4f} | {f + dg + wg:.4f} | "
              f"{2 * pairs * r['c'] ** 2 / f / 1e9:.0f} | {r['dense_ms']:.4f} | {r['dense_ms'] / f:.2f} | "
              f"{ex['fwd']:.3f} | {sum(ex.values()):.3f} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "implicit_dev.json"), "w") as fh:
        json.dump({"n": n, "pairs": pairs, "records": records}, fh, indent=1, default=str)


SWEEP = {  # C -> [(BM, BN, (WM, WN, STAGES))]
    32: [(64, 32, (32, 16, 2)), (64, 32, (32, 16, 3)), (64, 32, (32, 16, 4)), (64, 32, (16, 16, 4)),
         (128, 32, (32, 16, 4)), (128, 32, (64, 16, 4)), (32, 32, (16, 16, 6))],
    128: [(32, 128, (16, 64, 4)), (32, 128, (32, 32, 4)), (64, 128, (32, 64, 3)), (128, 128, (64, 64, 3))],
    256: [(64, 128, (32, 64, 2)), (64, 128, (32, 64, 3)), (128, 128, (64, 64, 3)), (128, 128, (64, 64, 4)),
          (64, 256, (32, 64, 3)), (64, 256, (64, 64, 3)), (32, 256, (16, 64, 3)), (32, 256, (32, 64, 3)),
          (32, 128, (16, 64, 4)), (32, 128, (32, 32, 4))],
}


def sweep(kmap, records):
    """Forward float16 variants outside the search space: each checked against EXPLICIT_GEMM first."""
    import cupy

    from sparsevox.algorithms import explicit_gemm as eg
    from sparsevox.algorithms import implicit_gemm as ig
    n, pairs = kmap.num_out, kmap.num_pairs
    for c, variants in SWEEP.items():
        rng = cupy.random.default_rng(c)
        x = rng.standard_normal((n, c), dtype=cupy.float32).astype("float16")
        w = (rng.standard_normal((27, c, c), dtype=cupy.float32) / np.sqrt(27 * c)).astype("float16")
        ref = eg.forward(x.astype(cupy.float32), w.astype(cupy.float32), kmap)
        for bm, bn, var in variants:
            p = dict(fwd_block_size=bm, gemm_block_size=bn, variant=var)
            try:
                err = rel(ig.forward(x, w, kmap, **p), ref)
            except Exception as e:  # noqa: BLE001 - a variant that cannot launch is reported
                print(f"  sweep C={c} {bm}x{bn} {var}: {type(e).__name__}: {e}")
                continue
            ok = err < 1e-2
            ms = gpu_ms(lambda: ig.forward(x, w, kmap, **p)) if ok else float("nan")
            records.append(dict(sweep=True, dtype="float16", c=c, params=p, rel_err=err, ok=ok, ms=ms))
            print(f"  sweep C={c:3d} {bm:3d}x{bn:3d} warp/stages={var} err={err:.1e} {'OK ' if ok else 'FAIL'} "
                  f"{ms:.4f} ms {2 * pairs * c * c / ms / 1e9:.0f} TF/s", flush=True)


if __name__ == "__main__":
    main()
