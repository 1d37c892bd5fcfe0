"""Flax NNX adapter: sparse convolution modules (:mod:`.conv`), built on :mod:`sparsevox.adapters.jax`.

Everything :mod:`sparsevox.adapters.flax` exported when it was one module is still importable from
here (its private helpers too, through :mod:`.conv`). This package imports flax; nothing else in
sparsevox does (install with ``pip install sparsevox[flax]``).
"""
from __future__ import annotations

from . import conv
from .conv import SparseConv, SparseDepthwiseConv

__all__ = list(conv.__all__)


def __getattr__(name):
    """The rest of :mod:`.conv` (its private helpers)."""
    try:
        return getattr(conv, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
