"""The Flax NNX MinkUNet in the end-to-end benchmark (issue 20 item 5; ``end_to_end --flax``).

The same network as the torch model (weights copied with ``load_torch_state_dict``), float32, every step
from the same torch voxelisation: the coords and features are handed to JAX (DLPack on the GPU), the
kernel maps are built outside ``jit`` with ``kernel_maps(voxels, bucket=True)`` (a fresh ``Voxels`` every
step, as the torch rows; buckets so that scans of similar size reuse the compiled step) and an
``nnx.jit``-ed step runs: inference (running statistics) or training (masked cross-entropy, gradients,
plain SGD at lr 0.01; the torch rows use SGD with momentum 0.9, a few elementwise ops more). Each step
ends with ``block_until_ready``. Peak memory is not reported (JAX's allocator is not torch's).
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with torch's allocator

FLAX_MODES = ("fp32_infer", "fp32_train")


def build(sv_model, in_channels: int, num_classes: int, widths):
    """A Flax MinkUNet with ``sv_model``'s (the torch twin's) weights and running statistics."""
    from flax import nnx

    from sparsevox.adapters import flax as svf
    model = svf.MinkUNet(in_channels, num_classes, widths=tuple(widths), rngs=nnx.Rngs(0))
    svf.load_torch_state_dict(model, {k: v.detach().cpu() for k, v in sv_model.state_dict().items()})
    return model


def _to_jax(t):
    import jax
    import jax.numpy as jnp
    return jax.dlpack.from_dlpack(t.contiguous()) if t.is_cuda else jnp.asarray(t.numpy())


def jitted_steps(traces=None):
    """``(train_step(model, feats, maps, labels) -> loss, infer(model, feats, maps) -> logits)``, both
    ``nnx.jit``-ed, on bucketed maps: training is masked cross-entropy (padding rows left out) and plain SGD
    at lr 0.01. ``traces``: a one-element list counted up at every trace (compilations)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def traced():
        if traces is not None:
            traces[0] += 1  # runs only while tracing

    @nnx.jit
    def train_step(model, feats, maps, labels):
        traced()

        def loss_fn(m):
            mask = maps[0].mask()
            ce = -jnp.take_along_axis(jax.nn.log_softmax(m(feats, maps)), labels[:, None], axis=1)[:, 0]
            return jnp.where(mask, ce, 0).sum() / mask.sum()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree_util.tree_map(lambda p, g: p - 0.01 * g, params, grads))
        return loss

    @nnx.jit
    def infer(model, feats, maps):
        traced()
        return model(feats, maps)
    return train_step, infer


def make_step(model, mode: str, vox, labels):
    """``step()``: one step of ``mode`` (:data:`FLAX_MODES`) on a fresh ``Voxels`` of ``vox()``'s points."""
    import jax
    import jax.numpy as jnp

    import sparsevox as sv
    if mode not in FLAX_MODES:
        raise ValueError(f"mode must be one of {FLAX_MODES} for the Flax model, got {mode!r}")
    train = mode == "fp32_train"
    model.train() if train else model.eval()
    jlabels = _to_jax(labels).astype(jnp.int32)
    train_step, infer = jitted_steps()

    def step():
        coords, feats = vox()
        v = sv.Voxels(_to_jax(coords), _to_jax(feats))
        maps = model.kernel_maps(v, bucket=True)
        f = maps[0].pad(v.feats)
        out = train_step(model, f, maps, maps[0].pad(jlabels)) if train else infer(model, f, maps)
        jax.block_until_ready(out)

    return step
