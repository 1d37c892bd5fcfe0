"""``spconv.pytorch.ops``: importable (model code imports it to detect spconv 2); ``ConvAlgo`` is the
compat enum, every other name (pair generation and GEMMs on spconv's own pair tensors) raises
``NotImplementedError``."""
from ._unsupported import attribute_error
from .core import ConvAlgo

__getattr__ = attribute_error(__name__, "spconv.pytorch.ops", known={"ConvAlgo": ConvAlgo})
