"""The examples run and learn (loss falls), on whatever backend this machine has."""
import importlib

import pytest


def _load(name):
    return importlib.import_module(f"sparsevox.examples.{name}")


def test_jax_training_example_reduces_the_loss():
    pytest.importorskip("jax", reason="jax not installed")
    assert _load("jax_train").main(["--steps", "15", "--crop", "4"]) < 0.9


def test_cupy_manual_gradient_example_reduces_the_loss():
    assert _load("cupy_manual_grad").main(steps=15) < 0.5


def test_the_readme_use_snippet_runs():
    """The first Python block of README.md's "Use" section, as a new user pastes it (its names defined)."""
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    use = text[text.index("## Use"):]
    code = re.search(r"```python\n(.*?)```", use, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md (Use)", "exec"), scope)
    v, out, down, up = (scope[k] for k in ("v", "out", "down", "up"))
    assert out.feats.shape == (v.num_voxels, 32) and up.feats.shape == (v.num_voxels, v.num_channels)
    assert 0 < down.num_voxels < v.num_voxels
