"""The two paths of every layer (tinynet.nn.fast): fixtures to run a test on both, or to pin one.

``path`` parametrizes a test over the fast path and the plain path (the plain NCHW functions
at the top of each family module); ``fast_path_on`` pins the fast path for tests of the fast
machinery itself (Winograd, threads, epilogues, CUDA twins), so that they test it even when the
suite runs with ``TINYNET_FAST=0``.
"""
import pytest

import tinynet


@pytest.fixture(params=["fast", "plain"])
def path(request):
    with tinynet.fast_path(request.param == "fast"):
        yield request.param


@pytest.fixture
def fast_path_on():
    with tinynet.fast_path(True):
        yield
