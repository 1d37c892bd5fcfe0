"""Runnable examples: ``python -m sparsevox.examples.jax_train``, ``python -m sparsevox.examples.cupy_manual_grad``."""
