"""Linear, ReLU, Softmax, Dropout, Flatten, Identity, Sequential."""
import numpy as np
import pytest

from tinynet import nn
from tinynet.gradcheck import gradcheck

from conftest import torch_or_skip
from fastpath import path  # noqa: F401  (a fixture: the test runs on the fast and the plain path)


@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4)])
def test_linear_gradcheck(path, shape, rng):
    gradcheck(nn.Linear(4, 3, dtype=np.float64), rng.standard_normal(shape)).assert_ok()


def test_linear_without_bias(rng):
    layer = nn.Linear(4, 3, bias=False, dtype=np.float64)
    gradcheck(layer, rng.standard_normal((5, 4))).assert_ok()


def test_linear_bad_input():
    with pytest.raises(ValueError, match=r"Linear.*\(N, 4\).*\(2, 5\)"):
        nn.Linear(4, 3)(np.zeros((2, 5), np.float32))


def test_linear_pytorch_parity(path, rng):
    torch = torch_or_skip()
    layer = nn.Linear(6, 3)
    ref = torch.nn.Linear(6, 3)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(layer.weight.data))
        ref.bias.copy_(torch.from_numpy(layer.bias.data))
    x = rng.standard_normal((4, 6)).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = ref(xt)
    np.testing.assert_allclose(layer(x), yt.detach().numpy(), rtol=1e-5, atol=1e-6)
    g = rng.standard_normal((4, 3)).astype(np.float32)
    yt.backward(torch.from_numpy(g))
    np.testing.assert_allclose(layer.backward(g), xt.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.weight.grad, ref.weight.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_relu_gradcheck_and_values(path, rng):
    x = rng.standard_normal((3, 4, 5))
    x[np.abs(x) < 1e-3] = 0.5  # keep finite differences away from the kink
    gradcheck(nn.ReLU(), x).assert_ok()
    layer = nn.ReLU()
    y = layer(np.array([[-1.0, 0.0, 2.0]]))
    np.testing.assert_array_equal(y, [[0, 0, 2]])
    np.testing.assert_array_equal(layer.backward(np.array([[3.0, 3.0, 3.0]])), [[0, 0, 3]])


def test_softmax_layer_gradcheck(path, rng):
    gradcheck(nn.Softmax(dim=1), rng.standard_normal((4, 5))).assert_ok()


def test_dropout_is_inverted_and_identity_in_eval(rng):
    layer = nn.Dropout(0.25, rng=np.random.default_rng(0))
    x = np.ones((200, 500))
    y = layer(x)
    kept = y != 0
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(y[kept], 1 / 0.75)
    assert abs(y.mean() - 1.0) < 0.02  # expectation preserved
    g = rng.standard_normal(x.shape)
    np.testing.assert_array_equal(layer.backward(g), g * (y / x))
    layer.eval()
    assert layer(x) is x


def test_dropout_gradcheck(path, rng):
    gradcheck(nn.Dropout(0.5, rng=np.random.default_rng(3)), rng.standard_normal((4, 6))).assert_ok()


def test_dropout_rejects_bad_p():
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        nn.Dropout(1.0)


def test_flatten_and_identity(rng):
    x = rng.standard_normal((2, 3, 4, 5))
    f = nn.Flatten()
    y = f(x)
    np.testing.assert_array_equal(y, x.reshape(2, -1))  # NCHW order, as PyTorch
    assert f.backward(y).shape == x.shape
    assert nn.Identity()(x) is x


def test_flatten_of_channels_first_view_keeps_nchw_order(rng):
    # A conv output is an NCHW view of a channels-first buffer; flattening must still be NCHW order.
    conv = nn.Conv2d(2, 3, 1, dtype=np.float64)
    x = rng.standard_normal((2, 2, 3, 3))
    y = conv(x)
    expected = np.ascontiguousarray(y).reshape(2, -1)
    np.testing.assert_array_equal(nn.Flatten()(y), expected)


def test_sequential_gradcheck_small_network(path, rng):
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, dtype=np.float64), nn.BatchNorm2d(4, dtype=np.float64), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(4, 3, 3, stride=2, padding=1, dtype=np.float64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5, dtype=np.float64),
    )
    x = rng.standard_normal((3, 2, 8, 8))
    gradcheck(net, x, max_checks=60).assert_ok()


def test_sequential_indexing_and_names():
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    assert len(net) == 3 and isinstance(net[2], nn.Linear)
    assert [k for k in net.state_dict()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert net[0]._describe() == "Linear '0'"
    with pytest.raises(TypeError, match="not a Module"):
        nn.Sequential(nn.ReLU(), "relu")


def test_relu_inplace_overwrites_its_input_and_keeps_the_gradient(rng):
    x = rng.standard_normal((4, 5))
    layer = nn.ReLU(inplace=True)
    y = layer(x)
    assert y is x and np.all(x >= 0)
    g = rng.standard_normal(x.shape)
    np.testing.assert_array_equal(layer.backward(g), g * (y > 0))
    gradcheck(nn.ReLU(inplace=True), rng.standard_normal((3, 4)) + 0.1).assert_ok()


@pytest.mark.parametrize("make, shape", [(lambda: nn.Dropout(0.5), (2, 3)), (lambda: nn.Dropout(0.0), (2, 3)),
                                         (lambda: nn.Flatten(), (2, 3, 2))])
def test_dropout_and_flatten_check_the_upstream_gradient(make, shape, rng):
    layer = make()
    y = layer(rng.standard_normal(shape).astype(np.float32))
    with pytest.raises(ValueError, match=r"backward expected dL/d\(output\) of shape"):
        layer.backward(np.ones((), np.float32))  # the loss instead of its gradient
    layer(rng.standard_normal(shape).astype(np.float32))
    with pytest.raises(ValueError, match=r"dtype float32.*float64"):
        layer.backward(np.ones(y.shape))


def test_an_in_place_relu_over_a_kept_output_is_an_error(rng):
    """Softmax's backward reads its output: an in-place ReLU after it would corrupt that gradient."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=1), nn.ReLU(inplace=True))
    with pytest.raises(RuntimeError, match=r"ReLU '2': would write in place over the output of Softmax '1'"):
        net(rng.standard_normal((2, 3)).astype(np.float32))
    safe = nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=1), nn.ReLU())
    y = safe(rng.standard_normal((2, 3)).astype(np.float32))
    safe.backward(np.ones_like(y))
