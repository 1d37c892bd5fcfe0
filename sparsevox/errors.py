"""Exceptions of sparsevox."""


class MissingDependencyError(ImportError):
    """An optional dependency (CuPy, torch, jax) is needed for what was asked; the message names the extra."""


class AlgorithmUnavailableError(ValueError):
    """None of the requested algorithms can run for these inputs; the message lists why."""
