"""Small IMPLICIT_GEMM run for compute-sanitizer (memcheck, racecheck): every direction, vector and scalar
loads, tensor-core and SIMT paths, sorted and unsorted slots. ``compute-sanitizer --tool racecheck python3
benchmarks/probes/implicit_sanitize.py``; prints the relative errors against EXPLICIT_GEMM (float32/float64)."""
import numpy as np


def main():
    import cupy

    import sparsevox as sv
    from sparsevox.algorithms import explicit_gemm as eg
    from sparsevox.algorithms import implicit_gemm as ig
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="submanifold only, four cases")
    ap.add_argument("--case", type=int, action="append", help="run only these case indices (repeatable)")
    ap.add_argument("--voxels", type=int, default=1500, help="random voxels in a 2 x 14^3 grid")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    flat = rng.choice(2 * 14 ** 3, size=min(args.voxels, 2 * 14 ** 3), replace=False)
    b, r = np.divmod(flat, 14 ** 3)
    x, r = np.divmod(r, 14 ** 2)
    y, z = np.divmod(r, 14)
    coords = cupy.asarray(np.stack([b, x, y, z], 1).astype(np.int32))
    quick = args.quick
    kinds = {"submanifold": (1, False)} if quick else {"submanifold": (1, False), "strided": (2, False)}
    for kind, (s, tr) in kinds.items():
        kmap = sv.kernel_map(sv.Voxels(coords, None), 3, s, 1, tr)
        cases = [
                ("float16", 32, 64, {"fwd_block_size": 64, "gemm_block_size": 64}, {"gemm_block_size": 64}),
                ("float16", 17, 3, {"fwd_block_size": 128, "gemm_block_size": 128, "sort_rows": False},
                 {"gemm_block_size": 32}),
                ("float16", 64, 256, {"fwd_block_size": 128, "gemm_block_size": 256}, {"gemm_block_size": 128}),
                ("float32", 20, 36, {"fwd_block_size": 64, "gemm_block_size": 64}, {"gemm_block_size": 64}),
                ("float64", 6, 5, {"fwd_block_size": 32, "gemm_block_size": 32}, {"gemm_block_size": 32}),
                ("float16", 32, 32, {"fwd_block_size": 64, "gemm_block_size": 32, "stage_nbr": True},
                 {"gemm_block_size": 32}),
                ("float16", 24, 40, {"fwd_block_size": 64, "gemm_block_size": 64, "mask_split": 2},
                 {"gemm_block_size": 64}),
                ("float16", 32, 32, {"fwd_block_size": 128, "gemm_block_size": 32}, {"gemm_block_size": 32})]
        if quick:
            cases = [cases[0], cases[1], cases[3], cases[5]]
        if args.case:
            cases = [cases[i] for i in args.case]
        for dt, cin, cout, fp, wp in cases:
            f = cupy.asarray(rng.standard_normal((kmap.num_in, cin))).astype(dt)
            w = cupy.asarray(rng.standard_normal((kmap.num_offsets, cin, cout))).astype(dt)
            g = cupy.asarray(rng.standard_normal((kmap.num_out, cout))).astype(dt)
            hi = "float64" if dt == "float64" else "float32"
            f2, w2, g2 = f.astype(hi), w.astype(hi), g.astype(hi)
            pairs = [(ig.forward(f, w, kmap, **fp), eg.forward(f2, w2, kmap)),
                     (ig.dgrad(g, w, kmap, **fp), eg.dgrad(g2, w2, kmap)),
                     (ig.wgrad(f, g, kmap, kmap.num_offsets, **wp), eg.wgrad(f2, g2, kmap, kmap.num_offsets))]
            errs = [float(cupy.linalg.norm(a.astype(hi) - r) / cupy.linalg.norm(r)) for a, r in pairs]
            print(kind, dt, cin, cout, " ".join(f"{e:.2e}" for e in errs), flush=True)


if __name__ == "__main__":
    main()
