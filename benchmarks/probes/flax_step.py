"""Where a jitted Flax MinkUNet step on a fresh scan spends its time (issue 20: the Flax step was 3.1× slower
than torch's at 7b3ec93, with no breakdown): per step, the kernel maps and padding outside ``jit``, the
jitted step (ending in ``block_until_ready``), and inside it the host time of every ``buffer_callback``
(each convolution, pooling or point op that does not take the XLA FFI path), by kind.

    python -m benchmarks.probes.flax_step [--scene semantickitti] [--steps 10] [--modes fp32_infer fp32_train]
                                          [--widths 32,32,64,128,256,128,96,96,96] [--ffi 0|1]
                                          [--out FILE.json | --out DIR --stem STEM] [--quick] [--budget-s S]

(``--out DIR --stem STEM --quick --budget-s S`` as ``benchmarks/gpu_suite.sh`` passes them to a module:
the records go to ``DIR/STEM-flax_step.json``; ``--quick`` runs 5 steps; a mode not started within the
budget is left out.)

Every step takes a different crop of the scene (a new scan: new maps, first calls on them); the maps are
bucketed (``kernel_maps(voxels, bucket=True)``), so the step compiles only when a bucket signature is new
(counted, and those steps are reported apart). Callbacks are timed by wrapping the adapter's ``_call``
before the first trace, so the compiled step carries the timers: a callback's figure is its host time
inside XLA's execution (on the GPU its kernels run asynchronously on XLA's stream, so the sum is host work,
not device time). ``callbacks_ms`` next to ``step_ms`` says how much of a step is Python inside XLA.
On a CPU (``--scene tiny``) it runs as a smoke test; the figures that matter come from a GPU.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_WIDTHS = "32,32,64,128,256,128,96,96,96"


class CallbackTimer:
    """Wraps ``sparsevox.adapters.jax._call`` so every callback traced afterwards adds its host time and
    count under its kind (the qualified name of the function it runs, e.g. ``_forward.<locals>.run``)."""

    def __init__(self, svj):
        self.svj, self.orig = svj, svj._call
        self.ms = collections.Counter()
        self.calls = collections.Counter()

    def _timed(self, fn, kind):
        if fn is None:
            return None

        def wrapped(*a):
            t = time.perf_counter()
            try:
                return fn(*a)
            finally:
                self.ms[kind] += (time.perf_counter() - t) * 1e3
                self.calls[kind] += 1
        return wrapped

    def __enter__(self):
        orig = self.orig

        def call(fn, out_shapes, *args, fast=None):
            kind = fn.__qualname__.replace(".<locals>", "")
            return orig(self._timed(fn, kind), out_shapes, *args, fast=self._timed(fast, kind + ".fast"))
        self.svj._call = call
        return self

    def __exit__(self, *exc):
        self.svj._call = self.orig

    def take(self) -> tuple[dict, dict]:
        """``(ms by kind, calls by kind)`` since the last take."""
        ms, calls = dict(self.ms), dict(self.calls)
        self.ms.clear()
        self.calls.clear()
        return ms, calls


def _crops(coords: np.ndarray, steps: int, rng) -> list[np.ndarray]:
    """``steps`` different scans: the scene without a random 5-15 % of its voxels each time (real scans of
    one sensor differ in count and in which voxels they hold; the bucket signature mostly stays)."""
    out = []
    for _ in range(steps):
        keep = rng.random(len(coords)) >= rng.uniform(0.05, 0.15)
        out.append(np.ascontiguousarray(coords[keep]))
    return out


def run_mode(mode: str, scans, widths, in_channels: int = 4, classes: int = 20) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import sparsevox as sv
    from benchmarks import flax_cell
    from sparsevox.adapters import jax as svj
    from sparsevox.adapters.flax import MinkUNet

    train = mode == "fp32_train"
    model = MinkUNet(in_channels, classes, widths=tuple(widths), rngs=nnx.Rngs(0))
    model.train() if train else model.eval()
    traces = [0]
    train_step, infer = flax_cell.jitted_steps(traces)  # the end-to-end benchmark's Flax steps

    rng = np.random.default_rng(1)
    rows = []
    with CallbackTimer(svj) as timer:
        for coords in scans:
            feats = rng.standard_normal((len(coords), in_channels)).astype(np.float32)
            labels = rng.integers(0, classes, len(coords)).astype(np.int32)
            t0 = time.perf_counter()
            v = sv.Voxels(jnp.asarray(coords), jnp.asarray(feats))
            maps = model.kernel_maps(v, bucket=True)
            f = maps[0].pad(v.feats)
            jax.block_until_ready(f)
            t1 = time.perf_counter()
            before = traces[0]
            out = train_step(model, f, maps, maps[0].pad(jnp.asarray(labels))) if train else infer(model, f, maps)
            jax.block_until_ready(out)
            t2 = time.perf_counter()
            ms, calls = timer.take()
            rows.append({"voxels": len(coords), "compiled": traces[0] > before, "maps_ms": (t1 - t0) * 1e3,
                         "step_ms": (t2 - t1) * 1e3, "callbacks_ms": sum(ms.values()),
                         "callbacks": sum(calls.values()), "by_kind_ms": ms, "by_kind_calls": calls})
    warm = [r for r in rows if not r["compiled"]]
    summary = {}
    if warm:
        med = {k: statistics.median(r[k] for r in warm) for k in ("maps_ms", "step_ms", "callbacks_ms", "callbacks")}
        kinds = sorted({k for r in warm for k in r["by_kind_ms"]})
        med["by_kind_ms"] = {k: statistics.median(r["by_kind_ms"].get(k, 0.0) for r in warm) for k in kinds}
        med["by_kind_calls"] = {k: statistics.median(r["by_kind_calls"].get(k, 0) for r in warm) for k in kinds}
        summary = med
    return {"mode": mode, "path": svj.jax_call_path()[0], "compiles": traces[0], "steps": rows,
            "median_of_steps_without_compile": summary}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scene", default="semantickitti", help="a benchmarks.scenes name, or 'tiny' (CPU smoke test)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--modes", nargs="+", default=["fp32_infer", "fp32_train"], choices=["fp32_infer", "fp32_train"])
    ap.add_argument("--widths", default=DEFAULT_WIDTHS, help="nine comma-separated level widths")
    ap.add_argument("--ffi", choices=["0", "1"], default=None, help="set SPARSEVOX_JAX_FFI (default: as it is)")
    ap.add_argument("--out", default=None, help="write the records here (a .json file, or a folder with --stem)")
    ap.add_argument("--stem", default=None, help="with --out DIR: the records go to DIR/STEM-flax_step.json")
    ap.add_argument("--quick", action="store_true", help="5 steps")
    ap.add_argument("--budget-s", type=float, default=None, help="start no mode after this many seconds")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 5)
    if args.steps < 2:
        ap.error(f"--steps must be >= 2 (the first compiles), got {args.steps}")
    widths = [int(w) for w in args.widths.split(",")]
    if len(widths) != 9 or min(widths) < 1:
        ap.error(f"--widths must be nine positive integers, got {args.widths!r}")
    import os
    if args.ffi is not None:
        os.environ["SPARSEVOX_JAX_FFI"] = args.ffi
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # CuPy's pool needs GPU memory too
    if args.scene == "tiny":
        from sparsevox.examples import flax_train as ft
        coords = np.asarray(ft.scene(3.0)[0].coords)
    else:
        from benchmarks import scenes
        found = scenes.load_scenes([args.scene])
        if not found:
            print(f"flax_step: scene {args.scene!r} not found", file=sys.stderr)
            return 1
        coords = found[0].coords
    scans = _crops(coords, args.steps, np.random.default_rng(0))
    records = []
    t0 = time.monotonic()
    for mode in args.modes:
        if args.budget_s is not None and time.monotonic() - t0 > args.budget_s:
            print(f"flax_step: budget of {args.budget_s:g} s spent; {mode} not run")
            continue
        rec = run_mode(mode, scans, widths)
        records.append(rec)
        m = rec["median_of_steps_without_compile"]
        print(f"{args.scene} {mode} ({rec['path']}): {rec['compiles']} compiles in {args.steps} steps; "
              + (f"median step {m['step_ms']:.2f} ms (maps {m['maps_ms']:.2f} ms outside), callbacks "
                 f"{m['callbacks_ms']:.2f} ms host in {m['callbacks']:.0f} calls" if m else "every step compiled"))
        for kind, ms in sorted(m.get("by_kind_ms", {}).items(), key=lambda kv: -kv[1]):
            print(f"    {kind:48s} {ms:8.2f} ms  {m['by_kind_calls'][kind]:5.0f} calls")
    if args.out:
        from benchmarks import provenance
        path = Path(args.out)
        if args.stem is not None or path.is_dir():
            path.mkdir(parents=True, exist_ok=True)
            path = path / f"{args.stem or provenance.stem()}-flax_step.json"
        path.write_text(json.dumps({**provenance.header(provenance.gpu_name() or "cpu"), "scene": args.scene,
                                    "widths": widths, "records": records}, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
