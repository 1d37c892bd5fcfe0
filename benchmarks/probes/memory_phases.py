"""Where a fresh-scan MinkUNet step reaches its peak memory (issue 19: float16 inference peaks 1.2-1.3x
spconv's with sparsevox's maps counted, ea920b6; not in the map build, 4fc84c9's build_maps A/B).

One step after warm-ups, with the device synchronised and torch's peak counter reset around every leaf
module's forward and around ``MinkUNet.build_maps``: for each, the memory allocated before it, the peak
during it and what stays allocated after it (MiB; with torch's allocator, the default, so that the kernel
maps and tables count). Backward is one phase (its peak, after the forward). The synchronisations change
the step's timing, not its allocations.

Usage on the GPU machine: ``python -m benchmarks.probes.memory_phases
[--scene semantickitti] [--modes fp16_infer fp32_infer] [--top 12]``; prints, per mode, the step's peak,
the phase that holds it and the phases with the highest peaks.
"""
from __future__ import annotations

import argparse
import sys


class CudaMemory:
    """The measurements, as torch.cuda gives them (a stand-in replaces it in the CPU test)."""

    def __init__(self, torch):
        self.cuda = torch.cuda

    def mark(self) -> int:
        """Synchronise, restart the peak counter; the bytes allocated now."""
        self.cuda.synchronize()
        self.cuda.reset_peak_memory_stats()
        return self.cuda.memory_allocated()

    def done(self) -> tuple[int, int]:
        """Synchronise; ``(peak since mark, allocated now)`` in bytes."""
        self.cuda.synchronize()
        return self.cuda.max_memory_allocated(), self.cuda.memory_allocated()


def record(model, step, mem, wrap=()) -> list[dict]:
    """Run ``step()`` once with every leaf module of ``model`` measured (and each ``(owner, attribute)``
    in ``wrap``, a function or method called during the step); rows in call order: ``name``, ``before``,
    ``peak``, ``after`` (bytes). A phase inside another (a wrapped function calling modules) restarts the
    peak counter, so only leaf phases' peaks are exact; a wrapped phase's peak covers its part before its
    first leaf module."""
    rows, open_rows, handles, undo = [], {}, [], []
    names = {m: n for n, m in model.named_modules()}

    def begin(key, name):
        open_rows[key] = {"name": name, "before": mem.mark()}

    def end(key):
        row = open_rows.pop(key)
        row["peak"], row["after"] = mem.done()
        rows.append(row)

    for m in model.modules():
        if next(m.children(), None) is None:
            handles.append(m.register_forward_pre_hook(lambda mod, args: begin(id(mod), names[mod] or type(mod).__name__)))
            handles.append(m.register_forward_hook(lambda mod, args, out: end(id(mod))))
    for owner, attr in wrap:
        fn = getattr(owner, attr)

        def wrapped(*a, _fn=fn, _name=f"{getattr(owner, '__name__', owner)}.{attr}", **k):
            key = ("wrap", _name)
            begin(key, _name)
            try:
                return _fn(*a, **k)
            finally:
                end(key)
        setattr(owner, attr, wrapped)
        undo.append((owner, attr, fn))
    try:
        start = mem.mark()
        step()
        peak, after = mem.done()
        # the peak counter was last restarted at the last phase's start: this covers it and all after it
        rows.append({"name": "(the last phase and all after it: loss, backward, optimizer)", "before": start,
                     "peak": peak, "after": after})
    finally:
        for h in handles:
            h.remove()
        for owner, attr, fn in undo:
            setattr(owner, attr, fn)
    return rows


def report(rows, top: int) -> str:
    mib = 2 ** 20
    worst = max(rows, key=lambda r: r["peak"])
    lines = [f"step peak {worst['peak'] / mib:.1f} MiB in {worst['name']} (allocated before it "
             f"{worst['before'] / mib:.1f}, after it {worst['after'] / mib:.1f})",
             "| phase | before MiB | peak MiB | after MiB |", "|---|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: -r["peak"])[:top]:
        lines.append(f"| {r['name']} | {r['before'] / mib:.1f} | {r['peak'] / mib:.1f} | {r['after'] / mib:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import torch

    from benchmarks import end_to_end as e2e
    from sparsevox.adapters.torch import MinkUNet
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scene", default="semantickitti", choices=list(e2e.SCENES))
    ap.add_argument("--modes", nargs="+", default=["fp16_infer", "fp32_infer"])
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("memory_phases: no GPU", file=sys.stderr)
        return 2
    libs, labels, model = e2e.sparsevox_scene_model(a.scene)
    for mode in a.modes:
        step, m, cleanup = e2e.make_step("sparsevox", model, mode, libs, labels, "cuda")
        try:
            for _ in range(3):
                step()
            rows = record(m, step, CudaMemory(torch), wrap=((MinkUNet, "build_maps"),))
            print(f"## {mode} ({a.scene})\n\n{report(rows, a.top)}\n")
        finally:
            cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
