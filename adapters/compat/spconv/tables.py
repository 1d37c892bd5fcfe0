"""``spconv.pytorch.tables``: the table modules, for code that imports them from here."""
from .modules import AddTable, AddTableMisaligned, ConcatTable, JoinTable  # noqa: F401

__all__ = ["JoinTable", "AddTable", "ConcatTable", "AddTableMisaligned"]
