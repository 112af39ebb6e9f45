import numpy as np
import pytest

import tinynet
from tinynet import nn, optim
from tinynet.gradcheck import gradcheck
from tinynet.models import resnet18, simple_cnn
from tinynet.nn.regularization import L2Penalty

from conftest import assert_close_to_scale, torch_or_skip
from fastpath import path  # noqa: F401  (a fixture: the test runs on the fast and the plain path)


def block(in_planes, planes, stride):
    downsample = None
    if stride != 1 or in_planes != planes:
        downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
    return nn.BasicBlock(in_planes, planes, stride, downsample)


@pytest.mark.parametrize("in_planes,planes,stride", [(3, 3, 1), (2, 4, 2)])
def test_basic_block_gradcheck(path, in_planes, planes, stride, rng):
    b = block(in_planes, planes, stride)
    x = rng.standard_normal((3, in_planes, 6, 5))
    gradcheck(b, x, max_checks=80, seed=2).assert_ok()


def test_basic_block_needs_downsample_when_shape_changes():
    with pytest.raises(ValueError, match="needs a downsample"):
        nn.BasicBlock(3, 6, stride=2)


def test_basic_block_backward_does_not_modify_dout(rng):
    b = block(2, 2, 1)
    x = rng.standard_normal((2, 2, 5, 5)).astype(np.float32)
    y = b(x)
    g = rng.standard_normal(y.shape).astype(np.float32)
    before = g.copy()
    b.backward(g)
    np.testing.assert_array_equal(g, before)


def test_every_layer_leaves_dout_untouched(rng):
    layers = [
        (nn.Conv2d(2, 3, 3, padding=1), (2, 2, 5, 5)),
        (nn.Linear(4, 3), (2, 4)),
        (nn.ReLU(), (2, 3, 4, 4)),
        (nn.Softmax(1), (2, 5)),
        (nn.MaxPool2d(3, 2, 1), (2, 3, 6, 6)),
        (nn.MaxPool2d(2), (2, 3, 6, 6)),
        (nn.AvgPool2d(2), (2, 3, 6, 6)),
        (nn.AdaptiveAvgPool2d(1), (2, 3, 6, 6)),
        (nn.BatchNorm2d(3), (2, 3, 4, 4)),
        (nn.BatchNorm1d(3), (4, 3)),
        (nn.Dropout(0.3), (4, 5)),
        (nn.Flatten(), (2, 3, 2, 2)),
    ]
    for layer, shape in layers:
        y = layer(rng.standard_normal(shape).astype(np.float32))
        g = rng.standard_normal(y.shape).astype(np.float32)
        before = g.copy()
        layer.backward(g)
        np.testing.assert_array_equal(g, before, err_msg=type(layer).__name__)


def test_resnet18_shapes_and_features(rng):
    model = resnet18(7)
    x = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    assert model(x).shape == (2, 7)
    with tinynet.no_grad():
        assert model.features(x).shape == (2, 512)
    model.set_input_grad(False)
    y = model(x)
    assert model.backward(np.ones_like(y)) is None
    assert model.conv1.weight.grad is not None


def test_resnet_small_input_end_to_end_gradcheck(path, rng):
    # The whole ResNet18 in float64 on 2 tiny images: a sample of entries per tensor.  A deep
    # ReLU/max-pool network is piecewise smooth; with h = 1e-6 some differences straddle a kink
    # (a ReLU crossing zero, a max-pool winner changing) and are wrong.  h = 1e-7 avoids that and
    # float64 rounding (~1e-16 * |L| / h) stays far below the tolerance.
    model = resnet18(3, rng=np.random.default_rng(0))
    x = rng.standard_normal((2, 3, 32, 32))
    report = gradcheck(model, x, max_checks=6, seed=4, eps=1e-7)
    report.assert_ok()


def test_cnn_shapes_and_softmax_flag(rng):
    x = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
    assert simple_cnn(10)(x).shape == (2, 10)
    probs = simple_cnn(10, softmax_before_loss=True)(x)
    np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)
    assert list(simple_cnn(5).state_dict())[-2:] == ["10.weight", "10.bias"]
    with pytest.raises(ValueError, match="multiple of 16"):
        simple_cnn(10, image_size=40)


def test_few_steps_of_training_decrease_the_loss(rng):
    tinynet.manual_seed(0)
    model = simple_cnn(4, image_size=16)
    x = rng.standard_normal((16, 3, 16, 16)).astype(np.float32)
    y = rng.integers(0, 4, 16)
    opt = optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    for _ in range(20):
        opt.zero_grad()
        losses.append(float(loss_fn(model(x), y)))
        model.backward(loss_fn.backward())
        opt.step()
    assert losses[-1] < 0.2 * losses[0]  # it memorises 16 random images


def test_l2_penalty_value_gradient_and_exclusions(rng):
    model = nn.Sequential(nn.Linear(3, 4, dtype=np.float64), nn.BatchNorm1d(4, dtype=np.float64), nn.Linear(4, 2, dtype=np.float64))
    pen = L2Penalty(model, 0.05)
    assert pen.names == ["0.weight", "2.weight"]  # biases and BatchNorm parameters excluded
    w0, w2 = model[0].weight.data, model[2].weight.data
    assert float(pen.value()) == pytest.approx(0.05 * (np.sum(w0 ** 2) + np.sum(w2 ** 2)))
    model.zero_grad()
    pen.backward()
    np.testing.assert_allclose(model[0].weight.grad, 2 * 0.05 * w0)
    assert model[0].bias.grad is None
    # finite differences of the penalty itself
    h = 1e-6
    w0[0, 0] += h
    up = float(pen.value())
    w0[0, 0] -= 2 * h
    down = float(pen.value())
    w0[0, 0] += h
    assert (up - down) / (2 * h) == pytest.approx(model[0].weight.grad[0, 0], rel=1e-6)
    assert len(L2Penalty(model, 0.1, include_all=True).params) == 6
    with pytest.raises(ValueError):
        L2Penalty(model, float("nan"))


def test_resnet18_pytorch_parity_train_mode(path, rng):
    """The whole ResNet18 forward and backward against a PyTorch model built from the same state dict."""
    torch = torch_or_skip()
    from tests_torch_models import torch_resnet18

    model = resnet18(5)
    ref = torch_resnet18(5)
    ref.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in model.state_dict().items()})
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = ref(xt)
    y = model(x)
    assert_close_to_scale(y, yt.detach().numpy(), 1e-3)  # float32 through 18 layers, BN over 4 values in layer4
    g = rng.standard_normal(y.shape).astype(np.float32)
    yt.backward(torch.from_numpy(g))
    dx = model.backward(g)
    assert_close_to_scale(dx, xt.grad.numpy(), 1e-3)
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert_close_to_scale(p.grad, grads[name].grad.numpy(), 1e-3, name)


def test_resnet18_pytorch_parity_float64(path, rng):
    """In float64 every gradient of the whole network agrees with PyTorch's autograd to ~1e-10."""
    torch = torch_or_skip()
    from tests_torch_models import torch_resnet18

    model = resnet18(3).double()
    ref = torch_resnet18(3).double()
    ref.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in model.state_dict().items()})
    x = rng.standard_normal((2, 3, 32, 32))
    y = model(x)
    yt = ref(torch.from_numpy(x))
    g = rng.standard_normal(y.shape)
    yt.backward(torch.from_numpy(g))
    model.backward(g)
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert_close_to_scale(p.grad, grads[name].grad.numpy(), 1e-9, name)


@pytest.mark.parametrize("case", ["conv", "resnet18"])
def test_the_same_bits_with_and_without_gradients(case):
    # Issue 21: same input, same weights, same bits, whatever the grad mode.  The conv,
    # 64 -> 64 3x3 padding 1 on a 64x64x16x16 float32 batch (work 2^26), and ResNet18 in eval mode at
    # 64 px, batch 64, whose layer1 convolutions once ran Winograd under grad and im2col under no_grad.
    rng = np.random.default_rng(21)
    if case == "conv":
        model, x = nn.Conv2d(64, 64, 3, padding=1, rng=rng), rng.standard_normal((64, 64, 16, 16))
    else:
        model, x = resnet18(num_classes=10, rng=rng).eval(), rng.standard_normal((64, 3, 64, 64))
    x = x.astype(np.float32)
    with_grad = np.array(model(x))
    model.release_saved()
    with nn.no_grad():
        np.testing.assert_array_equal(with_grad, np.array(model(x)))


def test_resnet18_float64_training_step_is_the_same_on_both_paths(rng):
    # Issue 21: logits, loss and every gradient within 1e-10 (relative) on the fast and the plain path.
    model = resnet18(num_classes=10, rng=rng).to(dtype="float64").train()
    x, t = rng.standard_normal((4, 3, 32, 32)), rng.integers(0, 10, 4)
    results = []
    for on in (True, False):
        for m in model.modules():  # both steps from the same running statistics
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean[...], m.running_var[...] = 0, 1
        model.zero_grad()
        loss_fn = nn.CrossEntropyLoss()
        with tinynet.fast_path(on):
            logits = model(x)
            loss = loss_fn(logits, t)
            model.backward(loss_fn.backward())
        results.append((np.array(logits), float(loss), {k: p.grad.copy() for k, p in model.named_parameters()}))
    (fl, floss, fg), (pl, ploss, pg) = results
    assert np.max(np.abs(fl - pl)) <= 1e-10 * np.max(np.abs(fl))
    assert abs(floss - ploss) <= 1e-10 * abs(floss)
    for k in fg:
        assert np.max(np.abs(fg[k] - pg[k])) <= 1e-10 * np.max(np.abs(fg[k])), k
