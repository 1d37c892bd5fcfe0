"""PyTorch adapter: differentiable sparse convolutions as ``torch.library`` custom ops, and modules.

The ops take the kernel map as tensors (``in_maps``, ``out_maps`` on the data's device, ``offsets`` on
the CPU) so they compose with ``torch.compile``; the :class:`~sparsevox.KernelMap` object that made
them is found again through a weak table, so algorithm-derived data (reverse maps, masks) stays cached.
Build kernel maps outside compiled regions (:func:`sparsevox.kernel_map`).
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import torch
from torch.autograd.function import once_differentiable

import sparsevox as sv
from sparsevox import _arrays
from sparsevox.geometry import positive_int
from sparsevox.conv import output_voxels_of
from sparsevox.tuning import tune_cache
from sparsevox.tuning.algo_inputs import resolve_algos
from sparsevox.tuning.problem import n_bucket
from sparsevox.tuning.registry import token as registry_token
from sparsevox.kernel_map import KernelMap, live_map, recall

__all__ = ["spatially_sparse_conv", "spatially_sparse_depthwise_conv", "SpatiallySparseConv", "SparseConv3d",
           "SpatiallySparseDepthwiseConv", "kernel_map_tensors", "conv_features", "conv_tensors"]

def _algo_str(value) -> str:
    """Algorithm input → a string that survives the op boundary ("" means None: read the environment)."""
    if value is None:
        return ""
    if type(value) is str:  # the common case, and what the join below makes of it
        return value
    items = value if isinstance(value, (list, tuple)) else [value]
    return ",".join(str(getattr(v, "value", v)) for v in items)


def _algo_value(s: str):
    return None if s == "" else s.split(",")


def kernel_map_tensors(kmap: KernelMap):
    """``(in_maps, out_maps, offsets)`` as torch tensors (zero-copy; offsets int64 on the CPU)."""
    t = kmap.derived.get("torch.tensors")
    if t is None:
        # Made outside inference mode even when the first call runs in it: the map's tensors are saved
        # for backward by later differentiable calls, which inference tensors cannot be.
        with torch.inference_mode(False):
            t = (torch.from_dlpack(kmap.in_maps), torch.from_dlpack(kmap.out_maps),
                 torch.from_numpy(kmap.offsets_host))
        kmap.derived["torch.tensors"] = t
    return t


def _core_map(in_maps, out_maps, offsets, num_in: int, num_out: int) -> KernelMap:
    # The tensors share memory with the live map's arrays: look it up by address before wrapping them.
    kmap = live_map(in_maps.data_ptr(), out_maps.data_ptr(), in_maps.shape[0], num_in, num_out)
    if kmap is not None:
        return kmap
    return recall(_arrays.to_core(in_maps)[0], _arrays.to_core(out_maps)[0], offsets.numpy(), num_in, num_out)


def _stream(t: torch.Tensor):
    if t.device.type != "cuda":
        return contextlib.nullcontext()
    return _arrays.on_caller_stream(_arrays.Origin("torch", t.device))


# --- the ops -------------------------------------------------------------------------------------
# One definition serves both convolutions: each becomes a pair of custom ops (forward, backward) with
# fake kernels and autograd for torch.compile, and a plain autograd.Function for eager calls, because
# ``torch.library.custom_op`` dispatch costs ~300 µs of host time per call in torch 2.11 (measured on
# the H100: 376 µs through the op vs 53 µs for the core call), more than a small layer's kernel.

# The bwd algorithm is not an input of the forward op (it would be an argument the forward ignores);
# under torch.compile it travels from the caller to setup_context through a context variable instead.
_BWD_ALGO: contextvars.ContextVar[str] = contextvars.ContextVar("sparsevox_bwd_algo", default="")


# --- prepared launches ------------------------------------------------------------------------------
# After one ordinary call of a signature (dtype, shapes, devices, algorithm input) on a CUDA map, the
# chosen algorithm's launch object (sparsevox.conv.prepared) is kept on the map; later calls launch from
# the tensors' addresses on torch's current stream, skipping the CuPy views, the DLPack hand-back and the
# planning (measured on the H100: ~100 µs of host time per call otherwise). Eager forwards get their
# output from a spare allocated after the previous call's launch (see SPARE_OUTPUT_MAX_BYTES).
# False marks "no prepared launch for this signature" so the slow path is not asked again.
# The launches go to the CUDA driver with torch's raw stream handle (no CuPy stream object to enter),
# and CuPy's device context is entered only when the caller's current device is another one.

def _prepared(kmap, key):
    return kmap.derived.get(key) if kmap.in_maps.__class__.__module__.startswith("cupy") else False


def _signature(direction: str, name: str, feats, weight, kmap, algo: str):
    """The key in ``tune_cache.plans`` of a call's ``(algorithm, params)`` without the map (row counts
    bucketed as the autotuner buckets them): what the next fresh map of the same layer reuses to make its
    launch object at once, skipping the core call of a first use (CuPy views, planning, the output's
    hand-back). ``algo`` as :func:`_algo_str` makes it."""
    env = resolve_algos(None, "conv", "fwd" if direction == "fwd" else "bwd") if algo == "" else None
    return ("torch.signature", direction, name, feats.device, weight.device, feats.dtype, feats.shape[1:],
            weight.shape, algo, env, sv.allow_tf32(), n_bucket(kmap.num_in), n_bucket(kmap.num_out),
            kmap.num_offsets, kmap.kind, tuple(kmap.stride), registry_token("conv"))


def _from_signature(kmap, key, sig, direction, feats, weight):
    """The launch object of a fresh map (stored under ``kmap.derived[key]``) for a layer signature an
    earlier map planned, or None when none did or the arguments do not fit the map (the core call then
    runs and raises what it raises)."""
    choice = tune_cache.plans.get(sig)
    if choice is None or not feats.is_cuda or feats.shape[0] != kmap.num_in or weight.ndim != 3 \
            or weight.shape[0] != kmap.num_offsets or feats.get_device() != kmap.offsets.device.id:
        return None
    dtype_name = str(feats.dtype).rpartition(".")[2]
    prep = sv.conv.prepare_choice(choice, direction, dtype_name, int(weight.shape[1]), int(weight.shape[2]), kmap,
                                  feats.get_device()) or False
    kmap.derived[key] = prep
    return prep


def _forward_launch(kmap, key, name, feats, weight, fwd_algo):
    """``(prep, sig)``: the forward's launch object kept on ``kmap`` under ``key``, else (a convolution on a
    fresh map) the one made from the plan of its layer signature ``sig`` (None when none was planned: the
    core call runs); ``sig`` is None when the launch was already on the map."""
    prep = _prepared(kmap, key)
    if prep is not None or name != "conv":
        return prep, None
    sig = _signature("fwd", name, feats, weight, kmap, fwd_algo)
    with _stream(feats):  # its tables are built on the caller's device and stream
        return _from_signature(kmap, key, sig, "fwd", feats, weight), sig


def _remember(kmap, key, sig, name, direction, f, w, algo):
    """After a core call: keep its launch object on the map and its plan under the layer's signature."""
    choice = sv.conv.remember_prepared(kmap, key, name, direction, f, w, _algo_value(algo))
    if choice is not None and sig is not None:
        tune_cache.plans[sig] = choice


def _fwd_key(name: str, feats, weight, fwd_algo: str):
    """The key of a forward's prepared launch in ``kmap.derived`` (``fwd_algo`` as :func:`_algo_str` makes it)."""
    return ("torch.fwd", name, feats.device, weight.device, feats.dtype, feats.shape, weight.shape, fwd_algo,
            sv.allow_tf32())


# An eager prepared forward's output of at most this many bytes is allocated one call ahead: right after
# a launch, the next call's output is allocated while the kernel runs, so the next launch does not wait
# for torch.empty (~7 µs of host time on the H100 host for a 10 MB tensor, the largest item before a
# small layer's launch). Costs one spare output per kernel map and layer signature, held while the map
# is cached (on its Voxels) and not returned by torch.cuda.empty_cache(); 0 turns it off.
# 1 MiB, not 16: in a step on fresh maps every (map, signature) keeps its last spare until the step ends,
# unused (SemanticKITTI's level-0 outputs are 11.7 MB each in float16), and a host-bound step gains nothing
# from moving torch.empty after the launch; the small layers, where a launch waits on the host, keep it.
SPARE_OUTPUT_MAX_BYTES = 1 << 20


def _fast_forward(prep, feats, weight, key=None, kmap=None):
    """Launch ``prep`` on torch's current stream into a new output; None when the inputs do not suit it.

    With ``key`` and ``kmap`` (the launch's entry in ``kmap.derived``; eager calls only), a small output
    is allocated one call ahead (:data:`SPARE_OUTPUT_MAX_BYTES`). A spare is handed out once, and only to
    a call on the stream it was allocated on, in the same inference mode (an inference tensor must not
    reach a differentiable call), outside CUDA graph capture (whose allocations belong to the graph's
    pool); a spare that cannot be allocated (out of memory) is simply not made."""
    if not (feats.is_contiguous() and weight.is_contiguous()):
        return None
    dev = feats.get_device()
    stream = _arrays.torch_stream_handle(torch, dev)
    with _arrays.on_device(dev):  # the capture check reads torch's current stream of the current device
        out = None
        if key is not None and not torch.cuda.is_current_stream_capturing():
            inference = torch.is_inference_mode_enabled()
            spare = kmap.derived.pop(("spare",) + key, None)
            if spare is not None and spare[1] == stream and spare[2] == inference:
                out = spare[0]
        else:
            key = None
        if out is None:
            out = torch.empty(prep.out_shape, dtype=feats.dtype, device=feats.device)
        if not prep.launch(feats.data_ptr(), weight.data_ptr(), out.data_ptr(), stream):
            return None
        if key is not None and out.numel() * out.element_size() <= SPARE_OUTPUT_MAX_BYTES:
            try:
                kmap.derived[("spare",) + key] = (torch.empty_like(out), stream, inference)
            except torch.OutOfMemoryError:
                pass
    return out


def _eager_forward(feats, weight, kmap, fwd_algo):
    """:func:`conv_features`' forward when nothing is differentiated and no compilation is active, on CUDA
    tensors of one device (else None): under autocast the inputs are cast here; then the prepared launch
    when an earlier call prepared this signature on ``kmap``, else the forward implementation directly.
    Skips what lies between (the map as tensors, the checks and dispatch of the autograd path, the
    live-map lookup by address): ~5 µs before a small layer's launch, and the second pass through those
    checks of a float16 inference step's every layer (autocast)."""
    if torch.compiler.is_compiling() or not feats.is_cuda or weight.device != feats.device \
            or _needs_function(feats, weight):
        return None
    if torch.is_autocast_enabled("cuda"):
        feats, weight = _autocast(feats, weight)
    if weight.dtype != feats.dtype:
        return None  # the checked path raises what it raises
    algo = _algo_str(fwd_algo)
    key = _fwd_key("conv", feats, weight, algo)
    prep = kmap.derived.get(key)
    out = _fast_forward(prep, feats, weight, key, kmap) if prep else None
    if out is not None:
        return out
    return _ConvFunction.impls[0](feats, weight, None, None, None, kmap.num_out, algo, kmap=kmap)


_REVERSED: dict = {}  # (K, device) -> int64 [K - 1, ..., 0] on that device
# A parameter's gradient in its own dtype when autocast ran the layer in another: the algorithms cast their
# float32 accumulator to it once (a float32 parameter gets the accumulator as it is, as the prepared launches
# hand it over), not rounded to the features' 16 bits first and cast again by the adapter.
_GRAD_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16"}


def _dgrad_weight(weight, flip: bool):
    """``[K, C_out, C_in]`` contiguous: ``W[k]^T``, with the offsets reversed when ``flip`` (a mirrored
    submanifold dgrad), in one copy (flip, then transpose and contiguous, were two)."""
    wt = weight.transpose(1, 2)
    if not flip:
        return wt.contiguous()
    key = (weight.shape[0], weight.device)
    rev = _REVERSED.get(key)
    if rev is None:
        rev = torch.arange(weight.shape[0] - 1, -1, -1, device=weight.device)
        if not (rev.is_cuda and torch.cuda.is_current_stream_capturing()):  # a captured one: the graph's pool
            _REVERSED[key] = rev
    return torch.index_select(wt, 0, rev)


def _fast_backward(dprep, wprep, grad_out, feats, weight, gw_dtype):
    """``(grad_feats or None, grad_weight or None)`` through prepared launches, or None to take the slow path.
    The weight's gradient comes in ``gw_dtype`` (the wgrad accumulator's float32 as it is, when the caller's
    weight is float32 and autocast ran the layer in 16 bits)."""
    if not (feats.is_contiguous() and weight.is_contiguous()):
        return None
    gf = gw = None
    dev = feats.get_device()
    stream = _arrays.torch_stream_handle(torch, dev)
    with _arrays.on_device(dev):
        if dprep is not None:
            wt = _dgrad_weight(weight, dprep.flip_b)
            gf = torch.empty(dprep.out_shape, dtype=feats.dtype, device=feats.device)
            if not dprep.launch(grad_out.data_ptr(), wt.data_ptr(), gf.data_ptr(), stream):
                return None
        if wprep is not None:
            acc = torch.zeros(wprep.out_shape, dtype=getattr(torch, wprep.acc_dtype), device=feats.device)
            if not wprep.launch(feats.data_ptr(), grad_out.data_ptr(), acc.data_ptr(), stream):
                return None
            gw = acc if acc.dtype == gw_dtype else acc.to(gw_dtype)
    return gf, gw


def _define(name: str, core_forward, core_backward, out_channels):
    """Register ``sparsevox::<name>_fwd``/``_bwd`` and return ``(eager autograd.Function, forward op)``."""

    def fwd_impl(feats, weight, in_maps, out_maps, offsets, num_out, fwd_algo, eager=True, kmap=None):
        # eager=False (the registered op, run by compiled graphs): no spare outputs, whose memory would
        # outlive the call outside the allocator state a compiled graph (cudagraph trees) manages.
        if kmap is None:
            with _stream(feats):  # a recalled map's offsets are made on the stream that will read them
                kmap = _core_map(in_maps, out_maps, offsets, feats.shape[0], num_out)
        key = _fwd_key(name, feats, weight, fwd_algo)
        prep, sig = _forward_launch(kmap, key, name, feats, weight, fwd_algo)
        fresh = sig is not None
        if prep:
            # A spare output only from this map's second call of the signature on: a fresh map's layers
            # are mostly called once (a new scan every step), and an unused spare is memory held per layer.
            out = _fast_forward(prep, feats, weight, key if eager and not fresh else None, kmap)
            if out is not None:
                return out
        with _stream(feats):
            f, origin = _arrays.to_core(feats)
            w, _ = _arrays.to_core(weight)
            out = _arrays.from_core(core_forward(f, w, kmap, _algo_value(fwd_algo)), origin)
            if prep is None:
                _remember(kmap, key, sig, name, "fwd", f, w, fwd_algo)
            return out

    def bwd_impl(grad_out, feats, weight, in_maps, out_maps, offsets, bwd_algo, feats_grad, weight_grad,
                 kmap=None, gw_dtype=None):
        gw_dtype = gw_dtype or weight.dtype
        if kmap is None:
            with _stream(feats):
                kmap = _core_map(in_maps, out_maps, offsets, feats.shape[0], grad_out.shape[0])
        grad_out = grad_out.contiguous()
        base = (name, feats.device, feats.dtype, feats.shape, weight.shape, bwd_algo, sv.allow_tf32())
        dkey, wkey = ("torch.dgrad",) + base, ("torch.wgrad",) + base
        dprep = _prepared(kmap, dkey) if feats_grad else None
        wprep = _prepared(kmap, wkey) if weight_grad else None
        dsig = wsig = None
        if name == "conv" and tuple(grad_out.shape) == (kmap.num_out, weight.shape[-1]) \
                and ((feats_grad and dprep is None) or (weight_grad and wprep is None)):
            with _stream(feats):  # tables on the caller's device and stream (autograd's, in backward)
                if feats_grad and dprep is None:
                    dsig = _signature("dgrad", name, feats, weight, kmap, bwd_algo)
                    dprep = _from_signature(kmap, dkey, dsig, "dgrad", feats, weight)
                if weight_grad and wprep is None:
                    wsig = _signature("wgrad", name, feats, weight, kmap, bwd_algo)
                    wprep = _from_signature(kmap, wkey, wsig, "wgrad", feats, weight)
        if (feats_grad or weight_grad) and (dprep or not feats_grad) and (wprep or not weight_grad) \
                and grad_out.dtype == feats.dtype:
            got = _fast_backward(dprep, wprep, grad_out, feats, weight, gw_dtype)
            if got is not None:
                gf, gw = got
                return (gf if gf is not None else torch.zeros_like(feats),
                        gw if gw is not None else torch.zeros_like(weight, dtype=gw_dtype))
        with _stream(feats):
            g, origin = _arrays.to_core(grad_out)
            f, _ = _arrays.to_core(feats)
            w, _ = _arrays.to_core(weight)
            gf, gw = core_backward(g, f, w, kmap, _algo_value(bwd_algo), feats_grad, weight_grad,
                                   _GRAD_DTYPE_NAMES.get(gw_dtype) if gw_dtype != weight.dtype else None)
            if feats_grad and dprep is None:
                _remember(kmap, dkey, dsig, name, "dgrad", f, w, bwd_algo)
            if weight_grad and wprep is None:
                _remember(kmap, wkey, wsig, name, "wgrad", f, w, bwd_algo)
            gf = _arrays.from_core(gf, origin) if gf is not None else torch.zeros_like(feats)
            gw = _arrays.from_core(gw, origin) if gw is not None else torch.zeros_like(weight)
            return gf, gw.to(gw_dtype)

    def fwd(feats: torch.Tensor, weight: torch.Tensor, in_maps: torch.Tensor, out_maps: torch.Tensor,
            offsets: torch.Tensor, num_out: int, fwd_algo: str) -> torch.Tensor:
        return fwd_impl(feats, weight, in_maps, out_maps, offsets, num_out, fwd_algo, eager=False)

    def bwd(grad_out: torch.Tensor, feats: torch.Tensor, weight: torch.Tensor, in_maps: torch.Tensor,
            out_maps: torch.Tensor, offsets: torch.Tensor, bwd_algo: str, feats_grad: bool,
            weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return bwd_impl(grad_out, feats, weight, in_maps, out_maps, offsets, bwd_algo, feats_grad, weight_grad)

    fwd_op = torch.library.custom_op(f"sparsevox::{name}_fwd", fwd, mutates_args=())
    bwd_op = torch.library.custom_op(f"sparsevox::{name}_bwd", bwd, mutates_args=())
    fwd_op.register_fake(lambda feats, weight, in_maps, out_maps, offsets, num_out, fwd_algo:
                         feats.new_empty((num_out, out_channels(feats, weight))))
    bwd_op.register_fake(lambda grad_out, feats, weight, *rest: (torch.empty_like(feats), torch.empty_like(weight)))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:5])
        ctx.bwd_algo = _BWD_ALGO.get()

    def backward(ctx, grad):
        need_f, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gf, gw = bwd_op(grad, *ctx.saved_tensors, ctx.bwd_algo, need_f, need_w)
        return gf if need_f else None, gw if need_w else None, None, None, None, None, None

    fwd_op.register_autograd(backward, setup_context=setup_context)

    class Eager(torch.autograd.Function):
        """``apply(feats, weight, kmap, fwd_algo, bwd_algo)``: the map object itself, not its tensors
        (making those costs two DLPack hand-overs and a lookup by address per call on a fresh map), and
        the node keeps it for backward: the coarse levels' Voxels (which own their maps) are gone by
        then, and a map recalled from bare tensors has none of the derived tables, plans or prepared
        launches (every backward call of a fresh scan rebuilt them). After its backward the node keeps
        only the map's index arrays (a graph kept alive by an output must not hold every map's tables
        and launches); a retained graph's next backward finds the map again from them."""

        @staticmethod
        def forward(ctx, feats, weight, kmap, fwd_algo, bwd_algo):
            # A weight in another dtype than the features (a float32 parameter under autocast) is cast
            # here, outside the graph: its gradient is the wgrad accumulator's float32 itself, not one
            # rounded to 16 bits and cast back by a separate autograd node (two casts and a node per layer).
            w = weight if weight.dtype == feats.dtype else weight.to(feats.dtype)
            ctx.save_for_backward(feats, w)
            ctx.bwd_algo, ctx.kmap, ctx.gw_dtype = bwd_algo, kmap, weight.dtype
            return fwd_impl(feats, w, None, None, None, kmap.num_out, fwd_algo, kmap=kmap)

        @staticmethod
        @once_differentiable  # the gradients are raw launches: a second derivative must raise, not be 0
        def backward(ctx, grad):
            need_f, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            feats, weight = ctx.saved_tensors
            kmap = ctx.kmap if isinstance(ctx.kmap, KernelMap) else recall(*ctx.kmap)
            ctx.kmap = (kmap.in_maps, kmap.out_maps, kmap.offsets_host, kmap.num_in, kmap.num_out)
            gf, gw = bwd_impl(grad, feats, weight, None, None, None, ctx.bwd_algo, need_f, need_w, kmap=kmap,
                              gw_dtype=ctx.gw_dtype)
            return gf if need_f else None, gw if need_w else None, None, None, None

    Eager.__name__ = Eager.__qualname__ = f"{name}_function"
    Eager.impls = (fwd_impl, bwd_impl)  # the bare implementations, for host-cost diagnostics
    return Eager, fwd_op


_ConvFunction, _conv_fwd = _define("conv", sv.conv_forward, sv.conv_backward, lambda f, w: w.shape[2])
_DepthwiseFunction, _dw_fwd = _define("depthwise", sv.depthwise_forward, sv.depthwise_backward,
                                      lambda f, w: f.shape[1])


_forward_ad = torch.autograd.forward_ad


def _needs_function(*tensors) -> bool:
    """Whether an eager call must go through the autograd.Function: a gradient can flow to an input, a
    forward-AD level is open, functorch transforms are active (where the Function decides, as before), or
    torch.jit.trace records the call (the Function is one node of the trace; the forward alone would
    leave only its torch.empty there). Otherwise the forward runs alone, as the Function would run it
    under no_grad (the output has no grad_fn either way), without the Function's ~6 µs of host time."""
    return ((torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
            or getattr(_forward_ad, "_current_level", 0) >= 0 or torch._C._are_functorch_transforms_active()
            or torch.jit.is_tracing())


def _apply(function, op, feats, weight, kmap, num_out, fwd_algo, bwd_algo, tensors=None):
    """Eager: the autograd.Function on the map object (or the forward alone when nothing is
    differentiated); under torch.compile: the registered custom op on the map as tensors (``tensors``
    when the caller has them, else made from ``kmap``, which may then be None)."""
    if not torch.compiler.is_compiling():
        if not _needs_function(feats, weight):
            fwd_impl = function.impls[0]
            return fwd_impl(feats, weight, None, None, None, num_out, _algo_str(fwd_algo), kmap=kmap)
        return function.apply(feats, weight, kmap, _algo_str(fwd_algo), _algo_str(bwd_algo))
    in_maps, out_maps, offsets = tensors if tensors is not None else kernel_map_tensors(kmap)
    if bwd_algo is None:  # nothing to pass on (keeps the traced call free of context-variable traffic)
        return op(feats, weight, in_maps, out_maps, offsets, num_out, _algo_str(fwd_algo))
    token = _BWD_ALGO.set(_algo_str(bwd_algo))
    try:
        return op(feats, weight, in_maps, out_maps, offsets, num_out, _algo_str(fwd_algo))
    finally:
        _BWD_ALGO.reset(token)


def _autocast(*tensors):
    """Under ``torch.autocast("cuda")`` run in the autocast dtype (float32 accumulation inside)."""
    t0 = tensors[0]
    if t0.is_cuda and torch.is_autocast_enabled("cuda"):
        dt = torch.get_autocast_dtype("cuda")
        return tuple(t.to(dt) if t.is_floating_point() else t for t in tensors)
    return tensors


def _checked(feats, weight, what: str = "weight", cast_inside: bool = False):
    """``(feats, weight)`` in the autocast dtype, checked to share a dtype and a device (errors name the
    weight argument ``what``). ``cast_inside``: under autocast, leave a floating-point weight in its own
    dtype when the eager autograd.Function will run (it casts the weight itself and returns the weight's
    gradient in the weight's dtype)."""
    for name, t in (("features", feats), (what, weight)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor (this is the torch adapter), got {type(t).__module__}."
                             f"{type(t).__name__}")
    if cast_inside and weight.is_floating_point() and feats.is_cuda and torch.is_autocast_enabled("cuda") \
            and not torch.compiler.is_compiling() and _needs_function(feats, weight):
        (feats,) = _autocast(feats)
        if weight.device != feats.device:
            raise ValueError(f"{what} is on {weight.device} and the features on {feats.device}: both must be on "
                             f"one device")
        return feats, weight
    feats, weight = _autocast(feats, weight)
    if weight.dtype != feats.dtype:
        raise ValueError(f"{what} dtype ({weight.dtype}) must equal the features dtype ({feats.dtype})")
    if weight.device != feats.device:
        raise ValueError(f"{what} is on {weight.device} and the features on {feats.device}: both must be on "
                         f"one device")
    return feats, weight


def conv_features(feats, weight, kmap: KernelMap, fwd_algo=None, bwd_algo=None):
    """Differentiable ``[N_out, C_out]`` features of a convolution with a prebuilt kernel map."""
    out = _eager_forward(feats, weight, kmap, fwd_algo)
    if out is not None:
        return out
    feats, weight = _checked(feats, weight, cast_inside=True)
    return _apply(_ConvFunction, _conv_fwd, feats, weight, kmap, kmap.num_out, fwd_algo, bwd_algo)


def conv_tensors(feats, weight, in_maps, out_maps, offsets, num_out: int, fwd_algo=None, bwd_algo=None):
    """:func:`conv_features` with the map as tensors (:func:`kernel_map_tensors`): the form to use inside
    ``torch.compile(fullgraph=True)``, where kernel maps must come in from outside. Under autocast inside a
    compiled graph the weight is cast before the registered op (it takes one dtype), so a float32 weight's
    gradient is the 16-bit one cast back; eager calls get the float32 accumulator, as conv_features does."""
    feats, weight = _checked(feats, weight, cast_inside=True)
    kmap = None if torch.compiler.is_compiling() else _core_map(in_maps, out_maps, offsets, feats.shape[0], num_out)
    return _apply(_ConvFunction, _conv_fwd, feats, weight, kmap, num_out, fwd_algo, bwd_algo,
                  (in_maps, out_maps, offsets))


def _is_pointwise(kernel_size, stride, transposed, generative, feats, fwd_algo, bwd_algo) -> bool:
    """A 1x1x1 stride-1 submanifold convolution left to ``auto`` is a matrix product of the features with
    ``W[0]``: no kernel map, no gather (spconv does the same). Not taken where it would change the
    arithmetic: float32 while torch allows TF32 matmuls and sparsevox does not, or 16-bit CPU tensors."""
    if transposed or generative or kernel_size not in (1, (1, 1, 1)) or stride not in (1, (1, 1, 1)):
        return False
    if resolve_algos(fwd_algo, "conv", "fwd")[1] or resolve_algos(bwd_algo, "conv", "bwd")[1]:
        return False  # an algorithm the user named runs
    if feats.dtype == torch.float32 and feats.is_cuda:
        return torch.backends.cuda.matmul.allow_tf32 <= sv.config.allow_tf32()
    return feats.is_cuda or feats.dtype in (torch.float32, torch.float64)


@contextlib.contextmanager
def _float32_accumulation(feats=None):
    """16-bit cuBLAS GEMMs with float32 reductions (DESIGN: accumulation is float32 or wider); torch lets
    them reduce in 16 bits by default. The flags are process-wide: set for the call, then restored.
    Given ``feats``, nothing is touched unless they are 16-bit CUDA tensors (the flags govern only those
    GEMMs; setting and restoring them cost ~8 µs of a 1x1 layer's ~30 µs of host time on the CPU)."""
    if feats is not None and not (feats.is_cuda and feats.dtype in (torch.float16, torch.bfloat16)):
        yield
        return
    m = torch.backends.cuda.matmul
    saved = m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction
    if not any(saved):
        yield
        return
    m.allow_fp16_reduced_precision_reduction = m.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction = saved


def spatially_sparse_conv(voxels, weight, kernel_size=3, stride=1, dilation=1, transposed=False,
                          generative=False, output_voxels=None, fwd_algo=None, bwd_algo=None):
    """Differentiable :func:`sparsevox.spatially_sparse_conv` for torch ``Voxels`` (same arguments)."""
    feats = voxels.feats
    if (output_voxels is None and isinstance(weight, torch.Tensor) and weight.shape[0] == 1
            and _is_pointwise(kernel_size, stride, transposed, generative, feats, fwd_algo, bwd_algo)):
        if weight.ndim != 3 or weight.shape[1] != feats.shape[1]:
            raise ValueError(f"weight must have shape [K=1, C_in={feats.shape[1]}, C_out], got {tuple(weight.shape)}")
        feats, w = _autocast(feats, weight)
        if w.dtype != feats.dtype:
            raise ValueError(f"weight dtype ({w.dtype}) must equal the features dtype ({feats.dtype})")
        with _float32_accumulation(feats):
            return voxels.replace(feats @ w[0])
    kmap = sv.kernel_map(voxels, kernel_size, stride, dilation, transposed, generative, output_voxels)
    out = conv_features(voxels.feats, weight, kmap, fwd_algo, bwd_algo)
    return output_voxels_of(voxels, kmap, out, output_voxels)


# --- depthwise ---------------------------------------------------------------------------------

def spatially_sparse_depthwise_conv(input_features, depthwise_weight, kernel_map, num_out_coords,
                                    fwd_algo=None, bwd_algo=None):
    """Differentiable depthwise convolution: features ``[N_in, C]``, weight ``[K, C]`` → ``[num_out_coords, C]``.

    ``kernel_map`` is a :class:`~sparsevox.KernelMap` or an ``(in_maps, out_maps, offsets)`` tuple."""
    from sparsevox.depthwise import _as_kmap
    kmap = _as_kmap(kernel_map, input_features.shape[0], int(num_out_coords))
    feats, weight = _checked(input_features, depthwise_weight, "depthwise_weight", cast_inside=True)
    return _apply(_DepthwiseFunction, _dw_fwd, feats, weight, kmap, kmap.num_out, fwd_algo, bwd_algo)


# --- modules --------------------------------------------------------------------------------------

def _set_geometry(layer, kernel_size, stride, dilation, transposed, generative, fwd_algo, bwd_algo,
                  op: str = "conv") -> int:
    """Store a layer's normalised geometry and algorithm inputs; return its number of offsets K."""
    from sparsevox.geometry import triple
    layer.kernel_size = triple(kernel_size, "kernel_size")
    layer.stride = triple(stride, "stride")
    layer.dilation = triple(dilation, "dilation")
    layer.transposed, layer.generative = bool(transposed), bool(generative)
    for value, direction in ((fwd_algo, "fwd"), (bwd_algo, "bwd")):
        if value is not None:  # a misspelt name fails here, not at the first forward (or backward)
            resolve_algos(value, op, direction)
    layer.fwd_algo, layer.bwd_algo = fwd_algo, bwd_algo
    return math.prod(layer.kernel_size)


class SpatiallySparseConv(torch.nn.Module):
    """A sparse convolution layer: ``Voxels [N, C_in] → Voxels [N_out, C_out]``.

    Weight ``[K, C_in, C_out]`` (K = kx·ky·kz, offset index z fastest), Kaiming-uniform initialised like
    ``torch.nn.Conv3d``; optional bias ``[C_out]``. ``forward(voxels, output_voxels=None)``; pass
    ``output_voxels`` (the finer level) to a non-generative transposed layer.
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, dilation=1, transposed=False,
                 generative=False, bias=True, fwd_algo=None, bwd_algo=None, device=None, dtype=None):
        super().__init__()
        self.in_channels = positive_int(in_channels, "in_channels")
        self.out_channels = positive_int(out_channels, "out_channels")
        k = _set_geometry(self, kernel_size, stride, dilation, transposed, generative, fwd_algo, bwd_algo)
        self.weight = torch.nn.Parameter(torch.empty(k, self.in_channels, self.out_channels, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.empty(self.out_channels, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        fan_in = self.in_channels * self.weight.shape[0]
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) as nn.Conv3d
        torch.nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            torch.nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, voxels, output_voxels=None):
        out = spatially_sparse_conv(voxels, self.weight, self.kernel_size, self.stride, self.dilation,
                                    self.transposed, self.generative, output_voxels, self.fwd_algo, self.bwd_algo)
        if self.bias is not None:
            out = out.replace(out.feats + self.bias.to(out.feats.dtype))
        return out

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"dilation={self.dilation}")
        if self.transposed:
            s += ", transposed=True"
        if self.generative:
            s += ", generative=True"
        if self.bias is None:
            s += ", bias=False"
        if self.fwd_algo is not None or self.bwd_algo is not None:
            s += f", fwd_algo={self.fwd_algo}, bwd_algo={self.bwd_algo}"
        return s


class SparseConv3d(SpatiallySparseConv):
    """spconv/TorchSparse-style name for :class:`SpatiallySparseConv` (stride 1 = submanifold)."""


class SpatiallySparseDepthwiseConv(torch.nn.Module):
    """Depthwise sparse convolution: weight ``[K, C]``, optional bias ``[C]``; ``forward(voxels, output_voxels=None)``."""

    def __init__(self, channels, kernel_size=3, stride=1, dilation=1, transposed=False, generative=False,
                 bias=True, fwd_algo=None, bwd_algo=None, device=None, dtype=None):
        super().__init__()
        self.channels = positive_int(channels, "channels")
        k = _set_geometry(self, kernel_size, stride, dilation, transposed, generative, fwd_algo, bwd_algo,
                          "depthwise")
        self.weight = torch.nn.Parameter(torch.empty(k, self.channels, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.empty(self.channels, device=device, dtype=dtype)) if bias else None
        bound = 1.0 / math.sqrt(k)
        torch.nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            torch.nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, voxels, output_voxels=None):
        kmap = sv.kernel_map(voxels, self.kernel_size, self.stride, self.dilation, self.transposed,
                             self.generative, output_voxels)
        out = spatially_sparse_depthwise_conv(voxels.feats, self.weight, kmap, kmap.num_out,
                                              self.fwd_algo, self.bwd_algo)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return output_voxels_of(voxels, kmap, out, output_voxels)

    def extra_repr(self):
        return (f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"dilation={self.dilation}" + ("" if self.bias is not None else ", bias=False"))
