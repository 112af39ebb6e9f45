import numpy as np
import pytest

from tinynet import nn
from tinynet.gradcheck import gradcheck

from conftest import torch_or_skip
from fastpath import path  # noqa: F401  (a fixture: the test runs on the fast and the plain path)


def with_random_affine(layer, rng):
    layer.weight.data = rng.uniform(0.5, 1.5, layer.weight.shape)
    layer.bias.data = rng.standard_normal(layer.bias.shape)
    return layer


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (2, 5, 3, 3), (7, 2, 1, 1)])
def test_batchnorm2d_train_gradcheck(path, shape, rng):
    layer = with_random_affine(nn.BatchNorm2d(shape[1], dtype=np.float64), rng)
    x = rng.standard_normal(shape) * 3 + 1
    report = gradcheck(layer, x, seed=3)
    report.assert_ok()


def test_batchnorm_dx_is_not_trivially_zero(rng):
    # With an all-ones upstream gradient BatchNorm's dx is analytically zero, which hides bugs;
    # a random one must give a clearly non-zero dx.
    layer = nn.BatchNorm2d(3, dtype=np.float64)
    x = rng.standard_normal((4, 3, 5, 5))
    y = layer(x)
    assert np.abs(layer.backward(np.ones_like(y))).max() < 1e-12
    layer(x)
    assert np.abs(layer.backward(rng.standard_normal(y.shape))).max() > 1e-2


def test_batchnorm2d_eval_gradcheck(path, rng):
    layer = with_random_affine(nn.BatchNorm2d(3, dtype=np.float64), rng)
    layer.running_mean = rng.standard_normal(3)
    layer.running_var = rng.uniform(0.5, 2, 3)
    layer.eval()
    gradcheck(layer, rng.standard_normal((2, 3, 4, 4))).assert_ok()


@pytest.mark.parametrize("shape", [(6, 4), (5, 3, 7)])
def test_batchnorm1d_gradcheck(path, shape, rng):
    layer = with_random_affine(nn.BatchNorm1d(shape[1], dtype=np.float64), rng)
    gradcheck(layer, rng.standard_normal(shape)).assert_ok()


def test_statistics_are_per_channel_over_n_h_w(rng):
    x = rng.standard_normal((8, 3, 4, 5)) * np.array([1, 5, 10])[None, :, None, None] + np.array([0, 3, -2])[None, :, None, None]
    y = nn.BatchNorm2d(3, dtype=np.float64)(x)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=(0, 2, 3)), 1, atol=1e-4)


def test_running_stats_follow_pytorch_rule(rng):
    layer = nn.BatchNorm2d(3, momentum=0.1, dtype=np.float64)
    x = rng.standard_normal((4, 3, 5, 5)) * 2 + 3
    layer(x)
    m = 4 * 5 * 5
    mean = x.mean(axis=(0, 2, 3))
    unbiased = x.var(axis=(0, 2, 3)) * m / (m - 1)
    np.testing.assert_allclose(layer.running_mean, 0.9 * 0 + 0.1 * mean)
    np.testing.assert_allclose(layer.running_var, 0.9 * 1 + 0.1 * unbiased)
    assert int(layer.num_batches_tracked) == 1
    layer.eval()
    y = layer(x)
    expected = (x - layer.running_mean[None, :, None, None]) / np.sqrt(layer.running_var[None, :, None, None] + 1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-10)
    assert int(layer.num_batches_tracked) == 1  # eval does not update


def test_cumulative_average_when_momentum_is_none(rng):
    layer = nn.BatchNorm1d(2, momentum=None, dtype=np.float64)
    xs = [rng.standard_normal((10, 2)) + i for i in range(3)]
    for x in xs:
        layer(x)
    np.testing.assert_allclose(layer.running_mean, np.mean([x.mean(0) for x in xs], axis=0))


def test_batchnorm_bad_input():
    with pytest.raises(ValueError, match=r"BatchNorm2d.*\(N, 4, H, W\).*\(2, 3, 5, 5\)"):
        nn.BatchNorm2d(4)(np.zeros((2, 3, 5, 5), np.float32))
    with pytest.raises(ValueError, match="more than one value per channel"):
        nn.BatchNorm1d(4)(np.zeros((1, 4), np.float32))


def test_state_dict_keys():
    assert list(nn.BatchNorm2d(4).state_dict()) == ["weight", "bias", "running_mean", "running_var",
                                                    "num_batches_tracked"]


@pytest.mark.parametrize("training", [True, False])
def test_pytorch_parity(path, training, rng):
    torch = torch_or_skip()
    x = (rng.standard_normal((6, 4, 5, 3)) * 2 + 1).astype(np.float32)
    layer = nn.BatchNorm2d(4)
    ref = torch.nn.BatchNorm2d(4)
    gamma, beta = rng.uniform(0.5, 1.5, 4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    layer.weight.data, layer.bias.data = gamma.copy(), beta.copy()
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(gamma))
        ref.bias.copy_(torch.from_numpy(beta))
    for _ in range(3):  # let the running statistics move
        layer(x * 1.5)
        ref(torch.from_numpy(x * 1.5))
    layer.train(training)
    ref.train(training)
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = ref(xt)
    y = layer(x)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.running_mean, ref.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.running_var, ref.running_var.numpy(), rtol=1e-5, atol=1e-6)
    g = rng.standard_normal(y.shape).astype(np.float32)
    yt.backward(torch.from_numpy(g))
    np.testing.assert_allclose(layer.backward(g), xt.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.weight.grad, ref.weight.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.bias.grad, ref.bias.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_affine_false_constants_are_non_persistent_buffers(rng):
    """gamma = 1 and beta = 0 move with .to() (no host copy per GPU forward) but stay out of the state dict."""
    layer = nn.BatchNorm2d(3, affine=False)
    assert list(layer.state_dict()) == ["running_mean", "running_var", "num_batches_tracked"]
    layer.double()
    names = dict(layer.named_buffers())
    assert names["_gamma"].dtype == np.float64 and names["_beta"].dtype == np.float64
    x = rng.standard_normal((4, 3, 2, 2))
    layer(x)
    layer.backward(rng.standard_normal(x.shape))
    gradcheck(nn.BatchNorm2d(3, affine=False, dtype=np.float64), x).assert_ok()


# ---------------------------------------------------------------------------
# LayerNorm
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape, normalized", [((4, 6), 6), ((2, 3, 5), 5), ((2, 3, 4, 4), (3, 4, 4)),
                                               ((3, 2, 4), (2, 4))])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_gradcheck(path, shape, normalized, affine, rng):
    layer = nn.LayerNorm(normalized, elementwise_affine=affine, dtype=np.float64)
    if affine:
        layer.weight.data = rng.uniform(0.5, 1.5, layer.weight.shape)
        layer.bias.data = rng.standard_normal(layer.bias.shape)
    gradcheck(layer, rng.standard_normal(shape) * 2 + 1).assert_ok()


def test_layer_norm_matches_the_loop_oracle(path, rng):
    from tinynet.nn import reference

    layer = nn.LayerNorm(5, dtype=np.float64)
    layer.weight.data, layer.bias.data = rng.uniform(0.5, 1.5, 5), rng.standard_normal(5)
    x = rng.standard_normal((3, 4, 5))
    y = layer(x)
    x2 = x.reshape(-1, 5)
    np.testing.assert_allclose(y.reshape(-1, 5), reference.layer_norm(x2, layer.weight.data, layer.bias.data, 1e-5),
                               rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(dy)
    np.testing.assert_allclose(dx.reshape(-1, 5),
                               reference.layer_norm_input_grad(x2, layer.weight.data, dy.reshape(-1, 5), 1e-5),
                               rtol=1e-10, atol=1e-12)


def test_layer_norm_normalises_each_sample_over_its_trailing_dims(rng):
    x = rng.standard_normal((4, 3, 2, 2)) * 5 + 3
    y = nn.LayerNorm((3, 2, 2), dtype=np.float64)(x)
    np.testing.assert_allclose(y.reshape(4, -1).mean(axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(y.reshape(4, -1).var(axis=1), 1, rtol=1e-4)


def test_layer_norm_pytorch_parity_float64(path, rng):
    torch = torch_or_skip()
    layer = nn.LayerNorm((3, 4), dtype=np.float64)
    layer.weight.data, layer.bias.data = rng.uniform(0.5, 1.5, (3, 4)), rng.standard_normal((3, 4))
    ref = torch.nn.LayerNorm((3, 4)).double()
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(layer.weight.data))
        ref.bias.copy_(torch.from_numpy(layer.bias.data))
    x = rng.standard_normal((2, 5, 3, 4))
    dy = rng.standard_normal(x.shape)
    t = torch.tensor(x, requires_grad=True)
    out = ref(t)
    out.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(layer(x), out.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.backward(dy), t.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.weight.grad, ref.weight.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.bias.grad, ref.bias.grad.numpy(), rtol=1e-10, atol=1e-12)
    assert list(layer.state_dict()) == list(ref.state_dict())


def test_layer_norm_bad_arguments_and_input():
    with pytest.raises(TypeError, match="LayerNorm: normalized_shape must be an int"):
        nn.LayerNorm(4.5)
    with pytest.raises(ValueError, match=r"LayerNorm: expected input of shape \(\*, 4\), received \(2, 5\)"):
        nn.LayerNorm(4)(np.zeros((2, 5), np.float32))
