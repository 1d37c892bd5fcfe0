"""Where a small layer's forward+backward time goes through torch autograd (host µs per call).

``python -m benchmarks.probes.train_step_profile [--scene semantickitti] [--c 32]``: host µs per call over a
loop of calls with one synchronise at the end (throughput, ``timing.loop_us``) and the median of calls
each followed by a synchronise (``timing.wall_ms``), for: an empty ``autograd.Function`` round trip on
CUDA tensors of the layer's shapes, the layer's forward with grad enabled, its backward implementation alone (main thread), and the whole
``torch.autograd.grad(layer(...), (f, w), g)``; then a torch.profiler table of the whole step.
"""
from __future__ import annotations

import argparse


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scene", default="semantickitti")
    ap.add_argument("--c", type=int, default=32)
    a = ap.parse_args(argv)
    import torch

    from benchmarks import scenes
    from benchmarks.runners import Geometry, Layers
    from benchmarks.timing import loop_us, wall_ms
    from sparsevox.adapters import torch as svt

    scene = (scenes.load_scenes([a.scene]) or scenes.load_scenes(["lidar_synth"]))[0]
    lay = Layers(Geometry(scene.coords, "gpu", "torch"), a.c, "float16")
    f = lay.feats.detach().clone().requires_grad_(True)
    w = lay.weights["subm"].detach().clone().requires_grad_(True)
    vox = lay.vox.replace(f)
    g = torch.randn_like(lay.feats) * 0.1
    algo = "implicit_gemm"

    class Noop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, y):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, gr):
            return gr, None

    def noop_step():
        return torch.autograd.grad(Noop.apply(f, w), (f,), g)

    def fwd():
        return svt.spatially_sparse_conv(vox, w, 3, fwd_algo=algo, bwd_algo=algo).feats

    def step():
        return torch.autograd.grad(fwd(), (f, w), g)
    kmap = lay.kmap_subm
    in_m, out_m, offs = svt.kernel_map_tensors(kmap)
    _, bwd_impl = svt._ConvFunction.impls

    def bwd_only():
        return bwd_impl(g, f.detach(), w.detach(), in_m, out_m, offs, algo, True, True)

    for name, fn in (("noop_function_grad", noop_step), ("layer_fwd_grad_enabled", fwd),
                     ("bwd_impl_main_thread", bwd_only), ("layer_fwd_bwd", step)):
        loop = loop_us(fn, 200, torch.cuda.synchronize, warmup=3)
        synced = wall_ms(fn, torch.cuda.synchronize, warmup=3, repeats=200) * 1e3
        print(f"{scene.name} C={a.c} {name}: loop {loop:.1f} us, synced {synced:.1f} us", flush=True)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
