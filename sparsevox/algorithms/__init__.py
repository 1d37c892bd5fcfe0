"""Algorithm registrations. Each module registers its algorithms with :mod:`sparsevox.tuning.registry`."""
from . import explicit  # noqa: F401
from . import depthwise_implicit  # noqa: F401
from . import implicit_gemm_registration  # noqa: F401
from . import cutlass_implicit_gemm  # noqa: F401
