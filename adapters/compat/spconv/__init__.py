"""spconv 2.x's PyTorch API on sparsevox: change ``import spconv.pytorch as spconv`` to

    import sparsevox.compat.spconv as spconv

and existing models and checkpoints run unchanged (spconv 2.3.8's names, arguments, ``indice_key`` rules,
output sites and spatial shapes, weight layout ``[C_out, *kernel_size, C_in]`` and state-dict keys). The
convolutions are sparsevox's (its kernel maps and algorithms, CPU tensors on the NumPy backend, CUDA
tensors on the GPU); torch only.

Provided: ``SparseConvTensor``; ``SubMConv{1,2,3}d``, ``SparseConv{1,2,3}d``, ``SparseConvTranspose{1,2,3}d``,
``SparseInverseConv{1,2,3}d``, ``SparseConvolution``; ``SparseMaxPool{1,2,3}d``, ``SparseAvgPool{1,2,3}d``,
``SparseGlobalMaxPool``, ``SparseGlobalAvgPool``; ``SparseModule``, ``SparseSequential``, ``SparseBatchNorm``,
``SparseSyncBatchNorm``, ``SparseReLU``, ``SparseIdentity``, ``ToDense``, ``RemoveGrid``, ``Identity``,
``JoinTable``, ``AddTable``, ``ConcatTable``, ``ConvAlgo``, ``assign_name_for_sparse_modules``. 1D and 2D
layers run as 3D with unit axes; the submodules ``tables``, ``identity``, ``ops`` (``ConvAlgo``),
``functional`` (``sparse_add``), ``utils`` (``PointToVoxel``, ``gather_features_by_pc_voxel_id``) and
``constants`` import; :func:`install` makes ``import spconv`` resolve here for code that cannot be edited.
Not supported (``NotImplementedError`` naming the feature): 4D layers, spconv's autograd functions and pair
builders (``functional`` / ``ops``) when used, ``AddTableMisaligned``, quantization (int8), ``hash``, fused
activations, ``benchmark``/``enable_timer``, ``SPCONV_SAVED_WEIGHT_LAYOUT`` other than KRSC. Deliberate differences and spconv quirks that are reproduced: see the project README
("Coming from spconv").

Example:
    >>> import sparsevox.compat.spconv as spconv
    >>> net = spconv.SparseSequential(spconv.SubMConv3d(4, 16, 3, indice_key="subm1"), torch.nn.ReLU(),
    ...                               spconv.SparseConv3d(16, 32, 3, 2, padding=1), spconv.ToDense())
    >>> x = spconv.SparseConvTensor(features, indices, [41, 400, 352], batch_size=2)
    >>> net.load_state_dict(torch.load("spconv_checkpoint.pth"))
    >>> dense = net(x)                                   # [2, 32, 21, 200, 176]
"""
from __future__ import annotations

from . import conv, core, modules, pool  # noqa: F401
from .conv import *  # noqa: F401,F403
from .conv import DEFAULT_SPARSE_CONV_TYPES, SparseConvolution  # noqa: F401
from .core import ConvAlgo, IndiceData, ImplicitGemmIndiceData, SparseConvTensor, expand_nd  # noqa: F401
from .modules import *  # noqa: F401,F403
from .pool import *  # noqa: F401,F403

__all__ = (["SparseConvTensor", "ConvAlgo", "IndiceData", "ImplicitGemmIndiceData", "expand_nd"] + conv.__all__
           + modules.__all__ + pool.__all__)

# functional, ops and utils import (their names raise when used: ops.py, functional.py, utils.py);
# tables and identity re-export the modules
from . import constants, functional, identity, ops, tables, utils  # noqa: F401,E402
from .install import install  # noqa: F401,E402

_UNSUPPORTED = {
    "quantization": "spconv.pytorch.quantization (int8)",
    "hash": "spconv.pytorch.hash (HashTable)",
}


def __getattr__(name):
    if name in _UNSUPPORTED:
        raise NotImplementedError(f"{_UNSUPPORTED[name]} is not supported by sparsevox.compat.spconv")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
