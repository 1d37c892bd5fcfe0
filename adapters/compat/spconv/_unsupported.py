"""The module-level ``__getattr__`` of spconv submodules that import but are not supported: spconv's own
names in them raise ``NotImplementedError`` naming the feature when used (model code often imports the
modules, e.g. CenterPoint's ``from spconv.pytorch import ops`` in a ``try``, and never calls them); any
other name is an ``AttributeError`` as usual, so ``hasattr`` and tools that probe modules keep working."""
from __future__ import annotations


def attribute_error(module: str, what: str, names, hint: str = "", known: dict | None = None):
    """A module ``__getattr__``: ``known`` names resolve to their values; spconv's ``names`` (None: every
    public name, for a module sparsevox has no counterpart of) raise ``NotImplementedError`` (``what`` is not
    supported, ``hint`` says what to use instead)."""
    known, names = known or {}, None if names is None else frozenset(names)

    def __getattr__(name: str):
        if name in known:
            return known[name]
        if (not name.startswith("_")) if names is None else name in names:
            raise NotImplementedError(f"{what}.{name} is not supported by sparsevox.compat.spconv"
                                      + (f" ({hint})" if hint else ""))
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    return __getattr__
