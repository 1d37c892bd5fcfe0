"""One SubM layer through the core (CuPy), the torch adapter and the JAX adapter (jitted), on the GPU.

``python -m benchmarks.adapters --out DIR [--stem STEM]`` — issue 8's comparison (target: JAX within
1.10× of torch). SemanticKITTI at 5 cm when present (else the built-in scan), SubM k3, C in (32, 128, 256),
float16 and float32, forward only and forward+backward; each figure is the median wall time of
``repeats`` calls ending in a device synchronise (host-inclusive: what a training loop sees). Also the
forward of a stack of ``STACK`` such layers per call (one jitted function for JAX, a Python loop for
torch), per layer: a network's step pays XLA's fixed dispatch cost once, not once per layer.
JAX runs both ways in one process (issue 20): through ``buffer_callback`` (``jax_callback``) and through
the XLA FFI custom calls (``jax_ffi``, ``SPARSEVOX_JAX_FFI=1``; the library is built first if missing).
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


def torch_stack(f, w, kmap):
    """The forward of ``STACK`` layers in a Python loop (torch eager, no autograd)."""
    import torch

    from sparsevox.adapters import torch as svt
    with torch.no_grad():
        for _ in range(STACK):
            f = svt.conv_features(f, w, kmap)
    return f


def _jax_rows(svj, jax, jnp, recall_stats, fj, wj, kj, repeats: int, ffi: str) -> dict:
    """JAX's figures with ``SPARSEVOX_JAX_FFI=ffi`` (read when a function is traced, so each path gets
    its own jitted functions): forward, forward+backward, and the forward per layer of a ``STACK``-layer
    jitted stack, with the map as an argument (the documented pattern); the forward with the map closed
    over; and how many kernel-map recalls missed (each one rebuilds the map's tables)."""
    import os
    os.environ["SPARSEVOX_JAX_FFI"] = ffi

    def stack(f, w, k):
        for _ in range(STACK):
            f = svj.conv_features(f, w, k)
        return f
    fwd = jax.jit(lambda f, w, k: svj.conv_features(f, w, k))
    grad = jax.jit(jax.grad(lambda f, w, k: svj.conv_features(f, w, k).astype(jnp.float32).sum(), (0, 1)))
    fwd_closed = jax.jit(lambda f, w: svj.conv_features(f, w, kj))
    stacked = jax.jit(stack)
    misses0 = recall_stats["misses"]
    ms = {"fwd": wall_ms(lambda: fwd(fj, wj, kj).block_until_ready(), repeats=repeats),
          "fwd_bwd": wall_ms(lambda: jax.block_until_ready(grad(fj, wj, kj)), repeats=repeats),
          # XLA's dispatch of a jitted call (~50-140 µs before any work) is paid once per stack, not per layer
          "fwd_per_layer_of_stack": wall_ms(lambda: stacked(fj, wj, kj).block_until_ready(), repeats=repeats) / STACK}
    misses_arg = recall_stats["misses"] - misses0
    ms["fwd_map_closed_over"] = wall_ms(lambda: fwd_closed(fj, wj).block_until_ready(), repeats=repeats)
    ffi_calls = fwd.lower(fj, wj, kj).as_text().count("sparsevox_launch") + \
        grad.lower(fj, wj, kj).as_text().count("sparsevox_launch")
    return {"ms": ms, "misses": {"map_argument": misses_arg,
                                 "map_closed_over": recall_stats["misses"] - misses0 - misses_arg},
            "ffi_custom_calls_in_fwd_and_grad": ffi_calls}


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
    from sparsevox.cuda import ffi_build, ffi_lib
    ffi_ok, ffi_why = ffi_lib.available()
    if not ffi_ok:
        try:  # seconds, no GPU needed: the FFI rows are what issue 20 compares
            ffi_build.build()
            ffi_lib.reset()
            ffi_ok, ffi_why = ffi_lib.available()
        except Exception as e:
            ffi_why = f"{type(e).__name__}: {e}"
    print(f"adapters: XLA FFI library {'built' if ffi_ok else 'missing: ' + ffi_why}")
    repeats = 10 if args.quick else 30
    t_end = time.monotonic() + args.budget_s
    records = []
    for dtype in ("float16", "float32"):
        for c in ((32, 128) if args.quick else (32, 128, 256)):
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
            torch_stack_ms = wall_ms(lambda: torch_stack(ft, wt, kt), torch.cuda.synchronize, repeats=repeats) / STACK
            # jax (jitted), through buffer_callback and, where the library is built, the XLA FFI custom calls
            fj, wj = jnp.asarray(f_np), jnp.asarray(w_np)
            vj = sv.Voxels(jnp.asarray(scene.coords), fj)
            kj = svj.kernel_map(vj, 3)
            paths = {"callback": _jax_rows(svj, jax, jnp, recall_stats, fj, wj, kj, repeats, "0")}
            if ffi_ok:
                paths["ffi"] = _jax_rows(svj, jax, jnp, recall_stats, fj, wj, kj, repeats, "1")
            rec = {"op": "subm_adapters", "scene": scene.name, "n_voxels": scene.n_voxels, "c_in": c, "c_out": c,
                   "dtype": dtype, "pairs": kc.num_pairs,
                   "ms": {"core": {"fwd": core_f, "fwd_bwd": core_fb},
                          "torch": {"fwd": torch_f, "fwd_bwd": torch_fb, "fwd_per_layer_of_stack": torch_stack_ms},
                          **{f"jax_{p}": r["ms"] for p, r in paths.items()}},
                   "stack_layers": STACK, "jax_ffi": ffi_why or "built",
                   "kernel_map_recall_misses": {p: r["misses"] for p, r in paths.items()},
                   "jax_over_torch": {p: {k: r["ms"][k] / t for k, t in (("fwd", torch_f), ("fwd_bwd", torch_fb),
                                                                         ("fwd_per_layer_of_stack", torch_stack_ms))}
                                      for p, r in paths.items()},
                   "target": 1.10}
            line = "  ".join(f"jax {p} {r['ms']['fwd']:.3f}/{r['ms']['fwd_bwd']:.3f}/{r['ms']['fwd_per_layer_of_stack']:.3f}"
                             f" ({rec['jax_over_torch'][p]['fwd']:.2f}×/{rec['jax_over_torch'][p]['fwd_bwd']:.2f}×/"
                             f"{rec['jax_over_torch'][p]['fwd_per_layer_of_stack']:.2f}×)" for p, r in paths.items())
            print(f"{scene.name} {dtype} C={c}: core {core_f:.3f}/{core_fb:.3f}  torch {torch_f:.3f}/{torch_fb:.3f}/"
                  f"{torch_stack_ms:.3f} ms (fwd / fwd+bwd / fwd per layer of a {STACK}-layer stack); {line} "
                  f"(jax/torch); map recall misses {rec['kernel_map_recall_misses']}")
            records.append(rec)
    from benchmarks import provenance
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.stem}-adapters.json"
    path.write_text(json.dumps({**provenance.header(provenance.gpu_name()), "records": records}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
