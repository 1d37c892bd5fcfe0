"""Where a fresh-scan MinkUNet step spends its time, sparsevox and spconv side by side (issue 19).

``python -m benchmarks.probes.step_profile [--scene semantickitti] [--modes fp16_infer fp16_train ...]
[--steps 3] [--out DIR] [--trace]``

For each library and mode (the steps of :mod:`benchmarks.end_to_end`: a fresh input from the points every
step), after 3 warm-up steps:

1. ``--steps`` steps under ``torch.profiler`` (CPU + CUDA activities). From its trace, per step: wall ms;
   host synchronisations (``cuda/cu`` ``Event``/``Stream``/``Device``/``Ctx`` ``Synchronize``) with the
   host time they block; synchronous copies (``cudaMemcpy``, ``cuMemcpyDtoH`` ...); kernel launches
   (runtime and driver API), memsets, memcpys and device allocations; device ms (kernels, copies and
   memsets, union of their intervals) and the GPU-busy fraction (device ms / wall ms); the 12 kernels
   with the most device time. ``--trace`` also writes the sparsevox trace (gzip JSON) of each mode.
2. One step with a device synchronisation around every convolution, BatchNorm, ReLU and the classifier
   (forward hooks; backward not split): ms and calls per layer kind (``subm_k3``, ``k1``, ``down_k2s2``,
   ``up_k2s2``, ``batchnorm``, ``relu``, ``linear``) — the per-kind comparison of issue 19.

``--compat`` adds the spconv-API MinkUNet on ``sparsevox.compat.spconv`` (same weights) as a third library,
to find where its step costs more than native sparsevox's (issue 21).

Prints a Markdown report and writes ``<out>/<stem>-step_profile.json`` and ``.md`` when ``--out`` is given.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import statistics
import sys
import time

from benchmarks.map_build_timeline import _trace_events

SYNC_CALLS = ("cudaEventSynchronize", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cuEventSynchronize",
              "cuStreamSynchronize", "cuCtxSynchronize")
SYNC_COPIES = ("cudaMemcpy", "cuMemcpyDtoH_v2", "cuMemcpyHtoD_v2", "cuMemcpy", "cuMemcpyDtoH", "cuMemcpyHtoD",
               "cudaMemcpyToSymbol", "cudaMemcpyFromSymbol")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC",
            "cudaLaunchCooperativeKernel")
ALLOCS = ("cudaMalloc", "cuMemAlloc_v2", "cuMemAlloc", "cudaMallocAsync", "cuMemAllocAsync", "cudaHostAlloc",
          "cuMemHostAlloc", "cudaMallocHost", "cuMemAllocHost_v2")
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def _union_ms(intervals) -> float:
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total / 1e3


def summarise_trace(events, steps: int, wall_ms: list[float]) -> dict:
    """Per-step counts from a chrome-trace event list (``torch.profiler`` export)."""
    calls = collections.Counter()
    blocked = collections.Counter()
    kernels = collections.defaultdict(float)
    launched = collections.Counter()
    device = []
    counts = collections.Counter()
    for e in events:
        if e.get("ph") != "X":
            continue
        cat, name, dur = e.get("cat", ""), e.get("name", ""), float(e.get("dur", 0.0))
        if cat in ("cuda_runtime", "cuda_driver"):
            calls[name] += 1
            blocked[name] += dur
        elif cat in DEVICE_CATS:
            device.append((float(e["ts"]), float(e["ts"]) + dur))
            counts[cat] += 1
            if cat == "kernel":
                kernels[name] += dur
                launched[name] += 1

    def per_step(names, table=calls):
        return round(sum(table[n] for n in names) / steps, 1)

    dev_ms = _union_ms(device) / steps
    wall = statistics.median(wall_ms)
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    return {
        "wall_ms": round(wall, 2),
        "device_ms": round(dev_ms, 2),
        "gpu_busy": round(dev_ms / wall, 3) if wall else None,
        "syncs": per_step(SYNC_CALLS),
        "sync_blocked_ms": round(sum(blocked[n] for n in SYNC_CALLS) / steps / 1e3, 2),
        "sync_by_call": {n: round(calls[n] / steps, 1) for n in SYNC_CALLS if calls[n]},
        "sync_copies": per_step(SYNC_COPIES),
        "launch_calls": per_step(LAUNCHES),
        "kernels": round(counts["kernel"] / steps, 1),
        "memsets": round(counts["gpu_memset"] / steps, 1),
        "memcpys": round(counts["gpu_memcpy"] / steps, 1),
        "allocs": per_step(ALLOCS),
        "top_kernels": [{"name": n[:120], "ms_per_step": round(d / steps / 1e3, 3)} for n, d in top],
        "launches_by_kernel": _per_step_by_prefix(launched, steps),
    }


def _per_step_by_prefix(counts, steps: int, width: int = 120) -> dict:
    """Launches per step keyed by the first ``width`` characters of the kernel name, summed over names that
    share them (template instantiations often differ only further on)."""
    out = collections.Counter()
    for name, n in counts.items():
        out[name[:width]] += n
    return {name: round(n / steps, 1) for name, n in out.items()}


def launch_differences(doc: dict, lib: str, base: str = "sparsevox") -> list[str]:
    """Markdown lines: per mode, the kernels launched a different number of times per step by ``lib``
    than by ``base`` (what compat adds over native, issue 21), most extra launches first."""
    by = {(r["mode"], r["library"]): r["summary"].get("launches_by_kernel", {}) for r in doc["records"]
          if r.get("summary")}
    lines = []
    for mode in dict.fromkeys(m for m, _ in by):
        if (mode, lib) not in by or (mode, base) not in by:
            continue
        a, b = by[(mode, lib)], by[(mode, base)]
        if not a or not b:  # (a record from before the counts were kept)
            continue
        diff = sorted(((a.get(n, 0) - b.get(n, 0), n) for n in set(a) | set(b) if a.get(n, 0) != b.get(n, 0)),
                      key=lambda t: (-t[0], t[1]))
        lines += [f"**{mode}**, {lib} − {base}: {sum(d for d, _ in diff):+.1f} launches per step", ""]
        lines += [f"- {d:+.1f} {n[:100]}" for d, n in diff[:15]] + [""]
    return lines


def layer_kind(m) -> str | None:
    """The layer kind of a module of either library's MinkUNet, or None for containers."""
    name = type(m).__name__
    if name in ("BatchNorm", "BatchNorm1d"):
        return "batchnorm"
    if name == "ReLU":
        return "relu"
    if name == "Linear":
        return "linear"
    if not hasattr(m, "kernel_size") or not hasattr(m, "stride"):
        return None
    ks = tuple(m.kernel_size) if not isinstance(m.kernel_size, int) else (m.kernel_size,)
    st = tuple(m.stride) if not isinstance(m.stride, int) else (m.stride,)
    if getattr(m, "transposed", False) or getattr(m, "inverse", False):
        return "up_k2s2"
    if all(k == 1 for k in ks):
        return "k1"
    if any(s > 1 for s in st):
        return "down_k2s2"
    return "subm_k3"


def per_kind_ms(model, step, sync) -> dict:
    """ms and calls per layer kind of one ``step()``, a synchronisation around every leaf layer."""
    totals = collections.defaultdict(lambda: [0.0, 0])
    handles = []
    for m in model.modules():
        kind = layer_kind(m)
        if kind is None:
            continue

        def pre(mod, args, kind=kind):
            sync()
            mod._sv_t0 = time.perf_counter()

        def post(mod, args, out, kind=kind):
            sync()
            totals[kind][0] += (time.perf_counter() - mod._sv_t0) * 1e3
            totals[kind][1] += 1
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        step()
        sync()
    finally:
        for h in handles:
            h.remove()
    return {k: {"ms": round(v[0], 3), "calls": v[1]} for k, v in sorted(totals.items())}


def host_profile(step, sync, lines: int = 45) -> str:
    """cProfile of one ``step()`` (after the warm-ups): the top functions by own and by cumulative time."""
    import cProfile
    import io
    import pstats
    sync()
    prof = cProfile.Profile()
    prof.enable()
    step()
    sync()
    prof.disable()
    out = io.StringIO()
    for key in ("tottime", "cumulative"):
        pstats.Stats(prof, stream=out).sort_stats(key).print_stats(lines)
    return out.getvalue()


def profile_cell(step, steps: int, trace_path: str | None) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile
    sync = torch.cuda.synchronize
    for _ in range(3):
        step()
    sync()
    wall = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            sync()
            t = time.perf_counter()
            step()
            sync()
            wall.append((time.perf_counter() - t) * 1e3)
    events = _trace_events(prof)
    if trace_path:
        with gzip.open(trace_path, "wt") as f:
            json.dump({"traceEvents": events}, f)
    return summarise_trace(events, steps, wall)


def render(doc: dict) -> str:
    lines = [f"# Step profile: MinkUNet, {doc['scene']}, fresh maps every step",
             "", f"{doc['device']}, {doc['date']}, commit {doc['commit']}; {doc['steps']} profiled steps per cell "
             "after 3 warm-ups (`benchmarks/probes/step_profile.py`).", "",
             "| mode | library | wall ms | device ms | GPU busy | host syncs | blocked ms | sync copies | "
             "launches | kernels | memsets | memcpys | allocs |", "|---" * 13 + "|"]
    for r in doc["records"]:
        s = r.get("summary")
        if not s:
            lines.append(f"| {r['mode']} | {r['library']} | {r.get('error', '')} |")
            continue
        lines.append(f"| {r['mode']} | {r['library']} | {s['wall_ms']} | {s['device_ms']} | {s['gpu_busy']:.0%} | "
                     f"{s['syncs']} | {s['sync_blocked_ms']} | {s['sync_copies']} | {s['launch_calls']} | "
                     f"{s['kernels']} | {s['memsets']} | {s['memcpys']} | {s['allocs']} |")
    lines += ["", "## Per layer kind (forward, a synchronisation around every layer)", "",
              "| mode | kind | " + " | ".join(f"{lib} ms (calls)" for lib in _libraries(doc)) + " |",
              "|---|---|" + "---|" * len(_libraries(doc))]
    by_mode = collections.defaultdict(dict)
    for r in doc["records"]:
        if r.get("kinds"):
            by_mode[r["mode"]][r["library"]] = r["kinds"]
    for mode, libs in by_mode.items():
        kinds = sorted(set().union(*[set(v) for v in libs.values()]))
        for k in kinds:
            cells = []
            for lib in _libraries(doc):
                v = libs.get(lib, {}).get(k)
                cells.append(f"{v['ms']:.2f} ({v['calls']})" if v else "-")
            lines.append(f"| {mode} | {k} | " + " | ".join(cells) + " |")
    lines += ["", "## Top kernels per step (device ms)", ""]
    for r in doc["records"]:
        if r.get("summary"):
            lines.append(f"**{r['mode']} {r['library']}**: " + "; ".join(
                f"{k['name'][:60]} {k['ms_per_step']}" for k in r["summary"]["top_kernels"][:8]))
            lines.append("")
        if r.get("sync_by_call"):
            lines.append(f"syncs by call: {r['sync_by_call']}")
    if "compat" in _libraries(doc):
        lines += ["## Kernels compat launches more or less often than native sparsevox", ""]
        lines += launch_differences(doc, "compat")
    return "\n".join(lines) + "\n"


def _libraries(doc) -> list[str]:
    """The libraries of the per-kind table: sparsevox and spconv, and compat when it ran."""
    ran = {r["library"] for r in doc["records"]}
    return ["sparsevox", "spconv"] + (["compat"] if "compat" in ran else [])


def build_models(scene: str, sp, compat=None):
    """``(libs, models, labels, n_voxels)`` for the MinkUNet step of :mod:`benchmarks.end_to_end` on
    ``scene``: native sparsevox, spconv (module ``sp``, when not None) and compat (module ``compat``, when
    not None) with the same weights and calibrated BatchNorm statistics, each kept on the CPU."""
    import torch

    from benchmarks import end_to_end as e2e
    from sparsevox.adapters.torch import MinkUNet
    plan = e2e.SCENES[scene]
    points, _ = e2e.scene_points(plan.source)
    xyz, feats, index = e2e.batch_points(points, plan.batch)
    vox = e2e.Voxeliser(xyz, feats, index, plan.voxel_size, "cuda")
    libs = e2e.Libraries(sp, vox, e2e.spm.DEFAULT_WIDTHS, compat)
    coords0, feats0 = vox()
    torch.manual_seed(0)
    labels = torch.randint(0, e2e.NUM_CLASSES, (len(coords0),), device="cuda")
    sv_model = MinkUNet(vox.channels, e2e.NUM_CLASSES).cuda()
    e2e.calibrate_batchnorm(sv_model, libs.make_input("sparsevox", coords0, feats0))
    models = {"sparsevox": sv_model.cpu()}
    if sp is not None:
        sp_model = libs.build_spconv().cuda()
        e2e.spm.load_from_sparsevox(sp_model, sv_model.cuda())
        models["spconv"] = sp_model.cpu()
        sv_model.cpu()
    if compat is not None:
        compat_model = libs.build_compat().cuda()
        e2e.spm.load_from_sparsevox(compat_model, sv_model.cuda())
        models["compat"] = compat_model.cpu()
        sv_model.cpu()
    return libs, models, labels, int(len(coords0))


def gpu_models(probe: str, scene: str, compat=None):
    """:func:`build_models` with spconv when it imports (else a line on stderr, sparsevox only), or None
    with a line on stderr when there is no GPU."""
    import torch

    from benchmarks import peers as peers_mod
    if not torch.cuda.is_available():
        print(f"{probe}: no GPU", file=sys.stderr)
        return None
    sp, why = peers_mod.import_peer("spconv")
    if sp is None:
        print(f"{probe}: spconv not importable ({why}); sparsevox only", file=sys.stderr)
    return build_models(scene, sp, compat)


def main(argv=None) -> int:
    from benchmarks import end_to_end as e2e
    from benchmarks import provenance
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scene", default="semantickitti", choices=list(e2e.SCENES))
    ap.add_argument("--modes", nargs="+", default=["fp16_infer", "fp16_train", "fp32_infer"],
                    choices=list(e2e.MODES + e2e.EXTRA_MODES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--stem", default=None)
    ap.add_argument("--trace", action="store_true", help="write the sparsevox traces (gzip chrome JSON)")
    ap.add_argument("--cprofile", action="store_true",
                    help="also one sparsevox step per mode under cProfile (<stem>-step_cprofile.txt)")
    ap.add_argument("--host-phases", action="store_true",
                    help="also host time per phase, both libraries (benchmarks/probes/host_phases.py; "
                         "<stem>-host_phases.md); with --phases-only, nothing else")
    ap.add_argument("--phases-only", action="store_true", help="only the host phases (no profiler)")
    ap.add_argument("--compat", action="store_true",
                    help="also the spconv-API MinkUNet on sparsevox.compat.spconv (library 'compat')")
    a = ap.parse_args(argv)
    import torch
    compat = None
    if a.compat:
        import sparsevox.compat.spconv as compat
    built = gpu_models("step_profile", a.scene, compat)
    if built is None:
        return 2
    libs, models, labels, n_voxels = built
    stem = a.stem or provenance.stem()
    doc = {**provenance.header(torch.cuda.get_device_name()), "scene": a.scene, "n_voxels": n_voxels, "steps": a.steps, "records": []}
    cprof, phase_rows = [], []
    for mode in a.modes:
        for lib, model in models.items():
            half = lib == "spconv" and mode == "fp16_infer"
            rec = {"mode": mode, "library": lib}
            step, m, cleanup = e2e.make_step(lib, model, mode, libs, labels, "cuda", half)
            try:
                trace = (os.path.join(a.out, f"{stem}-step_trace-{mode}.json.gz")
                         if a.trace and a.out and lib == "sparsevox" else None)
                if a.host_phases or a.phases_only:
                    from benchmarks.probes import host_phases as hp
                    for _ in range(3):
                        step()
                    fn = hp.host_phases if lib == "sparsevox" else hp.totals
                    rec["host_phases"] = fn(step, torch.cuda.synchronize, 5)
                    phase_rows.append({"mode": mode, "library": lib, **rec["host_phases"]})
                if not a.phases_only:
                    rec["summary"] = profile_cell(step, a.steps, trace)
                    rec["kinds"] = per_kind_ms(m, step, torch.cuda.synchronize)
                if a.cprofile and lib in ("sparsevox", "compat"):
                    cprof.append(f"==== {mode} {lib}\n" + host_profile(step, torch.cuda.synchronize))
            except Exception as e:  # report and go on with the other cells
                rec["error"] = f"{type(e).__name__}: {e}"[:300]
            finally:
                cleanup()
                del step, m
                torch.cuda.empty_cache()
            doc["records"].append(rec)
            print(json.dumps(rec), flush=True)
    text = render(doc) if not a.phases_only else f"# Host phases ({doc['device']}, {doc['date']}, {doc['commit']})\n"
    if phase_rows:
        from benchmarks.probes import host_phases as hp
        text += "\n" + hp.render(phase_rows)
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        what = "host_phases" if a.phases_only else "step_profile"
        with open(os.path.join(a.out, f"{stem}-{what}.json"), "w") as f:
            json.dump(doc, f, indent=1)
        with open(os.path.join(a.out, f"{stem}-{what}.md"), "w") as f:
            f.write(text)
        if cprof:
            with open(os.path.join(a.out, f"{stem}-step_cprofile.txt"), "w") as f:
                f.write("\n".join(cprof))
    return 0


if __name__ == "__main__":
    sys.exit(main())
