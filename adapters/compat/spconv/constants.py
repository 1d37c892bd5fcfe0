"""``spconv.pytorch.constants``: the torch version as spconv reads it, and its autocast query."""
import re

import torch

__all__ = ["PYTORCH_VERSION", "TORCH_HAS_AMP", "is_amp_enabled"]

# "2.13.0+cpu" / "2.14.0.dev20261101" -> [2, 13, 0]
PYTORCH_VERSION = [int(v) for v in re.match(r"\d+(?:\.\d+)*", torch.__version__).group(0).split(".")]
TORCH_HAS_AMP = True


def is_amp_enabled() -> bool:
    """Whether autocast is on (spconv's helper)."""
    return torch.is_autocast_enabled()
