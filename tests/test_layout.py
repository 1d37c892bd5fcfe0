"""The layout's dependency rules, read from the source with ``ast`` and checked in a fresh interpreter.

Layers (``sparsevox/``; see each subpackage's docstring):

- core: the top-level modules (``Voxels``, geometry, kernel maps, the public ops, array interop) and any
  other top-level subpackage. At import time: no framework (torch, jax, flax, CuPy) and none of
  ``sparsevox.cuda``, ``sparsevox.algorithms``, ``sparsevox.adapters``. Inside functions the core may
  reach them (the GPU map builder when CuPy coordinates arrive; ``conv`` hands torch/jax ``Voxels`` to
  their adapter).
- ``tuning/``: no framework, ``cuda``, ``algorithms`` at import time (the registry imports
  ``sparsevox.algorithms`` on first use); never an adapter, torch or jax.
- ``algorithms/``: never an adapter, torch or jax; CuPy only inside functions.
- ``cuda/``: never an adapter, an algorithm or the tuning machinery, torch or jax; CuPy only inside
  functions.
- ``adapters/`` (installed as ``sparsevox.adapters``) and ``adapters/compat/`` (installed as
  ``sparsevox.compat``, the spconv-compatible API, adapter name ``compat``): use the core and never each
  other, with the exceptions in :data:`ADAPTER_BUILDS_ON`.
- Programs (``__main__``, ``demo``, ``examples/``) sit on top and may import anything; ``__main__`` and
  ``demo`` still import no framework at import time.
"""
import ast
import configparser
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("torch", "jax", "jaxlib", "flax", "cupy", "cupyx", "cupy_backends")
ML_FRAMEWORKS = ("torch", "jax", "jaxlib", "flax")  # never outside the adapters, not even lazily
PROGRAMS = ("sparsevox.__main__", "sparsevox.demo")

# The exceptions to "adapters never import each other":
# - flax -> jax: the Flax NNX layers are built on the JAX adapter's functional layer (its custom_vjp
#   functions and kernel-map pytree). That layer is JAX code, so it cannot move into the framework-free
#   core; Flax is a layer library on top of JAX, as flax is on jax.
# - compat -> torch: sparsevox.compat.spconv is spconv's torch API; its convolutions are the torch
#   adapter's differentiable ops (autograd functions over the core's kernel maps), which are torch code and
#   cannot move into the core either. Nothing imports compat.
ADAPTER_BUILDS_ON = {"flax": {"jax"}, "compat": {"torch"}}
ADAPTER_PACKAGES = ("sparsevox.adapters", "sparsevox.compat")


def _module_files():
    """``{module name: path}`` for sparsevox/ (without the adapters/compat/kernels_cu links of a source
    checkout), adapters/ (as ``sparsevox.adapters``, module or package form) and adapters/compat/ (as
    ``sparsevox.compat``, setup.cfg's ``package_dir``)."""
    mods = {}
    compat = REPO / "adapters" / "compat"
    roots = [(REPO / "sparsevox", "sparsevox"), (REPO / "adapters", "sparsevox.adapters"), (compat, "sparsevox.compat")]
    for root, prefix in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            d = Path(dirpath)
            dirnames[:] = sorted(n for n in dirnames if not (d / n).is_symlink() and n != "__pycache__"
                                 and (d / n != compat or root == compat))
            for f in filenames:
                if not f.endswith(".py"):
                    continue
                parts = list((d / f).relative_to(root).with_suffix("").parts)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                mods[".".join([prefix, *parts])] = d / f
    return mods


MODULES = _module_files()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _deferred_nodes(tree):
    """Nodes that do not run at import time: function bodies and ``if TYPE_CHECKING:`` blocks."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            out.update(id(n) for n in ast.walk(node) if n is not node)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out.update(id(n) for b in node.body for n in ast.walk(b))
    return out


def imports_of(name: str) -> list[tuple[str, bool]]:
    """``(imported module, at import time?)`` for every import statement of module ``name``."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    deferred = _deferred_nodes(tree)
    package = name if _is_package(name) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        now = id(node) not in deferred
        if isinstance(node, ast.Import):
            out += [(a.name, now) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            for a in node.names:  # `from pkg import mod` imports the submodule pkg.mod
                sub = f"{base}.{a.name}"
                out.append((sub if sub in MODULES else base, now))
    return out


def _layer(name: str) -> str:
    parts = name.split(".")
    if name in PROGRAMS:
        return "program"
    if len(parts) > 1 and parts[1] == "compat":
        return "adapters"
    if len(parts) > 1 and parts[1] in ("adapters", "algorithms", "tuning", "cuda", "examples"):
        return parts[1]
    return "core"


def _under(target: str, *prefixes: str) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def _adapter(name: str) -> str | None:
    """The adapter a module belongs to (``torch`` for sparsevox.adapters.torch and its submodules,
    ``compat`` for sparsevox.compat and its submodules)."""
    parts = name.split(".")
    if len(parts) > 1 and parts[:2] == ["sparsevox", "compat"]:
        return "compat"
    return parts[2] if len(parts) > 2 and parts[:2] == ["sparsevox", "adapters"] else None


def violations(name: str) -> list[str]:
    layer = _layer(name)
    bad = []
    for target, now in imports_of(name):
        when = "at import time" if now else "inside a function"
        rule = None
        if layer in ("core", "program") and now and _under(target, *FRAMEWORKS):
            rule = "imports a framework at import time (import it where it is used)"
        elif layer == "core" and now and _under(target, "sparsevox.cuda", "sparsevox.algorithms",
                                                  *ADAPTER_PACKAGES):
            rule = "the core imports no CUDA plumbing, algorithm or adapter at import time"
        elif layer in ("tuning", "algorithms", "cuda"):
            if _under(target, *ADAPTER_PACKAGES, *ML_FRAMEWORKS):
                rule = f"{layer}/ never imports an adapter, torch or jax"
            elif now and _under(target, *FRAMEWORKS):
                rule = f"{layer}/ imports CuPy only inside functions"
            elif layer == "tuning" and now and _under(target, "sparsevox.algorithms", "sparsevox.cuda"):
                rule = "tuning/ reaches algorithms and CUDA plumbing only inside functions"
            elif layer == "cuda" and _under(target, "sparsevox.algorithms", "sparsevox.tuning"):
                rule = "cuda/ is plumbing: it imports no algorithm and no tuning machinery"
        elif layer == "adapters":
            mine, theirs = _adapter(name), _adapter(target)
            if theirs and theirs != mine and theirs not in ADAPTER_BUILDS_ON.get(mine, ()):
                rule = "adapters never import each other"
        if rule:
            bad.append(f"{name} imports {target} {when}: {rule}")
    return bad


def test_the_layout_is_what_the_rules_name():
    layers = {}
    for name in MODULES:
        layers.setdefault(_layer(name), []).append(name)
    for layer in ("core", "tuning", "algorithms", "cuda", "adapters"):
        assert layers.get(layer), f"no modules found in the {layer} layer: the walk of {REPO} is broken"
    assert "sparsevox.backends" not in MODULES  # algorithms register themselves in algorithms/
    assert {"sparsevox.conv", "sparsevox.tuning.registry", "sparsevox.algorithms.implicit_gemm",
            "sparsevox.cuda.gpu_kernel_map", "sparsevox.adapters.torch", "sparsevox.compat.spconv",
            "sparsevox.compat.spconv.conv"} <= set(MODULES)
    assert not any(n.startswith("sparsevox.adapters.compat") for n in MODULES)  # installed as sparsevox.compat


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _layer(n) != "examples"))
def test_imports_follow_the_dependency_direction(name):
    assert violations(name) == []


def test_the_rules_catch_what_they_are_for(monkeypatch, tmp_path):
    """The checker itself: a core module importing cupy, a cuda module importing an algorithm, the
    torch adapter importing the jax adapter, compat importing the jax adapter, the torch adapter importing
    compat, and the core or tuning/ importing compat are all reported; flax on jax and compat on torch
    are not."""
    cases = {
        "sparsevox.fake_core": ("import cupy\nfrom .cuda import driver\n", 2),
        "sparsevox.cuda.fake": ("def f():\n    from ..algorithms import implicit_gemm\n", 1),
        "sparsevox.tuning.fake": ("from .. import algorithms\ndef f():\n    import torch\n", 2),
        "sparsevox.adapters.torch.fake": ("from sparsevox.adapters import jax\n", 1),
        "sparsevox.adapters.flax.fake": ("from sparsevox.adapters import jax\n", 0),
        "sparsevox.compat.spconv.fake": ("from sparsevox.adapters.torch import functional\nimport torch\n"
                                         "from . import conv\nfrom sparsevox import kernel_map\n", 0),
        "sparsevox.compat.fake": ("from sparsevox.adapters import jax\n", 1),
        "sparsevox.adapters.torch.fake2": ("def f():\n    from sparsevox.compat import spconv\n", 1),
        "sparsevox.fake_core2": ("from .compat import spconv\n", 1),
        "sparsevox.tuning.fake2": ("def f():\n    import sparsevox.compat.spconv\n", 1),
        "sparsevox.fake_lazy": ("def f():\n    import cupy\n    from .cuda import gpu_info\n", 0),
    }
    files = dict(MODULES)
    for i, (name, (src, _)) in enumerate(cases.items()):
        (tmp_path / f"m{i}.py").write_text(src)
        files[name] = tmp_path / f"m{i}.py"
    monkeypatch.setattr(sys.modules[__name__], "MODULES", files)
    for name, (_, n_bad) in cases.items():
        assert len(violations(name)) == n_bad, (name, violations(name))


def _run(code: str) -> str:
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_import_sparsevox_loads_no_framework_and_no_cuda_plumbing():
    out = _run("import sys, sparsevox\n"
               "print(sparsevox.__file__)\n"
               "print(sorted(m for m in sys.modules if m.split('.')[0] in "
               f"{FRAMEWORKS!r} or m.startswith(('sparsevox.cuda', 'sparsevox.algorithms', 'sparsevox.adapters', "
               "'sparsevox.compat'))))")
    path, loaded = out.splitlines()
    assert Path(path).resolve().is_relative_to(REPO), path  # this checkout, not another installed copy
    assert loaded == "[]"


def test_the_numpy_path_with_every_algorithm_registered_loads_no_framework():
    """Registering every algorithm (which imports algorithms/ and cuda/) and a NumPy convolution import
    neither CuPy nor torch nor jax."""
    out = _run("import sys, numpy as np, sparsevox as sv\n"
               "from sparsevox.tuning.registry import algorithms\n"
               "assert {'explicit_gemm', 'implicit_gemm', 'cutlass_implicit_gemm'} <= set(algorithms('conv'))\n"
               "assert {'explicit', 'implicit'} <= set(algorithms('depthwise'))\n"
               "c = np.array([[0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0]], np.int32)\n"
               "v = sv.Voxels(c, np.ones((3, 2), np.float32))\n"
               "out = sv.spatially_sparse_conv(v, np.ones((27, 2, 4), np.float32), kernel_size=3)\n"
               "assert out.feats.shape == (3, 4)\n"
               f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}))")
    assert out.strip() == "[]"


def test_setup_cfg_lists_every_package():
    """Every folder with an ``__init__.py`` is installed: setup.cfg's ``packages`` names it."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = {n for n in MODULES if _is_package(n)} | {"sparsevox.kernels_cu"}
    assert found <= listed, f"missing from setup.cfg [options] packages: {sorted(found - listed)}"
