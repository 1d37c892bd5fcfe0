"""``spconv.pytorch.functional``: importable; its autograd functions on spconv's pair tensors raise
``NotImplementedError`` when used (the layers run sparsevox's own)."""
from ._unsupported import attribute_error

__all__: list = []
_SPCONV_NAMES = ("SparseConvFunction", "SparseInverseConvFunction", "SparseImplicitGemmFunction", "SubMConvFunction",
                 "SparseMaxPoolFunction", "SparseMaxPoolImplicitGemmFunction", "SparseAvgPoolImplicitGemmFunction",
                 "indice_conv", "implicit_gemm", "indice_inverse_conv", "indice_subm_conv", "indice_maxpool",
                 "indice_maxpool_implicit_gemm", "indice_avgpool_implicit_gemm", "sparse_add_hash_based", "sparse_add")
__getattr__ = attribute_error(__name__, "spconv.pytorch.functional", _SPCONV_NAMES)
