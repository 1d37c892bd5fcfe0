"""Algorithm registrations. Each module registers its algorithms with :mod:`sparsevox.registry`."""
from . import explicit  # noqa: F401
