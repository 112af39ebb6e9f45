"""Shared fixtures.  PyTorch and the shared photo folder are optional: tests that need them skip."""
from __future__ import annotations

import pathlib

import numpy as np
import pytest

import tinynet

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _seed():
    tinynet.manual_seed(0)


def torch_or_skip():
    return pytest.importorskip("torch", reason="PyTorch not installed: reference parity test skipped")


def popular_animals_or_skip() -> pathlib.Path:
    path = SHARED_DATA / "popular-animals"
    if not path.is_dir():
        pytest.skip(f"shared photo folder {path} not present")
    return path


def assert_close_to_scale(actual, expected, rtol, name=""):
    """``max|a - e| <= rtol * max|e|``: float32 parity of deep networks, where entries near zero
    carry absolute rounding errors of the size of the tensor's large entries."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    scale = float(np.abs(expected).max()) or 1.0
    err = float(np.abs(actual - expected).max())
    assert err <= rtol * scale, f"{name}: max abs error {err:.3g} > {rtol} * max|expected| ({scale:.3g})"
