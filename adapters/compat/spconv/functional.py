"""``spconv.pytorch.functional``: importable; its autograd functions on spconv's pair tensors raise
``NotImplementedError`` when used (the layers run sparsevox's own)."""
from ._unsupported import attribute_error

__getattr__ = attribute_error(__name__, "spconv.pytorch.functional")
