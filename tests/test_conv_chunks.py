"""im2col in chunks of output rows without gradients (tinynet.nn.fast.conv.forward_in_chunks).

Its promise: the bits of the forward that keeps ``col`` (a layer's result must not depend on the
grad mode), on any number of threads, for any chunk size, the last chunk partial included.
"""
import numpy as np
import pytest

from tinynet import backend, nn
from tinynet.nn import reference
from tinynet.nn.fast import conv, gemm

from fastpath import fast_path_on  # noqa: F401  (a fixture)
from fastpath import openblas_control, record_blas_threads_of_every_product, thread_alive_after

pytestmark = pytest.mark.usefixtures("fast_path_on")

# (C, C_out, kernel, stride, padding, H, W, N): each large enough for one output row's product to
# reach SPLIT_MIN_MACS (the rule's second condition); strides 1-3, paddings 0-4, odd sizes.
CASES = [
    (16, 32, 3, 1, 1, 16, 16, 64),
    (3, 64, 7, 2, 3, 40, 36, 32),
    (5, 40, 5, 2, 2, 33, 30, 64),
    (8, 48, 3, 1, 0, 20, 21, 64),
    (6, 128, 3, 3, 4, 25, 31, 64),
]


@pytest.fixture
def every_size(monkeypatch):
    """Chunks for every shape the MAC rule allows, of ``CHUNK_BYTES`` set by the test; threads reset after."""
    monkeypatch.setattr(conv, "CHUNKED_MIN_COL_BYTES", 0)
    ran = []
    real = conv.forward_in_chunks
    monkeypatch.setattr(conv, "forward_in_chunks", lambda *a, **k: ran.append(1) or real(*a, **k))
    yield ran
    backend.set_num_threads(None)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_chunks_give_the_bits_of_the_forward_that_keeps_col(case, dtype, every_size, monkeypatch, rng):
    c, co, k, s, p, h, w, n = case
    layer = nn.Conv2d(c, co, k, stride=s, padding=p, rng=rng, dtype=dtype)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    with conv.algorithm("im2col"):
        kept = np.array(layer(x))          # with gradients: col is kept for the backward
        layer.release_saved()
        row_bytes = c * k * k * ((w + 2 * p - k) // s + 1) * n * x.itemsize
        for chunk_bytes, threads in [(1 << 22, 2), (row_bytes, 3), (2 * row_bytes + 1, 1), (1, 2)]:
            monkeypatch.setattr(conv, "CHUNK_BYTES", chunk_bytes)
            backend.set_num_threads(threads)
            with nn.no_grad():
                out = layer(x)
            assert np.array_equal(out, kept), (chunk_bytes, threads)
            assert layer.pending_calls == 0
    assert len(every_size) == 4  # every call above ran in chunks
    if dtype == np.float64:
        np.testing.assert_allclose(kept, reference.conv2d(x, layer.weight.data, layer.bias.data, (s, s), (p, p)),
                                   rtol=1e-10, atol=1e-10)


def test_an_odd_number_of_rows_leaves_a_partial_last_chunk(every_size, monkeypatch, rng):
    layer = nn.Conv2d(8, 48, 3, padding=0, rng=rng, dtype=np.float32)
    x = rng.standard_normal((64, 8, 20, 21)).astype(np.float32)   # 18 output rows
    kept = np.array(layer(x))
    layer.release_saved()
    monkeypatch.setattr(conv, "CHUNK_BYTES", 4 * 72 * 19 * 64 * 4)  # 4 rows a chunk: 4 + 4 + 4 + 4 + 2
    with nn.no_grad():
        assert np.array_equal(layer(x), kept)
    assert every_size


def test_the_rule():
    def pays(x_shape, w_shape, stride=(1, 1), padding=(1, 1), groups=1):
        return conv._chunks_pay(np.empty(x_shape, np.float32), w_shape, stride, padding, groups)

    assert pays((64, 3, 64, 64), (64, 3, 7, 7), (2, 2), (3, 3))        # ResNet18's stem at batch 64: col 38 MB
    assert pays((64, 32, 16, 16), (64, 32, 3, 3))                      # the CNN's second conv: 19 MB
    assert not pays((64, 128, 8, 8), (256, 128, 3, 3), (2, 2))         # 4.7 MB of col: the whole product
    assert not pays((64, 3, 64, 64), (32, 3, 3, 3))                    # one output row: 3.5 M multiply-adds
    assert not pays((64, 32, 16, 16), (64, 32, 1, 1), padding=(0, 0))  # 1x1: col is x itself
    assert not pays((64, 32, 16, 16), (64, 16, 3, 3), groups=2)        # grouped


@pytest.mark.skipif(not gemm.owns_threads(), reason="threadpoolctl finds no BLAS to set")
def test_a_chunk_is_one_blas_call_on_one_thread(every_size, monkeypatch, rng):
    # The first product of a process may be a chunk (an evaluation's first layer): it holds BLAS at one
    # thread too, so that two pool threads do not each start BLAS's own threads.
    from threadpoolctl import threadpool_limits

    layer = nn.Conv2d(16, 32, 3, padding=1, rng=rng, dtype=np.float32)
    x = rng.standard_normal((64, 16, 16, 16)).astype(np.float32)
    backend.set_num_threads(2)
    gemm.release_blas_threads()
    threadpool_limits(2, user_api="blas")
    real = np.matmul
    seen = record_blas_threads_of_every_product(monkeypatch)
    try:
        with nn.no_grad():
            layer(x)
    finally:
        monkeypatch.setattr(np, "matmul", real)
        gemm.release_blas_threads()
    assert every_size and len(seen) >= 2 and all(set(counts) == {1} for counts in seen), seen


def test_without_control_of_blas_the_whole_product_runs(every_size, monkeypatch, rng):
    # threadpoolctl 3.8: while another thread controls OpenBLAS's count, this one cannot hold it on one
    # thread, and products inside the pool's pieces would each start BLAS's threads: no chunks then.
    from threadpoolctl import threadpool_limits

    if not gemm.owns_threads():
        pytest.skip("threadpoolctl finds no BLAS to set")
    openblas_control()
    layer = nn.Conv2d(16, 32, 3, padding=1, rng=rng, dtype=np.float32)
    x = rng.standard_normal((64, 16, 16, 16)).astype(np.float32)
    kept = np.array(layer(x))
    layer.release_saved()
    openblas_control()  # the forward above held BLAS from this thread: give its count back

    def owner(wait):
        with threadpool_limits(2, user_api="blas"):
            wait()

    calls, real = [], np.matmul
    with thread_alive_after(owner):
        monkeypatch.setattr(np, "matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
        try:
            with nn.no_grad():
                out = layer(x)
        finally:
            monkeypatch.setattr(np, "matmul", real)
    assert every_size and len(calls) == 1  # asked for chunks, got one whole product on BLAS's threads
    np.testing.assert_allclose(out, kept, rtol=1e-5, atol=1e-5)
