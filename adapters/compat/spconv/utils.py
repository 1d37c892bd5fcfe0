"""``spconv.pytorch.utils``: importable; ``PointToVoxel`` and ``gather_features_by_pc_voxel_id`` raise
``NotImplementedError`` when used (``sparsevox.Voxels.from_points`` voxelises)."""
from ._unsupported import attribute_error

__all__: list = []
__getattr__ = attribute_error(__name__, "spconv.pytorch.utils", ("PointToVoxel", "gather_features_by_pc_voxel_id"),
                              "sparsevox.Voxels.from_points voxelises")
