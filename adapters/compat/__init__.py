"""Other libraries' APIs on sparsevox: :mod:`sparsevox.compat.spconv` runs models written for spconv 2.x
(``import sparsevox.compat.spconv as spconv`` in place of ``import spconv.pytorch as spconv``).

This package lives in the repository's ``adapters/compat/`` and is installed as ``sparsevox.compat``. It is
an adapter (torch): it builds on :mod:`sparsevox.adapters.torch` (the one adapter it may import,
``tests/test_layout.py``) and on the framework-free core; nothing in the core imports it.
"""
