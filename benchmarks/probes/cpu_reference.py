"""The CPU reference figure: NumPy-backend SubM k3 forward, C = 32, ~100k voxels, on this machine.

    python -m benchmarks.probes.cpu_reference [--out DIR] [--stem STEM] [--repeats N]

Scene: :func:`sparsevox.synthetic.lidar_like_points` (seed 0, 120,000 points) at 5 cm, about 105k voxels.
Times the kernel-map build of a fresh ``Voxels`` and the float32 forward with the map cached (median of
``--repeats`` after one warm-up), and writes ``<out>/<yyyy-mm-dd>-cpu-<commit>-cpu_reference.json``.
Target: forward < 2 s.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import numpy as np

from .. import provenance, report
from ..timing import time_call, tflops

TARGET_S = 2.0


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.probes.cpu_reference", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(provenance.REPO / "benchmarks" / "results"))
    ap.add_argument("--stem", default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="accepted for the suite; same as --repeats 3")
    ap.add_argument("--budget-s", type=float, default=None, help="accepted for the suite; unused")
    args = ap.parse_args(argv)
    import sparsevox as sv
    from sparsevox.synthetic import lidar_like_points

    pts = lidar_like_points(seed=0, n_points=120_000)
    coords = np.asarray(sv.Voxels.from_points(pts[:, :3], 0.05).coords, dtype=np.int32)
    n, c = coords.shape[0], 32
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((n, c), dtype=np.float32)
    weight = (rng.standard_normal((27, c, c), dtype=np.float32) / np.sqrt(27 * c)).astype(np.float32)
    repeats = 3 if args.quick else args.repeats

    t_map = time_call(lambda: sv.kernel_map(sv.Voxels(coords, None, check=False), 3), "cpu", 1, repeats)
    kmap = sv.kernel_map(sv.Voxels(coords, feats), 3)
    t_fwd = time_call(lambda: sv.conv_forward(feats, weight, kmap, "explicit_gemm"), "cpu", 1, repeats)
    pairs = kmap.num_pairs
    base = {"scene": "lidar_synth_120k", "n_voxels": n, "n_out": n, "pairs": pairs, "peer": {},
            "cublas_fraction": None}
    records = [
        dict(base, op="map_build", c_in=None, c_out=None, dtype=None,
             algo={"requested": "kernel_map", "builder": "sparsevox.kernel_map.build_kernel_map"},
             tflops=None, **t_map.as_dict()),
        dict(base, op="subm_fwd", c_in=c, c_out=c, dtype="float32",
             algo={"requested": "explicit_gemm", "chosen": {"fwd": {"name": "explicit_gemm", "params": {}}}},
             tflops=tflops(pairs, c, c, t_fwd.ms), **t_fwd.as_dict()),
    ]
    doc = provenance.header(f"CPU {cpu_name()} ({os.cpu_count()} logical cores), NumPy {np.__version__}")
    doc.update({"what": "cpu_reference", "target_s": TARGET_S, "meets_target": t_fwd.ms / 1e3 < TARGET_S,
                "python": sys.version.split()[0], "records": records})
    stem = args.stem or provenance.stem("cpu")
    path = f"{args.out}/{stem}-cpu_reference.json"
    report.write_json(doc, path)
    print(f"CPU reference ({doc['device']}): {n:,} voxels, {pairs:,} pairs, C={c} float32: "
          f"map build {t_map.ms:.0f} ms, SubM k3 forward {t_fwd.ms:.0f} ms "
          f"(target < {TARGET_S:g} s: {'met' if doc['meets_target'] else 'MISSED'}) -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
