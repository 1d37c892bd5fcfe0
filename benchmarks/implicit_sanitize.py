"""Small IMPLICIT_GEMM run for compute-sanitizer (memcheck, racecheck): every direction, vector and scalar
loads, tensor-core and SIMT paths, sorted and unsorted slots. ``compute-sanitizer --tool racecheck python3
benchmarks/implicit_sanitize.py``; prints the relative errors against EXPLICIT_GEMM (float32/float64)."""
import numpy as np


def main():
    import cupy

    import sparsevox as sv
    from sparsevox import explicit_gemm as eg
    from sparsevox import implicit_gemm as ig
    rng = np.random.default_rng(0)
    flat = rng.choice(2 * 14 ** 3, size=1500, replace=False)
    b, r = np.divmod(flat, 14 ** 3)
    x, r = np.divmod(r, 14 ** 2)
    y, z = np.divmod(r, 14)
    coords = cupy.asarray(np.stack([b, x, y, z], 1).astype(np.int32))
    import sys
    quick = "--quick" in sys.argv
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
                 {"gemm_block_size": 32})]
        if quick:
            cases = [cases[0], cases[1], cases[3], cases[5]]
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
