"""float32 on tensor cores (3xTF32) against the exact SIMT float32 kernels, on real scans (issue 22, item 2).

Per scene (SemanticKITTI 5 cm, ScanNet 2 cm), SubM k3, C_in = C_out = C in {64, 128, 256}, and direction
(``fwd``, ``dgrad``, ``wgrad``), IMPLICIT_GEMM is run with every candidate of the autotuner's search space,
split into the SIMT ones and the ``tf32x3`` ones; the fastest of each family is recorded with:

- ``ms``: median CUDA-event time of 20 calls (map and tables cached), ``tflops`` = 2 * pairs * C * C / ms;
- the error of its output against the float64 kernel on the same inputs (float32 values upcast): norm
  relative error and the elementwise ``|out - ref| / mag`` (``mag`` = the same operation on ``|inputs|``,
  the scale of every rounding error of the sum; :mod:`sparsevox.tuning.check`) at the median, 99th
  percentile and maximum, and whether every element passes the autotuner's float32 check;
- ``cublas_tflops``: a dense ``[pairs, C] @ [C, C]`` float32 GEMM by cuBLAS (CuPy, TF32 off), the same
  FLOPs with no gather, and the fraction of it each kernel reaches.

Usage on the GPU machine: ``python -m benchmarks.probes.tf32x3 --out DIR [--stem STEM] [--quick]``; writes
``<stem>-tf32x3.json`` and ``.md`` (``--quick``: C 64 and 256, forward only).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

import numpy as np

from .. import provenance
from ..scenes import load_scenes

log = logging.getLogger("sparsevox.benchmarks.tf32x3")


def _time(fn, repeats: int = 20) -> float:
    import cupy
    fn()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    samples = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(cupy.cuda.get_elapsed_time(start, end))
    return statistics.median(samples)


def _errors(out, ref, mag, depth: int) -> dict:
    import cupy

    from sparsevox.tuning import check
    out64 = out.astype(cupy.float64)
    rel = cupy.abs(out64 - ref) / cupy.maximum(mag, 1e-300)
    q = cupy.asnumpy(cupy.percentile(rel, cupy.asarray([50.0, 99.0]))).tolist()
    bound = check.SAFETY * (check.UNIT_ROUNDOFF["float32"] * cupy.abs(ref) + check.HALF_SUBNORMAL["float32"]
                            + 2 * check.gamma(depth, "float32") * mag)
    return {"norm_rel": float(cupy.linalg.norm(out64 - ref) / cupy.linalg.norm(ref)), "elem_p50": q[0],
            "elem_p99": q[1], "elem_max": float(rel.max()), "passes_check": bool((cupy.abs(out64 - ref) <= bound).all())}


def _run_direction(direction, x, w, g, kmap, c) -> list[dict]:
    import cupy

    from sparsevox.algorithms import implicit_gemm as ig
    f64 = {k: v.astype(cupy.float64) for k, v in (("x", x), ("w", w), ("g", g))}
    if direction == "fwd":
        def call(a, b, **p):
            return ig.forward(a, b, kmap, **p)
        args, args64 = (x, w), (f64["x"], f64["w"])
        params, depth = ig.fwd_params("float32", c, kmap.num_offsets), kmap.num_offsets * c
    elif direction == "dgrad":
        def call(a, b, **p):
            return ig.dgrad(a, b, kmap, **p)
        args, args64 = (g, w), (f64["g"], f64["w"])
        params, depth = ig.fwd_params("float32", c, kmap.num_offsets), kmap.num_offsets * c
    else:
        def call(a, b, **p):
            return ig.wgrad(a, b, kmap, kmap.num_offsets, **p)
        args, args64 = (x, g), (f64["x"], f64["g"])
        params, depth = ig.wgrad_params("float32", c, c), kmap.num_pairs
    ref = call(*args64)
    mag = call(*(cupy.abs(a) for a in args64))
    best = {}
    for p in params:
        family = "tf32x3" if p.get("tf32x3") else "simt"
        ms = _time(lambda: call(*args, **p))
        if family not in best or ms < best[family][0]:
            best[family] = (ms, p)
    out = []
    for family, (ms, p) in sorted(best.items()):
        rec = {"direction": direction, "family": family, "params": p, "ms": ms,
               "tflops": 2.0 * kmap.num_pairs * c * c / (ms * 1e9)}
        rec.update(_errors(call(*args, **p), ref, mag, depth))
        out.append(rec)
    return out


def run(quick: bool) -> list[dict]:
    import cupy

    import sparsevox as sv
    records = []
    channels = (64, 256) if quick else (64, 128, 256)
    directions = ("fwd",) if quick else ("fwd", "dgrad", "wgrad")
    rng = np.random.default_rng(0)
    for scene in load_scenes(["semantickitti", "scannet"]):
        v = sv.Voxels(cupy.asarray(scene.coords), None)
        kmap = sv.kernel_map(v, 3)
        kmap.wait()
        for c in channels:
            x = cupy.asarray(rng.standard_normal((kmap.num_in, c)), dtype=cupy.float32)
            w = cupy.asarray(rng.standard_normal((kmap.num_offsets, c, c)) / np.sqrt(27 * c), dtype=cupy.float32)
            g = cupy.asarray(rng.standard_normal((kmap.num_out, c)), dtype=cupy.float32)
            a, b = cupy.asarray(rng.standard_normal((kmap.num_pairs, c)), dtype=cupy.float32), w[0]
            dense_ms = _time(lambda: a @ b)
            dense = 2.0 * kmap.num_pairs * c * c / (dense_ms * 1e9)
            for d in directions:
                for rec in _run_direction(d, x, w, g, kmap, c):
                    rec.update(scene=scene.name, voxels=int(kmap.num_in), pairs=int(kmap.num_pairs), c=c,
                               cublas_tflops=dense, of_cublas=rec["tflops"] / dense)
                    log.info("%s C=%d %s %s: %.3f ms, %.1f TFLOP/s (%.0f %% of cuBLAS), norm err %.2e, max elem %.2e",
                             scene.name, c, d, rec["family"], rec["ms"], rec["tflops"], 100 * rec["of_cublas"],
                             rec["norm_rel"], rec["elem_max"])
                    records.append(rec)
    return records


def markdown(doc: dict) -> str:
    lines = [f"# 3xTF32 vs SIMT float32 ({doc['device']}, {doc['date']}, {doc['commit']})", "",
             "IMPLICIT_GEMM SubM k3, C_in = C_out = C, fastest candidate of each family; errors against the "
             "float64 kernel on the same inputs (elementwise: |out - ref| / mag).", "",
             "| scene | C | dir | family | ms | TFLOP/s | of cuBLAS | norm rel err | elem p99 | elem max | check |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in doc["records"]:
        lines.append(f"| {r['scene']} | {r['c']} | {r['direction']} | {r['family']} | {r['ms']:.3f} | "
                     f"{r['tflops']:.1f} | {100 * r['of_cublas']:.0f} % | {r['norm_rel']:.2e} | {r['elem_p99']:.2e} | "
                     f"{r['elem_max']:.2e} | {'pass' if r['passes_check'] else 'FAIL'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    p.add_argument("--stem", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--budget-s", type=float, default=None, help="accepted for gpu_suite.sh; not used")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    doc = provenance.header(provenance.gpu_name() or "unknown GPU")
    doc.update(what="tf32x3", quick=a.quick, records=run(a.quick))
    stem = a.stem or provenance.stem()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}-tf32x3.json").write_text(json.dumps(doc, indent=1))
    (out / f"{stem}-tf32x3.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
