"""``spconv.pytorch.ops``: importable (model code imports it to detect spconv 2); ``ConvAlgo`` is the
compat enum and the output-size helpers are the compat ones; spconv's pair generation and GEMMs on its
own pair tensors raise ``NotImplementedError``."""
from ._unsupported import attribute_error
from .core import ConvAlgo
from .maps import conv_output_size, deconv_output_size


def get_deconv_output_size(input_size, kernel_size, stride, padding, dilation, output_padding):
    """spconv's signature (``dilation`` taken and unused, as in spconv)."""
    return deconv_output_size(input_size, kernel_size, stride, padding, output_padding)


__all__ = ["ConvAlgo", "get_conv_output_size", "get_deconv_output_size"]
_SPCONV_NAMES = ("get_indice_pairs", "get_indice_pairs_implicit_gemm", "indice_conv", "fused_indice_conv",
                 "indice_conv_backward", "implicit_gemm", "implicit_gemm_backward", "indice_maxpool",
                 "indice_maxpool_backward", "indice_maxpool_implicit_gemm", "indice_maxpool_implicit_gemm_backward",
                 "indice_avgpool_implicit_gemm", "indice_avgpool_implicit_gemm_backward", "global_pool_rearrange")
__getattr__ = attribute_error(__name__, "spconv.pytorch.ops", _SPCONV_NAMES, known={
    "ConvAlgo": ConvAlgo, "get_conv_output_size": conv_output_size})
