"""sparsevox: spatially sparse convolutions on voxel grids for NumPy, CuPy, PyTorch and JAX.

``import sparsevox`` needs only NumPy; CuPy, torch and jax are imported when their arrays are used.

Layout: the top-level modules are the core (``Voxels``, geometry, kernel maps, the public ops, array
interop); ``algorithms/`` implements and registers each algorithm, ``tuning/`` chooses among them,
``cuda/`` is the CUDA plumbing, and ``sparsevox.adapters`` (the ``adapters/`` folder) wraps the core for
torch, JAX and Flax. The core may import ``tuning`` at import time, but no framework and nothing of
``cuda``, ``algorithms`` or ``adapters`` (only inside functions); ``tests/test_layout.py`` checks it.
"""
from .tuning.algo_inputs import (SPARSE_CONV_BWD_ALGO_MODE, SPARSE_CONV_FWD_ALGO_MODE,
                                 SPARSE_DEPTHWISE_CONV_BWD_ALGO_MODE, SPARSE_DEPTHWISE_CONV_FWD_ALGO_MODE)
from .config import allow_tf32, allow_tf32x3
from .conv import conv_backward, conv_forward, spatially_sparse_conv
from .depthwise import depthwise_backward, depthwise_forward, spatially_sparse_depthwise_conv
from .errors import AlgorithmUnavailableError, MissingDependencyError
from .kernel_map import KernelMap, kernel_map, strided_output_voxels
from .voxels import Voxels
from .dense import from_dense, to_dense
from .points import devoxelize
from .pooling import avg_pool, global_pool, max_pool, unpool

__version__ = "0.1.0"

__all__ = [
    "Voxels", "KernelMap", "kernel_map", "strided_output_voxels", "spatially_sparse_conv",
    "spatially_sparse_depthwise_conv",
    "conv_forward", "conv_backward", "depthwise_forward", "depthwise_backward", "allow_tf32", "allow_tf32x3",
    "SPARSE_CONV_FWD_ALGO_MODE", "SPARSE_CONV_BWD_ALGO_MODE", "SPARSE_DEPTHWISE_CONV_FWD_ALGO_MODE",
    "SPARSE_DEPTHWISE_CONV_BWD_ALGO_MODE", "AlgorithmUnavailableError", "MissingDependencyError",
    "max_pool", "avg_pool", "global_pool", "unpool", "devoxelize", "to_dense", "from_dense",
]
