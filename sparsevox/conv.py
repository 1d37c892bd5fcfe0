"""Sparse convolution: the core forward/backward on NumPy or CuPy arrays, and the public functions.

``conv_forward``/``conv_backward`` are for users who differentiate themselves (NumPy, CuPy); the
framework adapters wrap exactly these two.
"""
from __future__ import annotations

import logging

from . import config
from .tuning import autotune
from ._arrays import array_module, from_core, to_core
from .tuning.algo_inputs import resolve_algos
from .errors import AlgorithmUnavailableError
from .kernel_map import KernelMap, kernel_map
from .tuning.problem import Problem, n_bucket
from .tuning import tune_cache
from .tuning.registry import availability
from .tuning.registry import token as registry_token
from .voxels import Voxels

log = logging.getLogger("sparsevox")

_FLOATS = ("float16", "bfloat16", "float32", "float64")


def _device(a) -> str:
    return "cpu" if array_module(a).__name__ == "numpy" else "gpu"


def _gpu_name(a) -> str:
    if _device(a) == "cpu":
        return ""
    from .cuda.gpu_info import device_name
    return device_name(a.device.id)


def check_conv_args(feats, weight, kmap: KernelMap, op: str = "conv") -> None:
    """Validate shapes, dtypes and devices; raise ``ValueError`` naming the argument."""
    for name, a in (("features", feats), ("weight", weight)):
        if type(a).__module__.split(".")[0] not in ("numpy", "cupy"):
            raise ValueError(f"{name} must be a NumPy or CuPy array here (the core), got {type(a).__module__}."
                             f"{type(a).__name__}: torch tensors go through sparsevox.adapters.torch, JAX arrays "
                             f"through sparsevox.adapters.jax (or pass Voxels to sparsevox.spatially_sparse_conv)")
    if feats.dtype.name not in _FLOATS:
        raise ValueError(f"features dtype must be one of {_FLOATS}, got {feats.dtype.name}")
    if weight.dtype != feats.dtype:
        raise ValueError(f"weight dtype ({weight.dtype.name}) must equal the features dtype ({feats.dtype.name})")
    if feats.ndim != 2:
        raise ValueError(f"features must have shape [N, C], got {tuple(feats.shape)}")
    if feats.shape[0] != kmap.num_in:
        raise ValueError(f"features have {feats.shape[0]} rows but the kernel map expects {kmap.num_in}")
    if _device(feats) != _device(weight):
        raise ValueError(f"weight is on the {_device(weight)} but the features are on the {_device(feats)}")
    if _device(feats) == "gpu":
        devs = {"features": feats.device.id, "weight": weight.device.id, "kernel map": kmap.in_maps.device.id}
        if len(set(devs.values())) > 1:
            raise ValueError(f"all arrays must be on one GPU, got {devs}")
    k = kmap.num_offsets
    if op == "conv":
        if weight.ndim != 3 or weight.shape[0] != k or weight.shape[1] != feats.shape[1]:
            raise ValueError(f"weight must have shape [K={k}, C_in={feats.shape[1]}, C_out], got {tuple(weight.shape)}")
    elif weight.ndim != 2 or weight.shape[0] != k or weight.shape[1] != feats.shape[1]:
        raise ValueError(f"depthwise weight must have shape [K={k}, C={feats.shape[1]}], got {tuple(weight.shape)}")


def problem_of(op, direction, feats, weight, kmap) -> Problem:
    c_out = weight.shape[2] if op == "conv" else weight.shape[1]
    return Problem(op, direction, _device(feats), feats.dtype.name, kmap.num_in, kmap.num_out,
                   feats.shape[1], c_out, kmap.num_offsets, kmap.stride, kmap.kind, _gpu_name(feats),
                   config.allow_tf32() and feats.dtype.name == "float32")


def oracle_of(op: str, direction: str, a, b, kmap: KernelMap):
    """The :class:`~sparsevox.tuning.check.Oracle` of one call: EXPLICIT_GEMM's function of this direction on the
    call's operands (``a``, ``b`` as that function takes them), evaluated in a wider dtype."""
    from .algorithms import explicit_gemm as ex
    from .tuning.check import Oracle
    k = kmap.num_offsets
    prefix = "" if op == "conv" else "depthwise_"
    fn = getattr(ex, prefix + {"fwd": "forward"}.get(direction, direction))
    if direction == "wgrad":
        o = kmap.offsets_host
        depth = max((int(o[j + 1]) - int(o[j]) for j in range(len(o) - 1)), default=1)
        extra = (kmap, k)
    else:
        depth = k * int(a.shape[1]) if op == "conv" else k
        extra = (kmap,)
    return Oracle(fn, a, b, *extra, dtype=a.dtype.name, depth=depth,
                  tf32=config.allow_tf32() and a.dtype.name == "float32")


def select(problem: Problem, algo_input, run, oracle=None):
    """Resolve the algorithm input, drop what cannot run here, and let the autotuner choose.

    ``oracle``: a zero-argument function returning the call's :class:`~sparsevox.tuning.check.Oracle` (built only
    when candidates are checked)."""
    names, explicit = resolve_algos(algo_input, problem.op, "fwd" if problem.direction == "fwd" else "bwd")
    algos, why = availability(problem.op, names, problem)
    if not algos:
        reasons = "; ".join(f"{n}: {r}" for n, r in why.items())
        raise AlgorithmUnavailableError(
            f"no requested {problem.op} algorithm can run on the {problem.device} for {problem.dtype} "
            f"({reasons})" + ("; on CPU arrays only explicit_gemm/explicit runs" if problem.device == "cpu" else ""))
    for n, r in why.items():
        (log.info if explicit else log.debug)("%s %s left out: %s", problem.op, n, r)
    return autotune.choose(problem, algos, run, oracle=oracle, named=explicit)


last_plans: dict = {}  # (op, direction) -> (algorithm name, params) of the latest call, for benchmarks and logs


def plan(op: str, direction: str, feats, weight, kmap: KernelMap, algo_input, run, memo_only: bool = False,
         operands=None):
    """``(algorithm, params)`` for one call: validated and chosen once per distinct call signature.

    A layer called again with the same shapes, dtypes, devices, map sizes and kind, and algorithm input
    skips validation, problem construction and registry filtering, also on a fresh kernel map (every
    training step on a new scan makes new maps): the memo (``tune_cache.plans``, bounded, forgotten with
    the autotuner's choices) is keyed by what the choice depends on, never by the map object, so it
    holds no map (a memo of maps kept every fresh scan's tables alive). ``memo_only``: return None instead
    of planning when this signature has no memoised choice. ``operands``: ``(a, b)`` as this direction's
    EXPLICIT_GEMM function takes them, for the autotuner's accuracy check.
    """
    algo_key = tuple(algo_input) if isinstance(algo_input, list) else algo_input
    env = resolve_algos(algo_input, op, "fwd" if direction == "fwd" else "bwd") if algo_input is None else None
    dev, wdev = getattr(feats, "device", None), getattr(weight, "device", None)
    # Row counts enter bucketed, as in the autotuner's key (scans differ in size every step); the memo's
    # validation is then exact except the rows of feats against the map, checked on every hit.
    key = ("plan", op, direction, type(feats), feats.dtype, feats.ndim, feats.shape[1:], n_bucket(feats.shape[0]),
           type(weight), weight.dtype, weight.shape, getattr(dev, "id", None), getattr(wdev, "id", None),
           getattr(getattr(kmap.offsets, "device", None), "id", None), n_bucket(kmap.num_in),
           n_bucket(kmap.num_out), kmap.num_offsets, kmap.kind, tuple(kmap.stride), algo_key, env,
           config.allow_tf32(), registry_token(op))
    memo = tune_cache.plans
    try:
        choice = memo.get(key)
    except TypeError:  # an unhashable algorithm input: plan without the memo
        choice, key = None, None
    if choice is not None and feats.shape[0] != kmap.num_in:
        check_conv_args(feats, weight, kmap, op)  # raises: the rows do not match the map
    if choice is None:
        if memo_only:
            return None
        check_conv_args(feats, weight, kmap, op)
        oracle = None if operands is None else (lambda: oracle_of(op, direction, *operands, kmap))
        choice = select(problem_of(op, direction, feats, weight, kmap), algo_input, run, oracle)
        if key is not None:
            if len(memo) >= PLAN_MEMO_LIMIT:
                memo.clear()
            memo[key] = choice
    last_plans[(op, direction)] = (choice[0].name, choice[1])
    return choice


PLAN_MEMO_LIMIT = 4096


def conv_forward(feats, weight, kmap: KernelMap, fwd_algo=None):
    """Forward sparse convolution on core arrays.

    Args:
        feats: ``[N_in, C_in]`` NumPy or CuPy array, float16/bfloat16/float32/float64.
        weight: ``[K, C_in, C_out]``, same dtype and device.
        kmap: the :class:`KernelMap` of the layer.
        fwd_algo: algorithm input (see :func:`spatially_sparse_conv`).

    Returns ``[N_out, C_out]`` in the input dtype:
    ``out[o] = sum_k sum_{(i, o) in pairs_k} feats[i] @ weight[k]``.
    """
    return planned_forward("conv", feats, weight, kmap, fwd_algo)


def conv_backward(grad_out, feats, weight, kmap: KernelMap, bwd_algo=None, feats_grad=True, weight_grad=True,
                  gw_dtype=None):
    """Gradients ``(grad_feats [N_in, C_in] or None, grad_weight [K, C_in, C_out] or None)``.

    ``gw_dtype``: the weight gradient's dtype (default: the features'). ``"float32"`` with 16-bit features
    (a float32 parameter run in float16 under autocast) hands over the float32 accumulator unrounded."""
    return planned_backward("conv", weight.shape[2], grad_out, feats, weight, kmap, bwd_algo, feats_grad, weight_grad,
                            gw_dtype)


def planned_forward(op: str, feats, weight, kmap: KernelMap, fwd_algo):
    """``op``'s (``"conv"``, ``"depthwise"``) forward by the algorithm :func:`plan` chooses."""
    algo, params = plan(op, "fwd", feats, weight, kmap, fwd_algo, lambda a, p: a.forward(feats, weight, kmap, **p),
                        operands=(feats, weight))
    return algo.forward(feats, weight, kmap, **params)


def planned_backward(op: str, c_out: int, grad_out, feats, weight, kmap: KernelMap, bwd_algo, feats_grad: bool,
                     weight_grad: bool, gw_dtype=None):
    """``op``'s gradients ``(grad_feats or None, grad_weight or None)`` by the algorithms :func:`plan` chooses
    per direction; ``grad_out`` must be ``[N_out, c_out]`` (cast to the features' dtype). ``grad_weight`` in
    ``gw_dtype`` (default: the features' dtype), cast from the algorithm's accumulator once."""
    if tuple(grad_out.shape) != (kmap.num_out, c_out):
        raise ValueError(f"grad_out must have shape {(kmap.num_out, c_out)}, got {tuple(grad_out.shape)}")
    grad_out = grad_out.astype(feats.dtype, copy=False)
    gf = gw = None
    if feats_grad:
        algo, p = plan(op, "dgrad", feats, weight, kmap, bwd_algo,
                       lambda a, p: a.dgrad(grad_out, weight, kmap, **p), operands=(grad_out, weight))
        gf = algo.dgrad(grad_out, weight, kmap, **p)
    if weight_grad:
        k = kmap.num_offsets
        algo, p = plan(op, "wgrad", feats, weight, kmap, bwd_algo,
                       lambda a, p: a.wgrad(feats, grad_out, kmap, k, **p), operands=(feats, grad_out))
        gw = algo.wgrad(feats, grad_out, kmap, k, out_dtype=gw_dtype, **p)
    return gf, gw


def prepared(op: str, direction: str, feats, weight, kmap: KernelMap, algo_input):
    """The launch object (``launch(a, b, out)`` on raw device addresses, see
    :class:`sparsevox.algorithms.implicit_gemm.Launch`) of the algorithm this call signature runs, or None when
    that algorithm has none. Call it after one ordinary call with the same arguments (which plans and, for
    AUTO, tunes): framework adapters then launch later calls from tensor addresses directly."""
    return _prepared_with_choice(op, direction, feats, weight, kmap, algo_input)[0]


def _prepared_with_choice(op, direction, feats, weight, kmap, algo_input):
    """``(launch object or None, (algorithm, params) or None)`` of :func:`prepared`, planned once."""
    choice = plan(op, direction, feats, weight, kmap, algo_input, None, memo_only=True) if op == "conv" else None
    if choice is None or _device(feats) != "gpu":
        return None, choice
    return prepare_choice(choice, direction, feats.dtype.name, int(feats.shape[1]), int(weight.shape[2]), kmap,
                          int(feats.device.id)), choice


def prepare_choice(choice, direction: str, dtype_name: str, c_in: int, c_out: int, kmap: KernelMap, device_id: int):
    """The launch object of a planned ``(algorithm, params)`` on ``kmap`` (None when the algorithm has
    none): how adapters prepare a fresh map's call from the choice an earlier map of the same layer got."""
    algo, params = choice
    if algo.prepare is None:
        return None
    return algo.prepare(direction, dtype_name, c_in, c_out, kmap, device_id, **params)


def remember_prepared(kmap: KernelMap, key, op: str, direction: str, feats, weight, algo_input):
    """Keep :func:`prepared` for a call that just ran under ``kmap.derived[key]`` (False when there is
    none, so callers do not ask again). Adapters key it by their own call signature. Returns the call's
    ``(algorithm, params)`` when a launch object was made (else None)."""
    if key in kmap.derived:
        return None  # kept by an earlier call, whose plan its caller already has
    prep, choice = _prepared_with_choice(op, direction, feats, weight, kmap, algo_input)
    kmap.derived[key] = prep or False
    return choice if prep else None


def output_voxels_of(voxels, kmap: KernelMap, out_feats, output_voxels=None):
    """Wrap output features as ``Voxels`` of the caller's library, sharing cached geometry."""
    if kmap.kind == "submanifold":
        return voxels.replace(out_feats)
    if isinstance(output_voxels, Voxels):
        return output_voxels.replace(out_feats)
    sites = kmap.derived.get("sites")  # made by strided_output_voxels (a plan built their maps ahead)
    sites = sites() if sites is not None else None
    if sites is not None and sites.origin == voxels.origin:
        return sites.replace(out_feats)
    return Voxels.from_core_coords(kmap.out_coords, out_feats, voxels.origin)


def spatially_sparse_conv(voxels, weight, kernel_size=3, stride=1, dilation=1, transposed=False,
                          generative=False, output_voxels=None, fwd_algo=None, bwd_algo=None):
    """Spatially sparse convolution of ``voxels`` with ``weight``.

    Args:
        voxels: :class:`~sparsevox.Voxels` with feats ``[N, C_in]``.
        weight: ``[K, C_in, C_out]`` with ``K = kx * ky * kz`` (offset index z fastest), same dtype.
        kernel_size, stride, dilation: int or 3-tuple.
        transposed, generative, output_voxels: see :func:`sparsevox.kernel_map`.
        fwd_algo, bwd_algo: an algorithm enum member, its lower-case name, a list of either, ``AUTO``,
            or None (read ``SPARSEVOX_FWD_ALGO_MODE``/``WARPCONVNET_FWD_ALGO_MODE``, else auto).

    Returns ``Voxels`` (feats ``[N_out, C_out]``, input dtype) in the caller's array library.
    ``out[p] = sum_k feats[stride * p + offset_k] @ weight[k]`` (cross-correlation, as PyTorch).
    PyTorch and JAX inputs go through :mod:`sparsevox.adapters` and are differentiable.
    """
    if not isinstance(voxels, Voxels):
        raise ValueError(f"voxels must be a sparsevox.Voxels, got {type(voxels).__name__}")
    lib = voxels.origin.lib
    if lib == "torch":
        from .adapters import torch as adapter
        return adapter.spatially_sparse_conv(voxels, weight, kernel_size, stride, dilation, transposed,
                                             generative, output_voxels, fwd_algo, bwd_algo)
    if lib == "jax":
        from .adapters import jax as adapter
        return adapter.spatially_sparse_conv(voxels, weight, kernel_size, stride, dilation, transposed,
                                             generative, output_voxels, fwd_algo, bwd_algo)
    if bwd_algo is not None:  # no backward runs here (NumPy/CuPy are not differentiated): still a valid name
        resolve_algos(bwd_algo, "conv", "bwd")
    kmap = kernel_map(voxels, kernel_size, stride, dilation, transposed, generative, output_voxels)
    feats, _ = to_core(voxels.feats)
    w, _ = to_core(weight)
    out = conv_forward(feats, w, kmap, fwd_algo)
    return output_voxels_of(voxels, kmap, from_core(out, voxels.origin), output_voxels)
