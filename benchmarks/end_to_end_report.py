"""Markdown tables and a PNG plot of a ``<stem>-end_to_end.json`` (written by :mod:`benchmarks.end_to_end`).

    python -m benchmarks.end_to_end_report benchmarks/results/<stem>-end_to_end.json   # rewrite .md and .png
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

from . import report

log = logging.getLogger("sparsevox.benchmarks")


def _ms(x):
    return "—" if not isinstance(x, (int, float)) else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _ratio(x):
    return "—" if not x else f"{x:.2f}×"


def _err(x):
    return x if isinstance(x, str) else "—" if x is None else f"{x:.1e}"


def _above_model(r) -> str:
    """``"a / b (ratio)"``: each library's peak less its model's resident MiB, or — without the figures."""
    p, m = r.get("peak_mib"), r.get("model_mib")
    pp, pm = r.get("peer_peak_mib", {}).get("spconv"), r.get("peer_model_mib", {}).get("spconv")
    if None in (p, m, pp, pm) or pp - pm <= 0:
        return "—"
    return f"{p - m:,.1f} / {pp - pm:,.1f} ({(p - m) / (pp - pm):.2f})"


def overhead_interval(base, other, level: float = 0.9, resamples: int = 2000, seed: int = 0):
    """``(lo, hi)``: a bootstrap interval (``level``) of ``median(other) / median(base) - 1`` from the cells'
    timed steps (resampled with replacement, each cell on its own; fixed seed, so a report is reproducible),
    or None with fewer than 3 steps in either. Says whether a difference is larger than the steps' spread."""
    a, b = np.asarray(base or [], float), np.asarray(other or [], float)
    if a.size < 3 or b.size < 3:
        return None
    rng = np.random.default_rng(seed)
    ma = np.median(a[rng.integers(0, a.size, (resamples, a.size))], axis=1)
    mb = np.median(b[rng.integers(0, b.size, (resamples, b.size))], axis=1)
    q = np.quantile(mb / ma - 1.0, [(1 - level) / 2, (1 + level) / 2])
    return float(q[0]), float(q[1])


def _interval(r, cell) -> str:
    iv = overhead_interval(r.get("samples_ms", {}).get("sparsevox"), r.get("samples_ms", {}).get(cell))
    return "—" if iv is None else f"{iv[0]:+.1%} … {iv[1]:+.1%}"


def markdown(doc) -> str:
    s = doc.get("settings", {})
    out = [f"# MinkUNet end to end: sparsevox vs spconv ({doc.get('device')}, {doc.get('date')}, "
           f"{doc.get('commit')})", "",
           f"SparseResUNet42 shape (widths {s.get('widths')}), {s.get('num_classes')} classes; every step: "
           f"{s.get('step')}. Median of {s.get('steps')} steps after {s.get('warmup')} warm-up steps, "
           f"CUDA-synchronised wall ms; peak = max_memory_allocated over the timed steps"
           + ("" if s.get("torch_allocator") else
              " (torch's allocator only: sparsevox's kernel maps and tables live in CuPy's pool and are not "
              "counted: SPARSEVOX_TORCH_ALLOCATOR=0 was set)")
           + f". Ratio = spconv ms / sparsevox "
           f"ms (> 1: sparsevox faster). fp16_infer: {s.get('fp16_infer')}. Peers: {doc.get('peers')}.", "",
           "| scene | voxels | mode | sparsevox ms | spconv ms | ratio | sparsevox peak MiB | spconv peak MiB | "
           "peak − model, sparsevox / spconv |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in doc["records"]:
        out.append(f"| {r['scene']} | {r['n_voxels']:,} | {r['op'].replace('minkunet_', '')} | "
                   f"{_ms(r.get('ms')) if r.get('ms') else r.get('error', '—')} | {_ms(r['peer'].get('spconv'))} | "
                   f"{_ratio(r.get('ratio'))} | "
                   f"{_ms(r.get('peak_mib'))} | {_ms(r['peer_peak_mib'].get('spconv'))} | {_above_model(r)} |")
    if any(r.get("model_mib") for r in doc["records"]):
        out += ["", "Peak − model: the peak less the model's parameters and buffers as the step holds them (sparsevox's "
                    "float32 model under autocast; spconv's float16 copy in fp16_infer): maps, activations, "
                    "workspaces; the ratio is sparsevox's over spconv's (issue 19 target ≤ 0.8)."]
    compat = [r for r in doc["records"] if r.get("compat_ms") is not None]
    if compat:
        extra = [(k, label) for k, label in (("compat_planned", "planned"), ("compat_unplanned", "unplanned"))
                 if any(r.get(f"{k}_ms") is not None for r in compat)]
        notes = {"planned": "planned: the same model under `plan_maps`",
                 "unplanned": "unplanned: compat's own map plan off (`SPARSEVOX_COMPAT_PLAN=0`; on by default: "
                              "each model's maps built at its first map request, as native's `build_maps`)"}
        out += ["", "The spconv-API MinkUNet (`benchmarks/spconv_minkunet.py`) run on `sparsevox.compat.spconv` "
                    "with the same weights: ms and its cost over native sparsevox (issue 21 target: ≤ 5 %); "
                    "90 % interval: bootstrap of the overhead from both cells' timed steps (— in records without "
                    "them)"
                + "".join(f"; {notes[label]}" for _, label in extra), "",
                "| scene | mode | sparsevox ms | compat ms | overhead | 90 % interval | "
                + "".join(f"{label} ms | {label} overhead | " for _, label in extra)
                + "logits vs native (fp32 eval, rel. err.) |",
                "|---|---|---:|---:|---:|---:|" + "---:|---:|" * len(extra) + "---:|"]
        par = doc.get("parity", {})

        def cost(r, key):
            return f"{r[key]:+.1%} | " if isinstance(r.get(key), float) else "— | "
        out += [f"| {r['scene']} | {r['op'].replace('minkunet_', '')} | {_ms(r.get('ms'))} | {_ms(r['compat_ms'])} | "
                + cost(r, "compat_overhead") + f"{_interval(r, 'compat')} | "
                + "".join(f"{_ms(r.get(f'{k}_ms'))} | " + cost(r, f"{k}_overhead") for k, _ in extra)
                + f"{_err(par.get(r['scene'], {}).get('compat_logits_fp32_eval'))} |" for r in compat]
    fl = [r for r in doc["records"] if r.get("flax_ms") is not None]
    if fl:
        out += ["", "The Flax NNX MinkUNet (`--flax`: same weights, float32, bucketed kernel maps, `nnx.jit`; plain "
                    "SGD where torch's rows use momentum): ms per step beside torch-native sparsevox and spconv", "",
                "| scene | mode | Flax ms | sparsevox (torch) ms | spconv ms | torch / Flax |", "|---|---|---:|---:|---:|---:|"]
        for r in fl:
            f = r["flax_ms"]
            ratio = f"{r['ms'] / f:.2f}×" if isinstance(f, (int, float)) and f and r.get("ms") else "—"
            out.append(f"| {r['scene']} | {r['op'].replace('minkunet_', '')} | {_ms(f)} | {_ms(r.get('ms'))} | "
                       f"{_ms(r.get('peer', {}).get('spconv'))} | {ratio} |")
    ab = [r for r in doc["records"] if "sparsevox_rows_sorted" in r.get("variants", {})]
    if ab:
        out += ["", "Slot sort A/B (`--sort-ab`): native sparsevox with the default policy (float16 rows unsorted, "
                    "float32 sorted) and with every dtype's rows sorted, against the same spconv measurement", "",
                "| scene | mode | default ms | sorted ms | spconv ms | ratio default | ratio sorted |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for r in ab:
            srt, sp = r["variants"]["sparsevox_rows_sorted"], r.get("peer", {}).get("spconv")
            ratio = (f"{sp / srt:.2f}×" if isinstance(srt, (int, float)) and srt and sp else "—")
            out.append(f"| {r['scene']} | {r['op'].replace('minkunet_', '')} | {_ms(r.get('ms'))} | {_ms(srt)} | "
                       f"{_ms(sp)} | " + (f"{r['ratio']:.2f}×" if r.get("ratio") else "—") + f" | {ratio} |")
    variants = [r for r in doc["records"] if "sparsevox_half_model" in r.get("variants", {})]
    if variants:
        out += ["", "float16 inference variants (ms): sparsevox on a float16 copy of the model; spconv's float32 "
                    "model under autocast alone", "", "| scene | sparsevox_half_model | spconv_autocast |",
                "|---|---:|---:|"]
        out += [f"| {r['scene']} | {_ms(r['variants'].get('sparsevox_half_model'))} | "
                f"{_ms(r['variants'].get('spconv_autocast'))} |" for r in variants]
    if doc.get("parity"):
        out += ["", "Same weights in both models: relative error of spconv's output against sparsevox's "
                    "(logits: eval = BatchNorm running statistics; layers: float32, C 16 → 24)", "",
                "| scene | logits fp32 eval | fp32 train | fp16 eval | SubM k3 | SubM k1 | down k2 s2 | up (inverse) |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for scene, p in doc["parity"].items():
            lg, ly = p.get("logits", {}), p.get("layers", {})
            if "error" in p:
                out.append(f"| {scene} | {p['error']} | | | | | | |")
                continue
            out.append(f"| {scene} | {_err(lg.get('fp32_eval'))} | {_err(lg.get('fp32_train'))} | "
                       f"{_err(lg.get('fp16_eval'))} | {_err(ly.get('subm3'))} | {_err(ly.get('subm1'))} | "
                       f"{_err(ly.get('down'))} | {_err(ly.get('up'))} |")
    at = doc.get("autotune", {})
    out += ["", f"Autotune: {at.get('warnings')} warnings, {at.get('tunings')} tunings. "
                f"{'Truncated by the time budget. ' if doc.get('truncated') else ''}Elapsed {doc.get('elapsed_s')} s."]
    return "\n".join(out)


def plot(doc, path) -> bool:
    """Step ms per library, one panel per scene, modes along x; False without matplotlib or data."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install 'sparsevox[bench]')")
        return False
    recs = [r for r in doc["records"] if r.get("ms")]
    scenes = list(dict.fromkeys(r["scene"] for r in recs))
    if not scenes:
        return False
    fig, axes = plt.subplots(1, len(scenes), figsize=(4.2 * len(scenes), 3.6), squeeze=False)
    for ax, scene in zip(axes[0], scenes):
        rs = [r for r in recs if r["scene"] == scene]
        xs = np.arange(len(rs))
        ours = [r["ms"] for r in rs]
        theirs = [r["peer"].get("spconv") or 0 for r in rs]
        ax.bar(xs - 0.2, ours, 0.4, label="sparsevox")
        if any(theirs):
            ax.bar(xs + 0.2, theirs, 0.4, label="spconv")
        for x, r in zip(xs, rs):
            if r.get("ratio"):
                ax.text(x, max(r["ms"], r["peer"]["spconv"]) * 1.02, f"{r['ratio']:.2f}×", ha="center", fontsize=7)
        ax.set_xticks(xs)
        ax.set_xticklabels([r["op"].replace("minkunet_", "") for r in rs], fontsize=8)
        ax.set_ylabel("ms per step", fontsize=8)
        ax.set_title(f"{scene} ({rs[0]['n_voxels']:,} voxels)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"MinkUNet step time (ratio: spconv / sparsevox): {doc.get('device')}, {doc.get('date')}, "
                 f"{doc.get('commit')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_all(doc, out_dir, stem) -> dict:
    """Write ``<stem>-end_to_end.json``, ``.md`` and ``.png`` (when matplotlib is there) under ``out_dir``."""
    base = Path(out_dir) / f"{stem}-end_to_end"
    paths = {"json": base.with_suffix(".json"), "md": base.with_suffix(".md"), "png": base.with_suffix(".png")}
    report.write_json(doc, paths["json"])
    paths["md"].write_text(markdown(doc) + "\n")
    if not plot(doc, paths["png"]):
        paths.pop("png")
    return paths


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print(__doc__)
        return 0 if args and args[0] in ("-h", "--help") else 2
    p = Path(args[0])
    paths = write_all(report.load(p), p.parent, p.name[:-len("-end_to_end.json")])
    print("\n".join(str(v) for v in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
