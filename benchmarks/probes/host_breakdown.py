"""Where host time goes, primitive by primitive, on the GPU machine (diagnostics for the host-cost work).

``python -m benchmarks.probes.host_breakdown --out DIR [--stem STEM]``: the per-call host cost of the CuPy and
torch primitives a layer call is made of (kernel launch by argument count, allocation, memset, a small
device->host read, stream lookups, DLPack hand-overs, an empty ``autograd.Function``), then cProfile
listings of the kernel-map build and of the torch-adapter SubM / down / up calls on SemanticKITTI (else
the built-in scan), C=32 float16. Primitive figures are wall µs per call over a loop without a
synchronise, except ``get_small_us`` (a synchronising read). Writes ``<stem>-host_breakdown.json`` and
``<stem>-host_breakdown.txt``.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
from pathlib import Path

import numpy as np

from benchmarks.timing import loop_us

_SRC = r"""
extern "C" __global__ void k2(int* a, int n) { if (threadIdx.x == 0 && blockIdx.x == 0 && n < 0) a[0] = n; }
extern "C" __global__ void k12(int* a, int* b, int* c, int* d, int n, int m, int s0, int s1, int s2,
                               int k0, int k1, int k2) {
    if (threadIdx.x == 0 && blockIdx.x == 0 && n < 0) a[0] = m + s0 + s1 + s2 + k0 + k1 + k2;
}
"""


def _us(fn, n=2000):
    return loop_us(fn, n)


def _profile(fn, n, sync, sort="tottime", lines=30) -> str:
    fn()
    sync()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    sync()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats(sort).print_stats(lines)
    return text.getvalue()


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
    from sparsevox import _arrays
    from sparsevox.cuda import gpu_kernel_map
    from sparsevox.adapters import torch as svt
    from benchmarks import scenes

    rec: dict = {}
    sync = torch.cuda.synchronize
    mod = cupy.RawModule(code=_SRC)
    k2, k12 = mod.get_function("k2"), mod.get_function("k12")
    a = cupy.zeros(1024, dtype=cupy.int32)
    i32 = np.int32(1)
    rec["launch_2args_us"] = _us(lambda: k2((1,), (32,), (a, i32)))
    rec["launch_12args_us"] = _us(lambda: k12((1,), (32,), (a, a, a, a) + (i32,) * 8))
    rec["launch_12args_pyint_us"] = _us(lambda: k12((1,), (32,), (a, a, a, a) + (1,) * 8))
    rec["launch_2args_rawptr_us"] = _us(lambda: k2((1,), (32,), (a.data.ptr, i32)))
    rec["cupy_empty_us"] = _us(lambda: cupy.empty(1024, dtype=cupy.int32))
    stream_ptr = cupy.cuda.get_current_stream().ptr
    rec["memset_async_us"] = _us(lambda: cupy.cuda.runtime.memsetAsync(a.data.ptr, 0xFF, a.nbytes, stream_ptr))
    rec["get_small_us"] = _us(lambda: a[:30].get(), 500)
    rec["cupy_device_ctx_us"] = _us(lambda: cupy.cuda.Device(0).__enter__() and None)

    x = torch.randn(91767, 32, device="cuda", dtype=torch.float16)
    origin = _arrays.Origin("torch", x.device)
    rec["torch_current_stream_us"] = _us(lambda: torch.cuda.current_stream())
    rec["torch_empty_us"] = _us(lambda: torch.empty(91767, 32, device="cuda", dtype=torch.float16))

    def stream_ctx():
        with _arrays.on_caller_stream(origin):
            pass
    rec["on_caller_stream_us"] = _us(stream_ctx)
    rec["to_core_torch_us"] = _us(lambda: _arrays.to_core(x))
    cx = _arrays.to_core(x)[0]
    rec["from_core_to_torch_us"] = _us(lambda: _arrays.from_core(cx, origin))
    rec["data_ptr_us"] = _us(lambda: x.data_ptr())

    class Noop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t

        @staticmethod
        def backward(ctx, g):
            return g
    rec["autograd_function_noop_us"] = _us(lambda: Noop.apply(x))
    with torch.no_grad():
        rec["autograd_function_noop_nograd_us"] = _us(lambda: Noop.apply(x))

    scene = (scenes.load_scenes(["semantickitti"]) or scenes.load_scenes(["lidar_synth"]))[0]
    rec["scene"] = scene.name
    coords = torch.as_tensor(np.asarray(scene.coords), device="cuda")
    ccoords = cupy.asarray(coords)
    n, c = coords.shape[0], 32
    feats = torch.randn(n, c, device="cuda", dtype=torch.float16)
    texts = []

    build = lambda: gpu_kernel_map.build_kernel_map(ccoords, None, 3, 1, 1, False, False)  # noqa: E731
    sync()
    rec["map_build_builder_us"] = _us(build, 200)
    public = lambda: sv.kernel_map(sv.Voxels(coords, None, check=False), 3)  # noqa: E731
    rec["map_build_public_us"] = _us(public, 200)
    rec["voxels_check_us"] = _us(lambda: sv.Voxels(coords, None), 200)  # validation (hash insert + one read)
    rec["voxels_check_and_map_us"] = _us(lambda: sv.kernel_map(sv.Voxels(coords, None), 3), 200)
    texts.append(("map build (builder), by own time", _profile(build, 200, sync)))
    from benchmarks.probes.map_build_sweep import kernel_times
    rec["map_build_kernel_us"] = kernel_times(build, 50)

    texts.append(("map build (public), cumulative", _profile(public, 200, sync, "cumulative", 40)))

    v = sv.Voxels(coords, feats)
    algo = ["implicit_gemm"]
    w = {k: torch.randn(kk, c, c, device="cuda", dtype=torch.float16) / 16 for k, kk in (("subm", 27), ("down", 8), ("up", 8))}
    with torch.no_grad():
        down = svt.spatially_sparse_conv(v, w["down"], 2, 2, fwd_algo=algo)

    def subm():
        with torch.no_grad():
            return svt.spatially_sparse_conv(v, w["subm"], 3, fwd_algo=algo)

    def downf():
        with torch.no_grad():
            return svt.spatially_sparse_conv(v, w["down"], 2, 2, fwd_algo=algo)

    def upf():
        with torch.no_grad():
            return svt.spatially_sparse_conv(down, w["up"], 2, 2, transposed=True, output_voxels=v, fwd_algo=algo)
    kmap = sv.kernel_map(v, 3)
    f_c, w_c = cupy.asarray(feats), cupy.asarray(w["subm"])
    core = lambda: sv.conv_forward(f_c, w_c, kmap, algo)  # noqa: E731
    for name, fn in (("core_subm", core), ("torch_subm", subm), ("torch_down", downf), ("torch_up", upf)):
        rec[f"{name}_us"] = loop_us(fn, 200, sync)
        texts.append((f"{name}, by own time", _profile(fn, 200, sync)))
        texts.append((f"{name}, cumulative", _profile(fn, 200, sync, "cumulative", 40)))

    # forward+backward through torch autograd (the backward runs on autograd's device thread), the bare
    # backward implementation on the main thread and on another thread, and the core pair.
    ft = feats.detach().clone().requires_grad_(True)
    wt = w["subm"].detach().clone().requires_grad_(True)
    g = torch.randn_like(feats)
    g_c = cupy.asarray(g)

    def torch_fb():
        return torch.autograd.grad(svt.conv_features(ft, wt, kmap, algo, algo), (ft, wt), g)
    _, bwd_impl = svt._ConvFunction.impls
    in_m, out_m, offs = svt.kernel_map_tensors(kmap)
    bwd = lambda: bwd_impl(g, ft.detach(), wt.detach(), in_m, out_m, offs, "implicit_gemm", True, True)  # noqa: E731
    core_fb = lambda: sv.conv_backward(g_c, f_c, w_c, kmap, algo)  # noqa: E731

    def per_call(fn, n=200):
        return loop_us(fn, n, sync)
    rec["torch_subm_fwd_bwd_us"] = per_call(torch_fb)
    rec["core_subm_bwd_us"] = per_call(core_fb)
    rec["torch_bwd_impl_main_thread_us"] = per_call(bwd)
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        rec["torch_bwd_impl_other_thread_us"] = ex.submit(per_call, bwd).result()
        rec["core_bwd_other_thread_us"] = ex.submit(per_call, core_fb).result()
    texts.append(("torch bwd_impl (main thread), cumulative", _profile(bwd, 200, sync, "cumulative", 40)))
    texts.append(("core backward, cumulative", _profile(core_fb, 200, sync, "cumulative", 40)))
    from sparsevox.kernel_map import recall_stats
    rec["recall_stats"] = dict(recall_stats)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}-host_breakdown.json").write_text(json.dumps(rec, indent=1))
    (out / f"{args.stem}-host_breakdown.txt").write_text("\n".join(f"### {t}\n{s}" for t, s in texts))
    for k, val in rec.items():
        print(f"{k:34} {val:.1f}" if isinstance(val, float) else f"{k:34} {val}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
