"""Host time of a fresh-scan step, split by phase, without a profiler's overhead (issue 19).

A float16 inference step is host-bound (the GPU is busy ~30 % of it), and cProfile inflates Python-heavy
code several-fold, so its proportions mislead. Here named functions are wrapped with ``perf_counter``
accumulators (about 1 µs per call) and a step's enqueue time (host until the step returns, before the
final synchronisation) is set against its wall time. Phases nest (a phase's time includes the phases it
calls); ``calls`` is per step.

Used by ``python -m benchmarks.probes.step_profile --host-phases``.
"""
from __future__ import annotations

import collections
import importlib
import sys
import time

# (module, attribute): a function, or Class.method. Every module-level binding of the same function object
# is replaced too (modules that did ``from x import f``).
PHASES = (
    ("sparsevox.adapters.torch.functional", "spatially_sparse_conv"),
    ("sparsevox.adapters.torch.functional", "_from_signature"),
    ("sparsevox.adapters.torch.functional", "_fast_forward"),
    ("sparsevox.adapters.torch.functional", "_fast_backward"),
    ("sparsevox.adapters.torch.functional", "_autocast"),
    ("sparsevox.adapters.torch.functional", "_checked"),
    ("sparsevox.adapters.torch.functional", "_remember"),
    ("sparsevox.adapters.torch.functional", "_eager_forward"),
    ("sparsevox.kernel_map", "kernel_map"),
    ("sparsevox.cuda.gpu_kernel_map", "build_kernel_map"),
    ("sparsevox.algorithms.implicit_gemm", "_prepare_gather_gemm"),
    ("sparsevox.algorithms.implicit_gemm", "slot_table"),
    ("sparsevox.algorithms.implicit_gemm", "tile_masks"),
    ("sparsevox.algorithms.implicit_gemm", "neighbour_table"),
    ("sparsevox.algorithms.implicit_gemm", "Launch.launch"),
    ("sparsevox.algorithms.implicit_gemm", "_upload"),
    ("sparsevox.cuda.radix_sort", "argsort"),
    ("sparsevox.kernel_map", "KernelMap.wait"),
    ("sparsevox.adapters.torch.models", "MinkUNet.build_maps"),
    ("sparsevox.adapters.torch.layers", "BatchNorm.forward"),
    ("sparsevox.voxels", "Voxels.__init__"),
    ("torch.nn.functional", "relu"),
)


def _timed(name, fn, acc):
    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            r = acc[name]
            r[0] += time.perf_counter() - t
            r[1] += 1
    timed.__wrapped__ = fn
    return timed


def install(acc, phases=PHASES) -> list:
    """Wrap the phases; returns the undo list ``(owner, attribute, original)``."""
    undo = []
    for modname, attr in phases:
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        owner_name, _, leaf = attr.rpartition(".")
        owner = getattr(mod, owner_name) if owner_name else mod
        fn = owner.__dict__.get(leaf) if isinstance(owner, type) else getattr(owner, leaf, None)
        if fn is None:
            continue
        wrapped = _timed(attr, fn, acc)
        places = [(owner, leaf)]
        if not isinstance(owner, type):
            for m in list(sys.modules.values()):
                d = getattr(m, "__dict__", None)
                if m is owner or not isinstance(d, dict):
                    continue
                places += [(m, n) for n, v in list(d.items()) if v is fn]
        for o, n in places:
            undo.append((o, n, fn))
            setattr(o, n, wrapped)
    return undo


def uninstall(undo) -> None:
    for o, n, fn in reversed(undo):
        setattr(o, n, fn)


def host_phases(step, sync, steps: int = 5, phases=PHASES) -> dict:
    """Per step: ``enqueue_ms`` (host until ``step()`` returns), ``wall_ms`` (until the GPU is done), and
    per phase ``[ms, calls]`` (medians of enqueue/wall, phase totals averaged)."""
    enqueue, wall = [], []
    acc = collections.defaultdict(lambda: [0.0, 0])
    undo = install(acc, phases)
    try:
        for _ in range(steps):
            sync()
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            sync()
            t2 = time.perf_counter()
            enqueue.append((t1 - t0) * 1e3)
            wall.append((t2 - t0) * 1e3)
    finally:
        uninstall(undo)
    med = sorted(enqueue)[len(enqueue) // 2], sorted(wall)[len(wall) // 2]
    return {"enqueue_ms": round(med[0], 2), "wall_ms": round(med[1], 2),
            "phases": {k: [round(v[0] * 1e3 / steps, 3), v[1] // steps] for k, v in
                       sorted(acc.items(), key=lambda kv: -kv[1][0])}}


def totals(step, sync, steps: int = 5) -> dict:
    """Enqueue and wall ms of a step with no phase wrapped (the peer's figures)."""
    return host_phases(step, sync, steps, phases=())


def render(rows: list[dict]) -> str:
    lines = ["## Host phases (perf_counter around named functions; nested; per step)", ""]
    for r in rows:
        lines.append(f"**{r['mode']} {r['library']}**: enqueue {r['enqueue_ms']} ms, wall {r['wall_ms']} ms")
        if r.get("phases"):
            lines += ["", "| phase | ms | calls |", "|---|---:|---:|"]
            lines += [f"| {k} | {ms} | {n} |" for k, (ms, n) in r["phases"].items()]
        lines.append("")
    return "\n".join(lines)
