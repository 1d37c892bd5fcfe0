"""``spconv.pytorch.utils``: importable; ``PointToVoxel`` and the other voxelisers raise
``NotImplementedError`` when used (``sparsevox.Voxels.from_points`` voxelises)."""
from ._unsupported import attribute_error

__getattr__ = attribute_error(__name__, "spconv.pytorch.utils", "sparsevox.Voxels.from_points voxelises")
