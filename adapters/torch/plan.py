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

    Returns ``model`` (forward hooks added; ``model._sv_map_plan`` is the plan). Calling it twice is a
    no-op. Example::

        net = svt.plan_maps(MyUNet(...)).cuda()
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if "_sv_map_plan" in model.__dict__:
        return model
    hooks = _PlanHooks()
    model.__dict__["_sv_map_plan"] = hooks.plan
    model.register_forward_pre_hook(hooks.enter)
    model.register_forward_hook(hooks.leave, always_call=True)
    return model


class _PlanHooks:
    """The forward hooks of a planned model: an object, not closures, so the model still pickles
    (``torch.save(model)``) and a deep copy gets a plan of its own."""

    def __init__(self):
        self.plan = MapPlan()
        self.scopes = []  # one per forward in flight on the model (a re-entrant forward nests)

    def enter(self, module, args):
        scope = self.plan.forward()
        scope.__enter__()
        self.scopes.append(scope)

    def leave(self, module, args, output):
        self.scopes.pop().__exit__(None, None, None)

    def __getstate__(self):
        return {"plan": self.plan, "scopes": []}
