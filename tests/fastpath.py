"""The two paths of every layer (tinynet.nn.fast): fixtures to run a test on both, or to pin one.

``path`` parametrizes a test over the fast path and the plain path (the plain NCHW functions
at the top of each family module); ``fast_path_on`` pins the fast path for tests of the fast
machinery itself (Winograd, threads, epilogues, CUDA twins), so that they test it even when the
suite runs with ``TINYNET_FAST=0``.
"""
import contextlib
import threading

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


def blas_threads() -> list:
    """Each BLAS library's thread count, as threadpoolctl reads it."""
    from tinynet.nn.fast import gemm

    return [lib.get_num_threads() for lib in gemm._blas_libraries()]


def record_blas_threads_of_every_product(monkeypatch) -> list:
    """A list that gets BLAS's thread counts at every ``numpy.matmul`` call while ``monkeypatch`` patches it."""
    import numpy as np

    seen = []
    real = np.matmul

    def recording(*args, **kwargs):
        seen.append(blas_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(np, "matmul", recording)
    return seen


# threadpoolctl 3.8: only one thread, the first to set OpenBLAS's count, can change it ("the controlling
# thread"); sets from any other thread silently do nothing.
def openblas_control():
    """threadpoolctl's OpenBLAS controller class, its controlling thread cleared; skips the test without one."""
    import threadpoolctl

    from tinynet.nn.fast import gemm

    controller = getattr(threadpoolctl, "OpenBLASController", None)
    if controller is None or not hasattr(controller, "clear_controlling_thread") \
            or not any(lib.internal_api == "openblas" for lib in gemm._blas_libraries()):
        pytest.skip("this threadpoolctl has no controlling thread for OpenBLAS")
    controller.clear_controlling_thread(force=True)
    gemm.release_blas_threads()
    return controller


@contextlib.contextmanager
def thread_alive_after(first):
    """Run ``first(wait)`` on a new thread, where ``wait()`` keeps that thread alive until the block ends.

    The block starts once ``first`` has called ``wait``; afterwards the thread is joined and
    OpenBLAS's controlling thread (see :func:`openblas_control`) cleared.
    """
    started, done = threading.Event(), threading.Event()

    def wait():
        started.set()
        done.wait(30)

    thread = threading.Thread(target=first, args=(wait,))
    thread.start()
    try:
        started.wait(30)
        yield
    finally:
        done.set()
        thread.join()
        import threadpoolctl

        threadpoolctl.OpenBLASController.clear_controlling_thread(force=True)
