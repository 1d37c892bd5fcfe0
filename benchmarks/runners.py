"""sparsevox's side of each benchmarked layer, through the torch adapter or the core.

Two ways to call sparsevox, chosen by ``api``:

- ``"torch"``: :mod:`sparsevox.adapters.torch` with torch ``Voxels`` (what a PyTorch network calls;
  differentiable, the backward through ``torch.autograd.grad``).
- ``"core"``: :func:`sparsevox.conv_forward` / :func:`sparsevox.conv_backward` on CuPy (GPU) or NumPy
  (CPU dry runs) arrays, with the kernel maps passed explicitly.

Every op method returns ``(fn, pairs)``: ``fn()`` runs the layer once and returns its output features
(torch tensor or core array), ``pairs`` is the kernel map's pair count. Kernel maps are built before
timing (map cached), except by ``map_build`` which times exactly that on a fresh ``Voxels``.
"""
from __future__ import annotations

import numpy as np

OPS = ("map_build", "subm_fwd", "subm_fwd_bwd", "down", "up")


def conv_algorithms() -> list[str]:
    """Every sparse-conv algorithm name of the public contract (without ``auto``), registered or not."""
    from sparsevox import SPARSE_CONV_FWD_ALGO_MODE
    return [m.value for m in SPARSE_CONV_FWD_ALGO_MODE if m.value != "auto"]


def torch_adapter_ready() -> tuple[bool, str]:
    try:
        from sparsevox.adapters import torch as svt
        svt.spatially_sparse_conv  # noqa: B018
    except Exception as e:  # not written yet, or torch missing
        return False, f"{type(e).__name__}: {e}"
    return True, ""


class Geometry:
    """A scene's coordinates on the benchmark device, in the array type ``api`` needs."""

    def __init__(self, coords: np.ndarray, device: str, api: str):
        if api not in ("torch", "core"):
            raise ValueError(f"api must be 'torch' or 'core', got {api!r}")
        self.device, self.api, self.n = device, api, int(coords.shape[0])
        self.coords_host = coords
        if api == "torch":
            import torch
            self.coords = torch.from_numpy(coords).to("cuda" if device == "gpu" else "cpu")
        elif device == "gpu":
            import cupy
            self.coords = cupy.asarray(coords)
        else:
            self.coords = coords

    def map_build(self, ready: bool = False):
        """``fn`` building the SubM k3 map of a fresh ``Voxels``, and its pairs. A GPU map is returned once
        its kernels are queued; ``ready`` also waits for its pairs (``KernelMap.wait``: the pair count
        read back and the exact-size copy), as spconv's map build returns finished pairs."""
        from sparsevox import Voxels, kernel_map
        coords = self.coords

        def fn():
            kmap = kernel_map(Voxels(coords, None, check=False), 3)
            return kmap.wait() if ready else kmap
        return fn, fn().num_pairs


class Layers:
    """sparsevox layers of one scene at one (C, dtype); maps built at construction.

    Args:
        geo: :class:`Geometry`.
        c: channels (C_in = C_out).
        dtype: ``"float16"``, ``"bfloat16"``, ``"float32"`` or ``"float64"``.
        seed: of the random features and weights.

    Attributes ``feats``, ``weights`` (``{"subm", "down", "up"}`` ``[K, C, C]``) and ``coarse_feats`` are
    torch tensors on the device when ``api == "torch"`` or the device is the GPU (the peers use them too),
    else NumPy.
    """

    def __init__(self, geo: Geometry, c: int, dtype: str, seed: int = 0):
        import sparsevox as sv
        self.geo, self.c, self.dtype = geo, c, dtype
        rng = np.random.default_rng(seed)
        n = geo.n
        host = {
            "feats": rng.standard_normal((n, c), dtype=np.float32) * 0.5,
            "subm": rng.standard_normal((27, c, c), dtype=np.float32) / np.sqrt(27 * c),
            "down": rng.standard_normal((8, c, c), dtype=np.float32) / np.sqrt(8 * c),
            "up": rng.standard_normal((8, c, c), dtype=np.float32) / np.sqrt(8 * c),
        }
        self.torch_side = geo.api == "torch" or geo.device == "gpu"
        if self.torch_side:
            import torch
            dev = "cuda" if geo.device == "gpu" else "cpu"
            t = {k: torch.from_numpy(v).to(dev).to(getattr(torch, dtype)) for k, v in host.items()}
        else:
            t = {k: v.astype(dtype) for k, v in host.items()}
        self.feats = t["feats"]
        self.weights = {k: t[k] for k in ("subm", "down", "up")}
        # Core arrays (zero-copy views of the torch tensors on the GPU).
        from sparsevox._arrays import to_core
        if geo.api == "core":
            self._core = {k: to_core(v)[0] for k, v in t.items()}
        vox = sv.Voxels(geo.coords, self.feats if geo.api == "torch" else self._core["feats"])
        self.vox = vox
        self.kmap_subm = sv.kernel_map(vox, 3)
        self.kmap_down = sv.kernel_map(vox, 2, 2)
        self.coarse_coords = self.kmap_down.out_coords  # core array
        m = self.kmap_down.num_out
        cf = np.random.default_rng(seed + 1).standard_normal((m, c), dtype=np.float32) * 0.5
        if self.torch_side:
            import torch
            self.coarse_feats = torch.from_numpy(cf).to(self.feats.device).to(self.feats.dtype)
        else:
            self.coarse_feats = cf.astype(dtype)
        if geo.api == "torch":
            from sparsevox.adapters import torch as svt
            self.svt = svt
            # The coarse Voxels as the down layer returns them (the up layer's input).
            with torch.no_grad():
                down = svt.spatially_sparse_conv(vox, self.weights["down"], 2, 2)
            self.coarse = down.replace(self.coarse_feats)
        else:
            from sparsevox.voxels import Voxels
            self.coarse = Voxels.from_core_coords(self.coarse_coords, None, vox.origin)
            self._core["coarse"] = to_core(self.coarse_feats)[0]
        self.kmap_up = sv.kernel_map(self.coarse, 2, 2, transposed=True, output_voxels=vox)

    @property
    def n_coarse(self) -> int:
        return self.kmap_down.num_out

    # --- ops ---------------------------------------------------------------------------------------
    def subm_fwd(self, algo):
        if self.geo.api == "torch":
            import torch
            svt, vox, w = self.svt, self.vox, self.weights["subm"]

            def fn():
                with torch.no_grad():
                    return svt.spatially_sparse_conv(vox, w, 3, fwd_algo=algo, bwd_algo=algo).feats
        else:
            import sparsevox as sv
            f, w, km = self._core["feats"], self._core["subm"], self.kmap_subm

            def fn():
                return sv.conv_forward(f, w, km, algo)
        return fn, self.kmap_subm.num_pairs

    def subm_fresh(self, algo):
        """``fn``: a fresh scan's first SubM k3 forward (torch, no grad): new unvalidated ``Voxels`` of
        the same coordinates and features, so the map is built (and first used) inside the call."""
        import torch

        import sparsevox as sv
        svt, coords, feats, w = self.svt, self.geo.coords, self.feats, self.weights["subm"]

        def fn():
            with torch.no_grad():
                return svt.spatially_sparse_conv(sv.Voxels(coords, feats, check=False), w, 3,
                                                 fwd_algo=algo, bwd_algo=algo).feats
        return fn

    def subm_fwd_bwd(self, algo):
        if self.geo.api == "torch":
            import torch
            svt = self.svt
            f = self.feats.detach().clone().requires_grad_(True)
            w = self.weights["subm"].detach().clone().requires_grad_(True)
            vox = self.vox.replace(f)
            g = torch.randn_like(self.feats) * 0.1

            def fn():
                out = svt.spatially_sparse_conv(vox, w, 3, fwd_algo=algo, bwd_algo=algo).feats
                return torch.autograd.grad(out, (f, w), g)
        else:
            import sparsevox as sv
            f, w, km = self._core["feats"], self._core["subm"], self.kmap_subm
            g = f * 0.1  # any [N, C] of the dtype: the map is SubM, C_in = C_out

            def fn():
                sv.conv_forward(f, w, km, algo)
                return sv.conv_backward(g, f, w, km, algo)
        return fn, self.kmap_subm.num_pairs

    def down(self, algo):
        if self.geo.api == "torch":
            import torch
            svt, vox, w = self.svt, self.vox, self.weights["down"]

            def fn():
                with torch.no_grad():
                    return svt.spatially_sparse_conv(vox, w, 2, 2, fwd_algo=algo, bwd_algo=algo).feats
        else:
            import sparsevox as sv
            f, w, km = self._core["feats"], self._core["down"], self.kmap_down

            def fn():
                return sv.conv_forward(f, w, km, algo)
        return fn, self.kmap_down.num_pairs

    def up(self, algo):
        if self.geo.api == "torch":
            import torch
            svt, coarse, fine, w = self.svt, self.coarse, self.vox, self.weights["up"]

            def fn():
                with torch.no_grad():
                    return svt.spatially_sparse_conv(coarse, w, 2, 2, transposed=True, output_voxels=fine,
                                                     fwd_algo=algo, bwd_algo=algo).feats
        else:
            import sparsevox as sv
            f, w, km = self._core["coarse"], self._core["up"], self.kmap_up

            def fn():
                return sv.conv_forward(f, w, km, algo)
        return fn, self.kmap_up.num_pairs

    def op(self, name: str, algo):
        """``(fn, pairs)`` of op ``name`` in :data:`OPS` (except ``map_build``, a :class:`Geometry` op)."""
        if name not in ("subm_fwd", "subm_fwd_bwd", "down", "up"):
            raise ValueError(f"op must be one of subm_fwd, subm_fwd_bwd, down, up; got {name!r}")
        return getattr(self, name)(algo)


def as_torch(x):
    """A layer output (torch tensor, CuPy or NumPy array, or a tuple of them: first item) as a torch tensor."""
    import torch
    if isinstance(x, tuple):
        x = x[0]
    if isinstance(x, torch.Tensor):
        return x
    if type(x).__module__.split(".")[0] == "cupy":
        return torch.from_dlpack(x)
    return torch.from_numpy(np.asarray(x))
