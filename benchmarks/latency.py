"""Where the time of ONE call goes, on the GPU: host, device, and what the benchmark harness adds.

``python -m benchmarks.latency --out DIR [--stem STEM]``. The layer benchmark times single calls between
two CUDA events (``benchmarks/timing.time_call``), so a call's host time before its first launch is
exposed in full. For the smallest layers (SubM k3, C=32 float16 forward, through the torch adapter,
map cached), for the kernel-map build, and for a fresh scan's first SubM layer (map build included),
this records per call:

- ``event_ms``: the layer benchmark's figure (events around one call, synchronise, median);
- ``host_us``: wall time of the call alone, with the device idle before it (no synchronise after);
- ``device_us``: device time per call with the host hidden: a sleeping kernel holds the stream while
  ``n`` calls queue behind it, events around the queued calls (not for the map build, which reads back);
- ``loop_us``: back-to-back calls, wall per call, one synchronise at the end.

The same for spconv's SubM layer when it is importable, and the harness floor (one tiny torch kernel).
For the map build also the host µs of each device operation of the GPU builder (``map_build_phases``).

JAX (issue 8): wall time of one jitted call ending in ``block_until_ready`` for a jitted no-op, a
jitted ``buffer_callback`` whose callback does nothing (plain, and ``command_buffer_compatible``), and
the sparsevox SubM forward; repeated in a child process with ``XLA_FLAGS=--xla_gpu_graph_min_graph_size=1``
(XLA command buffers also for one-op graphs). This bounds what the adapter's own work can win.
Writes ``<stem>-latency.json``; prints one line per figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.timing import timed_attrs, wall_ms

SLEEP_CYCLES = 20_000_000  # ~10 ms at H100 clocks: longer than the host needs to queue the calls


def _median(xs):
    return float(statistics.median(xs))


def decompose(fn, repeats: int = 40, queued: int = 20, device: bool = True) -> dict:
    """Figures of one call of ``fn`` (see the module docstring); µs except ``event_ms``."""
    import torch
    from benchmarks.timing import time_call
    rec = {"event_ms": time_call(fn, "gpu", 3, repeats).ms}
    host = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t) * 1e6)
    torch.cuda.synchronize()
    rec["host_us"] = _median(host)
    if device:
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        per = []
        for _ in range(5):
            torch.cuda._sleep(SLEEP_CYCLES)
            s.record()
            for _ in range(queued):
                fn()
            e.record()
            e.synchronize()
            per.append(s.elapsed_time(e) * 1e3 / queued)
        rec["device_us"] = _median(per)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(queued * 5):
        fn()
    torch.cuda.synchronize()
    rec["loop_us"] = (time.perf_counter() - t) * 1e6 / (queued * 5)
    return rec


def _line(name, rec):
    print(f"{name}: " + ", ".join(f"{k} {v:.3f}" if k.endswith("ms") else f"{k} {v:.1f}"
                                  for k, v in rec.items() if isinstance(v, float)), flush=True)


def torch_part(scene_names) -> dict:
    import torch

    from benchmarks import peers, scenes
    from benchmarks.runners import Geometry, Layers
    out = {}
    x = torch.zeros(1024, device="cuda")
    out["harness_floor_tiny_kernel"] = decompose(lambda: x.add_(1))
    _line("harness floor (x.add_(1))", out["harness_floor_tiny_kernel"])
    sp, why = peers.import_peer("spconv")
    for scene in scenes.load_scenes(scene_names):
        geo = Geometry(scene.coords, "gpu", "torch")
        lay = Layers(geo, 32, "float16")
        fn, _ = lay.subm_fwd("implicit_gemm")
        key = f"{scene.name}_subm_c32_f16_fwd"
        out[key] = decompose(fn)
        _line(key, out[key])
        if sp is not None:
            pg = peers.PeerGeometry(sp, scene.coords)
            pl = peers.PeerLayers(pg, lay.feats, lay.weights)
            out[key + "_spconv"] = decompose(pl.subm_fwd())
            _line(key + " spconv", out[key + "_spconv"])
        mb, _ = geo.map_build()
        out[f"{scene.name}_map_build"] = decompose(mb, device=False)
        _line(f"{scene.name} map build", out[f"{scene.name}_map_build"])
        out[f"{scene.name}_map_build_ready"] = decompose(geo.map_build(ready=True)[0], device=False)
        _line(f"{scene.name} map build, pairs taken", out[f"{scene.name}_map_build_ready"])
        out[f"{scene.name}_map_build_host_phases"] = map_build_phases(geo.coords)
        _line(f"{scene.name} map build host phases", out[f"{scene.name}_map_build_host_phases"])
        if sp is not None:
            pg = peers.PeerGeometry(sp, scene.coords)
            out[f"{scene.name}_map_build_spconv"] = decompose(pg.map_build(), device=False)
            _line(f"{scene.name} map build spconv", out[f"{scene.name}_map_build_spconv"])
        # A fresh scan's first layer: map build, first forward (its tables) and the layer itself. Our map
        # build leaves the pair count on the device until first use; this figure includes that use.
        key = f"{scene.name}_fresh_subm_c32_f16_fwd"
        out[key] = decompose(lay.subm_fresh("implicit_gemm"), device=False)
        _line(key, out[key])
        if sp is not None:
            out[key + "_spconv"] = decompose(pl.subm_fresh(), device=False)
            _line(key + " spconv", out[key + "_spconv"])
    if sp is None:
        out["spconv"] = f"not importable: {why}"
    return out


def map_build_phases(coords, n: int = 50) -> dict:
    """Host µs per SubM k3 map build (``kernel_map(Voxels(coords, None, check=False), 3)``, torch coords)
    spent in each device operation of the GPU builder (wrapped with timers), in making the ``Voxels``,
    and the rest (Python glue). The build does not wait for its kernels (``host_result`` records the event
    of the sizes); ``copy_pairs`` runs at a map's first use, so it is absent here."""
    import torch

    from sparsevox import Voxels, kernel_map
    from sparsevox.cuda import gpu_kernel_map as gkm
    dev = gkm._cupy_device()
    names = ("launch", "fill_ones", "host_buffer", "host_result", "copy_pairs", "view")
    with timed_attrs([(dev, name, name) for name in names]) as spent:
        kernel_map(Voxels(coords, None, check=False), 3)
        torch.cuda.synchronize()
        spent.clear()
        total = vox = 0.0
        for _ in range(n):
            t0 = time.perf_counter()
            v = Voxels(coords, None, check=False)
            t1 = time.perf_counter()
            kernel_map(v, 3)
            t2 = time.perf_counter()
            vox += t1 - t0
            total += t2 - t0
    rec = {"total_us": total / n * 1e6, "voxels_us": vox / n * 1e6}
    rec.update({f"{k}_us": v / n * 1e6 for k, v in spent.items()})
    rec["python_glue_us"] = rec["total_us"] - sum(v for k, v in rec.items() if k != "total_us")
    return rec


def _wall_us(fn, repeats=50):
    return wall_ms(fn, warmup=5, repeats=repeats) * 1e3


def jax_part() -> dict:
    """One jitted call + block_until_ready, µs: the floor XLA sets under any buffer_callback."""
    import jax
    import jax.numpy as jnp
    from jax.experimental.buffer_callback import buffer_callback

    if jax.default_backend() != "gpu":
        return {"skipped": "jax has no GPU"}
    import sparsevox as sv
    from benchmarks import scenes
    from sparsevox.adapters import jax as svj
    scene = (scenes.load_scenes(["semantickitti"]) or scenes.load_scenes(["lidar_synth"]))[0]
    n, c = scene.n_voxels, 32
    x = jnp.zeros((n, c), jnp.float16)
    shape = jax.ShapeDtypeStruct(x.shape, x.dtype)

    def nothing(ctx, out, ins):
        del ctx, out, ins

    def touch_stream(ctx, out, ins):  # what the adapter's callback pays before its work: the stream
        int(ctx.stream)

    out = {"xla_flags": os.environ.get("XLA_FLAGS", "")}
    fns = {
        "jit_noop": jax.jit(lambda a: a + 1),
        "jit_buffer_callback_empty": jax.jit(lambda a: buffer_callback(nothing, shape)(a)),
        "jit_buffer_callback_stream": jax.jit(lambda a: buffer_callback(touch_stream, shape)(a)),
        "jit_buffer_callback_empty_cmdbuf": jax.jit(
            lambda a: buffer_callback(nothing, shape, command_buffer_compatible=True)(a)),
    }
    for name, f in fns.items():
        try:
            out[name + "_us"] = _wall_us(lambda f=f: f(x).block_until_ready())
        except Exception as e:  # one variant failing (e.g. a flag this jaxlib lacks) keeps the others
            out[name + "_error"] = f"{type(e).__name__}: {e}"[:300]
    rng = np.random.default_rng(0)
    fj = jnp.asarray(rng.standard_normal((n, c)).astype(np.float16))
    wj = jnp.asarray((rng.standard_normal((27, c, c)) / np.sqrt(27 * c)).astype(np.float16))
    kj = svj.kernel_map(sv.Voxels(jnp.asarray(scene.coords), fj), 3)
    fwd = jax.jit(lambda f, w, k: svj.conv_features(f, w, k))
    out["sparsevox_subm_c32_f16_fwd_us"] = _wall_us(lambda: fwd(fj, wj, kj).block_until_ready())
    # The adapter's own work inside the callback (``run``: map lookup, key, prepared launch), timed from
    # within, so that total - floor - run = what the callback's wrapper and XLA's round trip add.
    spent = {"s": 0.0, "n": 0}
    plain_call = svj._call

    def timed_call(fn, out_shapes, *args, fast=None):
        def run(outs, ins, on_gpu):
            t = time.perf_counter()
            try:
                fn(outs, ins, on_gpu)
            finally:
                spent["s"] += time.perf_counter() - t
                spent["n"] += 1
        def timed_fast(outs, ins, stream):  # counted as a callback only when it launched (else run is)
            t = time.perf_counter()
            ok = False
            try:
                ok = fast(outs, ins, stream)
                return ok
            finally:
                spent["s"] += time.perf_counter() - t
                spent["n"] += bool(ok)
        return plain_call(run, out_shapes, *args, fast=timed_fast if fast is not None else None)
    svj._call = timed_call
    try:
        fwd_t = jax.jit(lambda f, w, k: svj.conv_features(f, w, k))
        out["sparsevox_fwd_timed_us"] = _wall_us(lambda: fwd_t(fj, wj, kj).block_until_ready())
        spent.update(s=0.0, n=0)
        for _ in range(50):
            fwd_t(fj, wj, kj).block_until_ready()
        out["callback_run_us"] = spent["s"] / max(spent["n"], 1) * 1e6
    finally:
        svj._call = plain_call
    out["scene"] = scene.name
    for k, v in out.items():
        if k.endswith("_us"):
            print(f"jax {k}: {v:.1f}", flush=True)
    return out


def _jax_parts(budget_s: float) -> dict:
    """The JAX figures, in this process and in a child with XLA command buffers for one-op graphs."""
    rec = {"jax": jax_part()}
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_gpu_graph_min_graph_size=1").strip())
    try:
        child = subprocess.run([sys.executable, "-m", "benchmarks.latency", "--jax-only"], env=env,
                               capture_output=True, text=True, timeout=max(30, budget_s / 2))
        print(child.stdout[-3000:], child.stderr[-2000:], flush=True)
        lines = [ln for ln in child.stdout.splitlines() if ln.startswith("JSON ")]
        rec["jax_min_graph_size_1"] = json.loads(lines[-1][5:]) if lines else {"error": child.stderr[-2000:]}
    except subprocess.TimeoutExpired:
        rec["jax_min_graph_size_1"] = {"error": "timed out"}
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--stem", default="latency")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget-s", type=float, default=120)
    ap.add_argument("--jax-only", action="store_true", help="print the JAX part as JSON (child process)")
    ap.add_argument("--torch-only", action="store_true", help="skip the JAX part (diagnostic runs)")
    args = ap.parse_args(argv)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if args.jax_only:
        print("JSON " + json.dumps(jax_part()))
        return 0
    rec = {"torch": torch_part(["semantickitti", "lidar_synth"])}
    if not args.torch_only:
        rec.update(_jax_parts(args.budget_s))
    from benchmarks import provenance
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.stem}-latency.json"
    path.write_text(json.dumps({**provenance.header(provenance.gpu_name()), **rec}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
