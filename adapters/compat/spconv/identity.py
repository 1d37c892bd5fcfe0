"""``spconv.pytorch.identity``: ``Identity``, for code that imports it from here."""
from .modules import Identity  # noqa: F401

__all__ = ["Identity"]
