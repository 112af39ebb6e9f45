"""Shared fixtures.  PyTorch and the shared photo folder are optional: tests that need them skip."""
from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest

import tinynet

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"

# The command lines the tests run (in process and as subprocesses) compute on a fixed number of threads,
# as before --threads auto: a test's numbers must not depend on what else the machine runs.  The
# automatic choice has its own tests (tests/test_cores.py).
os.environ.setdefault("TINYNET_THREADS", str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                             else os.cpu_count() or 1))


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


def pytest_configure(config):
    config.addinivalue_line("markers", "real_gpu(reason): needs a real GPU, skipped on the CuPy stand-in "
                                       "(tests/gpu/conftest.py)")


# The GPU tests run on real CuPy, or on the CuPy stand-in without a GPU (tests/cupy_standin).
from cupy_standin.pytest_plugin import cupy_module, pytest_collection_modifyitems, standin  # noqa: E402,F401
