"""Device time of every layer of a fresh-scan MinkUNet forward, sparsevox and spconv side by side (issue 19).

``python -m benchmarks.probes.layer_table [--scene semantickitti] [--modes fp16_infer fp32_infer]
[--steps 2] [--sort-ab] [--out DIR] [--stem STEM]``

The step profile's per-kind table times each layer between device synchronisations, so a layer's host work
counts too; this one sums the device time of the kernels each layer *launched* (``torch.profiler``: every
kernel is tied to its launch call by the correlation id, and the launch to the ``record_function`` range
that forward hooks open around each convolution, BatchNorm, ReLU and the classifier). No synchronisation
is added, so the step runs as it does in the end-to-end benchmark. Kernels launched outside every layer
(map builds, the input's voxelisation, the loss) are summed as ``(outside layers)``.

The convolutions of the two models are paired in module order (both MinkUNets are built stage by stage in
the same order); a row gives the layer's kind, rows in and out, channels in and out, each library's device
ms per step and spconv / sparsevox, and sparsevox's kernel with the most time in that layer (its template
arguments say which tile the autotuner chose). ``--sort-ab`` adds native sparsevox with every dtype's rows
sorted by neighbour mask (``sparsevox.config.sort_rows(True)``) as a third column.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import json
import os
import sys

from benchmarks.probes.step_profile import gpu_models, layer_kind

CONV_KINDS = ("subm_k3", "k1", "down_k2s2", "up_k2s2")


def _shape(x):
    """``[rows, channels]`` of a layer input or output of either library (first element of a tuple)."""
    if isinstance(x, (tuple, list)):
        x = x[0] if x else None
    f = getattr(x, "features", None)
    if f is None:
        f = getattr(x, "feats", x)
    shape = getattr(f, "shape", None)
    return [int(s) for s in shape] if shape is not None and len(shape) == 2 else None


def annotate(model):
    """Forward hooks opening a ``record_function`` range named ``svxL<i>`` around leaf layer ``i`` (module
    order); returns ``(layers, remove)``, ``layers[i] = {"kind", "in", "out"}`` filled as the layers run."""
    from torch.profiler import record_function
    layers, handles = [], []
    for m in model.modules():
        kind = layer_kind(m)
        if kind is None:
            continue
        i = len(layers)
        layers.append({"kind": kind, "in": None, "out": None})

        def pre(mod, args, i=i):
            rf = record_function(f"svxL{i}")
            rf.__enter__()
            mod._svx_rf = rf
            layers[i]["in"] = _shape(args[0]) if args else None

        def post(mod, args, out, i=i):
            mod._svx_rf.__exit__(None, None, None)
            layers[i]["out"] = _shape(out)
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]

    def remove():
        for h in handles:
            h.remove()
    return layers, remove


def attribute(events, steps: int) -> tuple[dict, dict]:
    """``(ms, top)`` per layer name (``svxL<i>`` or ``(outside layers)``) from a chrome trace: device ms per
    step of the kernels, memsets and copies launched inside each range, and the kernel with the most time."""
    ranges = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e["name"]) for e in events
                    if e.get("ph") == "X" and e.get("cat") == "user_annotation" and e["name"].startswith("svxL"))
    starts = [r[0] for r in ranges]
    launch_ts = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver"):
            corr = (e.get("args") or {}).get("correlation")
            if corr is not None:
                launch_ts[corr] = float(e["ts"])
    ms = collections.defaultdict(float)
    per_kernel = collections.defaultdict(lambda: collections.defaultdict(float))
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in ("kernel", "gpu_memset", "gpu_memcpy"):
            continue
        ts = launch_ts.get((e.get("args") or {}).get("correlation"))
        name = "(outside layers)"
        if ts is not None:
            j = bisect.bisect_right(starts, ts) - 1
            if j >= 0 and ranges[j][0] <= ts <= ranges[j][1]:
                name = ranges[j][2]
        dur = float(e.get("dur", 0)) / 1e3 / steps
        ms[name] += dur
        per_kernel[name][e["name"]] += dur
    top = {n: max(k.items(), key=lambda kv: kv[1])[0] for n, k in per_kernel.items()}
    return dict(ms), top


def profile_layers(model, step, steps: int) -> dict:
    """Run ``step()`` 3 times, then ``steps`` times under the profiler with the layers annotated."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.map_build_timeline import _trace_events
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    layers, remove = annotate(model)
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
    finally:
        remove()
    ms, top = attribute(_trace_events(prof), steps)
    for i, layer in enumerate(layers):
        layer["ms"] = round(ms.get(f"svxL{i}", 0.0), 4)
        layer["top_kernel"] = top.get(f"svxL{i}", "")[:90]
    return {"layers": layers, "outside_ms": round(ms.get("(outside layers)", 0.0), 4),
            "total_ms": round(sum(ms.values()), 4)}


def _conv_rows(rec):
    return [dict(layer, index=i) for i, layer in enumerate(rec["layers"]) if layer["kind"] in CONV_KINDS]


def render(doc: dict) -> str:
    libs = [lib for lib in ("sparsevox", "spconv", "sparsevox_sorted") if any(r["library"] == lib for r in doc["records"])]
    lines = [f"# Device time per layer: MinkUNet forward, {doc['scene']}, fresh maps every step", "",
             f"{doc['device']}, {doc['date']}, commit {doc['commit']}; {doc['steps']} profiled steps after 3 "
             "warm-ups (`benchmarks/probes/layer_table.py`): device ms per step of the kernels each layer "
             "launched; ratio = spconv / sparsevox (> 1: sparsevox faster).", ""]
    for mode in dict.fromkeys(r["mode"] for r in doc["records"]):
        recs = {r["library"]: r for r in doc["records"] if r["mode"] == mode and "layers" in r}
        if "sparsevox" not in recs:
            continue
        rows = {lib: _conv_rows(recs[lib]) for lib in libs if lib in recs}
        lines += [f"## {mode}", "", "| # | kind | rows in → out | C in → out | " + " | ".join(f"{lib} ms" for lib in libs)
                  + " | spconv / sparsevox | sparsevox kernel |", "|---" * (6 + len(libs)) + "|"]
        totals = collections.defaultdict(lambda: collections.defaultdict(float))
        for j, ours in enumerate(rows["sparsevox"]):
            cells = []
            for lib in libs:
                r = rows.get(lib, [])
                v = r[j]["ms"] if j < len(r) else None
                cells.append(f"{v:.3f}" if v is not None else "-")
                if v is not None:
                    totals[lib][ours["kind"]] += v
            theirs = rows.get("spconv", [])
            ratio = (f"{theirs[j]['ms'] / ours['ms']:.2f}×" if j < len(theirs) and ours["ms"] > 0 else "-")
            i_, o_ = ours["in"] or ["?", "?"], ours["out"] or ["?", "?"]
            lines.append(f"| {ours['index']} | {ours['kind']} | {i_[0]:,} → {o_[0]:,} | {i_[1]} → {o_[1]} | "
                         + " | ".join(cells) + f" | {ratio} | `{ours['top_kernel'][:70]}` |")
        lines += ["", "| kind | " + " | ".join(f"{lib} ms" for lib in libs) + " |", "|---" * (1 + len(libs)) + "|"]
        for kind in CONV_KINDS:
            lines.append(f"| {kind} | " + " | ".join(f"{totals[lib][kind]:.3f}" for lib in libs) + " |")
        for label, key in (("other layers (norms, ReLU, classifier)", None), ("outside layers", "outside_ms"),
                           ("all device time", "total_ms")):
            cells = []
            for lib in libs:
                rec = recs.get(lib)
                if rec is None:
                    cells.append("-")
                elif key is None:
                    cells.append(f"{sum(x['ms'] for x in rec['layers'] if x['kind'] not in CONV_KINDS):.3f}")
                else:
                    cells.append(f"{rec[key]:.3f}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from benchmarks import end_to_end as e2e
    from benchmarks import provenance
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scene", default="semantickitti", choices=list(e2e.SCENES))
    ap.add_argument("--modes", nargs="+", default=["fp16_infer", "fp32_infer"], choices=list(e2e.MODES))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--sort-ab", action="store_true", help="also sparsevox with every dtype's rows sorted")
    ap.add_argument("--out", default=None)
    ap.add_argument("--stem", default=None)
    a = ap.parse_args(argv)
    import torch

    import sparsevox
    built = gpu_models("layer_table", a.scene)
    if built is None:
        return 2
    libs, models, labels, n_voxels = built
    doc = {**provenance.header(torch.cuda.get_device_name()), "scene": a.scene, "n_voxels": n_voxels,
           "steps": a.steps, "records": []}
    cells = [(lib, lib) for lib in models] + ([("sparsevox_sorted", "sparsevox")] if a.sort_ab else [])
    for mode in a.modes:
        for name, lib in cells:
            rec = {"mode": mode, "library": name}
            half = lib == "spconv" and mode == "fp16_infer"
            step, m, cleanup = e2e.make_step(lib, models[lib], mode, libs, labels, "cuda", half)
            before = sparsevox.config.sort_rows()
            try:
                if name == "sparsevox_sorted":
                    sparsevox.config.sort_rows(True)
                rec.update(profile_layers(m, step, a.steps))
            except Exception as e:  # report and go on with the other cells
                rec["error"] = f"{type(e).__name__}: {e}"[:300]
            finally:
                sparsevox.config.sort_rows(before)
                cleanup()
                del step, m
                torch.cuda.empty_cache()
            doc["records"].append(rec)
            print(json.dumps({k: rec.get(k) for k in ("mode", "library", "total_ms", "outside_ms", "error")}), flush=True)
    text = render(doc)
    print(text)
    if a.out:
        stem = a.stem or provenance.stem()
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"{stem}-layer_table.json"), "w") as f:
            json.dump(doc, f, indent=1)
        with open(os.path.join(a.out, f"{stem}-layer_table.md"), "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
