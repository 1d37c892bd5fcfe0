"""The shape of the MinkUNet (SparseResUNet42 of TorchSparse/SPVNAS) that the torch and Flax adapters
build: default widths and the checked ``(widths, blocks)`` of a model, framework-free."""
from __future__ import annotations


# stem, four encoder stages, four decoder stages
DEFAULT_WIDTHS = (32, 32, 64, 128, 256, 256, 128, 96, 96)


def unet_shape(widths=DEFAULT_WIDTHS, blocks=2) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(9 widths, 8 block counts)`` as ints; ``blocks`` is one int for all eight stages or 8 of them
    (encoder 1-4, decoder 1-4). Raises ``ValueError`` naming the argument otherwise."""
    from .geometry import _is_int
    w = tuple(widths) if hasattr(widths, "__len__") and not isinstance(widths, str) else ()
    if len(w) != 9 or not all(_is_int(c) and c >= 1 for c in w):
        raise ValueError(f"widths must be 9 positive channel counts (stem, 4 encoder, 4 decoder stages), "
                         f"got {widths!r}")
    b = (blocks,) * 8 if _is_int(blocks) else tuple(blocks) if hasattr(blocks, "__len__") else ()
    if len(b) != 8 or not all(_is_int(n) and n >= 1 for n in b):
        raise ValueError(f"blocks must be an int >= 1 or 8 of them (encoder 1-4, decoder 1-4), got {blocks!r}")
    return tuple(int(c) for c in w), tuple(int(n) for n in b)
