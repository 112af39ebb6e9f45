"""The fast path's matrix products (tinynet.nn.fast.gemm): pieces on tinynet's threads, BLAS on one.

A product cut into pieces must give the same bits as one single-threaded call, on any number of
threads; BLAS must run on one thread, and stay there until released; every product of a
fast-path training step must go through it (a product left to BLAS's own threads wakes them, and
they spin beside tinynet's threads for ~0.1 s: the reason for the module).
"""
import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import tinynet
from tinynet import backend, nn
from tinynet.models import resnet18
from tinynet.nn.fast import gemm
from fastpath import fast_path_on  # noqa: F401  (a fixture)
from fastpath import blas_threads, openblas_control, record_blas_threads_of_every_product, thread_alive_after

pytestmark = pytest.mark.usefixtures("fast_path_on")

needs_blas_control = pytest.mark.skipif(not gemm._blas_libraries(), reason="threadpoolctl finds no BLAS to set")


@pytest.fixture
def threads():
    yield backend.set_num_threads
    backend.set_num_threads(None)
    gemm.release_blas_threads()


# (a shape, b shape): columns split, rows split (few columns), batch split, broadcast, too small to split,
# and odd sizes so the last piece is short.
SHAPES = [((64, 288), (288, 4096)), ((70, 147), (147, 1000)), ((512, 4000), (4000, 27)), ((33, 900), (900, 100)),
          ((16, 64, 64), (16, 64, 1030)), ((2, 16, 72), (2, 72, 1500)), ((40, 64), (5, 64, 800)),
          ((8, 8), (8, 8)), ((3, 1, 5000), (3, 5000, 1))]


@needs_blas_control
@pytest.mark.parametrize("a_shape, b_shape", SHAPES)
def test_the_pieces_give_the_bits_of_one_product(threads, rng, a_shape, b_shape):
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    with threadpool_limits(1, user_api="blas"):
        one = np.matmul(a, b)
    for n in (1, 2, 3):
        threads(n)
        np.testing.assert_array_equal(gemm.matmul(a, b), one)
        out = np.full(one.shape[:-1] + (one.shape[-1] + 3,), np.nan, np.float32)[..., 1:-2]  # a strided view
        assert gemm.matmul(a, b, out=out) is out
        np.testing.assert_array_equal(out, one)


@needs_blas_control
@pytest.mark.parametrize("a_shape, b_shape", [((32, 3 * gemm.K_BLOCK + 5), (3 * gemm.K_BLOCK + 5, 27)),
                                              ((7, 2 * gemm.K_BLOCK), (2 * gemm.K_BLOCK, 9))])
def test_a_long_k_is_cut_into_blocks_summed_in_order_on_any_number_of_threads(threads, rng, a_shape, b_shape):
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = np.asfortranarray(rng.standard_normal(b_shape).astype(np.float32))  # col.T, as in a convolution's dW
    assert gemm._split(a_shape[:1] + b_shape[1:], a_shape[1]) == "k"
    k = a_shape[1]
    blocks = [a[:, i:i + gemm.K_BLOCK].astype(np.float64) @ b[i:i + gemm.K_BLOCK] for i in range(0, k, gemm.K_BLOCK)]
    threads(1)
    one = gemm.matmul(a, b)
    for n in (2, 3):
        threads(n)
        np.testing.assert_array_equal(gemm.matmul(a, b), one)
    np.testing.assert_allclose(one, sum(blocks), rtol=1e-4, atol=1e-3)


@needs_blas_control
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transposed_operands_and_a_1d_operand(threads, rng, dtype):
    threads(2)
    x = rng.standard_normal((3000, 256)).astype(dtype)
    y = rng.standard_normal((300, 3000)).astype(dtype)
    with threadpool_limits(1, user_api="blas"):
        expected = np.matmul(y, x), np.matmul(x.T, y.T), np.matmul(y, x[:, 0])
    got = gemm.matmul(y, x), gemm.matmul(x.T, y.T), gemm.matmul(y, x[:, 0])
    for g, e in zip(got, expected):
        if dtype == np.float32:  # (OpenBLAS's own 2 threads differ from its 1 in the last bits here)
            np.testing.assert_array_equal(g, e)
        else:  # float64: the last, partial block of columns may differ in the last bit (seen: columns 296-299 of 300)
            np.testing.assert_allclose(g, e, rtol=1e-13, atol=1e-12)


@needs_blas_control
def test_blas_stays_on_one_thread_until_released(threads, rng, monkeypatch):
    from threadpoolctl import threadpool_limits as limits

    threads(2)
    limits(2, user_api="blas")
    seen = record_blas_threads_of_every_product(monkeypatch)
    gemm.matmul(rng.standard_normal((64, 300)).astype(np.float32), rng.standard_normal((300, 4096)).astype(np.float32))
    monkeypatch.undo()
    assert len(seen) >= 2 and all(set(counts) == {1} for counts in seen), seen
    assert set(blas_threads()) == {1}  # kept: setting it back after every product woke BLAS's threads
    gemm.release_blas_threads()
    assert set(blas_threads()) == {2}
    gemm.release_blas_threads()  # nothing held: nothing to do
    assert set(blas_threads()) == {2}


@needs_blas_control
def test_products_from_several_python_threads(threads, rng):
    threads(2)
    a = rng.standard_normal((128, 256)).astype(np.float32)
    b = rng.standard_normal((256, 4096)).astype(np.float32)
    with threadpool_limits(1, user_api="blas"):
        expected = np.matmul(a, b)
    errors = []

    def work():
        for _ in range(20):
            if not np.array_equal(gemm.matmul(a, b), expected):
                errors.append("different bits")

    workers = [threading.Thread(target=work) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    assert set(blas_threads()) == {1}


@needs_blas_control
@pytest.mark.parametrize("algorithm", ["im2col", "winograd_f2"])
def test_every_product_of_a_fast_training_step_runs_with_blas_on_one_thread(threads, rng, monkeypatch, algorithm):
    from tinynet.nn.fast import conv

    threads(2)
    tinynet.manual_seed(0)
    model = resnet18(10, width=8)
    opt = tinynet.optim.Adam(model.parameters())
    loss_fn = nn.CrossEntropyLoss()
    x = rng.standard_normal((8, 3, 64, 64)).astype(np.float32)
    y = rng.integers(0, 10, 8)
    gemm.release_blas_threads()  # BLAS at its own count when the step starts
    seen = record_blas_threads_of_every_product(monkeypatch)
    with conv.algorithm(algorithm):  # Winograd forced where it applies (the 3x3 stride-1 layers)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        model.backward(loss_fn.backward())
        opt.step()
    monkeypatch.undo()
    assert np.isfinite(float(loss))
    # 20 convolutions and 2 linear layers, forward and backward: each product is one or more calls
    assert len(seen) >= 60, len(seen)
    assert all(set(counts) == {1} for counts in seen)


def test_without_a_blas_to_set_it_is_numpys_matmul(threads, rng, monkeypatch):
    monkeypatch.setattr(gemm, "_blas", [])
    threads(2)
    assert not gemm.owns_threads()
    a, b = rng.standard_normal((64, 300)), rng.standard_normal((300, 4096))
    np.testing.assert_array_equal(gemm.matmul(a, b), a @ b)


def test_the_linear_layer_on_the_fast_path_matches_the_plain_one(threads, rng):
    threads(2)
    x = rng.standard_normal((64, 700))
    dy = rng.standard_normal((64, 300))
    results = []
    for on in (True, False):
        with tinynet.fast_path(on):
            layer = nn.Linear(700, 300, rng=np.random.default_rng(1), dtype="float64")
            out = layer(x)
            dx = layer.backward(dy)
            results.append((out, dx, layer.weight.grad, layer.bias.grad))
    for fast, plain in zip(*results):
        np.testing.assert_allclose(fast, plain, rtol=1e-12, atol=1e-12)


def test_a_linear_backward_follows_the_path_of_its_forward(threads, rng, monkeypatch):
    from tinynet.nn import linear

    calls = []
    real = gemm.linear_backward
    monkeypatch.setattr(linear._fast, "linear_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = nn.Linear(20, 5, rng=np.random.default_rng(1), dtype="float64")
    x, dy = rng.standard_normal((4, 20)), rng.standard_normal((4, 5))
    with tinynet.fast_path(False):
        layer(x)
    dx = layer.backward(dy)  # made by the plain forward: the plain backward, whatever the switch says now
    assert calls == []
    np.testing.assert_allclose(dx, dy @ layer.weight.data, rtol=1e-12)
    layer(x)
    layer.backward(dy)
    assert calls == [1]


@needs_blas_control
def test_a_thread_that_held_blas_does_not_keep_control_of_it(threads, rng):
    # A user's worker thread (or one of tinynet's own) makes the process's first product: it must not
    # keep control of OpenBLAS's count, or the main thread's release and set_threads would do nothing.
    openblas_control()
    before = blas_threads()
    assert before != [1] * len(before), "BLAS must start on several threads for this test"
    a, b = rng.standard_normal((64, 300)).astype(np.float32), rng.standard_normal((300, 4096)).astype(np.float32)

    def worker(wait):  # alive after its product, as tinynet's pool threads are for the life of the process
        gemm.matmul(a, b)
        wait()

    with thread_alive_after(worker):
        assert set(blas_threads()) == {1}  # the worker held it
        gemm.release_blas_threads()        # from the main thread
        assert blas_threads() == before


@needs_blas_control
def test_when_another_thread_controls_blas_a_product_is_one_call_on_blas_threads(threads, rng, monkeypatch):
    openblas_control()

    def owner(wait):  # a thread of the user's that holds BLAS at 2 threads in a block of its own
        with threadpool_limits(2, user_api="blas"):
            wait()

    with thread_alive_after(owner):
        threads(2)
        a, b = rng.standard_normal((64, 300)).astype(np.float32), rng.standard_normal((300, 4096)).astype(np.float32)
        seen = record_blas_threads_of_every_product(monkeypatch)
        out = gemm.matmul(a, b)
        monkeypatch.undo()
        # not cut into pieces that would each start BLAS's 2 threads on tinynet's 2
        assert len(seen) == 1 and set(seen[0]) == {2}, seen
        np.testing.assert_allclose(out, np.matmul(a, b), rtol=1e-5, atol=1e-4)
        assert gemm.hold_blas_threads() is False
