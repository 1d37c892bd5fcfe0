"""Tuning: which algorithm runs, with which parameters.

``algo_inputs`` (the algorithm enums and the one resolver of ``fwd_algo``/``bwd_algo`` and the
environment), ``problem`` (what a choice depends on: the cache key), ``registry`` (canonical name →
``Algorithm``, per op), ``autotune`` (time every allowed candidate, keep the fastest) and ``tune_cache``
(the on-disk cache).

May import: the standard library, NumPy, the core's helpers (``sparsevox._arrays``, ``errors``,
``config``). Only inside functions: ``sparsevox.algorithms`` (the registry fills itself on first use),
``sparsevox.cuda.gpu_info`` and CuPy. Never a framework (torch, jax) and never ``sparsevox.adapters``.
"""
