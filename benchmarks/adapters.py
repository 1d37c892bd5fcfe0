"""One SubM layer through the core (CuPy), the torch adapter and the JAX adapter (jitted), on the GPU.

``python -m benchmarks.adapters --out DIR [--stem STEM]`` — issue 8's comparison (target: JAX within
1.10× of torch). SemanticKITTI at 5 cm when present (else the built-in scan), SubM k3, C in (32, 128),
float16 and float32, forward only and forward+backward; each figure is the median wall time of
``repeats`` calls ending in a device synchronise (host-inclusive: what a training loop sees). Also the
forward of a stack of ``STACK`` such layers per call (one jitted function for JAX, a Python loop for
torch), per layer: a network's step pays XLA's fixed dispatch cost once, not once per layer.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.timing import wall_ms

STACK = 8  # layers per call in the stacked figure


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--stem", default="adapters")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=120)
    args = ap.parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for CuPy
    import cupy
    import jax
    import jax.numpy as jnp
    import torch

    import sparsevox as sv
    from benchmarks import scenes
    from sparsevox.adapters import jax as svj
    from sparsevox.adapters import torch as svt
    from sparsevox.kernel_map import recall_stats

    if jax.default_backend() != "gpu":
        print("adapters: jax has no GPU here; nothing measured")
        return 0
    scene = (scenes.load_scenes(["semantickitti"]) or scenes.load_scenes(["lidar_synth"]))[0]
    repeats = 10 if args.quick else 30
    t_end = time.monotonic() + args.budget_s
    records = []
    for dtype in ("float16", "float32"):
        for c in (32, 128):
            if time.monotonic() > t_end:
                break
            rng = np.random.default_rng(0)
            f_np = rng.standard_normal((scene.n_voxels, c)).astype(dtype)
            w_np = (rng.standard_normal((27, c, c)) / np.sqrt(27 * c)).astype(dtype)
            # core (CuPy)
            vc = sv.Voxels(cupy.asarray(scene.coords), cupy.asarray(f_np))
            kc = sv.kernel_map(vc, 3)
            wc = cupy.asarray(w_np)
            sync_c = cupy.cuda.get_current_stream().synchronize
            core_f = wall_ms(lambda: sv.conv_forward(vc.feats, wc, kc), sync_c, repeats=repeats)
            core_fb = wall_ms(lambda: sv.conv_backward(sv.conv_forward(vc.feats, wc, kc), vc.feats, wc, kc),
                              sync_c, repeats=repeats)
            # torch
            ft = torch.tensor(f_np, device="cuda", requires_grad=True)
            wt = torch.tensor(w_np, device="cuda", requires_grad=True)
            vt = sv.Voxels(torch.as_tensor(scene.coords, device="cuda"), ft)
            kt = sv.kernel_map(vt, 3)
            torch_f = wall_ms(lambda: svt.conv_features(ft, wt, kt), torch.cuda.synchronize, repeats=repeats)
            torch_fb = wall_ms(lambda: svt.conv_features(ft, wt, kt).sum().backward(), torch.cuda.synchronize,
                               repeats=repeats)
            # jax (jitted)
            fj, wj = jnp.asarray(f_np), jnp.asarray(w_np)
            vj = sv.Voxels(jnp.asarray(scene.coords), fj)
            kj = svj.kernel_map(vj, 3)
            # The map as an argument of the jitted function (the documented pattern), and closed over.
            fwd = jax.jit(lambda f, w, k: svj.conv_features(f, w, k))
            grad = jax.jit(jax.grad(lambda f, w, k: svj.conv_features(f, w, k).astype(jnp.float32).sum(), (0, 1)))
            fwd_closed = jax.jit(lambda f, w: svj.conv_features(f, w, kj))
            misses0 = recall_stats["misses"]
            jax_f = wall_ms(lambda: fwd(fj, wj, kj).block_until_ready(), repeats=repeats)
            jax_fb = wall_ms(lambda: jax.block_until_ready(grad(fj, wj, kj)), repeats=repeats)
            misses_arg = recall_stats["misses"] - misses0
            jax_f_closed = wall_ms(lambda: fwd_closed(fj, wj).block_until_ready(), repeats=repeats)
            misses_closed = recall_stats["misses"] - misses0 - misses_arg
            # A stack of STACK layers per call (what a network's jitted step does): XLA's dispatch of the
            # jitted call, a fixed ~50-140 µs before any callback runs, is paid once, not per layer.
            def torch_stack():
                with torch.no_grad():
                    f = ft
                    for _ in range(STACK):
                        f = svt.conv_features(f, wt, kt)
                return f

            def jax_stack(f, w, k):
                for _ in range(STACK):
                    f = svj.conv_features(f, w, k)
                return f
            jax_stack = jax.jit(jax_stack)
            torch_s = wall_ms(torch_stack, torch.cuda.synchronize, repeats=repeats) / STACK
            jax_s = wall_ms(lambda: jax_stack(fj, wj, kj).block_until_ready(), repeats=repeats) / STACK
            rec = {"op": "subm_adapters", "scene": scene.name, "n_voxels": scene.n_voxels, "c_in": c, "c_out": c,
                   "dtype": dtype, "pairs": kc.num_pairs,
                   "ms": {"core": {"fwd": core_f, "fwd_bwd": core_fb},
                          "torch": {"fwd": torch_f, "fwd_bwd": torch_fb, "fwd_per_layer_of_stack": torch_s},
                          "jax": {"fwd": jax_f, "fwd_bwd": jax_fb, "fwd_per_layer_of_stack": jax_s},
                          "jax_map_closed_over": {"fwd": jax_f_closed}},
                   "stack_layers": STACK,
                   "kernel_map_recall_misses": {"jax_map_argument": misses_arg, "jax_map_closed_over": misses_closed},
                   "jax_over_torch": {"fwd": jax_f / torch_f, "fwd_bwd": jax_fb / torch_fb,
                                      "fwd_per_layer_of_stack": jax_s / torch_s}, "target": 1.10}
            records.append(rec)
            print(f"{scene.name} {dtype} C={c}: core {core_f:.3f}/{core_fb:.3f}  torch {torch_f:.3f}/{torch_fb:.3f}"
                  f"  jax {jax_f:.3f}/{jax_fb:.3f} ms (fwd/fwd+bwd; map closed over: fwd {jax_f_closed:.3f}); "
                  f"jax/torch {rec['jax_over_torch']['fwd']:.2f}× / {rec['jax_over_torch']['fwd_bwd']:.2f}×; "
                  f"map recall misses {misses_arg} (argument), {misses_closed} (closed over); "
                  f"{STACK}-layer stack, fwd per layer: torch {torch_s:.3f}, jax {jax_s:.3f} ms "
                  f"(jax/torch {jax_s / torch_s:.2f}×)")
    from benchmarks import provenance
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.stem}-adapters.json"
    path.write_text(json.dumps({**provenance.header(provenance.gpu_name()), "records": records}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
