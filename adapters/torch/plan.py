"""``plan_maps(model)``: a model's kernel maps built before its first layer on every forward after the
first (:mod:`sparsevox.map_plan`)."""
from __future__ import annotations

from torch import nn

from sparsevox.map_plan import MapPlan

__all__ = ["plan_maps"]


def plan_maps(model: nn.Module) -> nn.Module:
    """Give ``model`` a :class:`sparsevox.map_plan.MapPlan`: its first forward records which kernel maps
    its layers ask for; every later forward (a new scan) builds them all, and waits for their pair
    counts, at the first map request, while the device has only map work queued. Without it each map's
    wait comes behind the convolutions already queued, draining the device once per level. Results are
    the same; maps the plan does not cover are built when asked. Works for native layers and
    ``sparsevox.compat.spconv`` models; ``MinkUNet`` builds its maps itself (``build_maps``).

    Returns ``model`` (its ``forward`` wrapped; ``model._sv_map_plan`` is the plan). Calling it twice is
    a no-op. Example::

        net = svt.plan_maps(MyUNet(...)).cuda()
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model.__dict__.get("forward"), _PlannedForward):
        return model
    planned = _PlannedForward(model)
    model.__dict__["_sv_map_plan"] = planned.plan
    model.forward = planned
    return model


class _PlannedForward:
    """``model.forward`` inside its plan's scope: a ``with`` around the class's forward, so any exception
    (a KeyboardInterrupt too) ends the scope, and forwards in several threads each have their own run. An
    object rather than a closure, so the model still pickles and a deep copy gets a plan of its own."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.plan = MapPlan()

    def __call__(self, *args, **kwargs):
        with self.plan.forward():
            return type(self.module).forward(self.module, *args, **kwargs)
