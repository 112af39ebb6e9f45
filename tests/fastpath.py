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


def float32_conv_errors(c, h, algorithms, stride=1, n=4, seed=0, torch=None) -> dict:
    """``{name: (out, dx, dW) errors}`` of a 3x3, padding-1 convolution run in float32 by each algorithm.

    The error is ``max |y32 - y64| / max |y64|`` against float64 im2col, on unit-normal input and
    upstream gradient and He-initialised (C * stride, C, 3, 3) weights; with ``torch``, PyTorch's
    float32 ``conv2d`` too, under ``"torch"``.
    """
    import numpy as np

    from tinynet.nn.fast import conv

    rng = np.random.default_rng(seed)
    s = (stride, stride)
    x = rng.standard_normal((n, c, h, h))
    w = rng.standard_normal((c * stride, c, 3, 3)) * np.sqrt(2 / (9 * c))   # He initialisation
    ref, cache = conv.conv2d_forward(x, w, None, s, (1, 1), algorithm="im2col")
    dout = rng.standard_normal(ref.shape)
    refs = (ref,) + conv.conv2d_backward(dout, cache)[:2]
    x32, w32, d32 = (a.astype(np.float32) for a in (x, w, dout))

    def rel(results):
        return tuple(float(np.abs(np.asarray(a, np.float64) - r).max() / np.abs(r).max())
                     for a, r in zip(results, refs))

    errors = {}
    for name in algorithms:
        out, cache = conv.conv2d_forward(x32, w32, None, s, (1, 1), algorithm=name)
        assert out.dtype == np.float32
        errors[name] = rel((out,) + conv.conv2d_backward(d32, cache)[:2])
    if torch is not None:
        tx, tw = torch.tensor(x32, requires_grad=True), torch.tensor(w32, requires_grad=True)
        out = torch.nn.functional.conv2d(tx, tw, stride=stride, padding=1)
        out.backward(torch.tensor(d32))
        errors["torch"] = rel((out.detach().numpy(), tx.grad.numpy(), tw.grad.numpy()))
    return errors


def chwn_copy(a):
    """A copy of ``a`` (N, C, H, W) laid out CHWN in memory, as the fast path's layers hand activations on."""
    import numpy as np

    return np.ascontiguousarray(a.transpose(1, 2, 3, 0)).transpose(3, 0, 1, 2)
