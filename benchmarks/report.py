"""Markdown tables, a PNG plot and a short summary, generated from a ``...-layers.json`` result file.

    python -m benchmarks.report benchmarks/results/<stem>-layers.json            # rewrite .md and .png
    python -m benchmarks.report benchmarks/results/<stem>-layers.json --summary  # print the summary only

Speed-up = spconv ms / sparsevox ms (> 1: sparsevox is faster). "Best" is the fastest sparsevox
algorithm of a cell, AUTO included.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from pathlib import Path

log = logging.getLogger("sparsevox.benchmarks")

LAYER_OPS = ("subm_fwd", "subm_fwd_bwd", "down", "up")
PEER = "spconv"
_SHORT = {"subm_fwd": "SubM fwd", "subm_fwd_bwd": "SubM f+b", "down": "down", "up": "up"}


def load(path) -> dict:
    with open(path) as f:
        return json.load(f)


def speedup(rec: dict, peer: str = PEER) -> float | None:
    p = (rec.get("peer") or {}).get(peer)
    return p / rec["ms"] if p and rec.get("ms") else None


def _fmt_ms(ms) -> str:
    if ms is None:
        return "–"
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


def _fmt_n(n) -> str:
    return "–" if n is None else f"{n:,}"


def _fmt_x(x) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _chosen(rec: dict) -> str:
    """``auto→implicit_gemm`` style label of what ran (forward choice; backward when it differs)."""
    algo = rec.get("algo") or {}
    req = algo.get("requested", "?")
    chosen = algo.get("chosen") or {}
    names = []
    for d in ("fwd", "dgrad", "wgrad"):
        n = (chosen.get(d) or {}).get("name")
        if n and n not in names:
            names.append(n)
    if req == "auto" and names:
        return "auto→" + "+".join(names)
    return req


def _order(doc):
    scenes = [s["name"] for s in doc.get("scenes", [])]
    recs = doc["records"]
    for r in recs:
        if r["scene"] not in scenes:
            scenes.append(r["scene"])
    dtypes = sorted({r["dtype"] for r in recs if r.get("dtype")}, key=lambda d: ("16" not in d, d))
    chans = sorted({r["c_in"] for r in recs if r.get("c_in")})
    algos = []
    for r in recs:
        a = (r.get("algo") or {}).get("requested")
        if r["op"] in LAYER_OPS and a and a not in algos:
            algos.append(a)
    return scenes, dtypes, chans, algos


def best_records(doc) -> dict:
    """``{(scene, dtype, op, C): fastest record}`` over sparsevox algorithms that ran."""
    best = {}
    for r in doc["records"]:
        if r["op"] not in LAYER_OPS or not r.get("ms"):
            continue
        k = (r["scene"], r["dtype"], r["op"], r["c_in"])
        if k not in best or r["ms"] < best[k]["ms"]:
            best[k] = r
    return best


def map_records(doc) -> dict:
    return {r["scene"]: r for r in doc["records"] if r["op"] == "map_build"}


def summary_table(doc) -> str:
    """The short table: best speed-up vs spconv per (scene, dtype, op) and C; map build per scene."""
    scenes, dtypes, chans, _ = _order(doc)
    best, maps = best_records(doc), map_records(doc)
    head = "| scene | dtype | op | " + " | ".join(f"C={c}" for c in chans) + " |"
    lines = [head, "|" + "---|" * (3 + len(chans))]
    for s in scenes:
        m = maps.get(s)
        if m:
            cell = f"{_fmt_ms(m.get('ms'))} ms"
            if speedup(m):
                cell += f" vs {_fmt_ms(m['peer'][PEER])} ms = {_fmt_x(speedup(m))}"
            lines.append(f"| {s} | – | map_build | {cell} |" + " |" * (len(chans) - 1))
        for d in dtypes:
            for op in LAYER_OPS:
                cells = []
                for c in chans:
                    r = best.get((s, d, op, c))
                    if r is None:
                        cells.append("–")
                    elif speedup(r) is not None:
                        cells.append(f"{_fmt_x(speedup(r))} {_chosen(r)}")
                    else:
                        cells.append(f"{_fmt_ms(r['ms'])} ms {_chosen(r)}")
                if any(x != "–" for x in cells):
                    lines.append(f"| {s} | {d} | {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _title(doc) -> str:
    dirty = " (uncommitted changes)" if doc.get("dirty") else ""
    return f"Layer benchmarks: {doc.get('device')}, {doc.get('date')}, commit {doc.get('commit')}{dirty}"


def summary_text(doc) -> str:
    note = "speed-up = spconv ms / sparsevox ms (>1: sparsevox faster), best sparsevox algorithm per cell"
    if doc.get("truncated"):
        note += "; RUN TRUNCATED by its time budget"
    return f"{_title(doc)}\n{note}\n\n{summary_table(doc)}\n"


def markdown(doc) -> str:
    scenes, dtypes, chans, algos = _order(doc)
    st = doc.get("settings", {})
    out = [f"# {_title(doc)}", ""]
    clock = "host `perf_counter` timings" if st.get("device") == "cpu" else "CUDA-event timings"
    out.append(f"- api: `{st.get('api')}`; timing: median of {st.get('repeats')} {clock} after "
               f"{st.get('warmup')} warm-up call(s); float32 TF32: {st.get('tf32')}; elapsed {doc.get('elapsed_s')} s")
    peers = doc.get("peers", {})
    out.append("- peers: " + (", ".join(f"{k}: {v}" for k, v in peers.items()) or "none"))
    for s in doc.get("scenes", []):
        out.append(f"- scene {s['name']}: {s['n_voxels']:,} voxels at {s['voxel_size'] * 100:g} cm, "
                   f"{s.get('neighbours', 0):.2f} neighbours per voxel, from `{s['source']}`")
    if doc.get("truncated"):
        out.append("- **the run stopped early at its time budget; missing cells were not measured**")
    out += ["", "## Summary", "",
            "Speed-up = spconv ms / sparsevox ms (>1: sparsevox faster), fastest sparsevox algorithm per cell.",
            "", summary_table(doc), ""]
    maps = map_records(doc)
    recs = doc["records"]
    by_key = {}
    for r in recs:
        if r["op"] in LAYER_OPS:
            by_key[(r["scene"], r["dtype"], r["op"], r["c_in"], (r.get("algo") or {}).get("requested"))] = r
    for s in scenes:
        out += [f"## {s}", ""]
        m = maps.get(s)
        if m:
            p = m.get("peer") or {}
            out += ["| kernel-map build (SubM k3) | ms | pairs |", "|---|---|---|",
                    f"| sparsevox ({(m.get('algo') or {}).get('builder', '?')}) | {_fmt_ms(m.get('ms'))} | "
                    f"{_fmt_n(m.get('pairs'))} |"]
            for k, v in p.items():
                out.append(f"| {k} | {_fmt_ms(v)} | |")
            if speedup(m):
                out.append(f"| speed-up vs spconv (inference map) | {_fmt_x(speedup(m))} | |")
            out.append("")
        errs = defaultdict(list)
        for r in recs:
            if r["scene"] == s and r.get("peer_rel_err"):
                for k, v in r["peer_rel_err"].items():
                    errs[(k, r["dtype"])].append(v)
        if errs:
            out += ["Same geometry and weights as the peer: largest relative error of sparsevox's SubM forward vs "
                    + ", ".join(f"{k} {d}: {max(v):.2g}" for (k, d), v in sorted(errs.items())), ""]
        for d in dtypes:
            rows = []
            for op in LAYER_OPS:
                peer_cells = []
                for c in chans:
                    r = next((by_key.get((s, d, op, c, a)) for a in algos if by_key.get((s, d, op, c, a))), None)
                    peer_cells.append(_fmt_ms((r or {}).get("peer", {}).get(PEER)) if r else "–")
                if any(x != "–" for x in peer_cells):
                    rows.append(f"| {op} | spconv | " + " | ".join(peer_cells) + " |")
                for a in algos:
                    cells = []
                    for c in chans:
                        r = by_key.get((s, d, op, c, a))
                        if r is None or not r.get("ms"):
                            cells.append("–" if r is None or not r.get("skipped") else "n/a")
                        else:
                            x = speedup(r)
                            cells.append(_fmt_ms(r["ms"]) + (f" ({_fmt_x(x)})" if x else ""))
                    if any(x not in ("–", "n/a") for x in cells):
                        rows.append(f"| {op} | {a} | " + " | ".join(cells) + " |")
            if rows:
                out += [f"### {s}, {d}: ms (speed-up vs spconv)", "",
                        "| op | algorithm | " + " | ".join(f"C={c}" for c in chans) + " |",
                        "|" + "---|" * (2 + len(chans))] + rows + [""]
        # Arithmetic rate of the best algorithm.
        rows = []
        ranked = sorted(best_records(doc).items(), key=lambda kv: (kv[0][1], LAYER_OPS.index(kv[0][2]), kv[0][3]))
        for (bs, d, op, c), r in ranked:
            if bs != s:
                continue
            tf, cb, fr = r.get("tflops"), r.get("cublas_tflops"), r.get("cublas_fraction")
            rows.append(f"| {op} | {d} | {c} | {_fmt_n(r['pairs'])} | {_chosen(r)} | {_fmt_ms(r['ms'])} | "
                        f"{'–' if tf is None else f'{tf:.2f}'} | {'–' if cb is None else f'{cb:.1f}'} | "
                        f"{'–' if fr is None else f'{fr * 100:.1f}%'} |")
        if rows:
            out += [f"### {s}: arithmetic rate of the fastest algorithm", "",
                    "TFLOP/s = passes · 2 · pairs · C_in · C_out / time (forward+backward: 3 passes); cuBLAS = "
                    "dense `[pairs × C_in] @ [C_in × C_out]` in the same dtype, same run.", "",
                    "| op | dtype | C | pairs | algorithm | ms | TFLOP/s | cuBLAS TFLOP/s | fraction |",
                    "|---|---|---|---|---|---|---|---|---|"] + rows + [""]
    notes = defaultdict(set)
    for r in recs:
        if r.get("skipped") or r.get("error"):
            notes[((r.get("algo") or {}).get("requested", r["op"]), r.get("skipped") or r.get("error"))].add(
                f"{r['scene']}/{r.get('dtype')}/{r['op']}")
    if notes:
        out += ["## Not measured", ""]
        for (a, why), where in sorted(notes.items()):
            w = sorted(where)
            out.append(f"- {a}: {why} ({len(w)} cells, e.g. {', '.join(w[:3])})")
        out.append("")
    return "\n".join(out)


def plot(doc, path) -> bool:
    """Speed-up vs spconv per layer: one panel per (scene, dtype), bars per algorithm, log scale.

    Returns False (with a warning) when matplotlib is missing or nothing has a spconv figure."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, FuncFormatter
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install 'sparsevox[bench]')")
        return False
    scenes, dtypes, chans, algos = _order(doc)
    recs = [r for r in doc["records"] if r["op"] in LAYER_OPS and speedup(r)]
    maps = map_records(doc)
    if not recs and not any(speedup(m) for m in maps.values()):
        log.warning("no record has a spconv time: no plot")
        return False
    algos = [a for a in algos if any((r.get("algo") or {}).get("requested") == a for r in recs)]
    panels = [(s, d) for s in scenes for d in dtypes
              if any(r["scene"] == s and r["dtype"] == d for r in recs)] or [(s, None) for s in maps]
    groups = [("map_build", None)] + [(op, c) for op in LAYER_OPS for c in chans]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8.0, 0.75 * len(groups)), 2.8 * len(panels) + 0.8),
                             squeeze=False)
    width = 0.8 / max(len(algos), 1)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    index = {(r["scene"], r["dtype"], r["op"], r["c_in"], (r.get("algo") or {}).get("requested")): r for r in recs}
    for ax, (s, d) in zip(axes[:, 0], panels):
        for gi, (op, c) in enumerate(groups):
            if op == "map_build":
                m = maps.get(s)
                if m and speedup(m):
                    ax.bar(gi, speedup(m), 0.6, color="0.55")
                continue
            for ai, a in enumerate(algos):
                r = index.get((s, d, op, c, a))
                if r:
                    ax.bar(gi - 0.4 + width * (ai + 0.5), speedup(r), width, color=colours[ai % len(colours)])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(FixedLocator([0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20]))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(["map\nbuild" if op == "map_build" else f"{_SHORT[op]}\nC={c}" for op, c in groups],
                           fontsize=7)
        for gi in range(1, len(groups)):
            if (gi - 1) % max(len(chans), 1) == 0:
                ax.axvline(gi - 0.5, color="0.8", lw=0.8)
        ax.set_ylabel("spconv / sparsevox", fontsize=8)
        ax.set_title(f"{s}, {d}" if d else s, fontsize=9, loc="left")
        ax.grid(axis="y", which="both", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[i % len(colours)]) for i in range(len(algos))]
    fig.legend(handles + [plt.Rectangle((0, 0), 1, 1, color="0.55")], algos + ["map build"], loc="upper center",
               bbox_to_anchor=(0.5, 1 - 0.45 / fig.get_figheight()), fontsize=8, ncol=len(algos) + 1, frameon=False)
    fig.suptitle(f"Speed-up vs spconv (>1: sparsevox faster): {doc.get('device')}, {doc.get('date')}, "
                 f"{doc.get('commit')}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.7 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(doc, out_dir, stem, what: str = "layers") -> dict:
    """Write ``<stem>-<what>.json``, ``.md`` and ``.png`` under ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"{stem}-{what}"
    paths = {"json": base.with_suffix(".json"), "md": base.with_suffix(".md"), "png": base.with_suffix(".png")}
    write_json(doc, paths["json"])
    paths["md"].write_text(markdown(doc) + "\n")
    if not plot(doc, paths["png"]):
        paths.pop("png")
    return paths


def write_json(doc, path) -> None:
    """Write atomically (a partial file never replaces a complete one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="a <stem>-layers.json result file")
    ap.add_argument("--summary", action="store_true", help="print the summary table only")
    args = ap.parse_args(argv)
    doc = load(args.json)
    if args.summary:
        print(summary_text(doc))
        return 0
    p = Path(args.json)
    name = p.name[:-len(".json")]
    stem, _, what = name.rpartition("-")
    paths = write_all(doc, p.parent, stem, what)
    print("\n".join(str(v) for v in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
