"""Scenes and the table of network ops that the torch and JAX adapter tests share (framework-neutral:
each op is called through ``sparsevox``'s public functions, which route torch and JAX ``Voxels`` to
their adapter)."""
import numpy as np
from reference import random_voxels

import sparsevox as sv

VS = 0.5  # voxel size of the devoxelisation cases


class Scene:
    """Random fine voxels with x, y, z in ``[0, extent)`` (so ``to_dense`` fits), their stride-2 parents,
    and points (with batch indices) inside the grid for ``devoxelize``."""

    def __init__(self, rng, n=60, extent=5, batches=2, c=3, points=40):
        self.coords = random_voxels(rng, n, extent=extent, batches=batches)
        self.coords[:, 1:] += extent // 2
        self.coarse = np.unique(np.concatenate([self.coords[:, :1], self.coords[:, 1:] // 2], 1), axis=0)
        self.coarse = self.coarse.astype(np.int32)
        self.points = rng.uniform(0, extent * VS, (points, 3))
        self.pbatch = rng.integers(0, batches, points)
        self.shape = (extent,) * 3
        self.batches, self.c = batches, c

    def level(self, level: str) -> np.ndarray:
        return self.coords if level == "fine" else self.coarse

    def feats(self, level: str, distinct: bool = True):
        """float64 feats of a level; ``distinct``: a permutation of multiples of 0.125 (no ties, exact
        in float16, so max pooling has one winner far from any finite-difference step)."""
        n = len(self.level(level))
        if not distinct:
            return np.random.default_rng(n).standard_normal((n, self.c))
        return (np.random.default_rng(n).permutation(n * self.c).reshape(n, self.c) - n * self.c / 2) * 0.125

    def dense(self):
        """float64 ``[B, C, X, Y, Z]`` with the fine level's distinct feats at its sites, zeros elsewhere."""
        d = np.zeros((self.batches, self.c) + self.shape)
        b, x, y, z = self.coords.T
        d[b, :, x, y, z] = self.feats("fine")
        return d


POOLS = [(2, None), (3, 2), (3, 1), ((2, 1, 3), (2, 1, 1)), (1, 2)]  # (1, 2): outputs with empty windows

# name -> (input level, fn(scene, voxels, as_lib) -> the op's array output); as_lib converts NumPy
# geometry (coords, points, batch) into the voxels' library
OPS = {}
POOL_ARGS = {}  # name of a pooling op -> (kernel_size, stride)
for _ks, _st in POOLS:
    POOL_ARGS[f"max_pool{_ks},{_st}"] = POOL_ARGS[f"avg_pool{_ks},{_st}"] = (_ks, _st)
    OPS[f"max_pool{_ks},{_st}"] = ("fine", lambda s, v, L, ks=_ks, st=_st: sv.max_pool(v, ks, st).feats)
    OPS[f"avg_pool{_ks},{_st}"] = ("fine", lambda s, v, L, ks=_ks, st=_st: sv.avg_pool(v, ks, st).feats)
for _mode in ("avg", "max", "sum"):
    OPS[f"global_pool_{_mode}"] = ("fine", lambda s, v, L, m=_mode: sv.global_pool(v, m))
OPS["unpool"] = ("coarse", lambda s, v, L: sv.unpool(v, sv.Voxels(L(s.coords), None), 2).feats)
OPS["devoxelize"] = ("fine", lambda s, v, L: sv.devoxelize(v, L(s.points), VS, L(s.pbatch)))
OPS["to_dense"] = ("fine", lambda s, v, L: sv.to_dense(v, s.shape))
OPS["to_dense_batch_size"] = ("fine", lambda s, v, L: sv.to_dense(v, s.shape, s.batches + 1))


def run_numpy(s, name, feats):
    """Op ``name`` by the core on NumPy arrays."""
    level, fn = OPS[name]
    return fn(s, sv.Voxels(s.level(level), feats), np.asarray)
