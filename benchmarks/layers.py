"""Layer benchmarks of sparsevox against spconv on the same geometry, in the same process.

    python -m benchmarks.layers [--quick] [--out DIR] [--stem STEM] [--algos A ...] [--scenes S ...]
                                [--channels C ...] [--dtypes D ...] [--peers P ...] [--budget-s S]
    python -m benchmarks.layers --cpu        # dry run on the CPU: tiny scenes, NumPy backend, no peers

Scenes: :mod:`benchmarks.scenes`. Per scene: the SubM k3 kernel-map build; then per dtype
(float16, float32), C in (32, 64, 128, 256) and op (``subm_fwd``: SubM k3 forward with the map cached,
``subm_fwd_bwd``: forward + gradients of features and weight, ``down``: k2 s2, ``up``: k2 s2 transposed
onto the finer voxels) each sparsevox algorithm forced alone (``fwd_algo = bwd_algo = [name]``) and AUTO,
next to the peers (:mod:`benchmarks.peers`). Figures are medians of CUDA-event timings after warm-up
(:mod:`benchmarks.timing`); the first warm-up call also autotunes.

Writes ``<out>/<stem>-layers.json`` ({"device", "date", "commit", "records", ...}; rewritten after every
scene, so a run cut short keeps what it measured), ``.md`` and ``.png`` (:mod:`benchmarks.report`).
A record::

    {"op", "scene", "n_voxels", "n_out", "pairs", "c_in", "c_out", "dtype",
     "algo": {"requested": "auto" | name, "chosen": {"fwd": {"name", "params"}, "dgrad": .., "wgrad": ..}},
     "ms", "min_ms", "max_ms", "repeats", "peer": {"spconv": ms, "spconv_with_map": ms, ...},
     "speedup_vs_spconv", "tflops", "cublas_tflops", "cublas_fraction", "peer_rel_err", "skipped" | "error"}
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
import time

from . import peers as peers_mod
from . import provenance, report, runners, scenes as scenes_mod
from .timing import DenseReference, time_call, tflops

log = logging.getLogger("sparsevox.benchmarks")

CHANNELS = (32, 64, 128, 256)
DTYPES = ("float16", "float32")
PASSES = {"subm_fwd": 1, "subm_fwd_bwd": 3, "down": 1, "up": 1}


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.layers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="C in (32, 128), 10 repeats")
    ap.add_argument("--cpu", "--dry-run", dest="cpu", action="store_true",
                    help="run on the CPU with tiny scenes through the NumPy backend (checks the plumbing)")
    ap.add_argument("--out", default=str(provenance.REPO / "benchmarks" / "results"), help="output folder")
    ap.add_argument("--stem", default=None, help="file-name stem (default <date>-<gpu>-<commit>)")
    ap.add_argument("--algos", nargs="+", default=None,
                    help="sparsevox algorithms to time (default: every contract algorithm, then auto)")
    ap.add_argument("--scenes", nargs="+", default=None, choices=list(scenes_mod.SCENES))
    ap.add_argument("--channels", nargs="+", type=int, default=None)
    ap.add_argument("--dtypes", nargs="+", default=None, choices=["float16", "bfloat16", "float32", "float64"])
    ap.add_argument("--ops", nargs="+", default=None, choices=list(runners.OPS))
    ap.add_argument("--peers", nargs="*", default=None, choices=list(peers_mod.MODULES),
                    help="peers to run when importable (default: spconv; spconv_triton autotunes for minutes)")
    ap.add_argument("--api", default="auto", choices=["auto", "torch", "core"],
                    help="call sparsevox through the torch adapter or the core (auto: torch when it imports)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 3; CPU 1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls (default 20; --quick 10; CPU 3)")
    ap.add_argument("--max-voxels", type=int, default=None, help="crop scenes (default: none; CPU 1500)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new measurement after this many seconds; results so far are written")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


@contextlib.contextmanager
def recorded_choices():
    """Record the algorithm and parameters that ran per direction while the block runs:
    ``{"fwd": {...}, ...}`` (from ``sparsevox.conv.last_plans``, set on every call, forced or AUTO)."""
    from sparsevox import conv
    conv.last_plans.clear()
    seen: dict = {}
    try:
        yield seen
    finally:
        for (_, direction), (name, params) in conv.last_plans.items():
            seen[direction] = {"name": name, "params": dict(params)}


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


class Run:
    """One benchmark run: settings, the records so far, and the deadline."""

    def __init__(self, args):
        self.args = args
        self.device = "cpu" if args.cpu else "gpu"
        self.quick = args.quick
        self.warmup = args.warmup if args.warmup is not None else (1 if args.cpu else 3)
        self.repeats = args.repeats if args.repeats is not None else (3 if args.cpu else (10 if args.quick else 20))
        self.channels = tuple(args.channels or ((8, 16) if args.cpu else ((32, 128) if args.quick else CHANNELS)))
        self.dtypes = tuple(args.dtypes or DTYPES)
        self.ops = tuple(args.ops or runners.OPS)
        self.max_voxels = args.max_voxels if args.max_voxels is not None else (1500 if args.cpu else 0)
        self.algos = [a.lower() for a in (args.algos or runners.conv_algorithms() + ["auto"])]
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s if args.budget_s else float("inf")
        self.truncated = False
        self.records: list[dict] = []
        self.dense = DenseReference(self.device, self.warmup, self.repeats)
        self.api = self._api(args.api)
        self.peers = {}  # name -> imported module
        self.peer_info = {}  # name -> version or why absent
        if self.device == "gpu":
            for name in (args.peers if args.peers is not None else ["spconv"]):
                mod, why = peers_mod.import_peer(name)
                if mod is None:
                    self.peer_info[name] = f"not run ({why})"
                    log.warning("peer %s not importable: %s", name, why)
                else:
                    self.peers[name] = mod
                    self.peer_info[name] = peers_mod.peer_version(name) or "imported"
        else:
            self.peer_info = {"spconv": "not run on the CPU"}

    def _api(self, api):
        if api == "auto":
            ok, why = runners.torch_adapter_ready()
            if self.device == "cpu":
                return "core"  # the dry run exercises the NumPy backend directly
            if not ok:
                log.warning("torch adapter not usable (%s): timing the core on CuPy arrays", why)
            return "torch" if ok else "core"
        return api

    def out_of_time(self) -> bool:
        if time.monotonic() > self.deadline:
            if not self.truncated:
                log.warning("time budget of %.0f s reached: no new measurements", self.args.budget_s)
            self.truncated = True
        return self.truncated

    def time(self, fn):
        return time_call(fn, self.device, self.warmup, self.repeats)


def device_name(device: str) -> str:
    if device == "cpu":
        import platform
        return f"CPU {platform.processor() or platform.machine()} (NumPy backend dry run)"
    return provenance.gpu_name() or "unknown GPU"


def measure_map_build(run: Run, scene, geo, peer_geos) -> dict:
    # ``sparsevox.kernel_map`` is also the name of the function the package exports: fetch the module.
    kmm = importlib.import_module("sparsevox.kernel_map")
    rec = {"op": "map_build", "scene": scene.name, "n_voxels": scene.n_voxels, "n_out": scene.n_voxels,
           "pairs": None, "c_in": None, "c_out": None, "dtype": None, "algo": {"requested": "kernel_map"},
           "ms": None, "peer": {}, "tflops": None, "cublas_fraction": None}
    try:
        fn, pairs = geo.map_build()  # (the first GPU build registers the GPU builder: name it after)
        builder = getattr(kmm, "BUILDERS", {}).get("cupy" if run.device == "gpu" else "numpy",
                                                   getattr(kmm, "build_kernel_map", None))
        rec["algo"]["builder"] = _qualname(builder)
        rec["pairs"] = pairs
        rec.update(run.time(fn).as_dict())
        rec["ms_ready"] = run.time(geo.map_build(ready=True)[0]).ms  # pairs taken too (KernelMap.wait)
    except Exception as e:
        rec["error"] = _error_text(e)
        log.exception("map_build on %s failed", scene.name)
    for name, pg in peer_geos.items():
        for key, train in ((name, False), (f"{name}_train", True)):
            try:
                rec["peer"][key] = run.time(pg.map_build(is_train=train)).ms
            except Exception as e:
                rec.setdefault("peer_errors", {})[key] = _error_text(e)
                log.warning("%s map build failed: %s", key, _error_text(e))
    rec["speedup_vs_spconv"] = report.speedup(rec)
    log.info("%s map_build: %s ms (pairs taken: %s ms), peers %s", scene.name, _r(rec.get("ms")),
             _r(rec.get("ms_ready")), {k: _r(v) for k, v in rec["peer"].items()})
    return rec


def _qualname(fn) -> str:
    return "?" if fn is None else f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__name__', '?')}"


def _r(x):
    return None if x is None else round(x, 4)


def measure_peer(run: Run, name, pl, op) -> tuple[dict, object]:
    """``({key: ms}, output)`` of a peer's op (output of the cached variant, for the SubM check)."""
    out, times = None, {}
    variants = {"subm_fwd": [(name, pl.subm_fwd)], "subm_fwd_bwd": [(name, pl.subm_fwd_bwd)],
                "down": [(name, pl.down_cached), (f"{name}_with_map", pl.down_with_map)],
                "up": [(name, pl.up_fwd)]}[op]
    for key, make in variants:
        if run.out_of_time():
            break
        try:
            fn = make()
            times[key] = run.time(fn).ms
            if key == name and op == "subm_fwd":
                out = fn()
        except Exception as e:
            times.setdefault("errors", {})[key] = _error_text(e)
            log.warning("%s %s failed: %s", key, op, _error_text(e))
    return times, out


def measure_layers(run: Run, scene, geo, peer_geos, dtype, c):
    try:
        layers = runners.Layers(geo, c, dtype)
    except Exception as e:
        log.exception("setting up %s %s C=%d failed", scene.name, dtype, c)
        run.records.append({"op": "setup", "scene": scene.name, "dtype": dtype, "c_in": c, "c_out": c,
                            "error": _error_text(e), "ms": None})
        return
    peer_layers = {}
    for name, pg in peer_geos.items():
        if dtype not in ("float16", "float32"):
            continue  # spconv runs neither float64 nor (reliably) bfloat16
        try:
            peer_layers[name] = peers_mod.PeerLayers(pg, layers.feats, layers.weights)
        except Exception as e:
            log.warning("%s setup failed for %s %s C=%d: %s", name, scene.name, dtype, c, _error_text(e))
    n_out = {"subm_fwd": scene.n_voxels, "subm_fwd_bwd": scene.n_voxels, "down": layers.n_coarse,
             "up": scene.n_voxels}
    for op in (o for o in run.ops if o != "map_build"):
        if run.out_of_time():
            return
        peer_ms, peer_out = {}, {}
        for name, pl in peer_layers.items():
            t, o = measure_peer(run, name, pl, op)
            errs = t.pop("errors", None)
            peer_ms.update(t)
            if o is not None:
                peer_out[name] = o
            if errs:
                peer_ms.setdefault("errors", {}).update(errs)
        peer_errors = peer_ms.pop("errors", None)
        line = []
        for algo in run.algos:
            if run.out_of_time():
                break
            rec = {"op": op, "scene": scene.name, "n_voxels": scene.n_voxels, "n_out": n_out[op], "pairs": None,
                   "c_in": c, "c_out": c, "dtype": dtype, "algo": {"requested": algo}, "ms": None,
                   "peer": dict(peer_ms), "tflops": None, "cublas_fraction": None}
            if peer_errors:
                rec["peer_errors"] = peer_errors
            try:
                fn, pairs = layers.op(op, algo if algo == "auto" else [algo])
                rec["pairs"] = pairs
                with recorded_choices() as chosen:
                    out = fn()  # first call: compiles and autotunes; its choice is recorded
                rec["algo"]["chosen"] = chosen
                if op == "subm_fwd" and peer_out:
                    ours = runners.as_torch(out)
                    rec["peer_rel_err"] = {k: peers_mod.relative_error(ours, v) for k, v in peer_out.items()}
                rec.update(run.time(fn).as_dict())
            except Exception as e:
                from sparsevox.errors import AlgorithmUnavailableError
                if isinstance(e, AlgorithmUnavailableError):
                    rec["skipped"] = _error_text(e)
                else:
                    rec["error"] = _error_text(e)
                    log.warning("%s %s %s C=%d %s failed: %s", scene.name, dtype, op, c, algo, rec["error"])
            if rec.get("ms"):
                rec["tflops"] = tflops(rec["pairs"], c, c, rec["ms"], PASSES[op])
                dense = run.dense.tflops(rec["pairs"], c, c, dtype)
                rec["cublas_tflops"] = dense
                rec["cublas_fraction"] = rec["tflops"] / dense if dense and rec["tflops"] else None
            rec["speedup_vs_spconv"] = report.speedup(rec)
            run.records.append(rec)
            line.append(f"{algo}={_r(rec['ms']) if rec.get('ms') else ('n/a' if rec.get('skipped') else 'ERR')}")
        log.info("%s %s C=%d %s: %s | peers %s", scene.name, dtype, c, op, " ".join(line),
                 {k: _r(v) for k, v in peer_ms.items()})


def document(run: Run, scene_info) -> dict:
    import sparsevox
    doc = provenance.header(device_name(run.device))
    doc.update({
        "what": "layers",
        "settings": {"api": run.api, "device": run.device, "quick": run.quick, "warmup": run.warmup,
                     "repeats": run.repeats, "channels": list(run.channels), "dtypes": list(run.dtypes),
                     "algos": run.algos, "ops": list(run.ops), "tf32": _tf32(), "max_voxels": run.max_voxels,
                     "sparsevox": sparsevox.__version__, "python": sys.version.split()[0],
                     **_versions()},
        "peers": run.peer_info,
        "scenes": scene_info,
        "truncated": run.truncated,
        "elapsed_s": round(time.monotonic() - run.started, 1),
        "records": run.records,
    })
    return doc


def _tf32() -> bool:
    from sparsevox import config
    return bool(config.allow_tf32())


def _versions() -> dict:
    out = {}
    for mod in ("numpy", "torch", "cupy"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed: not part of this run
            pass
    return out


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    if not args.cpu:
        from sparsevox.cuda.gpu_info import gpu_available
        ok, why = gpu_available()
        if not ok:
            print(f"benchmarks.layers: no GPU ({why}); use --cpu for a dry run", file=sys.stderr)
            return 2
        import torch
        torch.backends.cuda.matmul.allow_tf32 = _tf32()  # the cuBLAS reference follows sparsevox's setting
    run = Run(args)
    stem = args.stem or provenance.stem(run.device)
    log.info("layers benchmark: api=%s device=%s stem=%s peers=%s", run.api, run.device, stem, run.peer_info)
    scenes = scenes_mod.load_scenes(args.scenes, run.max_voxels)
    scene_info = []
    for scene in scenes:
        if run.out_of_time():
            break
        info = {"name": scene.name, "n_voxels": scene.n_voxels, "voxel_size": scene.voxel_size,
                "source": scene.source, "neighbours": scenes_mod.neighbours_per_voxel(scene.coords)}
        scene_info.append(info)
        log.info("scene %s, %.2f neighbours per voxel", scene.label, info["neighbours"])
        geo = runners.Geometry(scene.coords, run.device, run.api)
        peer_geos = {}
        for name, mod in run.peers.items():
            try:
                peer_geos[name] = peers_mod.PeerGeometry(mod, scene.coords)
            except Exception as e:
                log.warning("%s cannot take scene %s: %s", name, scene.name, _error_text(e))
        if "map_build" in run.ops:
            run.records.append(measure_map_build(run, scene, geo, peer_geos))
        for dtype in run.dtypes:
            for c in run.channels:
                if run.out_of_time():
                    break
                measure_layers(run, scene, geo, peer_geos, dtype, c)
        report.write_json(document(run, scene_info), f"{args.out}/{stem}-layers.json")
        if run.device == "gpu":
            import torch
            torch.cuda.empty_cache()
    doc = document(run, scene_info)
    paths = report.write_all(doc, args.out, stem, "layers")
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    print(report.summary_text(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
