"""Where a result comes from: date, device, commit, and the file-name stem built from them.

``python -m benchmarks.provenance`` prints the stem ``<yyyy-mm-dd>-<gpu>-<short commit>`` (used by
``gpu_suite.sh`` so that every file of one run shares it).

The commit is the ``COMMIT`` environment variable when set (the lead names the commit it sends; the GPU
machine's copy of ``.git`` was seen to be stale), else ``git rev-parse --short HEAD``, else
``"unknown"``. ``SPARSEVOX_RESULT_COMMIT`` overrides both (``gpu_suite.sh`` sets it, so every file of
one run names the same commit even if HEAD moves meanwhile).
"""
from __future__ import annotations

import datetime
import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Short names of known GPU families, matched in the device name ("NVIDIA H100 80GB HBM3" -> "h100").
_FAMILIES = ("gh200", "h200", "h100", "h800", "b200", "b100", "a100", "a800", "a10g", "a10", "l40s", "l40",
             "l4", "v100", "t4", "rtx6000ada", "rtx4090", "rtx3090")


def today() -> str:
    return datetime.date.today().isoformat()


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", "-c", "safe.directory=*", *args], cwd=REPO, capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


@functools.lru_cache(maxsize=None)
def commit() -> str:
    """``$SPARSEVOX_RESULT_COMMIT`` (the suite pins the commit it started at), else ``$COMMIT`` (the lead
    names the commit it sent: the GPU machine's copy of ``.git`` was seen to be stale), else the
    checkout's short commit, else ``"unknown"``."""
    return (os.environ.get("SPARSEVOX_RESULT_COMMIT", "").strip() or os.environ.get("COMMIT", "").strip()
            or _git("rev-parse", "--short", "HEAD") or "unknown")


@functools.lru_cache(maxsize=None)
def dirty() -> bool | None:
    """Whether tracked files differ from the commit (None when there is no git checkout)."""
    if _git("rev-parse", "HEAD") is None:
        return None
    out = subprocess.run(["git", "-c", "safe.directory=*", "status", "--porcelain", "--untracked-files=no"],
                         cwd=REPO, capture_output=True, text=True)
    return bool(out.stdout.strip())


@functools.lru_cache(maxsize=None)
def gpu_name() -> str | None:
    """The first GPU's full name (nvidia-smi, else torch), or None without a GPU."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # torch missing or broken CUDA: no GPU for our purposes
        pass
    return None


def slug(name: str | None) -> str:
    """Short lower-case device tag for file names: a known family, else the name squeezed."""
    if not name:
        return "cpu"
    low = re.sub(r"[^a-z0-9]", "", name.lower())
    for fam in _FAMILIES:
        if fam in low:
            return fam
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:24] or "gpu"


def stem(device: str = "gpu") -> str:
    """``<yyyy-mm-dd>-<gpu>-<short commit>``; ``device="cpu"`` names the CPU run ``cpu``."""
    tag = "cpu" if device == "cpu" else slug(gpu_name())
    return f"{today()}-{tag}-{commit()}"


def header(device_name: str) -> dict:
    """The provenance fields every result file starts with."""
    return {"device": device_name, "date": today(), "commit": commit(), "dirty": dirty()}


if __name__ == "__main__":
    import sys
    print(stem("cpu" if "--cpu" in sys.argv else "gpu"))
