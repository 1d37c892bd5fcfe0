"""How much of IMPLICIT_GEMM's forward work on a SubM map is useful, rows unsorted or sorted (issue 19), on the CPU.

``python -m benchmarks.probes.tile_occupancy [--scenes semantickitti scannet] [--bm 64 128] [--out DIR]``

The forward kernel runs, for each tile of ``BM`` output rows, every offset that some row of the tile has a
neighbour at (its tile mask), over all ``BM`` rows: a row without that neighbour costs a zero-filled
gather and MMAs on zeros. The *occupancy* of a map is ``pairs / (active (tile, offset) iterations x BM)``:
the fraction of that work that is useful, and ``1 / occupancy`` the factor by which the kernel does more
than the pairs need. Per level of the end-to-end benchmark's MinkUNet (the scene's voxels, then each k2 s2
level's sites), for the k3 submanifold map:

- ``unsorted``: rows in voxel order (the float16 default, :func:`sparsevox.config.sort_rows`);
- ``sorted``: rows stably ordered by their neighbour bitmask with the rarest offsets most significant
  (:func:`sparsevox.algorithms.implicit_gemm.slot_table`'s order), as float32 does by default;
- ``iterations``: the active (tile, offset) pairs per map, unsorted and sorted: each is one pass of the
  kernel's pipeline over ``C_in`` (a latency-bound narrow layer costs about that many passes).

No GPU: the maps are the NumPy backend's (the same pairs as the GPU's). Prints Markdown; ``--out`` writes
``<stem>-tile_occupancy.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def neighbour_mask(kmap) -> np.ndarray:
    """bool ``[K, num_out]``: output row ``r`` has a neighbour at offset ``k``."""
    off = np.asarray(kmap.offsets_host if getattr(kmap, "offsets_host", None) is not None else kmap.offsets)
    out = np.asarray(kmap.out_maps)
    has = np.zeros((len(off) - 1, kmap.num_out), dtype=bool)
    for k in range(len(off) - 1):
        has[k, out[off[k]:off[k + 1]]] = True
    return has


def mask_order(has: np.ndarray) -> np.ndarray:
    """The stable order of the rows by neighbour bitmask, the rarest offsets most significant."""
    k_count, n = has.shape
    rare = np.argsort(has.sum(1), kind="stable")
    key = np.zeros(n, dtype=np.uint64)
    for rank, k in enumerate(rare):
        key |= has[k].astype(np.uint64) << np.uint64(k_count - 1 - rank)
    return np.argsort(key, kind="stable")


def iterations(has: np.ndarray, bm: int, order: np.ndarray | None = None) -> int:
    """Active (tile, offset) pairs of ``BM``-row tiles of the rows in ``order`` (None: as they are)."""
    k_count, n = has.shape
    rows = has if order is None else has[:, order]
    tiles = -(-n // bm)
    padded = np.zeros((k_count, tiles * bm), dtype=bool)
    padded[:, :n] = rows
    return int(padded.reshape(k_count, tiles, bm).any(axis=2).sum())


def occupancy_rows(scene: str, bms=(64, 128)) -> list[dict]:
    """One dict per level of ``scene``'s MinkUNet: voxels, pairs, and per ``BM`` the iterations and
    occupancy unsorted and sorted."""
    import sparsevox as sv
    from benchmarks import end_to_end as e2e
    plan = e2e.SCENES[scene]
    points, _ = e2e.scene_points(plan.source)
    xyz, feats, index = e2e.batch_points(points, plan.batch)
    coords, f = e2e.Voxeliser(xyz, feats, index, plan.voxel_size, "cpu")()
    level = sv.Voxels(coords.numpy(), f.numpy())
    rows = []
    for depth in range(5):
        if depth:
            level = sv.strided_output_voxels(level, 2, 2, 1)
        has = neighbour_mask(sv.kernel_map(level, 3, 1, 1))
        pairs, order = int(has.sum()), mask_order(has)
        row = {"scene": scene, "level": depth, "voxels": int(has.shape[1]), "pairs": pairs}
        for bm in bms:
            for name, o in (("unsorted", None), ("sorted", order)):
                it = iterations(has, bm, o)
                row[f"bm{bm}_{name}_iterations"] = it
                row[f"bm{bm}_{name}_occupancy"] = round(pairs / (it * bm), 4) if it else None
        rows.append(row)
    return rows


def render(rows: list[dict], bms) -> str:
    lines = ["| scene | level | voxels | pairs / voxel | " + " | ".join(
        f"BM={bm} unsorted | BM={bm} sorted | BM={bm} iterations unsorted → sorted" for bm in bms) + " |",
        "|---" * (4 + 3 * len(bms)) + "|"]
    for r in rows:
        cells = []
        for bm in bms:
            u, s = r[f"bm{bm}_unsorted_occupancy"], r[f"bm{bm}_sorted_occupancy"]
            cells += [f"{u:.3f}", f"{s:.3f}", f"{r[f'bm{bm}_unsorted_iterations']:,} → {r[f'bm{bm}_sorted_iterations']:,} "
                      f"({r[f'bm{bm}_unsorted_iterations'] / max(1, r[f'bm{bm}_sorted_iterations']):.2f}×)"]
        lines.append(f"| {r['scene']} | {r['level']} | {r['voxels']:,} | {r['pairs'] / r['voxels']:.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from benchmarks import end_to_end as e2e
    from benchmarks import provenance
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenes", nargs="+", default=["semantickitti", "scannet"], choices=list(e2e.SCENES))
    ap.add_argument("--bm", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--out", default=None)
    ap.add_argument("--stem", default=None)
    a = ap.parse_args(argv)
    if any(b < 1 for b in a.bm):
        ap.error(f"--bm values must be >= 1, got {a.bm}")
    rows = [r for scene in a.scenes for r in occupancy_rows(scene, a.bm)]
    text = ("# IMPLICIT_GEMM forward occupancy of the k3 SubM maps, rows unsorted vs sorted\n\n"
            "Useful fraction of the forward kernel's (tile, offset) work: pairs / (active (tile, offset) x BM) "
            "(`benchmarks/probes/tile_occupancy.py`, NumPy maps, the end-to-end benchmark's batches).\n\n"
            + render(rows, a.bm))
    print(text)
    if a.out:
        stem = a.stem or provenance.stem("cpu")
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"{stem}-tile_occupancy.md"), "w") as f:
            f.write(text)
        with open(os.path.join(a.out, f"{stem}-tile_occupancy.json"), "w") as f:
            json.dump({"rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
