"""A network's kernel maps built before its first layer needs one (issue 19), for any network.

A map's pair counts must reach the host (they size its arrays). Built layer by layer, each such wait comes
behind the convolutions already queued, so the device drains once per level of a UNet; built up front,
the waits find only map work queued. ``MinkUNet.build_maps`` does that by hand for its own levels; a
:class:`MapPlan` does it for any network: on one forward it records which maps are asked for, of which
sites ("levels": the first sites asked about, then the output sites of each strided map), and on every
later forward it builds them all, and waits for them, at the first map request, so later layers find them
cached. Only maps asked for without given output sites are planned (a transposed layer back onto a
strided layer's input is that map swapped, free); any other map is built when asked, as without a plan.
The plan depends on the layers' geometry only, not on the sites, so it serves every new scan.

Used through an adapter (``sparsevox.adapters.torch.plan_maps(model)``) or directly::

    plan = MapPlan()
    for batch in loader:
        with plan.forward():
            out = net(batch)
"""
from __future__ import annotations

import contextlib
import contextvars

from . import geometry

_RUN: contextvars.ContextVar = contextvars.ContextVar("sparsevox_map_plan_run", default=None)


class MapPlan:
    """The maps one forward of a network asks for, by level: ``steps`` is None until recorded, then a
    list of ``(level, kernel_size, stride, dilation, out_level)`` (``out_level``: the level a strided
    map's output sites are, else None), in the order first asked."""

    def __init__(self):
        self.steps: list | None = None

    def open_run(self) -> "_Run":
        """A run of this plan without a ``with`` scope, for a caller that cannot wrap the forward (the spconv
        compat layer plans each model by itself: the run rides on the tensors of one forward). A recording
        run records into the plan as it goes, so the next run replays what it has seen so far (a forward
        that raised leaves the maps asked before it as the plan: those are built ahead, the rest when
        asked). Make it current around each map request with :func:`active`."""
        run = _Run(self)
        if run.recording:
            self.steps = run.steps
        return run

    @contextlib.contextmanager
    def forward(self):
        """The scope of one forward: records the plan on the first that returns, replays it on the later
        ones. Inside another plan's forward it does nothing (the outer plan sees every request). The run
        lives in a context variable: forwards in other threads have their own."""
        if _RUN.get() is not None:
            yield
            return
        run = _Run(self)
        token = _RUN.set(run)
        done = False
        try:
            yield
            done = True
        finally:
            _RUN.reset(token)
            run.finish(done)


@contextlib.contextmanager
def active(run: "_Run"):
    """Inside: ``run`` sees the map requests of this thread (:func:`sparsevox.kernel_map`)."""
    token = _RUN.set(run)
    try:
        yield
    finally:
        _RUN.reset(token)


def current() -> "_Run | None":
    """The run whose scope this thread is in, or None."""
    return _RUN.get()


class _Run:
    """One forward under a plan: records while the plan has no steps, else replays them at the first
    request. Holds the sites and arrays it refers to by identity until the forward ends."""

    def __init__(self, plan: MapPlan):
        from .kernel_map import _kernel_map  # (here, once per forward: kernel_map imports this module)
        self.build = _kernel_map
        self.plan = plan
        self.recording = not plan.steps  # (an empty plan, from a forward that asked for no map, records again)
        self.steps: list = []
        self.seen: set = set()
        self.level_of: dict = {}    # id(a geometry's map cache dict) -> level
        self.coords_level: dict = {}  # id(a strided map's out_coords) -> level of those sites
        self.keep: list = []        # what the ids above refer to, alive until the forward ends
        self.replayed = False

    def kernel_map(self, voxels, kernel_size, stride, dilation):
        if not self.recording and not self.replayed:
            self.replayed = True
            self._replay(voxels)
        kmap = self.build(voxels, kernel_size, stride, dilation, False, False, None)
        if self.recording:
            self._record(voxels, kernel_size, stride, dilation, kmap)
        return kmap

    def _level(self, voxels):
        kmaps = voxels._kmaps
        level = self.level_of.get(id(kmaps))
        if level is not None:
            return level
        core = voxels._core[0] if voxels._core is not None else None
        if not self.level_of:
            level = 0  # the first sites asked about: the input
        elif core is not None and id(core) in self.coords_level:
            level = self.coords_level[id(core)]
        else:
            return None  # sites the plan cannot name (computed elsewhere): their maps are built when asked
        self.level_of[id(kmaps)] = level
        self.keep.append(kmaps)
        return level

    def _record(self, voxels, kernel_size, stride, dilation, kmap) -> None:
        level = self._level(voxels)
        if level is None:
            return
        args = (geometry.triple(kernel_size, "kernel_size"), geometry.triple(stride, "stride"),
                geometry.triple(dilation, "dilation"))
        if (level,) + args in self.seen:
            return
        self.seen.add((level,) + args)
        out_level = None
        if kmap.kind == "strided":
            out_level = 1 + max([0] + [s[4] for s in self.steps if s[4] is not None])
            self.coords_level[id(kmap.out_coords)] = out_level
            self.keep.append(kmap.out_coords)
        self.steps.append((level,) + args + (out_level,))

    def _replay(self, voxels) -> None:
        from .kernel_map import strided_output_voxels
        levels = {0: voxels}
        maps = []
        for level, ks, st, dl, out_level in self.plan.steps:
            src = levels.get(level)
            if src is None:
                continue
            maps.append(self.build(src, ks, st, dl, False, False, None))
            if out_level is not None and maps[-1].kind == "strided":
                levels[out_level] = strided_output_voxels(src, ks, st, dl)
        for kmap in maps:
            kmap.wait()
        for v in levels.values():  # their planned maps are built and done: validation's hash table goes (16
            v._hash = None        # MiB at SemanticKITTI's 183,534 voxels); a map asked later builds its own
        self.keep.append(levels)  # the sites stay alive (their maps cached on them) for this forward

    def finish(self, done: bool) -> None:
        """``done``: the forward returned (a forward that raised records nothing: the next one records)."""
        if self.recording and done:
            self.plan.steps = self.steps
        self.keep.clear()
