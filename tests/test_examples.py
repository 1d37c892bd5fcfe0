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
