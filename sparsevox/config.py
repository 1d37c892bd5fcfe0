"""Process-wide switches."""
from __future__ import annotations

import os

_tf32 = os.environ.get("SPARSEVOX_ALLOW_TF32", "0").lower() in ("1", "true", "yes")


def allow_tf32(enabled: bool | None = None) -> bool:
    """Get, or set with ``enabled``, whether float32 convolutions may use TF32 tensor cores.

    Off by default (float32 stays exact, as with ``torch.backends.cuda.matmul.allow_tf32 = False``);
    also switched on by the environment variable ``SPARSEVOX_ALLOW_TF32=1``.
    """
    global _tf32
    if enabled is not None:
        _tf32 = bool(enabled)
    return _tf32
