"""The peers run in the same process on the same geometry: spconv 2.3.8 and, when asked, spconv-triton.

Both share spconv's API (``spconv.pytorch`` / ``spconv_triton.pytorch``). What each op times:

- ``map_build``: ``ops.get_indice_pairs_implicit_gemm`` for SubM k3 in inference (``is_train=False``);
  the training variant (it also builds the backward pairs) is recorded as ``<peer>_train``.
- ``subm_fwd``: ``SubMConv3d(C, C, 3, indice_key=...)`` in eval mode under ``no_grad`` on a tensor whose
  ``indice_dict`` already holds the pairs (map cached).
- ``subm_fwd_bwd``: the same in train mode, then ``torch.autograd.grad`` of features and weight.
- ``down``: ``SparseConv3d(C, C, 2, 2)``. spconv's module rebuilds the pairs of a strided layer on every
  call, so the map-cached figure calls ``ops.implicit_gemm`` with the pairs the module saved under its
  ``indice_key`` (the module's own inference call); the module call, map included, is ``<peer>_with_map``.
- ``up``: ``SparseInverseConv3d(C, C, 2, indice_key=<the down layer's>)`` in eval mode: it reuses the down
  layer's pairs; its output sites are the finer voxels.

spconv wants non-negative coordinates: they are shifted by the minimum rounded down to an even number
(so that ``floor(c / 2)`` of a stride-2 layer picks the same parents as sparsevox's) and the spatial shape
is rounded up to even. Weights are copied from sparsevox's ``[K, C_in, C_out]`` into spconv's
``[C_out, kx, ky, kz, C_in]``, so SubM outputs can be compared (``check_subm``).
"""
from __future__ import annotations

import importlib
import logging

import numpy as np

log = logging.getLogger("sparsevox.benchmarks")

MODULES = {"spconv": "spconv.pytorch", "spconv_triton": "spconv_triton.pytorch"}


def import_peer(name: str):
    """``(the peer's pytorch module, "")``, or ``(None, why it cannot be imported)``."""
    if name not in MODULES:
        raise ValueError(f"peer must be one of {sorted(MODULES)}, got {name!r}")
    try:
        return importlib.import_module(MODULES[name]), ""
    except Exception as e:  # ImportError, or a CUDA library that fails to load: the peer is skipped
        return None, f"{type(e).__name__}: {e}"


def peer_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    for dist in {"spconv": ("spconv-cu126", "spconv-cu124", "spconv-cu121", "spconv-cu120", "spconv"),
                 "spconv_triton": ("spconv-triton",)}[name]:
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return None


def _kernel_torch(w, k: int):
    """sparsevox ``[k^3, C_in, C_out]`` → spconv ``[C_out, k, k, k, C_in]`` (contiguous)."""
    c_in, c_out = w.shape[1], w.shape[2]
    return w.detach().reshape(k, k, k, c_in, c_out).permute(4, 0, 1, 2, 3).contiguous()


class PeerGeometry:
    """One scene's coordinates as a peer sees them (built once per scene and peer)."""

    def __init__(self, sp, coords: np.ndarray):
        import torch
        self.sp = sp
        c = coords.astype(np.int64)
        shift = np.zeros(4, np.int64)
        shift[1:] = np.floor_divide(c[:, 1:].min(axis=0), 2) * 2
        c = c - shift
        extent = c[:, 1:].max(axis=0) + 1
        self.spatial_shape = [int(v + (v % 2)) for v in extent]
        self.indices = torch.from_numpy(c.astype(np.int32)).cuda().contiguous()
        self.n = int(coords.shape[0])
        self._algo = sp.SubMConv3d(1, 1, 3, bias=False, indice_key="probe").algo

    def tensor(self, feats, indice_dict=None):
        return self.sp.SparseConvTensor(feats, self.indices, self.spatial_shape, 1, indice_dict=indice_dict)

    def map_build(self, is_train: bool = False):
        """Callable that builds the SubM k3 pairs once (what a fresh tensor pays before its first layer)."""
        ops = importlib.import_module(self.sp.__name__ + ".ops")

        def fn():
            return ops.get_indice_pairs_implicit_gemm(
                self.indices, 1, self.spatial_shape, self._algo, ksize=[3, 3, 3], stride=[1, 1, 1],
                padding=[1, 1, 1], dilation=[1, 1, 1], out_padding=[0, 0, 0], subm=True, transpose=False,
                is_train=is_train)
        return fn


class PeerLayers:
    """The peer's layers at one (C, dtype), with pairs built once; each method returns a callable.

    Args:
        geo: :class:`PeerGeometry` of the scene.
        feats: torch CUDA ``[N, C]`` (the same features sparsevox gets).
        weights: dict ``{"subm": [27, C, C], "down": [8, C, C], "up": [8, C, C]}`` sparsevox-layout tensors.
    """

    def __init__(self, geo: PeerGeometry, feats, weights: dict):
        import torch
        sp = geo.sp
        self.geo, self.sp, self.torch = geo, sp, torch
        c = feats.shape[1]
        dt = feats.dtype
        self.feats = feats
        self.subm = sp.SubMConv3d(c, c, 3, bias=False, indice_key="bench_subm").cuda().to(dt)
        self.down = sp.SparseConv3d(c, c, 2, 2, bias=False, indice_key="bench_down").cuda().to(dt)
        self.up = sp.SparseInverseConv3d(c, c, 2, indice_key="bench_down", bias=False).cuda().to(dt)
        with torch.no_grad():
            self.subm.weight.copy_(_kernel_torch(weights["subm"], 3))
            self.down.weight.copy_(_kernel_torch(weights["down"], 2))
            self.up.weight.copy_(_kernel_torch(weights["up"], 2))
        # Pairs built once, in train mode (they then also hold the backward pairs).
        self.subm.train()
        x0 = geo.tensor(feats)
        self.subm_dict = self.subm(x0).indice_dict
        self.down.train()
        self.coarse = self.down(x0)  # holds indice_dict["bench_down"] and the coarse indices
        self.down_data = self.coarse.indice_dict["bench_down"]
        self.coarse_feats = torch.randn(self.coarse.features.shape, device="cuda", dtype=dt) * 0.1
        self.coarse_in = self.coarse.replace_feature(self.coarse_feats)
        self.grad_out = torch.randn_like(feats) * 0.1

    def subm_fwd(self):
        x = self.geo.tensor(self.feats, dict(self.subm_dict))
        torch, conv = self.torch, self.subm

        def fn():
            conv.eval()
            with torch.no_grad():
                return conv(x).features
        return fn

    def subm_fresh(self):
        """``fn``: a fresh scan's first SubM layer: a tensor without pairs, so the module builds them
        (inference) and runs the layer."""
        torch, conv, geo, feats = self.torch, self.subm, self.geo, self.feats

        def fn():
            conv.eval()
            with torch.no_grad():
                return conv(geo.tensor(feats)).features
        return fn

    def subm_fwd_bwd(self):
        torch, conv = self.torch, self.subm
        f = self.feats.detach().clone().requires_grad_(True)
        x = self.geo.tensor(f, dict(self.subm_dict))
        g = self.grad_out

        def fn():
            conv.train()
            out = conv(x).features
            return torch.autograd.grad(out, (f, conv.weight), g)
        return fn

    def down_cached(self):
        ops = importlib.import_module(self.sp.__name__ + ".ops")
        d, w, torch, f = self.down_data, self.down.weight, self.torch, self.feats
        n_out = int(d.out_indices.shape[0])

        def fn():
            with torch.no_grad():
                out, _, _ = ops.implicit_gemm(f, w, d.pair_fwd, d.pair_mask_fwd_splits, d.mask_argsort_fwd_splits,
                                              n_out, d.masks, False, False, output_dtype=w.dtype)
                return out
        return fn

    def down_with_map(self):
        torch, conv = self.torch, self.down
        x = self.geo.tensor(self.feats)

        def fn():
            conv.eval()
            with torch.no_grad():
                return conv(x).features
        return fn

    def up_fwd(self):
        torch, conv, x = self.torch, self.up, self.coarse_in

        def fn():
            conv.eval()
            with torch.no_grad():
                return conv(x).features
        return fn

    @property
    def n_coarse(self) -> int:
        return int(self.coarse.indices.shape[0])


def relative_error(a, b) -> float:
    """``||a - b|| / ||b||`` of two torch tensors, in float64."""
    a, b = a.double(), b.double()
    den = float(b.norm())
    return float((a - b).norm()) / den if den > 0 else float((a - b).norm())
