"""The data that broke the autotuner's accuracy check (issue 17), for the CPU and GPU tests.

Network data, not unit normals: ReLU'd BatchNorm activations (half zeros, the rest a half-normal),
gradients of a loss averaged over ~10^5 voxels (1e-6 to 1e-7: float16 subnormals), and outputs that
are sums of large terms of both signs (heavy cancellation). Geometry: the submanifold k3 map, the k2 s2
strided map and its transposed twin, on a random scene of a few thousand voxels in two batch items.
"""
import numpy as np
from gpu_cases import np_dtype
from reference import random_voxels

import sparsevox as sv

DATA = ["relu_bn", "tiny_grad_1e-6", "tiny_grad_1e-7", "cancellation"]
MAPS = ["submanifold", "strided", "transposed"]


def geometry(rng, kind, n=1500, extent=16, xp=np):
    """``(kmap, n_in, n_out)`` of ``kind`` (``submanifold`` k3, ``strided`` k2 s2, ``transposed`` k2 s2)."""
    fine = random_voxels(rng, n, extent=extent, batches=2)
    if kind == "submanifold":
        kmap = sv.kernel_map(sv.Voxels(xp.asarray(fine), None), 3)
    elif kind == "strided":
        kmap = sv.kernel_map(sv.Voxels(xp.asarray(fine), None), 2, 2)
    else:
        down = sv.kernel_map(sv.Voxels(xp.asarray(fine), None), 2, 2)
        coarse = sv.Voxels(down.out_coords, None)
        kmap = sv.kernel_map(coarse, 2, 2, transposed=True, output_voxels=sv.Voxels(xp.asarray(fine), None))
    return kmap


def _q(a, dtype):
    """Host float64 values quantised to ``dtype`` (still float64)."""
    return np.asarray(a).astype(np_dtype(dtype)).astype(np.float64)


def operands(rng, data, n_in, n_out, c_in, c_out, k, dtype):
    """Host float64 ``(feats [n_in, c_in], weight [k, c_in, c_out], grad_out [n_out, c_out])`` quantised
    to ``dtype`` and shaped like ``data``."""
    w = rng.standard_normal((k, c_in, c_out)) * np.sqrt(2.0 / (k * c_in))
    x = rng.standard_normal((n_in, c_in))
    x = np.maximum((x - x.mean(0)) / x.std(0) * 0.8 + 0.1, 0)  # BatchNorm(affine) then ReLU
    g = rng.standard_normal((n_out, c_out))
    if data.startswith("tiny_grad"):
        g *= float(data.rsplit("_", 1)[1])
    elif data == "cancellation":
        # every offset contributes a large term; the halves of the kernel cancel up to a small residue
        x = 50.0 + rng.standard_normal((n_in, c_in)) * 0.5
        w_half = rng.standard_normal((c_in, c_out)) / np.sqrt(c_in)
        sign = np.where(np.arange(k) % 2 == 0, 1.0, -1.0)
        w = sign[:, None, None] * w_half[None] + rng.standard_normal((k, c_in, c_out)) * 1e-3
        g = (50.0 * sign[rng.integers(0, k)] + rng.standard_normal((n_out, c_out))) * 1e-3  # wgrad fits float16
    return _q(x, dtype), _q(w, dtype), _q(g, dtype)


def candidate(direction, x, w, g, kmap, dtype, skip=None, wrong_row=None, tf32=False, passes=1):
    """What a kernel of ``dtype`` computes (host NumPy): operands as given, float32 sums (float64 for
    float64) over the offsets in reverse order, the result rounded once to ``dtype``; ``tf32`` rounds
    float32 operands to 10 mantissa bits first. Sabotage for the check's tests: ``skip`` leaves that
    offset out; ``wrong_row`` copies the next row of the result into that row. ``passes`` > 1 runs the
    offsets in that many contiguous parts, rounding the output to ``dtype`` after each (IMPLICIT_GEMM's
    mask split)."""
    acc = np.float64 if dtype == "float64" else np.float32

    def op(a):
        a = np.asarray(a, dtype=acc)
        if tf32:
            a = (a.view(np.uint32) + np.uint32(0x1000) & np.uint32(0xFFFFE000)).view(np.float32)
        return a
    x, w, g = op(x), op(w), op(g)
    o = kmap.offsets_host
    in_maps, out_maps = (np.asarray(m if isinstance(m, np.ndarray) else m.get()) for m in (kmap.in_maps, kmap.out_maps))
    k = len(o) - 1
    shape = {"fwd": (kmap.num_out, w.shape[2]), "dgrad": (kmap.num_in, w.shape[1]), "wgrad": w.shape}[direction]
    out = np.zeros(shape, dtype=acc)
    ends = {k * (h + 1) // passes for h in range(passes - 1)}
    for j in reversed(range(k)):
        if j in ends:  # a pass ends: its sum is stored in (rounded to) the output dtype
            out = out.astype(np_dtype(dtype)).astype(acc)
        if j == skip:
            continue
        i, r = in_maps[o[j]:o[j + 1]], out_maps[o[j]:o[j + 1]]
        if direction == "fwd":
            np.add.at(out, r, x[i] @ w[j])
        elif direction == "dgrad":
            np.add.at(out, i, g[r] @ w[j].T)
        else:
            out[j] = x[i].T @ g[r]
    if wrong_row is not None:
        out[wrong_row] = out[(wrong_row + 1) % len(out)]
    return out.astype(np_dtype(dtype))


def busiest_offset(kmap):
    """The offset with the most pairs (skipping it must be caught)."""
    return int(np.argmax(np.diff(kmap.offsets_host)))
