"""Registers EXPLICIT_GEMM (conv) and EXPLICIT (depthwise); they run on NumPy and CuPy alike."""
from . import explicit_gemm as eg
from ..tuning.registry import Algorithm, register


def _params(direction, problem):
    return [{}]


def _available(problem):
    return True, ""


register("conv", Algorithm("explicit_gemm", eg.forward, eg.dgrad, eg.wgrad, _params, _available))
register("depthwise", Algorithm("explicit", eg.depthwise_forward, eg.depthwise_dgrad, eg.depthwise_wgrad,
                                _params, _available))
