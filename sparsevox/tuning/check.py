"""Is a candidate's output right? A precise oracle and an error bound that follows the candidate's dtype.

Every operation the autotuner checks is bilinear in two arrays, ``f(a, b)`` (forward: features and
weight; dgrad: output gradient and weight; wgrad: features and output gradient). The oracle evaluates
``f`` on the *same* inputs upcast without loss (float16/bfloat16 to float32 — whose products of two
16-bit values are exact and whose sums are never rounded to 16 bits — and float32/float64 to float64),
once per configuration, together with the magnitude ``f(|a|, |b|)``, which bounds every rounding error
of a sum of products.

A candidate passes when, element by element,

    |out - ref| <= SAFETY * (u_out * |ref| + r * tiny_out + (r - 1) * u_out * mag
                             + (2 * u_tf32 if TF32) * mag + 2 * gamma * mag)

- ``u_out``: the unit roundoff of the output dtype (one rounding of the result);
- ``tiny_out``: half the smallest subnormal of the output dtype (a result near zero, such as an
  un-scaled float16 gradient of 1e-6, is rounded in absolute, not relative, terms);
- ``gamma = min(depth, LAMBDA * sqrt(depth)) * u_acc``: the accumulation of ``depth`` terms in the
  accumulator dtype (float32, float64 for float64), in the probabilistic form of Higham & Mary (2019),
  which rounding-to-nearest sums meet with overwhelming probability; counted twice (candidate and
  oracle, which accumulate in the same dtype for 16-bit inputs);
- under TF32, both operands rounded to 10 mantissa bits;
- ``r``: how often the candidate rounds an element to the output dtype (1 for a kernel that sums in
  its accumulator and writes once; IMPLICIT_GEMM's mask split of ``m`` passes adds each pass into the
  output the previous one rounded, ``r = m``, and the partial sums it rounds are bounded by ``mag``).

The elementwise form catches a kernel that writes one wrong row, and one that skips an offset (whose
missing term is about ``mag / K``, far above ``gamma * mag`` for any real depth), while a correct kernel
that rounds once passes on data with heavy cancellation or subnormal results, where a flat relative
tolerance against a less precise reference rejected it (issue 17).
"""
from __future__ import annotations

import math

import numpy as np

from .._arrays import array_module

UNIT_ROUNDOFF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8, "float32": 2.0 ** -24, "float64": 2.0 ** -53}
LARGEST = {"float16": 65504.0, "bfloat16": 3.3895e38, "float32": 3.4028e38, "float64": 1.7976e308}
HALF_SUBNORMAL = {"float16": 2.0 ** -25, "bfloat16": 2.0 ** -134, "float32": 2.0 ** -150, "float64": 0.0}
TF32_ROUNDOFF = 2.0 ** -11
SAFETY = 2.0
LAMBDA = 4.0


def oracle_dtype(dtype: str) -> str:
    """The dtype the oracle computes in: float32 for 16-bit inputs, float64 for float32 and float64."""
    return "float32" if dtype in ("float16", "bfloat16") else "float64"


def accumulation_roundoff(dtype: str) -> float:
    """Unit roundoff of the accumulator every candidate of ``dtype`` uses (float32, or float64)."""
    return UNIT_ROUNDOFF["float64" if dtype == "float64" else "float32"]


def gamma(depth: int, dtype: str) -> float:
    """Relative error bound (of ``mag``) of accumulating ``depth`` products of ``dtype`` inputs."""
    depth = max(int(depth), 1)
    return min(depth, LAMBDA * math.sqrt(depth)) * accumulation_roundoff(dtype)


class Verdict:
    """What :meth:`Oracle.judge` found: ``ok``, the worst ratio of error to bound, the relative error."""

    def __init__(self, ok: bool, ratio: float, rel_err: float, detail: str = ""):
        self.ok, self.ratio, self.rel_err, self.detail = ok, ratio, rel_err, detail

    def __str__(self):
        if self.detail:
            return self.detail
        return f"relative error {self.rel_err:.3g}, worst element {self.ratio:.3g}x its bound"


class Oracle:
    """The precise value of a bilinear ``fn(a, b, *extra)``, computed once when first needed.

    Args:
        fn: a bilinear function of core arrays (an EXPLICIT_GEMM entry point, which sums in its input
            dtype when that is float32 or float64).
        a, b: its operands, as the candidates receive them.
        extra: further arguments passed through (the kernel map, the offset count).
        dtype: the candidates' dtype name (``float16``, ``bfloat16``, ``float32``, ``float64``).
        depth: the most products summed into one output element (forward ``K * C_in``, dgrad
            ``K * C_out``, wgrad the most pairs of one offset).
        tf32: the candidates may round float32 operands to TF32.
    """

    def __init__(self, fn, a, b, *extra, dtype: str, depth: int, tf32: bool = False):
        self.fn, self.a, self.b, self.extra = fn, a, b, extra
        self.dtype, self.depth, self.tf32 = dtype, int(depth), bool(tf32)
        self._ref = self._mag = None

    def values(self):
        """``(ref, mag)`` in :func:`oracle_dtype`: ``fn(a, b)`` and ``fn(|a|, |b|)``."""
        if self._ref is None:
            xp = array_module(self.a)
            dt = getattr(xp, oracle_dtype(self.dtype))
            a, b = self.a.astype(dt), self.b.astype(dt)
            self._ref = self.fn(a, b, *self.extra)
            self._mag = self.fn(xp.abs(a), xp.abs(b), *self.extra)
        return self._ref, self._mag

    def bound(self, ref, mag, roundings: int = 1):
        """The elementwise error allowance (same shape as ``ref``) of a candidate that rounds each
        element ``roundings`` times to the output dtype."""
        xp = array_module(ref)
        u, r = UNIT_ROUNDOFF[self.dtype], max(int(roundings), 1)
        acc = 2.0 * gamma(self.depth, self.dtype) + (2.0 * TF32_ROUNDOFF if self.tf32 else 0.0) + (r - 1) * u
        return SAFETY * (u * xp.abs(ref) + r * HALF_SUBNORMAL[self.dtype] + acc * mag)

    def judge(self, out, roundings: int = 1) -> Verdict:
        """Compare a candidate's output (rounded ``roundings`` times to the output dtype) with the oracle."""
        if out is None:
            return Verdict(False, math.inf, math.inf, "returned no output to check")
        ref, mag = self.values()
        if tuple(out.shape) != tuple(ref.shape):
            return Verdict(False, math.inf, math.inf,
                           f"wrong shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
        xp = array_module(ref)
        # Elements the output dtype cannot hold (an overflowing float16 gradient of an early GradScaler
        # step, inputs that hold inf or NaN) are no evidence against a candidate: judge the rest.
        judged = xp.isfinite(ref) & xp.isfinite(mag) & (xp.abs(ref) < LARGEST[self.dtype] * (1 - 2.0 ** -7))
        out = out.astype(ref.dtype)
        if not bool(judged.all()):
            out, ref, mag = (xp.where(judged, a, 0) for a in (out, ref, mag))
        diff = xp.abs(out - ref)
        bound = self.bound(ref, mag, roundings)
        if not bool(xp.isfinite(diff).all()):
            return Verdict(False, math.inf, math.inf, "non-finite values where the oracle's are finite")
        over = diff / xp.where(bound > 0, bound, np.finfo(np.float64).tiny)
        ratio = float(over.max()) if over.size else 0.0
        den = float(xp.linalg.norm(ref))
        num = float(xp.linalg.norm(diff))
        rel = num / den if den > 0 else num
        detail = ""
        if ratio > 1.0:
            row = int(xp.argmax(over.max(axis=tuple(range(1, over.ndim))) if over.ndim > 1 else over))
            detail = (f"relative error {rel:.3g}; worst element {ratio:.3g}x its bound "
                      f"(first index {row} of axis 0)")
        return Verdict(ratio <= 1.0, ratio, rel, detail)
