"""Weights between the Flax modules here and their torch twins (``sparsevox.adapters.torch``), by torch's
``state_dict`` names. Imports no torch: tensors are read through ``.detach().cpu().numpy()``.

The Flax modules mirror the torch ones attribute for attribute (``stem.0.0``, ``encoder.1.blocks.0.main.3``,
``decoder.2.up``, ``classifier``), so a torch name is a path in the Flax module; only the leaves are
named and laid out differently:

=========================  =====================  ===============================
torch                      flax                   layout
=========================  =====================  ===============================
conv ``weight``/``bias``   ``weight``/``bias``    the same (``[K, C_in, C_out]``)
norm ``weight``/``bias``   ``scale``/``bias``     the same
``running_mean``/``_var``  ``mean``/``var``       the same (``num_batches_tracked`` has no twin)
Linear ``weight``          ``kernel``             transposed (``[out, in]`` → ``[in, out]``)
=========================  =====================  ===============================
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from .conv import SparseConv, SparseDepthwiseConv
from .layers import InstanceNorm

__all__ = ["load_torch_state_dict", "torch_state_dict"]

_NORM = (("weight", "scale"), ("bias", "bias"))
_STATS = (("running_mean", "mean"), ("running_var", "var"))


def _children(module):
    if isinstance(module, (nnx.Sequential, nnx.List)):
        items = enumerate(module.layers if isinstance(module, nnx.Sequential) else module)
        return [(str(i), m) for i, m in items if isinstance(m, nnx.Module)]
    return [(k, v) for k, v in vars(module).items() if not k.startswith("_") and isinstance(v, nnx.Module)]


def _leaves(module):
    """``[(torch leaf name, nnx Variable, transposed?)]`` of a module that holds variables itself."""
    if isinstance(module, (SparseConv, SparseDepthwiseConv)):
        pairs = (("weight", "weight"), ("bias", "bias"))
    elif isinstance(module, nnx.BatchNorm):
        pairs = _NORM + _STATS
    elif isinstance(module, InstanceNorm):
        pairs = _NORM
    elif isinstance(module, nnx.Linear):
        return [(t, getattr(module, f), t == "weight") for t, f in (("weight", "kernel"), ("bias", "bias"))
                if getattr(module, f) is not None]
    else:
        own = [k for k, v in vars(module).items() if isinstance(v, nnx.Variable)]
        if own:
            raise ValueError(f"no torch names are known for the variables {own} of {type(module).__name__}")
        return None
    return [(t, getattr(module, f), False) for t, f in pairs if getattr(module, f) is not None]


def _entries(module, prefix=""):
    """``{torch name: (Variable, transposed?)}`` for every parameter and batch statistic of ``module``."""
    leaves = _leaves(module)
    if leaves is not None:
        return {prefix + t: (var, tr) for t, var, tr in leaves}
    out = {}
    for name, child in _children(module):
        out.update(_entries(child, f"{prefix}{name}."))
    return out


def _numpy(value) -> np.ndarray:
    """A copy: on the CPU ``jnp.asarray`` may alias a NumPy buffer, and torch updates its own in place
    (a training step of the torch net would change the Flax running statistics)."""
    if hasattr(value, "detach"):  # a torch tensor (bfloat16 has no NumPy twin: widen it)
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.array(value, copy=True)


def load_torch_state_dict(module, state_dict, strict: bool = True):
    """Copy a torch ``state_dict`` of the twin torch module into the Flax ``module``, in place.

    Every value is cast to the Flax variable's dtype; a shape that differs is a ``ValueError`` naming the
    key. With ``strict`` (the default), a torch key without a Flax twin or a Flax variable without a torch
    key is a ``ValueError`` listing them (``num_batches_tracked`` is ignored). Returns ``module``.

    Example::

        tnet = sparsevox.adapters.torch.MinkUNet(4, 20)
        fnet = sparsevox.adapters.flax.MinkUNet(4, 20, rngs=nnx.Rngs(0))
        load_torch_state_dict(fnet, tnet.state_dict())
    """
    entries = _entries(module)
    keys = [k for k in state_dict if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in keys if k not in entries]
    missing = [k for k in entries if k not in state_dict]
    if strict and (unexpected or missing):
        raise ValueError(f"the torch state_dict and the Flax {type(module).__name__} differ: torch keys without "
                         f"a Flax twin {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, Flax variables "
                         f"without a torch key {missing[:8]}{'...' if len(missing) > 8 else ''}")
    for key in keys:
        if key not in entries:
            continue
        var, transposed = entries[key]
        value = _numpy(state_dict[key])
        value = value.T if transposed else value
        if value.shape != tuple(var.shape):
            raise ValueError(f"{key}: the torch value has shape {value.shape} (after conversion), the Flax "
                             f"variable {tuple(var.shape)}")
        var[...] = jnp.asarray(value, dtype=var.dtype)
    return module


def torch_state_dict(module) -> dict:
    """The Flax ``module``'s parameters and batch statistics as ``{torch name: np.ndarray}``, in torch's
    layouts (the inverse of :func:`load_torch_state_dict`): ``torch_net.load_state_dict({k:
    torch.from_numpy(v) ...})`` loads it (torch fills in ``num_batches_tracked``)."""
    out = {}
    for key, (var, transposed) in _entries(module).items():
        value = np.array(var[...], copy=True)  # writable, not JAX's buffer (torch.from_numpy shares memory)
        out[key] = np.ascontiguousarray(value.T) if transposed else value
    return out
