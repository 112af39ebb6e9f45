"""The memory-bound passes split over threads and cache blocks give the same bits on 1 and 2 threads.

Each layer runs forward and backward with ``backend.set_num_threads(1)``
and ``(2)``; the results must be identical (element-wise passes, and
reductions kept per channel, are the same computation in any split).  Sizes
straddle ``backend.PARALLEL_MIN_ELEMENTS`` (below it nothing is split) and
``layout.BLOCK_ELEMENTS``; channel counts are odd so pieces are unequal.
"""
import numpy as np
import pytest

from tinynet import backend, nn
from tinynet.nn import layout
from fastpath import fast_path_on  # noqa: F401  (a fixture)

pytestmark = pytest.mark.usefixtures("fast_path_on")  # tests of the fast path itself (tinynet.nn.fast)

# (N, C, H, W): small (one block, one thread), a few blocks, and above PARALLEL_MIN_ELEMENTS.
SHAPES = [(2, 3, 5, 6), (4, 5, 16, 16), (16, 7, 48, 45)]


@pytest.fixture
def threads():
    yield backend.set_num_threads
    backend.set_num_threads(None)


def chwn(rng, shape, dtype=np.float32):
    """An (N, C, H, W) array stored CHWN, as the layers make them."""
    n, c, h, w = shape
    return rng.standard_normal((c, h, w, n)).astype(dtype).transpose(3, 0, 1, 2)


def run_on(threads, n_threads, make_layer, x, dout_seed=7):
    """``(out, dx, parameter gradients)`` of a fresh layer on ``n_threads`` threads."""
    threads(n_threads)
    layer = make_layer()
    out = layer(x.copy(order="K") if getattr(layer, "inplace", False) else x)
    dout = chwn(np.random.default_rng(dout_seed), out.shape, out.dtype) if out.ndim == 4 else \
        np.random.default_rng(dout_seed).standard_normal(out.shape).astype(out.dtype)
    dx = layer.backward(dout)
    grads = [p.grad.copy() for p in layer.parameters() if p.grad is not None]
    return np.array(out), np.array(dx), grads


def assert_same_on_one_and_two_threads(threads, make_layer, x):
    one = run_on(threads, 1, make_layer, x)
    two = run_on(threads, 2, make_layer, x)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])
    for a, b in zip(one[2], two[2]):
        np.testing.assert_array_equal(a, b)
    return one


def test_the_large_shape_is_split(threads):
    assert np.prod(SHAPES[-1]) > backend.PARALLEL_MIN_ELEMENTS
    assert np.prod(SHAPES[-1]) > 3 * layout.BLOCK_ELEMENTS


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k,s,p", [(3, 2, 1), (2, 2, 0), (3, 1, 1), (4, 4, 0)])
def test_maxpool(threads, rng, shape, k, s, p):
    x = np.round(chwn(rng, shape), 1)  # ties: every split must route them to the same cell
    assert_same_on_one_and_two_threads(threads, lambda: nn.MaxPool2d(k, s, p), x)


def test_maxpool_with_nan(threads, rng):
    x = chwn(rng, SHAPES[-1])
    x[3, 2, 5, 7] = x[0, 6, 0, 0] = np.nan
    out, dx, _ = assert_same_on_one_and_two_threads(threads, lambda: nn.MaxPool2d(3, 2, 1), x)
    assert np.isnan(out).sum() == 4 + 1  # interior NaN: 4 windows; corner NaN: 1


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batchnorm2d(threads, rng, shape, dtype):
    def make():
        layer = nn.BatchNorm2d(shape[1], dtype=dtype)
        layer.weight.data[...] = np.random.default_rng(3).uniform(0.5, 1.5, shape[1])
        layer.bias.data[...] = np.random.default_rng(4).standard_normal(shape[1])
        return layer

    one = assert_same_on_one_and_two_threads(threads, make, chwn(rng, shape, dtype) * 3 + 1)
    assert one[0].dtype == dtype and one[1].dtype == dtype


def test_batchnorm2d_running_statistics_and_eval(threads, rng):
    x = chwn(rng, SHAPES[-1])
    stats = []
    for n_threads in (1, 2):
        threads(n_threads)
        layer = nn.BatchNorm2d(x.shape[1])
        layer(x)
        layer.eval()
        stats.append((layer.running_mean.copy(), layer.running_var.copy(), np.array(layer(x))))
    for a, b in zip(*stats):
        np.testing.assert_array_equal(a, b)


def test_batchnorm1d(threads, rng):
    x = rng.standard_normal((4096, 37)).astype(np.float32)  # (N, C): a copied channel matrix
    assert_same_on_one_and_two_threads(threads, lambda: nn.BatchNorm1d(37), x)


FLAT_SHAPES = SHAPES[:2] + [(16, 9, 96, 80)]  # the last above layout.FLAT_SPLIT_MIN_ELEMENTS


def test_the_large_flat_shape_is_split():
    assert np.prod(FLAT_SHAPES[-1]) > layout.FLAT_SPLIT_MIN_ELEMENTS


@pytest.mark.parametrize("shape", FLAT_SHAPES)
@pytest.mark.parametrize("inplace", [False, True])
def test_relu(threads, rng, shape, inplace):
    x = chwn(rng, shape)
    out, dx, _ = assert_same_on_one_and_two_threads(threads, lambda: nn.ReLU(inplace=inplace), x)
    np.testing.assert_array_equal(out, np.maximum(x, 0))
    assert out.strides == x.strides  # the CHWN layout is kept


def test_relu_on_an_nchw_array_and_a_mismatched_gradient(threads, rng):
    x = rng.standard_normal(FLAT_SHAPES[-1]).astype(np.float32)  # C-contiguous NCHW
    assert_same_on_one_and_two_threads(threads, nn.ReLU, x)
    threads(2)
    layer = nn.ReLU()
    x = chwn(rng, FLAT_SHAPES[-1])
    layer(x)
    dy = rng.standard_normal(FLAT_SHAPES[-1]).astype(np.float32)  # NCHW gradient, CHWN mask: no flat view
    np.testing.assert_array_equal(layer.backward(dy), dy * (x > 0))


@pytest.mark.parametrize("shape", FLAT_SHAPES)
def test_residual_add(threads, rng, shape):
    a, b = chwn(rng, shape), chwn(rng, shape)
    sums = []
    for n_threads in (1, 2):
        threads(n_threads)
        sums.append(layout.add(a, b))
        c = a.copy(order="K")
        layout.add(c, b, out=c)
        np.testing.assert_array_equal(c, sums[-1])
    np.testing.assert_array_equal(sums[0], sums[1])
    np.testing.assert_array_equal(sums[0], a + b)
    assert sums[0].strides == a.strides
    np.testing.assert_array_equal(layout.add(a, np.ascontiguousarray(b)), a + b)  # other layouts: whole


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k,s,p", [(3, 1, 1), (3, 2, 1), (2, 2, 0)])
def test_conv_im2col_col2im(threads, rng, shape, k, s, p):
    def make():
        return nn.Conv2d(shape[1], 4, k, stride=s, padding=p, rng=np.random.default_rng(5))

    assert_same_on_one_and_two_threads(threads, make, chwn(rng, shape))
    # NCHW images (the first layer's input) are reordered first, then split the same way
    assert_same_on_one_and_two_threads(threads, make, rng.standard_normal(shape).astype(np.float32))


def test_relu_under_no_grad_computes_no_mask_and_keeps_nothing():
    import tinynet
    from tinynet.nn.fast.activation import relu_forward

    x = np.random.default_rng(3).standard_normal((4, 3, 5, 5)).astype(np.float32)
    y, mask = relu_forward(x, need_mask=False)
    assert mask is None
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    layer = tinynet.nn.ReLU()
    with tinynet.no_grad():
        np.testing.assert_array_equal(layer(x), np.maximum(x, 0))
    assert layer.pending_calls == 0
