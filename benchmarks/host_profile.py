"""Where the host time of a small layer goes: map build, core call, torch-adapter call, and a profile.

``python -m benchmarks.host_profile --out DIR [--stem STEM]``: SemanticKITTI at 5 cm (else the built-in
scan), SubM k3, C=32, float16, IMPLICIT_GEMM forced. Host µs per call are wall time over many calls
ending in one synchronise (so they include GPU time when the GPU is the bottleneck); GPU µs are CUDA
events. Writes ``<stem>-host_profile.json`` and ``<stem>-host_profile.txt`` (cProfile, top by own time).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path

import numpy as np


def _per_call_us(fn, n, sync):
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t) / n * 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--stem", default="host")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=60)
    args = ap.parse_args(argv)
    import cupy
    import torch

    import sparsevox as sv
    from sparsevox.adapters import torch as svt
    from benchmarks import scenes

    scene = (scenes.load_scenes(["semantickitti"]) or scenes.load_scenes(["lidar_synth"]))[0]
    coords = torch.as_tensor(np.asarray(scene.coords), device="cuda")
    n = coords.shape[0]
    c = 32
    feats = torch.randn(n, c, device="cuda", dtype=torch.float16)
    w = torch.randn(27, c, c, device="cuda", dtype=torch.float16) / 16
    v = sv.Voxels(coords, feats)
    sync = torch.cuda.synchronize
    rec = {"scene": scene.name, "n_voxels": int(n), "c": c, "dtype": "float16"}

    ccoords = cupy.asarray(coords)
    from sparsevox import gpu_kernel_map
    rec["map_build_builder_us"] = _per_call_us(
        lambda: gpu_kernel_map.build_kernel_map(ccoords, None, 3, 1, 1, False, False), 100, sync)
    rec["map_build_public_us"] = _per_call_us(lambda: sv.kernel_map(sv.Voxels(coords, feats, check=False), 3), 100, sync)
    rec["voxels_check_us"] = _per_call_us(lambda: sv.Voxels(coords, feats), 100, sync)

    kmap = sv.kernel_map(v, 3)
    f_c, w_c = cupy.asarray(feats), cupy.asarray(w)
    algo = ["implicit_gemm"]
    rec["core_call_us"] = _per_call_us(lambda: sv.conv_forward(f_c, w_c, kmap, algo), 300, sync)
    from sparsevox.registry import algorithms
    impl = algorithms("conv")["implicit_gemm"]
    params = sv.conv.last_plans[("conv", "fwd")][1]
    rec["direct_kernel_call_us"] = _per_call_us(lambda: impl.forward(f_c, w_c, kmap, **params), 300, sync)
    rec["torch_adapter_call_us"] = _per_call_us(lambda: svt.spatially_sparse_conv(v, w, 3, fwd_algo=algo), 300, sync)
    rec["torch_conv_tensors_us"] = _per_call_us(
        lambda: svt.conv_features(feats, w, kmap, algo), 300, sync)
    rec["dlpack_torch_to_cupy_us"] = _per_call_us(lambda: cupy.from_dlpack(feats), 1000, lambda: None)
    from sparsevox import _arrays
    rec["to_core_torch_us"] = _per_call_us(lambda: _arrays.to_core(feats), 1000, lambda: None)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(100):
        svt.spatially_sparse_conv(v, w, 3, fwd_algo=algo)
    end.record()
    sync()
    rec["torch_adapter_gpu_us"] = start.elapsed_time(end) * 10

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        svt.spatially_sparse_conv(v, w, 3, fwd_algo=algo)
    sync()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}-host_profile.json").write_text(json.dumps(rec, indent=1))
    (out / f"{args.stem}-host_profile.txt").write_text(text.getvalue())
    for k, val in rec.items():
        print(f"{k:28} {val:.1f}" if isinstance(val, float) else f"{k:28} {val}")
    print("\n".join(text.getvalue().splitlines()[:40]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
