"""Where the smallest layer's time goes (issue 4): host µs of each stage of one torch SubM call, and the
forward kernel alone, for ``ncu``.

``python -m benchmarks.probes.small_layer_profile [--scene lidar_synth] [--c 32] [--dtype float16] [--out DIR --stem S]``
prints host µs per stage of ``spatially_sparse_conv(vox, w, 3)`` (map cached, no grad): the whole call,
the cached map lookup, ``conv_features``, the adapter's forward implementation, ``torch.empty`` of the
output, the prepared launch, the output ``Voxels``; and a cProfile of the whole call sorted by own time.

``--kernel-only N``: run the prepared forward launch N times and exit (for
``ncu --profile-from-start off``).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scene", default="lidar_synth")
    ap.add_argument("--c", type=int, default=32)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--algo", default="implicit_gemm")
    ap.add_argument("--kernel-only", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--stem", default="small_layer")
    a = ap.parse_args(argv)

    import torch

    import sparsevox as sv
    from benchmarks import scenes
    from benchmarks.runners import Geometry, Layers
    from benchmarks.timing import loop_us
    from sparsevox import _arrays
    from sparsevox.adapters import torch as svt

    scene = scenes.load_scenes([a.scene])[0]
    geo = Geometry(scene.coords, "gpu", "torch")
    lay = Layers(geo, a.c, a.dtype)
    vox, w, algo = lay.vox, lay.weights["subm"], a.algo

    def call():
        with torch.no_grad():
            return svt.spatially_sparse_conv(vox, w, 3, fwd_algo=algo, bwd_algo=algo)
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    kmap = sv.kernel_map(vox, 3)
    in_maps, out_maps, offsets = svt.kernel_map_tensors(kmap)
    key = ("torch.fwd", "conv", vox.feats.device, vox.feats.dtype, vox.feats.shape, w.shape, algo, sv.allow_tf32())
    prep = kmap.derived.get(key)
    if a.kernel_only:
        stream = _arrays.torch_stream_handle(torch, vox.feats.get_device())
        out = torch.empty(prep.out_shape, dtype=vox.feats.dtype, device=vox.feats.device)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()  # ncu --profile-from-start off: only these launches
        for _ in range(a.kernel_only):
            prep.launch(vox.feats.data_ptr(), w.data_ptr(), out.data_ptr(), stream)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        print(f"launched {a.kernel_only}: grid {prep.steps[0][1]}, block {prep.steps[0][2]}, smem {prep.steps[0][3]}")
        return
    feats = vox.feats
    fwd_impl = svt._ConvFunction.impls[0]
    dev = feats.get_device()
    stream = _arrays.torch_stream_handle(torch, dev)
    out = torch.empty(prep.out_shape, dtype=feats.dtype, device=feats.device)
    stages = {
        "whole_call": call,
        "kernel_map_lookup": lambda: sv.kernel_map(vox, 3),
        "conv_features": lambda: svt.conv_features(feats, w, kmap, algo, algo),
        "fwd_impl": lambda: fwd_impl(feats, w, in_maps, out_maps, offsets, kmap.num_out, algo),
        "fast_forward": lambda: svt._fast_forward(prep, feats, w),
        "torch_empty": lambda: torch.empty(prep.out_shape, dtype=feats.dtype, device=feats.device),
        "launch_driver": lambda: prep.launch(feats.data_ptr(), w.data_ptr(), out.data_ptr(), stream),
        "core_map": lambda: svt._core_map(in_maps, out_maps, offsets, feats.shape[0], kmap.num_out),
        "needs_function": lambda: svt._needs_function(feats, w),
        "output_voxels": lambda: sv.conv.output_voxels_of(vox, kmap, out),
        "stream_handle": lambda: _arrays.torch_stream_handle(torch, dev),
        "key_tuple": lambda: ("torch.fwd", "conv", feats.device, feats.dtype, feats.shape, w.shape, algo,
                              sv.allow_tf32()),
    }
    with torch.no_grad():
        res = {name: loop_us(fn, 400, torch.cuda.synchronize, sync_every=50) for name, fn in stages.items()}
    for name, v in res.items():
        print(f"{scene.name} C={a.c} {a.dtype} {name}: {v:.1f} us", flush=True)
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    for _ in range(300):
        call()
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    print(s.getvalue())
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / f"{a.stem}-small_layer_profile.json").write_text(json.dumps(
            {"scene": scene.name, "c": a.c, "dtype": a.dtype, "host_us": res}, indent=1))


if __name__ == "__main__":
    main()
