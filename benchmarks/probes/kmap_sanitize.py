"""Small GPU kernel-map run for compute-sanitizer (memcheck, racecheck): the symmetric SubM path (k3,
k5, (3, 1, 5)) with and without a prebuilt table, the probing path (k2 s2 strided, even SubM k2, k2 s2
generative), on 6,000 voxels; run it with ``SPARSEVOX_KMAP_ITEMS=1 SPARSEVOX_KMAP_PROBE_ITEMS=1``
(256-row tiles) so that each offset spans several tiles.
Every map is compared with the NumPy builder. ``compute-sanitizer --tool memcheck python3 -m
benchmarks.probes.kmap_sanitize``; prints one line per map and ``kmap_sanitize: N maps OK``."""
import numpy as np


def main() -> int:
    import cupy

    import sparsevox as sv
    rng = np.random.default_rng(0)
    flat = rng.choice(2 * 24 ** 3, size=6000, replace=False)
    b, r = np.divmod(flat, 24 ** 3)
    x, r = np.divmod(r, 24 ** 2)
    y, z = np.divmod(r, 24)
    host = np.stack([b, x, y, z], 1).astype(np.int32)
    cases = [(3, 1), (5, 1), ((3, 1, 5), 1), (2, 2), (2, 1)]
    n = 0
    for check in (False, True):  # True: Voxels validation builds the table the maps reuse
        for ks, s in cases:
            got = sv.kernel_map(sv.Voxels(cupy.asarray(host), None, check=check), ks, s)
            want = sv.kernel_map(sv.Voxels(host, None), ks, s)
            for name in ("in_maps", "out_maps", "offsets", "out_coords"):
                g, w = cupy.asnumpy(getattr(got, name)), np.asarray(getattr(want, name))
                if not np.array_equal(g, w):
                    raise SystemExit(f"kmap_sanitize: {name} differs for ks={ks} s={s} (table reused: {check})")
            n += 1
            print(f"ks={ks} s={s} table reused={check}: {got.num_pairs} pairs OK", flush=True)
        up = sv.kernel_map(sv.Voxels(cupy.asarray(host), None, check=check), 2, 2, transposed=True, generative=True)
        want = sv.kernel_map(sv.Voxels(host, None), 2, 2, transposed=True, generative=True)
        assert np.array_equal(cupy.asnumpy(up.in_maps), want.in_maps), "generative map differs"
        n += 1
    cupy.cuda.Device().synchronize()
    print(f"kmap_sanitize: {n} maps OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
