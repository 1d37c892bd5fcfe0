"""``spconv.pytorch.utils``: spconv's point-cloud voxeliser ``PointToVoxel`` and
``gather_features_by_pc_voxel_id``, in torch (CPU and CUDA tensors alike, no spconv or cumm)."""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["PointToVoxel", "gather_features_by_pc_voxel_id"]


class PointToVoxel:
    """spconv's ``PointToVoxel``: points ``[N, F]`` (x, y, z first) → voxels of at most
    ``max_num_points_per_voxel`` points each.

    Args:
        vsize_xyz: voxel size per axis (x, y, z; 1 to 4 axes as in spconv), > 0.
        coors_range_xyz: ``[min_x, min_y, min_z, max_x, max_y, max_z]`` (2 × ndim values, max > min); the grid
            has ``round((max - min) / vsize)`` cells per axis.
        num_point_features: F, the points' columns (>= ndim).
        max_num_voxels, max_num_points_per_voxel: >= 1; later voxels / points are dropped.
        device: where the outputs go (the points must be there).

    ``__call__(pc, clear_voxels=True, empty_mean=False)`` returns ``(voxels [M, P, F] float32, indices [M, ndim]
    int32 in z, y, x order, num_per_voxel [M] int32)``; ``generate_voxel_with_id`` adds ``pc_voxel_id [N]``
    int64 (the voxel of every point, -1 for a point outside the range or in a voxel past ``max_num_voxels``).
    As spconv's CPU voxeliser: a point's cell is ``floor((p - min) / vsize)`` in the points' dtype, voxels are
    numbered in the order of their first point, a voxel keeps its first ``P`` points in point order, and
    ``empty_mean`` fills a voxel's empty slots with the mean of its points. Differences: spconv's CUDA
    voxeliser numbers voxels in another order (the same voxels); with ``clear_voxels=False`` spconv leaves
    the previous call's values in empty slots, here they are zeros; spconv's CPU ``empty_mean`` carries
    sums from one voxel into the next (it clears its mean buffer by resizing it to zero and then indexes
    it), here each voxel's mean is its own.
    """

    def __init__(self, vsize_xyz, coors_range_xyz, num_point_features: int, max_num_voxels: int,
                 max_num_points_per_voxel: int, device: torch.device = torch.device("cpu:0")):
        vsize = [float(v) for v in vsize_xyz]
        rng = [float(v) for v in coors_range_xyz]
        ndim = len(vsize)
        if not 1 <= ndim <= 4:
            raise ValueError(f"vsize_xyz must have 1 to 4 values, got {len(vsize)}")
        if len(rng) != 2 * ndim:
            raise ValueError(f"coors_range_xyz must have 2 * {ndim} values (mins, then maxes), got {len(rng)}")
        if any(not v > 0 for v in vsize):
            raise ValueError(f"vsize_xyz must be > 0, got {vsize}")
        if any(not rng[ndim + i] > rng[i] for i in range(ndim)):
            raise ValueError(f"coors_range_xyz's maxes must exceed its mins, got {rng}")
        for name, v, lo in (("num_point_features", num_point_features, ndim), ("max_num_voxels", max_num_voxels, 1),
                            ("max_num_points_per_voxel", max_num_points_per_voxel, 1)):
            if int(v) != v or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v}")
        self.ndim, self.device = ndim, torch.device(device)
        self.num_point_features, self.max_num_voxels = int(num_point_features), int(max_num_voxels)
        self.max_num_points_per_voxel = int(max_num_points_per_voxel)
        # spconv's metadata: per axis in z, y, x order (the indices' order)
        self.vsize = vsize[::-1]
        self.coors_range = rng[:ndim][::-1] + rng[ndim:][::-1]
        # as spconv's calc_meta_data: float32 arithmetic, std::round (halves away from zero; Python's round
        # takes them to even, and float64 differs: a 1.25 m range of 0.5 m voxels is 3 cells there, not 2)
        self.grid_size = [_round_half_away(np.float32(np.float32(self.coors_range[ndim + i])
                                                      - np.float32(self.coors_range[i])) / np.float32(self.vsize[i]))
                          for i in range(ndim)]
        self.grid_stride = [math.prod(self.grid_size[i + 1:]) for i in range(ndim)]

    def __call__(self, pc: torch.Tensor, clear_voxels: bool = True, empty_mean: bool = False):
        return self.generate_voxel_with_id(pc, clear_voxels, empty_mean)[:3]

    def generate_voxel_with_id(self, pc: torch.Tensor, clear_voxels: bool = True, empty_mean: bool = False):
        """``(voxels, indices, num_per_voxel, pc_voxel_id)``: see the class."""
        if not isinstance(pc, torch.Tensor) or pc.ndim != 2 or pc.shape[1] != self.num_point_features:
            raise ValueError(f"pc must be a [N, num_point_features={self.num_point_features}] tensor, got "
                             f"{tuple(pc.shape) if isinstance(pc, torch.Tensor) else type(pc).__name__}")
        if pc.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"pc must be float32 or float64 (as spconv's voxeliser), got {pc.dtype}")
        if pc.device.type != self.device.type:
            raise ValueError(f"pc is on {pc.device}, the voxeliser was made for {self.device}")
        with torch.no_grad():
            return self._voxelise(pc, bool(empty_mean))

    def _voxelise(self, pc, empty_mean):
        n, nd, dev = pc.shape[0], self.ndim, pc.device
        p_max, m_max, f = self.max_num_points_per_voxel, self.max_num_voxels, self.num_point_features
        lo = torch.tensor(self.coors_range[:nd], dtype=torch.float32, device=dev).to(pc.dtype)
        size = torch.tensor(self.vsize, dtype=torch.float32, device=dev).to(pc.dtype)
        xyz = pc[:, :nd].flip(1)  # z, y, x
        cell = torch.floor((xyz - lo) / size)
        grid = torch.tensor(self.grid_size, dtype=cell.dtype, device=dev)
        inside = ((cell >= 0) & (cell < grid)).all(1)
        cell = cell.long()
        key = (cell * torch.tensor(self.grid_stride, dtype=torch.long, device=dev)).sum(1)
        pts = torch.nonzero(inside).view(-1)  # in point order
        uniq, inv = torch.unique(key[pts], return_inverse=True)
        # voxels numbered by their first point
        first = torch.full((len(uniq),), n, dtype=torch.long, device=dev).scatter_reduce_(0, inv, pts, "amin")
        rank = torch.empty_like(first)
        rank[torch.argsort(first)] = torch.arange(len(first), device=dev)
        vid = rank[inv]
        keep_voxel = vid < m_max
        pc_voxel_id = torch.full((n,), -1, dtype=torch.int64, device=dev)
        pc_voxel_id[pts[keep_voxel]] = vid[keep_voxel]
        pts, vid = pts[keep_voxel], vid[keep_voxel]
        m = min(len(uniq), m_max)
        # a point's slot: how many earlier points its voxel holds (a stable sort by voxel keeps point order)
        order = torch.sort(vid, stable=True).indices
        counts = torch.bincount(vid, minlength=m)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(vid)
        slot[order] = torch.arange(len(vid), device=dev) - starts[vid[order]]
        stored = slot < p_max
        voxels = torch.zeros((m, p_max, f), dtype=torch.float32, device=dev)
        voxels[vid[stored], slot[stored]] = pc[pts[stored]].to(torch.float32)
        num = counts.clamp(max=p_max).to(torch.int32)
        indices = torch.zeros((m, nd), dtype=torch.int32, device=dev)
        firsts = first[torch.argsort(first)][:m]
        indices[:] = cell[firsts].to(torch.int32)
        if empty_mean and m:
            mean = voxels.sum(1) / num.clamp(min=1).unsqueeze(1).to(voxels.dtype)
            empty = torch.arange(p_max, device=dev).unsqueeze(0) >= num.unsqueeze(1)  # [m, P]
            voxels = torch.where(empty.unsqueeze(2) & (num > 0).view(-1, 1, 1), mean.unsqueeze(1), voxels)
        return voxels, indices, num, pc_voxel_id


def _round_half_away(q) -> int:
    """std::round of a float32 value (its exact value in float64: adding 0.5 there does not round)."""
    q = float(q)
    return int(math.copysign(math.floor(abs(q) + 0.5), q))


def gather_features_by_pc_voxel_id(seg_res_features: torch.Tensor, pc_voxel_id: torch.Tensor, invalid_value=0):
    """Per point, its voxel's row of ``seg_res_features [M, ...]`` (``invalid_value`` where ``pc_voxel_id`` is -1):
    ``[N, ...]``, as spconv's."""
    if seg_res_features.device != pc_voxel_id.device:
        pc_voxel_id = pc_voxel_id.to(seg_res_features.device)
    res = torch.full((pc_voxel_id.shape[0], *seg_res_features.shape[1:]), invalid_value, dtype=seg_res_features.dtype,
                     device=seg_res_features.device)
    valid = torch.nonzero(pc_voxel_id != -1).view(-1)
    res[valid] = seg_res_features[pc_voxel_id[valid]]
    return res
