"""Where tests/gpu runs: on CuPy and a real GPU when there is one, else on the strict CuPy stand-in.

Imported by tests/conftest.py.  The stand-in is installed as ``cupy`` for each test module of
tests/gpu (and any module marked ``gpu``) and removed after it, so the rest of the suite never
sees it.  ``TINYNET_CUPY_STANDIN=1`` forces the stand-in on a GPU machine,
``TINYNET_CUPY_STANDIN=0`` forces real CuPy (the GPU tests then skip without a GPU).  A test that
needs what the stand-in cannot give (CUDA numerics, several real GPUs) is marked
``@pytest.mark.real_gpu(reason=...)`` and skips on the stand-in with that reason.
"""
from __future__ import annotations

import os
import shutil

import pytest

from tinynet import backend, kernels

_CHOICE = os.environ.get("TINYNET_CUPY_STANDIN", "")
ON_STANDIN = _CHOICE == "1" or (_CHOICE != "0" and not backend.gpu_available())


def _is_gpu_module(node) -> bool:
    return any(m.name == "gpu" for m in node.iter_markers()) or "gpu" in node.path.parts[-2:-1]


def pytest_collection_modifyitems(config, items):
    for item in items:
        marker = item.get_closest_marker("real_gpu")
        if marker is not None and ON_STANDIN:
            item.add_marker(pytest.mark.skip(reason="on the CuPy stand-in: " + marker.kwargs.get("reason", "")))


@pytest.fixture(scope="module", autouse=True)
def cupy_module(request):
    """The ``cupy`` the GPU tests of this module run on (real, or the stand-in installed for the module)."""
    if not _is_gpu_module(request.node):
        yield None
        return
    if not ON_STANDIN:
        if not backend.gpu_available():
            pytest.skip("needs CuPy and a CUDA GPU (TINYNET_CUPY_STANDIN=0 turned the stand-in off)")
        yield backend._cupy
        return
    if shutil.which("g++") is None:  # the stand-in runs the fused kernels' bodies as compiled C++
        pytest.skip("the CuPy stand-in compiles the fused kernels' bodies with g++, which is not installed")
    import cupy_standin

    previous = cupy_standin.install()
    kernels._compiled.cache_clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backend, "_cupy", cupy_standin)
        mp.setattr(backend, "_cupy_import_error", None)
        yield cupy_standin
    kernels._compiled.cache_clear()
    cupy_standin.uninstall(previous)


@pytest.fixture
def standin(cupy_module):
    """The stand-in with fresh counters (for the budget tests); skips on real CuPy."""
    if not ON_STANDIN or cupy_module is None:
        pytest.skip("counts what the CuPy stand-in sees")
    cupy_module.stats.reset()
    return cupy_module
