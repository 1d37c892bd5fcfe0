"""How many XLA compilations a jitted Flax MinkUNet training run costs when every step sees a new scan
(issue 20: "say how many compiles a 100-scan run costs"), with exact and with bucketed kernel maps.

Each step takes a different crop of the synthetic street scan (crop half-width ``3 + spread * i`` m, so the
voxel count changes from scan to scan as real scans' do), builds the kernel maps outside ``jit`` and runs
an ``nnx.jit``-ed SGD step. A trace counter inside the step counts the compilations; the first call on
each scan is timed against a second call on the same scan (compiled). Exact maps carry their sizes as
static pytree fields and the features their row count, so every new scan compiles; bucketed maps
(``kernel_maps(voxels, bucket=True)``: rows and pairs rounded up to eight buckets per power of two)
compile once per bucket signature (the five levels' row buckets and every map's pair bucket), so their
count stops growing once a run's scans have visited their signatures; exact maps compile at every scan.

    python -m benchmarks.probes.jax_compiles [--scans 6] [--spread 0.02] [--modes exact bucketed] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def run(scans: int, spread: float, bucket: bool) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sparsevox.adapters.flax import MinkUNet
    from sparsevox.examples import flax_train as ft

    model = MinkUNet(4, 3, widths=ft.SMALL, blocks=1, rngs=nnx.Rngs(0))
    traces = [0]

    def loss_of(logits, labels, maps):
        if not bucket:
            return ft.cross_entropy(logits, labels)
        mask = maps[0].mask()
        ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1)[:, 0]
        return jnp.where(mask, ce, 0).sum() / mask.sum()

    @nnx.jit
    def step(model, feats, maps, labels):
        traces[0] += 1  # runs only while tracing: once per compilation
        loss, grads = nnx.value_and_grad(lambda m: loss_of(m(feats, maps), labels, maps))(model)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree_util.tree_map(lambda p, g: p - 0.05 * g, params, grads))
        return loss

    rows = []
    for i in range(scans):
        v, labels = ft.scene(3.0 + spread * i)  # a new crop: a new voxel count
        maps = model.kernel_maps(v, bucket=bucket)
        feats = maps[0].pad(v.feats) if bucket else v.feats
        labels = maps[0].pad(labels) if bucket else labels
        before = traces[0]
        t = time.perf_counter()
        jax.block_until_ready(step(model, feats, maps, labels))
        first = time.perf_counter() - t
        t = time.perf_counter()
        jax.block_until_ready(step(model, feats, maps, labels))
        again = time.perf_counter() - t
        rows.append({"scan": i, "voxels": int(v.num_voxels), "compiles": traces[0] - before,
                     "first_call_s": first, "compiled_call_s": again})
        print(f"{'bucketed' if bucket else 'exact'} scan {i}: {v.num_voxels:,} voxels, {traces[0] - before} "
              f"compile(s), first call {first:.2f} s, "
              f"compiled call {again:.3f} s", flush=True)
    per_scan = sum(r["compiles"] for r in rows) / len(rows)
    return {"bucketed": bucket, "spread_m": spread, "scans": rows, "compiles_per_scan": per_scan,
            "compiles": sum(r["compiles"] for r in rows),
            "compile_overhead_s_per_scan": float(np.median([r["first_call_s"] - r["compiled_call_s"] for r in rows]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, default=6, help="new scans to run in each mode (>= 1)")
    ap.add_argument("--spread", type=float, default=0.02, help="crop half-width step between scans (m)")
    ap.add_argument("--modes", nargs="+", choices=("exact", "bucketed"), default=["exact", "bucketed"],
                    help="which kernel maps to run (exact maps compile at every scan: 100 of them take minutes)")
    ap.add_argument("--out", default=None, help="write the result JSON here")
    a = ap.parse_args(argv)
    if a.scans < 1:
        raise ValueError(f"--scans must be >= 1, got {a.scans}")
    import jax

    from benchmarks import provenance
    modes = [run(a.scans, a.spread, bucket) for bucket in (False, True) if ("bucketed" if bucket else "exact") in a.modes]
    doc = {**provenance.header(provenance.gpu_name() or "cpu"), "what": "jax_compiles",
           "backend": jax.default_backend(), "modes": modes}
    for m in modes:
        print(f"{'bucketed' if m['bucketed'] else 'exact'}: {m['compiles']} compilations over {len(m['scans'])} new "
              f"scans; median first-call overhead {m['compile_overhead_s_per_scan']:.2f} s ({doc['backend']})")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
