"""End to end: the MinkUNet (SparseResUNet42 shape, 20 classes) in sparsevox and in spconv 2.3.8, in one
process on one GPU, with the same weights.

    python -m benchmarks.end_to_end [--scenes S ...] [--modes M ...] [--steps N] [--warmup N] [--quick]
                                    [--out DIR] [--stem STEM] [--budget-s S] [--no-peer] [-v]
    python -m benchmarks.end_to_end --cpu --quick     # CPU smoke run: a tiny synthetic scene, sparsevox only

Scenes (batch items: the scan, then the same scan with x and y swapped):

| name | points | voxel | batch |
|---|---|---|---|
| ``semantickitti`` | ``semantickitti_000000.bin`` (x y z remission) | 5 cm | 2 |
| ``scannet`` | ``scannet_scene0000_00.bin`` (x y z r g b) | 2 cm | 2 |
| ``indoor_synth`` | :func:`sparsevox.synthetic.indoor_like_points` (346k voxels) | 2 cm | 1 |
| ``lidar_synth`` | :func:`sparsevox.synthetic.lidar_like_points` | 5 cm | 2 |

Every step starts from the points: voxelisation (the same torch code for both libraries: ``floor``,
``torch.unique``, mean of the points' features: x y z and the scan's own columns), then a **fresh**
``sparsevox.Voxels`` / ``spconv.SparseConvTensor``, so every kernel map is built inside the step.
Modes: ``fp16_infer`` (``torch.autocast`` float16, eval, ``no_grad``), ``fp16_train`` (autocast +
``torch.amp.GradScaler``, cross-entropy on fixed random labels, backward, SGD step; on request
``fp16_train_noscaler``: the same without the scaler), ``fp32_infer``,
``fp32_train``. A cell is the median of ``--steps`` CUDA-synchronised wall times per step after
``--warmup`` steps (the first warm-up also autotunes); its peak memory is ``max_memory_allocated`` over
the timed steps (``reset_peak_memory_stats`` after the warm-up; ``warmup_peak_mib`` covers the warm-up),
with only that library's model (and optimizer state) on the GPU. With ``--rounds R`` (default 4 on a GPU)
the cells of a mode run interleaved, R times ``--steps``/R timed steps each (the first round after
``--warmup`` steps, later rounds after one), and each cell's figures pool its rounds: the libraries are
timed over the same minutes, so host drift (which moved one library's median by 20-40 % between runs
minutes apart, ce287b0) falls on all of them alike.

spconv's inference path ignores autocast (its eval-mode convolutions run in the weights' dtype), so its
``fp16_infer`` figure runs a float16 copy of the model on float16 features (under autocast), and
``peer.spconv_autocast`` the float32 model under autocast (what autocast alone gives spconv); likewise
``variants.sparsevox_half_model`` is sparsevox on the float16 copy. ``--sort-ab`` adds
``variants.sparsevox_rows_sorted``: native sparsevox with every dtype's rows sorted (the default sorts
float32/float64 only, :func:`sparsevox.config.sort_rows`).

Before the timings, per scene: the sparsevox model's BatchNorm statistics are set from one train-mode
forward, its weights are loaded into the spconv model (:mod:`benchmarks.spconv_minkunet`), and the
logits of both are compared (relative error, float32, eval and train mode; float16 too), as are single
layers (SubM k3, SubM k1, k2 s2 down, its inverse up) converted the same way.

Writes ``<out>/<stem>-end_to_end.json`` (DESIGN.md "Recorded GPU results": ``{"device", "date", "commit",
"records", ...}``, rewritten after every scene), ``.md`` (tables) and ``.png`` (step time per library,
scene and mode; without matplotlib no plot), both by :mod:`benchmarks.end_to_end_report`. A record::

    {"op": "minkunet_<mode>", "scene", "n_voxels", "batch", "library": "sparsevox", "ms", "min_ms", "max_ms",
     "steps", "peak_mib", "model_mib" (its parameters and buffers, part of the peak), "peer": {"spconv": ms, ...},
     "peer_peak_mib": {"spconv": MiB}, "peer_model_mib": {"spconv": MiB},
     "ratio": spconv ms / sparsevox ms (> 1: sparsevox faster), "variants", "autotuned_during_warmup_and_timing",
     "logits_rel_err" (fp32_infer), "error" (when a cell failed),
     "compat_ms", "compat_overhead": the spconv-API model on sparsevox.compat.spconv (issue 21), its ms and
     its cost over native sparsevox (compat / sparsevox - 1); with ``--plan-compat`` also
     "samples_ms": {cell: every timed step's ms} (cell "sparsevox", "spconv", "compat", ...),
     "compat_planned_ms", "compat_planned_overhead": the same model under ``plan_maps``; with
     ``--unplanned-compat`` "compat_unplanned_ms", "compat_unplanned_overhead": compat's own plan off}

Progress lines go to stdout; at the end the number of autotune warnings (logger ``sparsevox.autotune``,
counted whether or not ``SPARSEVOX_AUTOTUNE_LOG`` is set) and tunings.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import logging
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np

from . import peers as peers_mod
from . import end_to_end_report as e2e_report
from . import provenance, report
from . import scenes as scenes_mod
from . import spconv_minkunet as spm

log = logging.getLogger("sparsevox.benchmarks")

MODES = ("fp16_infer", "fp16_train", "fp32_infer", "fp32_train")
EXTRA_MODES = ("fp16_train_noscaler",)  # autocast without GradScaler: un-scaled float16 gradients (~1e-6)
NUM_CLASSES = 20


@dataclass(frozen=True)
class Plan:
    source: str  # a benchmarks.scenes name, "indoor_synth" or "tiny"
    voxel_size: float
    batch: int


SCENES = {"semantickitti": Plan("semantickitti", 0.05, 2), "scannet": Plan("scannet", 0.02, 2),
          "indoor_synth": Plan("indoor_synth", 0.02, 1), "lidar_synth": Plan("lidar_synth", 0.05, 2),
          "tiny": Plan("tiny", 0.25, 2)}
DEFAULT_SCENES = ("semantickitti", "scannet", "indoor_synth")


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.end_to_end", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", nargs="+", default=None, choices=list(SCENES))
    ap.add_argument("--modes", nargs="+", default=None, choices=list(MODES + EXTRA_MODES))
    ap.add_argument("--steps", type=int, default=None, help="timed steps per cell (default 20; --quick 10; CPU 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; CPU 1)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds per mode, each cell timed steps/rounds steps per round (default 4; "
                         "CPU and --quick 1)")
    ap.add_argument("--quick", action="store_true", help="10 timed steps, no float16-inference variants")
    ap.add_argument("--cpu", action="store_true", help="CPU smoke run: the tiny scene, sparsevox only, fp32 modes")
    ap.add_argument("--no-peer", action="store_true", help="do not run spconv even when importable")
    ap.add_argument("--no-compat", action="store_true",
                    help="no row for the spconv-API MinkUNet on sparsevox.compat.spconv")
    ap.add_argument("--plan-compat", action="store_true",
                    help="also time the spconv-API MinkUNet with a map plan (sparsevox.adapters.torch.plan_maps): "
                         "compat_planned_ms beside compat_ms")
    ap.add_argument("--unplanned-compat", action="store_true",
                    help="also time the spconv-API MinkUNet with compat's own map plan off "
                         "(sparsevox.compat.spconv.maps.auto_plan(False)): compat_unplanned_ms beside compat_ms")
    ap.add_argument("--sort-ab", action="store_true",
                    help="also time native sparsevox with every dtype's rows sorted (variants.sparsevox_rows_sorted; "
                         "the policy A/B in one process against one spconv measurement)")
    ap.add_argument("--flax", action="store_true",
                    help="also time the Flax NNX MinkUNet (same weights, bucketed maps, nnx.jit; float32 modes)")
    ap.add_argument("--widths", nargs=9, type=int, default=None, help="MinkUNet widths (default SparseResUNet42)")
    ap.add_argument("--out", default=str(provenance.REPO / "benchmarks" / "results"), help="output folder")
    ap.add_argument("--stem", default=None, help="file-name stem (default <date>-<gpu>-<commit>)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new cell after this many seconds; what was measured is written")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


# --- points and voxelisation --------------------------------------------------------------------------

def scene_points(name: str):
    """``(float32 [P, 3 + F] points, source)`` of one batch item, or None when its file is absent."""
    if name == "indoor_synth":
        from sparsevox.synthetic import indoor_like_points
        return indoor_like_points(seed=0), "sparsevox.synthetic.indoor_like_points(seed=0)"
    if name == "tiny":
        from sparsevox.synthetic import lidar_like_points
        pts = lidar_like_points(seed=0, n_points=12_000)
        return pts[np.abs(pts[:, :2]).max(axis=1) < 8.0], "lidar_like_points(seed=0, n_points=12000), |x|,|y| < 8 m"
    return scenes_mod.points_of(name)


def batch_points(points: np.ndarray, batch: int):
    """The batch: item 0 the scan, item 1 the scan with x and y swapped. Returns ``(xyz [P, 3], feats
    [P, 3 + F], batch index [P])``: features are x y z relative to the scan's centre and the scan's own
    columns (colours scaled to 0..1)."""
    items = [points]
    if batch == 2:
        swapped = points.copy()
        swapped[:, [0, 1]] = points[:, [1, 0]]
        items.append(swapped)
    xyz = np.concatenate([p[:, :3] for p in items]).astype(np.float32)
    extra = np.concatenate([p[:, 3:] for p in items]).astype(np.float32)
    if extra.size and extra.max() > 1.5:  # 0..255 colours
        extra = extra / 255.0
    feats = np.concatenate([xyz - xyz.mean(axis=0), extra], 1).astype(np.float32)
    index = np.concatenate([np.full(len(p), i, np.int64) for i, p in enumerate(items)])
    return xyz, feats, index


class Voxeliser:
    """Voxelisation of fixed points in torch on one device, run inside every step by both libraries.

    ``voxeliser() -> (coords int32 [N, 4], feats float32 [N, C])``: rows sorted by (batch, x, y, z), coords
    shifted into spconv's frame (:func:`benchmarks.spconv_minkunet.spatial_frame`); features the mean of
    the points' features per voxel."""

    def __init__(self, xyz, feats, index, voxel_size: float, device):
        import torch
        self.torch = torch
        self.xyz = torch.from_numpy(xyz).to(device)
        self.feats = torch.from_numpy(feats).to(device)
        self.index = torch.from_numpy(index).to(device)
        self.voxel_size = float(voxel_size)
        self.ones = torch.ones(len(xyz), device=device)
        ijk = torch.floor(self.xyz / self.voxel_size).to(torch.int64).cpu().numpy()
        shift, shape = spm.spatial_frame(np.concatenate([index[:, None], ijk], 1))
        self.shift = torch.from_numpy(shift).to(device)
        self.spatial_shape = shape
        self.batch_size = int(index.max()) + 1
        self.channels = feats.shape[1]

    def __call__(self):
        torch = self.torch
        X, Y, Z = self.spatial_shape
        ijk = torch.floor(self.xyz / self.voxel_size).to(torch.int64) - self.shift
        key = ((self.index * X + ijk[:, 0]) * Y + ijk[:, 1]) * Z + ijk[:, 2]
        uniq, inv = torch.unique(key, sorted=True, return_inverse=True)
        n = uniq.shape[0]
        count = torch.zeros(n, device=key.device).index_add_(0, inv, self.ones)
        feats = torch.zeros(n, self.channels, device=key.device).index_add_(0, inv, self.feats) / count[:, None]
        z = uniq % Z
        rest = uniq // Z
        y = rest % Y
        rest = rest // Y
        coords = torch.stack([rest // X, rest % X, y, z], 1).to(torch.int32)
        return coords, feats


# --- models ---------------------------------------------------------------------------------------

def calibrate_batchnorm(model, x) -> None:
    """BatchNorm running statistics := those of one train-mode forward of ``x`` (eval mode then
    normalises realistically; the initial mean 0 / variance 1 would not)."""
    import torch
    saved = {}
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            saved[m] = m.momentum
            m.momentum = None  # cumulative average: after one batch, its statistics
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(x)
    for m, mom in saved.items():
        m.momentum = mom


def sparsevox_scene_model(scene: str, device: str = "cuda"):
    """``(libs, labels, model)`` for the probes that run native sparsevox alone on one scene: its
    :class:`Libraries` (no peer), random labels for its first voxelisation, and a MinkUNet whose BatchNorm
    statistics are calibrated on it, left on the CPU (``make_step`` moves it)."""
    import torch

    from sparsevox.adapters.torch import MinkUNet
    plan = SCENES[scene]
    points, _ = scene_points(plan.source)
    xyz, feats, index = batch_points(points, plan.batch)
    vox = Voxeliser(xyz, feats, index, plan.voxel_size, device)
    libs = Libraries(None, vox, spm.DEFAULT_WIDTHS)
    coords0, feats0 = vox()
    labels = torch.randint(0, NUM_CLASSES, (len(coords0),), device=device)
    model = MinkUNet(vox.channels, NUM_CLASSES).to(device)
    calibrate_batchnorm(model, libs.make_input("sparsevox", coords0, feats0))
    return libs, labels, model.cpu()


class Libraries:
    """How each library turns ``(coords, feats)`` into its input, and copies its model."""

    def __init__(self, sp, vox: Voxeliser, widths, compat=None):
        self.sp, self.vox, self.widths, self.compat = sp, vox, tuple(widths), compat

    def make_input(self, lib: str, coords, feats):
        if lib == "sparsevox":
            import sparsevox as sv
            return sv.Voxels(coords, feats)
        mod = self.compat if lib.startswith("compat") else self.sp
        return mod.SparseConvTensor(feats, coords, self.vox.spatial_shape, self.vox.batch_size)

    def build_compat(self):
        """The spconv-API MinkUNet (:mod:`benchmarks.spconv_minkunet`) on ``sparsevox.compat.spconv``."""
        return spm.build(self.compat, self.vox.channels, NUM_CLASSES, widths=self.widths)

    def build_spconv(self):
        return spm.build(self.sp, self.vox.channels, NUM_CLASSES, widths=self.widths)

    def half_copy(self, lib: str, model):
        """A float16 copy of ``model`` (spconv's is built anew and loaded: its modules hold bound C++ enums)."""
        if lib == "sparsevox":
            return copy.deepcopy(model).half()
        new = self.build_spconv().to(next(model.parameters()).device)
        tensors = dict(model.named_parameters())
        tensors.update(model.named_buffers())
        spm.copy_into(new, {k: v.detach() for k, v in tensors.items()})
        return new.half()  # on the device of ``model``


# --- parity ---------------------------------------------------------------------------------------

def _sort_rows(coords, shape):
    X, Y, Z = shape
    c = coords.long()
    return (((c[:, 0] * X + c[:, 1]) * Y + c[:, 2]) * Z + c[:, 3]).argsort()


def layer_parity(sp, libs: Libraries, coords, c_in: int = 16, c_out: int = 24) -> dict:
    """Relative error of spconv against sparsevox per layer kind, weights converted by
    :func:`benchmarks.spconv_minkunet.convert_weight`, float32, on the scene's sites."""
    import torch

    from sparsevox.adapters import torch as svt
    torch.manual_seed(1)
    dev = coords.device
    f = torch.randn(len(coords), c_in, device=dev)
    v, x = libs.make_input("sparsevox", coords, f), libs.make_input("spconv", coords, f)
    out = {}

    def pair(ours, theirs):
        with torch.no_grad():
            theirs.weight.copy_(spm.convert_weight(ours.weight, theirs.weight.shape))
        return ours.to(dev).eval(), theirs.to(dev).eval()

    with torch.no_grad():
        for name, k in (("subm3", 3), ("subm1", 1)):
            a, b = pair(svt.SparseConv3d(c_in, c_out, k, bias=False), sp.SubMConv3d(c_in, c_out, k, bias=False))
            out[name] = peers_mod.relative_error(b(x).features, a(v).feats)
        a, b = pair(svt.SparseConv3d(c_in, c_out, 2, stride=2, bias=False),
                    sp.SparseConv3d(c_in, c_out, 2, 2, bias=False, indice_key="parity_down"))
        va, xb = a(v), b(x)
        half = [s // 2 for s in libs.vox.spatial_shape]
        ia, ib = _sort_rows(va.coords, half), _sort_rows(xb.indices, half)
        if va.coords.shape != xb.indices.shape or not torch.equal(va.coords[ia].int(), xb.indices[ib].int()):
            out["down"] = "different output sites"
        else:
            out["down"] = peers_mod.relative_error(xb.features[ib], va.feats[ia])
        up_a, up_b = pair(svt.SparseConv3d(c_out, c_in, 2, stride=2, transposed=True, bias=False),
                          sp.SparseInverseConv3d(c_out, c_in, 2, indice_key="parity_down", bias=False))
        out["up"] = peers_mod.relative_error(up_b(xb).features, up_a(va, output_voxels=v).feats)
    return out


def model_parity(sv_model, sp_model, libs: Libraries, coords, feats) -> dict:
    """Relative error of the spconv model's logits against sparsevox's, same weights."""
    import torch
    out = {}
    with torch.no_grad():
        for name, train in (("fp32_eval", False), ("fp32_train", True)):
            sv_model.train(train)
            sp_model.train(train)
            a = sv_model(libs.make_input("sparsevox", coords, feats))
            b = sp_model(libs.make_input("spconv", coords, feats))
            out[name] = peers_mod.relative_error(b, a)
        if coords.is_cuda:  # float16: sparsevox under autocast, spconv's float16 copy (as the timings run)
            sv_model.eval()
            half = libs.half_copy("spconv", sp_model).eval()
            with torch.autocast("cuda", dtype=torch.float16):
                a = sv_model(libs.make_input("sparsevox", coords, feats))
                b = half(libs.make_input("spconv", coords, feats.half()))
            out["fp16_eval"] = peers_mod.relative_error(b.float(), a.float())
            del half
    return out


# --- one cell ---------------------------------------------------------------------------------------

class TuneCounter(logging.Handler):
    """Counts the autotuner's warnings and its finished tunings (logger ``sparsevox.autotune``)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.warnings = 0
        self.tunings = 0

    def emit(self, record):
        if record.levelno >= logging.WARNING:
            self.warnings += 1
        elif record.getMessage().startswith("autotune: tuned"):
            self.tunings += 1


def make_step(lib, model, mode, libs: Libraries, labels, device, half_model=False):
    """``(step, model, cleanup)``: ``step()`` runs one step of ``mode`` from the points (a fresh input
    every call) on ``model`` (``half_model``: a float16 copy of it) moved to ``device``; ``cleanup()``
    drops the optimizer and moves the original model back to the CPU."""
    import torch
    train, amp = "train" in mode, mode.startswith("fp16")
    on_gpu = device == "cuda"
    orig = model  # kept on the CPU between cells
    model = libs.half_copy(lib, orig) if half_model else orig
    model.to(device).train(train)
    state = {"opt": torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if train else None,
             "scaler": (torch.amp.GradScaler("cuda", enabled=amp)
                        if train and on_gpu and "noscaler" not in mode else None)}
    loss_fn = torch.nn.CrossEntropyLoss()

    def autocast():
        if not on_gpu:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.float16, enabled=amp)

    def step():
        opt, scaler = state["opt"], state["scaler"]
        coords, feats = libs.vox()
        if half_model:
            feats = feats.half()
        x = libs.make_input(lib, coords, feats)
        if train:
            with autocast():
                loss = loss_fn(model(x).float(), labels)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
        else:
            with torch.no_grad(), autocast():
                model(x)

    def cleanup():
        state.clear()
        model.zero_grad(set_to_none=True)
        orig.cpu()

    return step, model, cleanup



def _torch_allocator_in_use() -> bool:
    """Whether sparsevox's CuPy allocations go through torch's allocator (``SPARSEVOX_TORCH_ALLOCATOR=1``), so
    that the peak memory figures include the kernel maps and tables (else they leave them out)."""
    try:
        from sparsevox.adapters.torch import torch_allocator_in_use
        return bool(torch_allocator_in_use())
    except ImportError:
        return False


@contextlib.contextmanager
def _rows_sorted(on: bool):
    """Sort every dtype's rows (``sparsevox.config.sort_rows(True)``) inside, when ``on``; the policy
    before is restored after (each change makes the process plan afresh; tuned entries stay cached)."""
    if not on:
        yield
        return
    import sparsevox
    before = sparsevox.config.sort_rows()
    sparsevox.config.sort_rows(True)
    try:
        yield
    finally:
        sparsevox.config.sort_rows(before)

@contextlib.contextmanager
def _compat_unplanned(on: bool):
    """compat's own map plan (``sparsevox.compat.spconv.maps.auto_plan``) off inside, when ``on``."""
    if not on:
        yield
        return
    from sparsevox.compat.spconv import maps
    before = maps.auto_plan()
    maps.auto_plan(False)
    try:
        yield
    finally:
        maps.auto_plan(before)


def run_cell(lib, model, mode, libs: Libraries, labels, device, warmup, steps, half_model=False,
             tunes: TuneCounter | None = None) -> dict:
    """Median wall ms per step of ``warmup + steps`` steps (the first ``warmup`` untimed), peak MiB, and
    the autotuner's tunings during the timed steps (``tuned_in_timed_steps``, when ``tunes`` is given)."""
    import torch
    on_gpu = device == "cuda"
    if lib == "flax":  # its step ends with block_until_ready; JAX's memory is not torch's to report
        from . import flax_cell
        step, cleanup = flax_cell.make_step(model, mode, libs.vox, labels), (lambda: None)
    else:
        step, model, cleanup = make_step(lib, model, mode, libs, labels, device, half_model)
    model_mib = resident_mib(model) if lib != "flax" else None
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    samples = []
    tuned = warm_peak = None
    try:
        for i in range(warmup + steps):
            if i == warmup:
                tuned = tunes.tunings if tunes is not None else None
                if on_gpu:  # the timed steps' peak: without autotuning's buffers of the first warm-up
                    torch.cuda.synchronize()
                    warm_peak = torch.cuda.max_memory_allocated() / 2 ** 20
                    torch.cuda.reset_peak_memory_stats()
            sync()
            t = time.perf_counter()
            step()
            sync()
            if i >= warmup:
                samples.append((time.perf_counter() - t) * 1e3)
        peak = torch.cuda.max_memory_allocated() / 2 ** 20 if on_gpu and lib != "flax" else None
    finally:
        cleanup()
        del model, step
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
    return {"ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples), "steps": steps,
            "samples": samples, "peak_mib": None if peak is None else round(peak, 1), "model_mib": model_mib,
            "warmup_peak_mib": None if warm_peak is None else round(warm_peak, 1),
            "tuned_in_timed_steps": None if tuned is None else tunes.tunings - tuned}


def _pooled(rounds: list[dict]) -> dict:
    """One cell's figures from its rounds (:func:`run_cell` results): the median, min and max of every
    timed step, the largest peaks, the summed tunings; the first error when a round failed."""
    errors = [g for g in rounds if "error" in g]
    if errors:
        return errors[0]
    samples = [t for g in rounds for t in g["samples"]]
    out = dict(rounds[0])
    peaks = [g["peak_mib"] for g in rounds if g["peak_mib"] is not None]
    warm = [g["warmup_peak_mib"] for g in rounds if g["warmup_peak_mib"] is not None]
    out.update(ms=statistics.median(samples), min_ms=min(samples), max_ms=max(samples), steps=len(samples),
               samples=[round(t, 3) for t in samples],
               rounds=len(rounds), peak_mib=max(peaks) if peaks else None, warmup_peak_mib=max(warm) if warm else None,
               tuned_in_timed_steps=sum(g["tuned_in_timed_steps"] or 0 for g in rounds),
               tunings=sum(g["tunings"] for g in rounds))
    return out


def resident_mib(model) -> float:
    """MiB of ``model``'s parameters and buffers as the step holds them (its dtype: the float32 model under
    autocast, spconv's float16 copy in fp16_infer): part of every peak, so the peaks' difference between the
    libraries in float16 inference is partly the two models' dtypes, not maps or activations."""
    import itertools
    return round(sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
                 / 2 ** 20, 1)


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


# --- the run ----------------------------------------------------------------------------------------

class Run:
    def __init__(self, args):
        self.args = args
        self.device = "cpu" if args.cpu else "cuda"
        self.quick = args.quick
        self.warmup = args.warmup if args.warmup is not None else (1 if args.cpu else 3)
        self.steps = args.steps if args.steps is not None else (2 if args.cpu else (10 if args.quick else 20))
        self.rounds = args.rounds if args.rounds is not None else (1 if args.cpu or args.quick else min(4, self.steps))
        if not 1 <= self.rounds <= self.steps:
            raise ValueError(f"--rounds must be in [1, steps={self.steps}], got {self.rounds}")
        self.scenes = list(args.scenes or (("tiny",) if args.cpu else DEFAULT_SCENES))
        modes = list(args.modes or MODES)
        self.modes = [m for m in modes if not (args.cpu and m.startswith("fp16"))]  # autocast float16: CUDA
        self.widths = tuple(args.widths) if args.widths else spm.DEFAULT_WIDTHS
        self.variants = not args.quick and not args.cpu
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s if args.budget_s else float("inf")
        self.truncated = False
        self.records: list[dict] = []
        self.scene_info: list[dict] = []
        self.parity: dict = {}
        self.sp, self.peer_info = None, {}
        if args.cpu:
            self.peer_info = {"spconv": "not run on the CPU"}
        elif args.no_peer:
            self.peer_info = {"spconv": "not run (--no-peer)"}
        else:
            self.sp, why = peers_mod.import_peer("spconv")
            self.peer_info = {"spconv": peers_mod.peer_version("spconv") or "imported" if self.sp else
                              f"not run ({why})"}
        self.compat = None
        if not args.no_compat:
            try:
                import sparsevox.compat.spconv as compat
                self.compat = compat
            except ImportError as e:  # torch-only module; the CPU smoke run has torch too
                log.warning("sparsevox.compat.spconv not importable (%s): no compat row", e)
        self.tunes = TuneCounter()
        tune_log = logging.getLogger("sparsevox.autotune")
        tune_log.addHandler(self.tunes)
        if tune_log.getEffectiveLevel() > logging.DEBUG:
            tune_log.setLevel(logging.DEBUG)  # every "tuned" record (DEBUG when quick) reaches the counter

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def out_of_time(self) -> bool:
        if not self.truncated and time.monotonic() > self.deadline:
            log.warning("time budget of %.0f s reached: no new cells", self.args.budget_s)
            self.truncated = True
        return self.truncated

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():7.1f} s] {text}", flush=True)


def device_name(device: str) -> str:
    if device == "cpu":
        import platform
        return f"CPU {platform.processor() or platform.machine()} (NumPy backend smoke run)"
    return provenance.gpu_name() or "unknown GPU"


def document(run: Run) -> dict:
    import torch

    import sparsevox
    doc = provenance.header(device_name(run.device))
    doc.update({
        "what": "end_to_end",
        "settings": {"device": run.device, "quick": run.quick, "warmup": run.warmup, "steps": run.steps,
                     "rounds": run.rounds,
                     "modes": run.modes, "widths": list(run.widths), "num_classes": NUM_CLASSES,
                     "tf32": bool(sparsevox.allow_tf32()), "plan_compat": bool(run.args.plan_compat),
                     "unplanned_compat": bool(run.args.unplanned_compat),
                     "sort_rows": sparsevox.config.sort_rows(), "flax": bool(run.args.flax),
                     "torch_allocator": _torch_allocator_in_use(),
                     "sparsevox": sparsevox.__version__,
                     "torch": torch.__version__, "python": sys.version.split()[0],
                     "step": "points -> torch voxelisation -> fresh Voxels / SparseConvTensor -> model "
                             "(-> loss, backward, SGD step)",
                     "fp16_infer": "sparsevox: float32 model under autocast; spconv: float16 copy of the model "
                                   "on float16 features under autocast (spconv's inference ignores autocast)"},
        "peers": run.peer_info,
        "scenes": run.scene_info,
        "parity": run.parity,
        "autotune": {"warnings": run.tunes.warnings, "tunings": run.tunes.tunings},
        "truncated": run.truncated,
        "elapsed_s": round(run.elapsed(), 1),
        "records": run.records,
    })
    return doc


def run_scene(run: Run, name: str) -> None:
    import torch

    from sparsevox.adapters.torch import MinkUNet
    plan = SCENES[name]
    got = scene_points(plan.source)
    if got is None:
        run.say(f"{name}: skipped (points not found)")
        return
    points, source = got
    xyz, feats, index = batch_points(points, plan.batch)
    vox = Voxeliser(xyz, feats, index, plan.voxel_size, run.device)
    libs = Libraries(run.sp, vox, run.widths, run.compat)
    coords0, feats0 = vox()
    n = int(coords0.shape[0])
    info = {"name": name, "source": source, "voxel_size": plan.voxel_size, "batch": plan.batch,
            "n_points": int(len(xyz)), "n_voxels": n, "in_channels": vox.channels,
            "spatial_shape": vox.spatial_shape}
    run.scene_info.append(info)
    run.say(f"scene {name}: {len(xyz):,} points, batch {plan.batch}, {n:,} voxels at {plan.voxel_size * 100:g} cm, "
            f"{vox.channels} input channels")
    torch.manual_seed(0)
    labels = torch.randint(0, NUM_CLASSES, (n,), device=run.device)
    sv_model = MinkUNet(vox.channels, NUM_CLASSES, widths=run.widths).to(run.device)
    calibrate_batchnorm(sv_model, libs.make_input("sparsevox", coords0, feats0))
    sp_model, sp_error = None, None
    if run.sp is not None:
        try:
            sp_model = libs.build_spconv().to(run.device)
            spm.load_from_sparsevox(sp_model, sv_model)
        except Exception as e:
            log.exception("the spconv model for %s could not be built or loaded", name)
            sp_model, sp_error = None, f"spconv model not built: {_error_text(e)}"
            run.parity[name] = {"error": sp_error}
    if sp_model is not None:
        try:
            par = {"logits": model_parity(sv_model, sp_model, libs, coords0, feats0),
                   "layers": layer_parity(run.sp, libs, coords0)}
        except Exception as e:  # report and go on: the timings do not depend on it
            log.exception("parity check on %s failed", name)
            par = {"error": _error_text(e)}
        run.parity[name] = par
        run.say(f"{name}: spconv vs sparsevox, same weights, relative error: {par}")
        bad = par.get("logits", {}).get("fp32_eval")
        if bad is None or bad > 1e-3:
            log.warning("%s: the spconv model's float32 logits differ from sparsevox's (rel. err %s): check the "
                        "weight conversion (benchmarks/spconv_minkunet.py)", name, bad)
        sp_model.cpu()
    compat_model = planned_model = None
    if run.compat is not None:  # issue 21: the spconv-API model on sparsevox, same weights
        try:
            compat_model = libs.build_compat().to(run.device)
            spm.load_from_sparsevox(compat_model, sv_model)
            with torch.no_grad():
                compat_model.eval()
                sv_model.eval()
                run.parity.setdefault(name, {})["compat_logits_fp32_eval"] = peers_mod.relative_error(
                    compat_model(libs.make_input("compat", coords0, feats0)),
                    sv_model(libs.make_input("sparsevox", coords0, feats0)))
            if run.args.plan_compat:  # the same model with a map plan: its maps built before its first layer
                from sparsevox.adapters.torch import plan_maps
                planned_model = plan_maps(copy.deepcopy(compat_model).cpu())
            compat_model.cpu()
        except Exception as e:
            log.exception("the compat model for %s could not be built or run", name)
            compat_model = planned_model = None
            run.parity.setdefault(name, {})["compat_error"] = _error_text(e)
    sv_model.cpu()
    del coords0, feats0
    flax_model = None
    if run.args.flax:
        try:
            from . import flax_cell
            flax_model = flax_cell.build(sv_model, vox.channels, NUM_CLASSES, run.widths)
        except Exception as e:
            log.exception("the Flax model for %s could not be built", name)
            run.parity.setdefault(name, {})["flax_error"] = _error_text(e)
    models = {"sparsevox": sv_model, "spconv": sp_model, "compat": compat_model, "compat_planned": planned_model,
              "flax": flax_model}
    for mode in run.modes:
        rec = {"op": f"minkunet_{mode}", "scene": name, "n_voxels": n, "batch": plan.batch, "library": "sparsevox",
               "ms": None, "peak_mib": None, "peer": {}, "peer_peak_mib": {}, "ratio": None}
        if sp_error:
            rec["peer_error"] = sp_error
        cells = [("sparsevox", False, None)]
        if sp_model is not None:
            cells.append(("spconv", mode == "fp16_infer", "spconv"))
        if compat_model is not None:
            cells.append(("compat", False, "compat"))
        if planned_model is not None:
            cells.append(("compat_planned", False, "compat_planned"))
        if compat_model is not None and run.args.unplanned_compat:
            cells.append(("compat", False, "compat_unplanned"))
        if run.args.sort_ab:
            cells.append(("sparsevox", False, "sparsevox_rows_sorted"))
        if flax_model is not None and mode in ("fp32_infer", "fp32_train"):
            cells.append(("flax", False, "flax"))
        if run.variants and mode == "fp16_infer":
            cells.append(("sparsevox", True, "sparsevox_half_model"))
            if sp_model is not None:
                cells.append(("spconv", False, "spconv_autocast"))
        results = {}
        for r in range(run.rounds):
            steps = run.steps // run.rounds + (1 if r < run.steps % run.rounds else 0)
            this_round = {}
            for lib, half, key in cells:
                if run.out_of_time():
                    break
                if any("error" in g for g in results.get(key, ())):
                    continue  # failed in an earlier round: reported once
                tuned = run.tunes.tunings
                try:
                    with _rows_sorted(key == "sparsevox_rows_sorted"), _compat_unplanned(key == "compat_unplanned"):
                        got = run_cell(lib, models[lib], mode, libs, labels, run.device,
                                       run.warmup if r == 0 else 1, steps, half, run.tunes)
                except Exception as e:
                    log.exception("%s %s %s failed", name, mode, key or lib)
                    got = {"error": _error_text(e)}
                    if run.device == "cuda":
                        torch.cuda.empty_cache()
                got["tunings"] = run.tunes.tunings - tuned
                this_round[key] = got
            else:
                for key, got in this_round.items():
                    results.setdefault(key, []).append(got)
                continue
            # the budget ran out inside this round: a later round is dropped whole, so every cell keeps the
            # same rounds (the same minutes); a first round keeps what it has
            if r == 0:
                results = {key: [got] for key, got in this_round.items()}
            break
        for lib, half, key in cells:
            if key not in results:
                break
            got = _pooled(results[key])
            what = key or lib
            if "samples" in got:  # every timed step, for the report's intervals (spread vs target)
                rec.setdefault("samples_ms", {})[what] = got.pop("samples")
            if key is None:
                rec.update(got)
                rec["autotuned_during_warmup_and_timing"] = got["tunings"]
            elif key == "spconv":
                rec["peer"]["spconv"] = got.get("ms")
                rec["peer_peak_mib"]["spconv"] = got.get("peak_mib")
                rec.setdefault("peer_model_mib", {})["spconv"] = got.get("model_mib")
                if "error" in got:
                    rec["peer_error"] = got["error"]
            elif key == "flax":
                rec["flax_ms"] = got.get("ms", got.get("error"))
            elif key in ("compat", "compat_planned", "compat_unplanned"):
                rec[f"{key}_ms"] = got.get("ms", got.get("error"))
                if got.get("ms") and rec.get("ms"):
                    rec[f"{key}_overhead"] = round(got["ms"] / rec["ms"] - 1.0, 3)
            else:
                rec.setdefault("variants", {})[key] = got.get("ms", got.get("error"))
            text = got.get("error") or (f"{got['ms']:.2f} ms (min {got['min_ms']:.2f}, max {got['max_ms']:.2f})"
                                        + (f", peak {got['peak_mib']:,.0f} MiB" if got["peak_mib"] else ""))
            run.say(f"{name} {mode} {what}: {text}")
        if rec.get("ms") and rec["peer"].get("spconv"):
            rec["ratio"] = round(rec["peer"]["spconv"] / rec["ms"], 3)
            run.say(f"{name} {mode}: spconv / sparsevox = {rec['ratio']:.2f}")
        if mode == "fp32_infer" and name in run.parity:
            rec["logits_rel_err"] = run.parity[name].get("logits", {}).get("fp32_eval")
        run.records.append(rec)
        if run.out_of_time():
            break
    del models, sv_model, sp_model, compat_model, planned_model, flax_model, vox, libs


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")
    for h in logging.getLogger().handlers:  # the counter lowers sparsevox.autotune to DEBUG: print INFO up
        h.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if not args.cpu:
        from sparsevox.cuda.gpu_info import gpu_available
        ok, why = gpu_available()
        if not ok:
            print(f"benchmarks.end_to_end: no GPU ({why}); use --cpu for a smoke run", file=sys.stderr)
            return 2
    import torch

    import sparsevox
    if not args.cpu:
        torch.backends.cuda.matmul.allow_tf32 = bool(sparsevox.allow_tf32())  # nn.Linear, spconv's 1x1 mm
        torch.backends.cudnn.allow_tf32 = bool(sparsevox.allow_tf32())
    run = Run(args)
    stem = args.stem or provenance.stem("cpu" if args.cpu else "gpu")
    run.say(f"end_to_end: device={run.device} stem={stem} scenes={run.scenes} modes={run.modes} "
            f"warmup={run.warmup} steps={run.steps} peers={run.peer_info}")
    for name in run.scenes:
        if run.out_of_time():
            break
        try:
            run_scene(run, name)
        except Exception as e:  # a scene that cannot even be set up: recorded, the others still run
            log.exception("scene %s failed", name)
            run.scene_info.append({"name": name, "error": _error_text(e)})
        report.write_json(document(run), f"{args.out}/{stem}-end_to_end.json")
        if run.device == "cuda":
            torch.cuda.empty_cache()
    doc = document(run)
    paths = e2e_report.write_all(doc, args.out, stem)
    print(e2e_report.markdown(doc))
    run.say(f"autotune: {run.tunes.warnings} warnings, {run.tunes.tunings} tunings")
    run.say("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
