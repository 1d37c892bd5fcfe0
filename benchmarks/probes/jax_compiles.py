"""How many XLA compilations a jitted Flax MinkUNet training run costs when every step sees a new scan
(issue 20: "say how many compiles a 100-scan run costs").

Each step takes a different crop of the synthetic street scan (so a different voxel count, as real scans
differ), builds the kernel maps outside ``jit`` and runs the ``nnx.jit``-ed train step of
:mod:`sparsevox.examples.flax_train`. A trace counter inside the step counts the compilations; the first
call of each scan is timed against a second call on the same scan (compiled). Today the kernel maps
carry their sizes as static pytree fields and the features their row count, so every new scan traces and
compiles the step again: the count is the number of scans.

    python -m benchmarks.probes.jax_compiles [--scans 5] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def run(scans: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sparsevox.adapters.flax import MinkUNet
    from sparsevox.examples import flax_train as ft

    model = MinkUNet(4, 3, widths=ft.SMALL, blocks=1, rngs=nnx.Rngs(0))
    traces = [0]

    @nnx.jit
    def step(model, feats, maps, labels):
        traces[0] += 1  # runs only while tracing: once per compilation
        loss, grads = nnx.value_and_grad(lambda m: ft.cross_entropy(m(feats, maps), labels))(model)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree_util.tree_map(lambda p, g: p - 0.05 * g, params, grads))
        return loss

    rows = []
    for i in range(scans):
        v, labels = ft.scene(3.0 + 0.37 * i)  # a new crop: a new voxel count
        maps = model.kernel_maps(v)
        before = traces[0]
        t = time.perf_counter()
        jax.block_until_ready(step(model, v.feats, maps, labels))
        first = time.perf_counter() - t
        t = time.perf_counter()
        jax.block_until_ready(step(model, v.feats, maps, labels))
        again = time.perf_counter() - t
        rows.append({"scan": i, "voxels": int(v.num_voxels), "compiles": traces[0] - before,
                     "first_call_s": first, "compiled_call_s": again})
        print(f"scan {i}: {v.num_voxels:,} voxels, {traces[0] - before} compile(s), first call {first:.2f} s, "
              f"compiled call {again:.3f} s", flush=True)
    per_scan = sum(r["compiles"] for r in rows) / len(rows)
    return {"backend": jax.default_backend(), "scans": rows, "compiles_per_scan": per_scan,
            "compiles_for_100_scans": round(100 * per_scan),
            "compile_overhead_s_per_scan": float(np.median([r["first_call_s"] - r["compiled_call_s"] for r in rows]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, default=5, help="new scans to run (>= 1)")
    ap.add_argument("--out", default=None, help="write the result JSON here")
    a = ap.parse_args(argv)
    if a.scans < 1:
        raise ValueError(f"--scans must be >= 1, got {a.scans}")
    doc = run(a.scans)
    from benchmarks import provenance
    doc = {**provenance.header(provenance.gpu_name() or "cpu"), "what": "jax_compiles", **doc}
    print(f"{doc['compiles_per_scan']:.2f} compiles per new scan: {doc['compiles_for_100_scans']} for 100 scans; "
          f"median compile overhead {doc['compile_overhead_s_per_scan']:.2f} s per scan ({doc['backend']})")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
