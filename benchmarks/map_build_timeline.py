"""Where the time of one SubM k3 map build goes, host and device on one clock (torch.profiler / CUPTI).

The layer benchmark times ``kernel_map(Voxels(coords, None, check=False), 3)`` between two CUDA events
(``benchmarks.runners.Geometry.map_build``). This profiles the same call ``--repeats`` times and prints,
per host API call of the build (runtime and driver: memset, launches, copy, event records), the median
µs from the start event's record to the call, and for the device work it queued the median start and
end, on the same origin. So the critical path reads off directly: host until the last launch, then the
device. CUPTI's callbacks add about a µs per API call to the host figures, so ``host_stamps`` also
times, without the profiler, when the host enters each device operation of the builder and the
inclusive cost of the Python steps before them.

``python -m benchmarks.map_build_timeline [--scene semantickitti] [--repeats 30] [--out DIR --stem STEM]``
(also spconv's build when it is importable); ``bash benchmarks/gpu_suite.sh benchmarks.map_build_timeline``
runs it with the suite.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np


def _trace_events(prof) -> list:
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            doc = json.load(f)
    finally:
        os.unlink(path)
    return doc["traceEvents"] if isinstance(doc, dict) else doc


_HOST = ("cuda_runtime", "cuda_driver")
_DEVICE = ("kernel", "gpu_memset", "gpu_memcpy")


def timeline(fn, repeats: int) -> dict:
    """Median host-call and device offsets (µs from the start event's record) of ``fn()`` timed the
    way the layer benchmark times it."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    event_ms = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(repeats):
            with record_function(f"svx_build_{i}"):
                start.record()
                fn()
                end.record()
            end.synchronize()
            event_ms.append(start.elapsed_time(end))
    events = _trace_events(prof)
    ranges = sorted((e for e in events if str(e.get("name", "")).startswith("svx_build_")
                     and e.get("ph") == "X" and e.get("cat") == "user_annotation"), key=lambda e: e["ts"])
    host = sorted((e for e in events if e.get("cat") in _HOST and e.get("ph") == "X"), key=lambda e: e["ts"])
    device = {e["args"].get("correlation"): e for e in events
              if e.get("cat") in _DEVICE and e.get("ph") == "X" and "args" in e}
    rows: dict = {}
    for r in ranges:
        lo, hi = r["ts"], r["ts"] + r["dur"]
        calls = [e for e in host if lo <= e["ts"] <= hi]
        t0 = next((e["ts"] for e in calls if "EventRecord" in e["name"]), lo)
        seen: dict = {}
        for e in calls:  # keyed by name and occurrence: the calls between launches vary (event queries)
            seen[e["name"]] = seen.get(e["name"], -1) + 1
            name = f"{e['name']}#{seen[e['name']]}"
            d = device.get(e.get("args", {}).get("correlation"))
            row = rows.setdefault(name, {"call": [], "call_dur": [], "dev_start": [], "dev_end": [], "dev": ""})
            row["call"].append(e["ts"] - t0)
            row["call_dur"].append(e["dur"])
            if d is not None:
                row["dev_start"].append(d["ts"] - t0)
                row["dev_end"].append(d["ts"] + d["dur"] - t0)
                row["dev"] = d["name"][:60]
        rows.setdefault("zz python range", {"call": [], "call_dur": [], "dev_start": [], "dev_end": [],
                                            "dev": ""})["call_dur"].append(r["dur"])
    med = lambda v: round(statistics.median(v), 1) if v else None
    out = {"event_us_profiled": round(statistics.median(event_ms) * 1e3, 1), "calls": {}}
    for name, row in sorted(rows.items(), key=lambda kv: med(kv[1]["call"]) or 0.0):
        out["calls"][name] = {"at_us": med(row["call"]), "dur_us": med(row["call_dur"]),
                              "device": row["dev"], "dev_start_us": med(row["dev_start"]),
                              "dev_end_us": med(row["dev_end"]), "n": len(row["call_dur"])}
    return out


def host_stamps(fn, repeats: int) -> dict:
    """Without the profiler: median host µs from the start of ``fn()`` (a sparsevox map build) to the
    entry of each device operation of the GPU builder (memset, each launch, the info row's copy), and
    the inclusive µs per call of the Python steps before them."""
    import cupy
    import torch

    from benchmarks.timing import timed_attrs
    from sparsevox.cuda import gpu_kernel_map as gkm
    from sparsevox import voxels
    dev = gkm._cupy_device()
    cur: dict = {}  # this call's "op#i" -> µs from its start
    t0 = [0.0]

    def stamp(name, label_of):
        real = getattr(dev, name)

        def wrapper(*a, **k):
            label = label_of(a)
            i = sum(1 for key in cur if key.startswith(label + "#"))
            cur[f"{label}#{i}"] = (time.perf_counter() - t0[0]) * 1e6
            return real(*a, **k)
        setattr(dev, name, wrapper)  # an instance attribute shadows the method

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    steps = [(voxels, "to_core", "to_core"), (voxels.Voxels, "__init__", "Voxels()"), (gkm, "build", "build"),
             (gkm, "_pairs", "_pairs"), (cupy, "empty", "cupy.empty")]
    entries: dict = {}
    totals = []
    with timed_attrs(steps) as spent:
        stamp("fill_ones", lambda a: "memset")
        stamp("launch", lambda a: f"launch {a[0]}")
        stamp("host_result", lambda a: "host_result")
        try:
            for _ in range(repeats):
                cur.clear()
                t0[0] = time.perf_counter()
                fn()
                totals.append((time.perf_counter() - t0[0]) * 1e6)
                for k, v in cur.items():
                    entries.setdefault(k, []).append(v)
                torch.cuda.synchronize()
        finally:
            for name in ("fill_ones", "launch", "host_result"):
                vars(dev).pop(name, None)
    med = {k: statistics.median(v) for k, v in entries.items()}
    return {"call_us": round(statistics.median(totals), 1),
            "inclusive_us_per_call": {k: round(v / repeats * 1e6, 1) for k, v in spent.items()},
            "op_entry_us": {k: round(v, 1) for k, v in sorted(med.items(), key=lambda kv: kv[1])}}


def launch_costs(n: int = 2000) -> dict:
    """Host µs per call of the pieces of one builder launch (a one-block kernel, back to back): the
    whole ``CupyDevice.launch``, the argument boxes and driver call (``Args.launch``), the driver call
    alone, and the lookups around them; and one ``fill_ones`` (memset) of 64 bytes."""
    import cupy

    from benchmarks.timing import loop_us
    from sparsevox.cuda import driver
    from sparsevox.cuda import gpu_kernel_map as gkm
    dev = gkm._cupy_device()
    pos, status, info = cupy.zeros(4, cupy.int32), cupy.zeros(2, cupy.uint64), cupy.zeros(2, cupy.int64)
    args = (pos, np.int32(4), status, info)
    sync = cupy.cuda.Device().synchronize
    dev.launch("unique_info", 1, gkm.BLOCK, args)
    packed = dev._fns[(cupy.cuda.runtime.getDevice(), "unique_info", gkm.BLOCK)]
    stream = cupy.cuda.get_current_stream().ptr
    from cupy_backends.cuda.api import driver as cdriver
    out = {
        "CupyDevice.launch": loop_us(lambda: dev.launch("unique_info", 1, gkm.BLOCK, args), n, sync, 256),
        "Args.launch": loop_us(lambda: packed.launch(1, gkm.BLOCK, stream, args), n, sync, 256),
        "driver.launch": loop_us(lambda: driver.launch(packed.func, 1, gkm.BLOCK, 0, stream, 0, packed.extra_addr),
                                 n, sync, 256),
        "cuLaunchKernel": loop_us(lambda: cdriver.launchKernel(packed.func, 1, 1, 1, gkm.BLOCK, 1, 1, 0, stream,
                                                               0, packed.extra_addr), n, sync, 256),
        "ctxGetCurrent": loop_us(cdriver.ctxGetCurrent, n),
        "getDevice": loop_us(cupy.cuda.runtime.getDevice, n),
        "get_current_stream": loop_us(cupy.cuda.get_current_stream, n),
        "fill_ones(64 B)": loop_us(lambda: dev.fill_ones(info), n, sync, 256),
        "cupy.empty(4 MB)": loop_us(lambda: cupy.empty(1 << 20, cupy.int32), n),
        "host_buffer(240 B)": loop_us(lambda: dev.host_buffer(240), n),
        "Event()+record": loop_us(lambda: cupy.cuda.Event(block=False, disable_timing=True).record(), n, sync, 256),
    }
    return {k: round(v, 2) for k, v in out.items()}


def _print_calls(label: str, res: dict) -> None:
    print(f"{label}: event (profiled) {res['event_us_profiled']} µs")
    print(f"{'call':42s} {'at':>7s} {'dur':>6s}  {'dev start':>9s} {'dev end':>8s}  device op")
    for name, r in res["calls"].items():
        print(f"{name:42.42s} {r['at_us']!s:>7s} {r['dur_us']!s:>6s}  {r['dev_start_us']!s:>9s} "
              f"{r['dev_end_us']!s:>8s}  {r['device']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scene", default="semantickitti")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out")
    p.add_argument("--stem", default="map_build")
    p.add_argument("--quick", action="store_true", help="10 repeats (benchmarks/gpu_suite.sh passes it)")
    p.add_argument("--budget-s", type=float, default=None, help="accepted for gpu_suite.sh; the run takes ~20 s")
    a = p.parse_args(argv)
    repeats = 10 if a.quick else a.repeats
    from benchmarks import peers, runners, scenes
    sc = (scenes.load_scenes([a.scene]) or scenes.load_scenes(["lidar_synth"]))[0]
    fn, pairs = runners.Geometry(sc.coords, "gpu", "torch").map_build()
    res = {"scene": sc.name, "n": sc.n_voxels, "pairs": pairs, "sparsevox": timeline(fn, repeats)}
    res["host"] = host_stamps(fn, repeats)
    print("host (no profiler):", json.dumps(res["host"]))
    res["launch_costs_us"] = launch_costs()
    print("launch pieces, host µs per call:", json.dumps(res["launch_costs_us"]))
    _print_calls(f"{sc.name} N={sc.n_voxels} pairs={pairs}, sparsevox", res["sparsevox"])
    sp, why = peers.import_peer("spconv")
    if sp is not None:  # the peer's build on the same scan, the same way (its kernels and host calls)
        res["spconv"] = timeline(peers.PeerGeometry(sp, sc.coords).map_build(), repeats)
        _print_calls(f"{sc.name}, spconv", res["spconv"])
    else:
        res["spconv"] = f"not importable: {why}"
    if a.out:
        with open(os.path.join(a.out, f"{a.stem}-map_build_timeline.json"), "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
