"""The float64 dense-convolution oracle that decides what is right.

Sparse inputs are scattered onto a dense grid (inactive sites zero), convolved densely with strided
slicing (no kernel map, no sorting, no hashing), and read back at the active output sites.
"""
from __future__ import annotations

import numpy as np

from sparsevox.geometry import kernel_offsets, triple


def random_voxels(rng, n, extent=8, batches=1):
    """``[N', 4]`` int32 unique coordinates (N' <= n), x, y, z in ``[-extent//2, extent - extent//2)``."""
    n = min(n, batches * extent ** 3)
    flat = rng.choice(batches * extent ** 3, size=n, replace=False)
    b, rest = np.divmod(flat, extent ** 3)
    x, rest = np.divmod(rest, extent ** 2)
    y, z = np.divmod(rest, extent)
    c = np.stack([b, x, y, z], axis=1) - np.array([0, extent // 2, extent // 2, extent // 2])
    return c.astype(np.int32)


def expected_out_coords(coords, kernel_size, stride, dilation, transposed, generative):
    """Output sites by the DESIGN.md rules, sorted by (batch, x, y, z)."""
    s = np.array(triple(stride, "stride"))
    c = np.asarray(coords, dtype=np.int64)
    if transposed and generative:
        off = kernel_offsets(kernel_size, dilation)
        rows = [np.concatenate([c[:, :1], c[:, 1:] * s + o], 1) for o in off]
        out = np.concatenate(rows) if rows else c
    elif not transposed and tuple(s) != (1, 1, 1):
        out = np.concatenate([c[:, :1], np.floor_divide(c[:, 1:], s)], 1)
    else:
        return np.asarray(coords)
    if out.shape[0] == 0:
        return out.astype(np.int32).reshape(0, 4)
    return np.unique(out, axis=0).astype(np.int32)


class _Grid:
    """A dense grid over a box of coordinates: ``[B, X, Y, Z, C]`` with an integer origin."""

    def __init__(self, lo, hi, batches, channels):
        self.lo = np.asarray(lo, dtype=np.int64)
        self.a = np.zeros((batches,) + tuple(np.asarray(hi) - self.lo + 1) + (channels,), np.float64)

    def scatter(self, coords, values):
        c = np.asarray(coords, dtype=np.int64)
        self.a[(c[:, 0],) + tuple((c[:, 1:] - self.lo).T)] = values

    def gather(self, coords):
        c = np.asarray(coords, dtype=np.int64)
        return self.a[(c[:, 0],) + tuple((c[:, 1:] - self.lo).T)]

    def window(self, start, step, count):
        """The strided sub-grid view starting at world coordinate ``start``."""
        step = np.broadcast_to(step, 3)
        sl = tuple(slice(int(st - lo), int(st - lo + sp * (n - 1) + 1), int(sp))
                   for st, lo, n, sp in zip(start, self.lo, count, step))
        return self.a[(slice(None),) + sl]


def _boxes(coords_in, out_coords, kernel_size, stride, dilation, transposed):
    off = kernel_offsets(kernel_size, dilation).astype(np.int64)
    s = np.array(triple(stride, "stride"), dtype=np.int64)
    ci = np.asarray(coords_in, dtype=np.int64)[:, 1:]
    co = np.asarray(out_coords, dtype=np.int64)[:, 1:]
    lo_i = ci.min(0) if len(ci) else np.zeros(3, np.int64)
    hi_i = ci.max(0) if len(ci) else np.zeros(3, np.int64)
    lo_o = co.min(0) if len(co) else np.zeros(3, np.int64)
    hi_o = co.max(0) if len(co) else np.zeros(3, np.int64)
    if transposed:  # output grid must hold every s * in + off
        lo_o = np.minimum(lo_o, s * lo_i + off.min(0))
        hi_o = np.maximum(hi_o, s * hi_i + off.max(0))
    else:  # input grid must hold every s * out + off
        lo_i = np.minimum(lo_i, s * lo_o + off.min(0))
        hi_i = np.maximum(hi_i, s * hi_o + off.max(0))
    return off, s, (lo_i, hi_i), (lo_o, hi_o)


def _batches(coords_in, out_coords):
    b = [int(np.max(c[:, 0])) + 1 for c in (np.asarray(coords_in), np.asarray(out_coords)) if len(c)]
    return max(b) if b else 1


def dense_conv(coords_in, feats, weight, kernel_size, stride, dilation, transposed, out_coords):
    """Float64 ``[M, C_out]`` result of the convolution read at ``out_coords``.

    Non-transposed: ``Y[p] = sum_k X[s p + off_k] W[k]``; transposed: ``Y[s p + off_k] += X[p] W[k]``.
    """
    feats = np.asarray(feats, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    off, s, (lo_i, hi_i), (lo_o, hi_o) = _boxes(coords_in, out_coords, kernel_size, stride, dilation, transposed)
    nb = _batches(coords_in, out_coords)
    X = _Grid(lo_i, hi_i, nb, feats.shape[1])
    X.scatter(coords_in, feats)
    Y = _Grid(lo_o, hi_o, nb, weight.shape[2])
    if transposed:
        count_i = hi_i - lo_i + 1
        for k, o in enumerate(off):
            Y.window(s * lo_i + o, s, count_i)[...] += X.a @ weight[k]
    else:
        count_o = hi_o - lo_o + 1
        for k, o in enumerate(off):
            Y.a += X.window(s * lo_o + o, s, count_o) @ weight[k]
    return Y.gather(out_coords)


def dense_conv_grads(coords_in, feats, weight, grad_out, kernel_size, stride, dilation, transposed, out_coords):
    """Float64 ``(grad_feats [N, C_in], grad_weight [K, C_in, C_out])`` of ``sum(dense_conv(...) * grad_out)``."""
    feats = np.asarray(feats, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    grad_out = np.asarray(grad_out, dtype=np.float64)
    off, s, (lo_i, hi_i), (lo_o, hi_o) = _boxes(coords_in, out_coords, kernel_size, stride, dilation, transposed)
    nb = _batches(coords_in, out_coords)
    X = _Grid(lo_i, hi_i, nb, feats.shape[1])
    X.scatter(coords_in, feats)
    G = _Grid(lo_o, hi_o, nb, weight.shape[2])
    G.scatter(out_coords, grad_out)
    GX = _Grid(lo_i, hi_i, nb, feats.shape[1])
    gw = np.zeros_like(weight)
    for k, o in enumerate(off):
        if transposed:
            g = G.window(s * lo_i + o, s, hi_i - lo_i + 1)
            GX.a += g @ weight[k].T
            gw[k] = X.a.reshape(-1, X.a.shape[-1]).T @ g.reshape(-1, g.shape[-1])
        else:
            x = X.window(s * lo_o + o, s, hi_o - lo_o + 1)
            GX.window(s * lo_o + o, s, hi_o - lo_o + 1)[...] += G.a @ weight[k].T
            gw[k] = x.reshape(-1, x.shape[-1]).T @ G.a.reshape(-1, G.a.shape[-1])
    return GX.gather(coords_in), gw


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if np.isnan(a).any() and not np.isnan(b).any():
        return float("inf")
    denom = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (denom if denom > 0 else 1.0))


TOL = {"float64": 1e-12, "float32": 1e-5, "float16": 1e-2, "bfloat16": 2e-2}
