"""``install()``: make ``import spconv`` resolve to sparsevox's compat modules, for model code that does not
import ``spconv.pytorch`` in one place that could be changed.

Detection and import code in the codebases spconv users run, which the one-line change cannot reach:
mmdetection3d registers its spconv 2 layers only when ``import spconv`` works and
``spconv.__version__ >= '2.0.0'`` (else it silently falls back to mmcv's spconv 1.x port); OpenPCDet's
``spconv_utils`` reads ``float(spconv.__version__[2:])`` and sets ``spconv.constants.SPCONV_USE_DIRECT_TABLE``;
CenterPoint looks for the package with ``importlib.util.find_spec("spconv")``; many files say
``from spconv.pytorch import ...`` or ``from spconv.core import ConvAlgo``. After :func:`install` every one of
those resolves here: ``spconv`` (``__version__`` ``"2.3.8"``, ``SPCONV_VERSION_NUMBERS``, ``ConvAlgo``,
``AlgoHint``, ``constants``, ``core``, ``utils``), ``spconv.pytorch`` and its submodules (``conv``, ``core``,
``modules``, ``pool``, ``ops``, ``functional``, ``utils``, ``tables``, ``identity``). spconv's submodules that
have no counterpart here (``spconv.pytorch.hash``, ``quantization``, ``cppcore``, ``spatial``,
``interpreter``; ``spconv.utils``' cumm-based voxelisers and box ops) import, and their names raise
``NotImplementedError`` naming the feature when used.
"""
from __future__ import annotations

import importlib.machinery
import sys
import types

from ._unsupported import attribute_error

SPCONV_VERSION = "2.3.8"  # the version whose behaviour compat reproduces (and reports)

# spconv.pytorch's submodules that compat does not provide: {name: (what, spconv 2.3.8's public names (None:
# every public name: int8 only), hint)}. Their names raise NotImplementedError; other names stay
# AttributeErrors (an ImportError for `from ... import`), as in spconv, so fallbacks written for spconv 1
# names keep working and hasattr answers.
_MISSING_PYTORCH = {
    "hash": ("spconv.pytorch.hash", ("HashTable",), "a GPU hash table"),
    "quantization": ("spconv.pytorch.quantization", None, "int8 sparse convolution"),
    "cppcore": ("spconv.pytorch.cppcore", ("TorchAllocator", "TorchSpconvMatmul", "ExternalAllocator",
                                           "ExternalSpconvMatmul", "get_arch", "get_current_stream",
                                           "torch_tensor_to_tv", "torch_tensors_to_tv", "AllocKeys",
                                           "COMPILED_CUDA_ARCHS", "CompileInfo"), "cumm tensor views"),
    "spatial": ("spconv.pytorch.spatial", ("RemoveDuplicate",), "RemoveDuplicate"),
    "interpreter": ("spconv.pytorch.interpreter", ("NetworkInterpreter", "REGISTERED_NODE_HANDLERS",
                                                   "get_node_handler", "register_method_handler",
                                                   "register_node_handler"), "spconv's TensorRT interpreter"),
}
# spconv.utils (2.3.8, CPU and CUDA builds): cumm tensor views in and out, box ops
_SPCONV_UTILS = tuple(f"Point2Voxel{d}{n}d" for d in ("CPU", "GPU") for n in range(1, 5)) + (
    "BoxOps", "non_max_suppression_cpu", "rbbox_intersection", "rbbox_iou", "rbbox_iou_loss",
    "rotate_non_max_suppression_cpu")


def _module(name: str, doc: str, package: bool = False, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name, doc)
    # a spec, so importlib.util.find_spec(name) answers (it reads sys.modules[name].__spec__)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        mod.__path__ = []  # a package: its submodules are the sys.modules entries made below
    mod.__dict__.update(attrs)
    return mod


def _constants() -> types.ModuleType:
    """``spconv.constants``: the flags models set (accepted and kept, nothing reads them)."""
    return _module("spconv.constants", "spconv's tuning flags: settable, not acted on by sparsevox.",
                   SPCONV_USE_DIRECT_TABLE=True, SPCONV_ALLOW_TF32=False, FILTER_HWIO=False, NDIM_DONT_CARE=3,
                   SAVED_WEIGHT_LAYOUT="", ALL_WEIGHT_IS_KRSC=True, SPCONV_DEBUG_SAVE_PATH="", DISABLE_JIT=False,
                   SPCONV_BWD_SPLITK=[1, 2, 4, 8, 16, 32, 64], SPCONV_CPP_INDICE_PAIRS=False,
                   SPCONV_CPP_GEMM=True, SPCONV_FX_TRACE_MODE=False)


def install(replace: bool = False) -> types.ModuleType:
    """Register the compat modules as ``spconv`` (see the module docstring) and return that package.

    Call it before the model code imports spconv. A real spconv already imported in this process is left
    alone (``RuntimeError``: its modules and the compat ones would mix) unless ``replace`` is True; an
    installed but not yet imported spconv is shadowed. Calling it again is a no-op."""
    from . import __name__ as compat_name

    current = sys.modules.get("spconv")
    if current is not None:
        if getattr(current, "__sparsevox_compat__", False):
            return current
        if not replace:
            raise RuntimeError("a real spconv is already imported in this process; call "
                               "sparsevox.compat.spconv.install() before anything imports spconv, or pass "
                               "replace=True to replace its modules")
        for name in [m for m in sys.modules if m == "spconv" or m.startswith("spconv.")]:
            del sys.modules[name]

    compat = sys.modules[compat_name]
    from . import core
    constants = _constants()
    spconv_core = _module("spconv.core", "spconv.core on sparsevox: ConvAlgo and AlgoHint.",
                          ConvAlgo=core.ConvAlgo, AlgoHint=core.AlgoHint)
    utils = _module("spconv.utils", "spconv.utils: cumm-based voxelisers and box ops, not supported.")
    utils.__getattr__ = attribute_error("spconv.utils", "spconv.utils", _SPCONV_UTILS,
                                        "spconv.pytorch.utils.PointToVoxel voxelises torch tensors",
                                        known={"CPU_ONLY_BUILD": False})
    root = _module("spconv", "spconv 2.x on sparsevox (sparsevox.compat.spconv.install()).", package=True,
                   __version__=SPCONV_VERSION, SPCONV_VERSION_NUMBERS=[int(v) for v in SPCONV_VERSION.split(".")],
                   ConvAlgo=core.ConvAlgo, AlgoHint=core.AlgoHint, constants=constants, core=spconv_core,
                   utils=utils, pytorch=compat, __sparsevox_compat__=True)
    modules = {"spconv": root, "spconv.constants": constants, "spconv.core": spconv_core, "spconv.utils": utils,
               "spconv.pytorch": compat}
    for sub in ("conv", "core", "modules", "pool", "ops", "functional", "utils", "tables", "identity", "constants"):
        modules[f"spconv.pytorch.{sub}"] = getattr(compat, sub)
    for sub, (what, names, feature) in _MISSING_PYTORCH.items():
        mod = _module(f"spconv.pytorch.{sub}", f"{what} ({feature}): not supported by sparsevox.compat.spconv.")
        mod.__getattr__ = attribute_error(mod.__name__, what, names, feature)
        modules[mod.__name__] = mod
        setattr(compat, sub, mod)  # as importing a submodule binds it on its package
    sys.modules.update(modules)
    return root
