"""Tune a whole model up front on an example batch (issue 19), so training steps do not tune.

The autotuner chooses an algorithm the first time it meets a layer's problem (shapes bucketed by row
count) and keeps the choice in ``~/.cache/sparsevox/``; without this, the first training steps pay for it
one layer at a time. :func:`tune_model` runs the model once per autocast dtype on an example batch,
forward and (in training) backward, with a progress line per tuned configuration, and leaves the model as
it found it.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time

import torch

__all__ = ["tune_model"]

_TUNE_LOG = logging.getLogger("sparsevox.autotune")


class _Progress(logging.Handler):
    """Counts the autotuner's finished tunings and writes one progress line per tuning."""

    def __init__(self, stream, started: float):
        super().__init__(logging.DEBUG)
        self.stream, self.started, self.tunings = stream, started, 0

    def emit(self, record):
        text = record.getMessage()
        if not text.startswith("autotune: tuned"):
            return
        self.tunings += 1
        if self.stream is not None:
            self.stream.write(f"sparsevox tune_model: {self.tunings} configurations tuned "
                              f"({time.perf_counter() - self.started:.1f} s): {text[len('autotune: tuned '):]}\n")
            self.stream.flush()


def tune_model(model: torch.nn.Module, example, *, train: bool = True, autocast=(None,), loss=None,
               progress=True) -> dict:
    """Run ``model(example)`` once per autocast dtype so every convolution's forward (and with ``train``
    its dgrad and wgrad) is tuned and cached before training starts.

    Args:
        model: a torch module whose forward takes ``example`` (e.g. a :class:`~sparsevox.adapters.torch.MinkUNet`
            and a ``sparsevox.Voxels`` with torch features ``[N, C_in]``).
        example: the model's input, a batch like the ones training will see (later scans of similar size
            reuse the choices: row counts are bucketed by powers of two).
        train: also run the backward pass (in training mode), tuning dgrad and wgrad.
        autocast: the dtypes to run under ``torch.autocast("cuda", dtype)``; ``None`` is no autocast.
            For a mixed-precision run: ``(torch.float16,)``; for both: ``(None, torch.float16)``.
        loss: ``loss(output) -> scalar tensor`` for the backward pass; default the sum of the output's
            squares (any differentiable scalar tunes the same layers).
        progress: True writes a line per tuned configuration to stderr; a text stream writes there;
            False is silent.

    Returns ``{"tunings": configurations tuned, "seconds": wall time}``. The model is left as found: its
    training mode, parameters' gradients (``None`` or their values) and buffers (BatchNorm running
    statistics) are restored. Raises ``ValueError`` for an ``autocast`` entry other than None, float16 or
    bfloat16.
    """
    dtypes = tuple(autocast) if isinstance(autocast, (list, tuple)) else (autocast,)
    for dt in dtypes:
        if dt not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"autocast entries must be None, torch.float16 or torch.bfloat16, got {dt!r}")
    stream = sys.stderr if progress is True else (progress or None)
    started = time.perf_counter()
    handler = _Progress(stream, started)
    old_level = _TUNE_LOG.level
    _TUNE_LOG.addHandler(handler)
    if _TUNE_LOG.getEffectiveLevel() > logging.DEBUG:
        _TUNE_LOG.setLevel(logging.DEBUG)  # "tuned" records are DEBUG unless a tuning is slow
    was_training = model.training
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    grads = {p: (None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()}
    try:
        for dt in dtypes:
            ctx = torch.autocast("cuda", dtype=dt) if dt is not None else contextlib.nullcontext()
            model.train(train)
            if train:
                with ctx:
                    out = model(example)
                    value = loss(out) if loss is not None else _default_loss(out)
                value.backward()
            else:
                with torch.no_grad(), ctx:
                    model(example)
            if any(p.is_cuda for p in model.parameters()):
                torch.cuda.synchronize()
    finally:
        _TUNE_LOG.removeHandler(handler)
        _TUNE_LOG.setLevel(old_level)
        model.train(was_training)
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
        for p, g in grads.items():
            p.grad = g
    seconds = time.perf_counter() - started
    if stream is not None:
        stream.write(f"sparsevox tune_model: done, {handler.tunings} configurations tuned in {seconds:.1f} s\n")
        stream.flush()
    return {"tunings": handler.tunings, "seconds": seconds}


def _default_loss(out):
    t = out.feats if hasattr(out, "feats") else out
    return t.float().square().sum()
