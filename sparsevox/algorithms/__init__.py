"""The algorithms: one module per algorithm, which implements it and registers it with
:mod:`sparsevox.tuning.registry` when imported (this package imports them all; the registry imports this
package the first time it is asked for an algorithm).

- ``explicit_gemm``: EXPLICIT_GEMM (conv) and EXPLICIT (depthwise), NumPy and CuPy alike: the reference.
- ``implicit_gemm``: IMPLICIT_GEMM (conv), fused gather-GEMM-scatter CUDA kernels.
- ``cutlass_implicit_gemm``: CUTLASS_IMPLICIT_GEMM (conv), CUTLASS GEMMs from the prebuilt library.
- ``depthwise_implicit``: IMPLICIT (depthwise), fused CUDA kernels.

May import: the standard library, NumPy, the core (``sparsevox._arrays``, ``config``, ``kernel_map``),
``sparsevox.tuning.registry`` and ``sparsevox.cuda``. CuPy only inside functions. Never a framework
(torch, jax) and never ``sparsevox.adapters``.
"""
from . import explicit_gemm  # noqa: F401
from . import depthwise_implicit  # noqa: F401
from . import implicit_gemm  # noqa: F401
from . import cutlass_implicit_gemm  # noqa: F401
