"""The module-level ``__getattr__`` of spconv submodules that import but are not supported: their names
raise ``NotImplementedError`` naming the feature when used (model code often imports them, e.g.
CenterPoint's ``from spconv.pytorch import ops`` in a ``try``, and never calls them)."""
from __future__ import annotations


def attribute_error(module: str, what: str, hint: str = "", known: dict | None = None):
    """A module ``__getattr__``: names in ``known`` resolve to their values; every other public name raises
    ``NotImplementedError`` (``what`` is not supported, ``hint`` says what to use instead)."""
    known = known or {}

    def __getattr__(name: str):
        if name in known:
            return known[name]
        if name.startswith("__"):
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        raise NotImplementedError(f"{what}.{name} is not supported by sparsevox.compat.spconv" + (f" ({hint})" if hint else ""))
    return __getattr__
