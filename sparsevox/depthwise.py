"""Depthwise sparse convolution: ``out[o, c] = sum_k sum_{(i, o) in pairs_k} feats[i, c] * weight[k, c]``."""
from __future__ import annotations

from ._arrays import from_core, library_of, to_core, to_host
from .conv import planned_backward, planned_forward
from .kernel_map import KernelMap, recall


def _as_kmap(kernel_map, num_in: int, num_out: int) -> KernelMap:
    if isinstance(kernel_map, KernelMap):
        if kernel_map.num_out != num_out:
            raise ValueError(f"num_out_coords ({num_out}) differs from the kernel map's {kernel_map.num_out}")
        return kernel_map
    try:
        in_maps, out_maps, offsets = kernel_map
    except (TypeError, ValueError):
        raise ValueError("kernel_map must be a KernelMap or a tuple (in_maps, out_maps, offsets)") from None
    return recall(to_core(in_maps)[0], to_core(out_maps)[0], to_host(to_core(offsets)[0]), num_in, num_out)


def depthwise_forward(feats, weight, kmap: KernelMap, fwd_algo=None):
    """Core forward on NumPy/CuPy arrays: feats ``[N_in, C]``, weight ``[K, C]`` → ``[N_out, C]``."""
    return planned_forward("depthwise", feats, weight, kmap, fwd_algo)


def depthwise_backward(grad_out, feats, weight, kmap: KernelMap, bwd_algo=None, feats_grad=True, weight_grad=True,
                       gw_dtype=None):
    """Core gradients ``(grad_feats [N_in, C] or None, grad_weight [K, C] or None)``; ``gw_dtype`` as in
    :func:`sparsevox.conv_backward`."""
    return planned_backward("depthwise", feats.shape[1], grad_out, feats, weight, kmap, bwd_algo, feats_grad,
                            weight_grad, gw_dtype)


def spatially_sparse_depthwise_conv(input_features, depthwise_weight, kernel_map, num_out_coords,
                                    fwd_algo=None, bwd_algo=None):
    """Depthwise sparse convolution (the reference guide's signature).

    Args:
        input_features: ``[N_in, C]`` float array (NumPy, CuPy, PyTorch or JAX).
        depthwise_weight: ``[K, C]``, same dtype.
        kernel_map: a :class:`KernelMap` (from :func:`sparsevox.kernel_map`) or ``(in_maps, out_maps, offsets)``.
        num_out_coords: number of output rows.
        fwd_algo, bwd_algo: ``EXPLICIT``, ``IMPLICIT``, ``AUTO``, names, lists, or None (environment).

    Returns ``[num_out_coords, C]`` in the caller's library; PyTorch/JAX inputs are differentiable.
    """
    lib = library_of(input_features)
    if lib in ("torch", "jax"):
        import importlib
        adapter = importlib.import_module(f"sparsevox.adapters.{lib}")
        return adapter.spatially_sparse_depthwise_conv(input_features, depthwise_weight, kernel_map,
                                                       num_out_coords, fwd_algo, bwd_algo)
    feats, origin = to_core(input_features)
    w, _ = to_core(depthwise_weight)
    kmap = _as_kmap(kernel_map, feats.shape[0], int(num_out_coords))
    return from_core(depthwise_forward(feats, w, kmap, fwd_algo), origin)
