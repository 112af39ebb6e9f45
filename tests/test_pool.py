import numpy as np
import pytest

from tinynet import nn
from tinynet.gradcheck import gradcheck
from tinynet.nn import reference

from conftest import torch_or_skip
from fastpath import path  # noqa: F401  (a fixture: the test runs on the fast and the plain path)

# (kernel, stride, padding, H, W): overlapping (the ResNet stem's 3/2/1), non-overlapping,
# non-square, and a window that does not tile the input exactly.
MAX_CASES = [
    (3, 2, 1, 9, 8),
    (2, 2, 0, 8, 6),
    (4, 4, 0, 8, 8),
    (3, 1, 1, 5, 6),
    ((3, 2), (2, 1), (1, 0), 7, 5),
    (3, 3, 0, 10, 11),
]


def distinct(rng, shape):
    """Values with no ties (finite differences need a unique maximum)."""
    return rng.permutation(np.prod(shape)).reshape(shape).astype(np.float64) / 7.0


@pytest.mark.parametrize("k,s,p,h,w", MAX_CASES)
def test_maxpool_gradcheck(path, k, s, p, h, w, rng):
    gradcheck(nn.MaxPool2d(k, s, p), distinct(rng, (2, 3, h, w)), eps=1e-6).assert_ok()


@pytest.mark.parametrize("k,s,p,h,w", MAX_CASES)
def test_maxpool_matches_loops(path, k, s, p, h, w, rng):
    # Rounded values create ties: the loop reference and the fast path must pick the same cell.
    x = np.round(rng.standard_normal((2, 3, h, w)), 1)
    layer = nn.MaxPool2d(k, s, p)
    kk, ss, pp = layer.kernel_size, layer.stride, layer.padding
    out = layer(x)
    ref_out, _ = reference.max_pool2d(x, kk, ss, pp)
    np.testing.assert_array_equal(out, ref_out)
    dout = rng.standard_normal(out.shape)
    np.testing.assert_allclose(layer.backward(dout), reference.max_pool2d_grad(x, dout, kk, ss, pp), atol=1e-12)


def test_overlapping_maxpool_accumulates():
    # One large value is the maximum of all four overlapping windows: it receives all four gradients.
    x = np.zeros((1, 1, 5, 5))
    x[0, 0, 1, 1] = 10.0  # rows/cols 1 lie in windows 0 ([-1, 1]) and 1 ([1, 3]) of each axis
    layer = nn.MaxPool2d(3, 2, 1)
    out = layer(x)
    assert out.shape == (1, 1, 3, 3)
    dx = layer.backward(np.ones_like(out))
    assert dx[0, 0, 1, 1] == 4.0
    assert dx.sum() == 9.0  # every window routes exactly its one gradient


def test_maxpool_ties_go_to_first_cell():
    x = np.ones((1, 1, 2, 2))
    layer = nn.MaxPool2d(2)
    layer(x)
    dx = layer.backward(np.full((1, 1, 1, 1), 5.0))
    np.testing.assert_array_equal(dx[0, 0], [[5.0, 0.0], [0.0, 0.0]])


def test_maxpool_padding_never_wins():
    x = -np.ones((1, 1, 3, 3)) * 100
    out = nn.MaxPool2d(3, 2, 1)(x)
    np.testing.assert_array_equal(out, -100)


@pytest.mark.parametrize("k,s,p,h,w", [(3, 2, 1, 9, 8), (2, 2, 0, 8, 6), (3, 1, 0, 5, 7)])
def test_avgpool_gradcheck_and_loops(path, k, s, p, h, w, rng):
    x = rng.standard_normal((2, 3, h, w))
    layer = nn.AvgPool2d(k, s, p)
    np.testing.assert_allclose(layer(x), reference.avg_pool2d(x, layer.kernel_size, layer.stride, layer.padding))
    gradcheck(layer, x).assert_ok()


@pytest.mark.parametrize("out_size,h,w", [(1, 5, 7), (2, 5, 7), ((3, 2), 7, 4)])
def test_adaptive_avgpool(out_size, h, w, rng):
    x = rng.standard_normal((2, 3, h, w))
    layer = nn.AdaptiveAvgPool2d(out_size)
    out = layer(x)
    if out_size == 1:
        np.testing.assert_allclose(out[:, :, 0, 0], x.mean(axis=(2, 3)))
    gradcheck(layer, x).assert_ok()


def test_pool_bad_input():
    with pytest.raises(ValueError, match=r"MaxPool2d.*\(N, C, H, W\)"):
        nn.MaxPool2d(2)(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="at most half"):
        nn.MaxPool2d(2, padding=2)(np.zeros((1, 1, 4, 4), np.float32))
    with pytest.raises(ValueError, match="smaller than the window"):
        nn.MaxPool2d(5)(np.zeros((1, 1, 4, 4), np.float32))


@pytest.mark.parametrize("k,s,p,h,w", MAX_CASES)
def test_maxpool_pytorch_parity(path, k, s, p, h, w, rng):
    torch = torch_or_skip()
    x = rng.standard_normal((3, 4, h, w)).astype(np.float32)
    layer = nn.MaxPool2d(k, s, p)
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = torch.nn.functional.max_pool2d(xt, layer.kernel_size, layer.stride, layer.padding)
    out = layer(x)
    np.testing.assert_array_equal(out, yt.detach().numpy())
    g = rng.standard_normal(out.shape).astype(np.float32)
    yt.backward(torch.from_numpy(g))
    np.testing.assert_allclose(layer.backward(g), xt.grad.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k,s,p,h,w", [(3, 2, 1, 9, 8), (2, 2, 0, 8, 6)])
def test_avgpool_pytorch_parity(path, k, s, p, h, w, rng):
    torch = torch_or_skip()
    x = rng.standard_normal((3, 4, h, w)).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = torch.nn.functional.avg_pool2d(xt, k, s, p)
    layer = nn.AvgPool2d(k, s, p)
    np.testing.assert_allclose(layer(x), yt.detach().numpy(), rtol=1e-5, atol=1e-6)
    g = rng.standard_normal(yt.shape).astype(np.float32)
    yt.backward(torch.from_numpy(g))
    np.testing.assert_allclose(layer.backward(g), xt.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_maxpool_propagates_nan_and_routes_its_gradient_like_pytorch(rng):
    """NaN wins its window (the last NaN in row-major order, PyTorch's rule); its cell takes the gradient."""
    torch = torch_or_skip()
    x = rng.standard_normal((2, 3, 7, 7))
    x[0, 0, 1, 1] = x[0, 0, 2, 2] = x[1, 2, 5, 0] = x[1, 1, 0, 6] = np.nan
    for k, s, p in [(2, 2, 0), (3, 2, 1), (3, 1, 1)]:
        layer = nn.MaxPool2d(k, s, p)
        out = layer(x)
        g = rng.standard_normal(out.shape)
        dx = layer.backward(g)
        t = torch.tensor(x, requires_grad=True)
        tout = torch.nn.functional.max_pool2d(t, k, s, p)
        tout.backward(torch.from_numpy(g))
        np.testing.assert_array_equal(out, tout.detach().numpy())  # NaN where PyTorch has NaN
        np.testing.assert_allclose(dx, t.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_non_integer_window_is_refused():
    with pytest.raises((TypeError, ValueError), match="kernel_size must be an int"):
        nn.MaxPool2d(2.5)
    with pytest.raises((TypeError, ValueError), match="stride must be an int"):
        nn.AvgPool2d(2, stride=1.5)
    with pytest.raises((TypeError, ValueError), match="output_size must be an int"):
        nn.AdaptiveAvgPool2d(1.5)
