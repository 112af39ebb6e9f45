"""PyTorch parity in float64 on unusual shapes, strides and paddings (skipped without PyTorch).

The family test files check the common cases; this one goes where bugs hide:
padding larger than half the kernel, strides larger than the kernel, kernels
larger than the input, non-square everything, output sizes that do not tile.
"""
import numpy as np
import pytest

from tinynet import nn

from conftest import torch_or_skip


def compare(layer, ref, x, rng, rtol=1e-10):
    torch = torch_or_skip()
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    yt = ref(xt)
    y = layer(x)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=rtol, atol=1e-12)
    g = rng.standard_normal(y.shape)
    yt.backward(torch.from_numpy(g))
    np.testing.assert_allclose(layer.backward(g), xt.grad.numpy(), rtol=rtol, atol=1e-12)
    for name, p in layer.named_parameters():
        np.testing.assert_allclose(p.grad, dict(ref.named_parameters())[name].grad.numpy(), rtol=rtol,
                                   atol=1e-12, err_msg=name)


@pytest.mark.parametrize("c,co,k,s,p,h,w", [
    (3, 5, 3, 1, 2, 6, 7),          # padding larger than half the kernel
    (2, 3, 5, 3, 2, 13, 11),        # stride 3, output does not tile the input
    (2, 4, (1, 3), (1, 2), (0, 1), 5, 9),
    (2, 2, 5, 1, 2, 3, 3),          # kernel larger than the input
    (3, 2, 1, 3, 0, 7, 8),          # stride larger than the kernel
    (1, 3, (4, 2), (2, 3), (3, 1), 6, 5),
])
def test_conv2d(c, co, k, s, p, h, w, rng):
    torch = torch_or_skip()
    layer = nn.Conv2d(c, co, k, s, p, dtype=np.float64)
    ref = torch.nn.Conv2d(c, co, k, s, p).double()
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(layer.weight.data))
        ref.bias.copy_(torch.from_numpy(layer.bias.data))
    compare(layer, ref, rng.standard_normal((2, c, h, w)), rng)


@pytest.mark.parametrize("k,s,p,h,w", [(2, 1, 0, 5, 6), (3, 3, 1, 7, 8), ((2, 3), (1, 2), (1, 1), 5, 7),
                                       (2, 3, 0, 8, 7), (5, 2, 2, 6, 6)])
def test_max_pool(k, s, p, h, w, rng):
    torch = torch_or_skip()
    x = rng.standard_normal((2, 3, h, w))
    compare(nn.MaxPool2d(k, s, p), torch.nn.MaxPool2d(k, s, p), x, rng)


@pytest.mark.parametrize("include", [True, False])
@pytest.mark.parametrize("k,s,p", [(3, 2, 1), ((3, 2), (1, 2), (1, 1)), (2, 2, 1)])
def test_avg_pool(k, s, p, include, rng):
    torch = torch_or_skip()
    x = rng.standard_normal((2, 3, 7, 6))
    compare(nn.AvgPool2d(k, s, p, count_include_pad=include),
            torch.nn.AvgPool2d(k, s, p, count_include_pad=include), x, rng)


@pytest.mark.parametrize("out,h,w", [((3, 2), 7, 5), (4, 3, 3), (1, 5, 7), ((2, 5), 9, 11)])
def test_adaptive_avg_pool(out, h, w, rng):
    torch = torch_or_skip()
    compare(nn.AdaptiveAvgPool2d(out), torch.nn.AdaptiveAvgPool2d(out), rng.standard_normal((2, 3, h, w)), rng)


@pytest.mark.parametrize("affine,track", [(False, True), (True, False), (False, False)])
def test_batch_norm_variants(affine, track, rng):
    torch = torch_or_skip()
    layer = nn.BatchNorm2d(3, affine=affine, track_running_stats=track, dtype=np.float64)
    ref = torch.nn.BatchNorm2d(3, affine=affine, track_running_stats=track).double()
    x = rng.standard_normal((4, 3, 5, 4)) * 2 + 1
    compare(layer, ref, x, rng)
    layer.eval()
    ref.eval()
    compare(layer, ref, x, rng)


def test_batch_norm_1d_on_sequences(rng):
    torch = torch_or_skip()
    compare(nn.BatchNorm1d(3, dtype=np.float64), torch.nn.BatchNorm1d(3).double(), rng.standard_normal((4, 3, 6)),
            rng)


def test_linear_on_three_dimensional_input(rng):
    torch = torch_or_skip()
    layer = nn.Linear(5, 3, dtype=np.float64)
    ref = torch.nn.Linear(5, 3).double()
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(layer.weight.data))
        ref.bias.copy_(torch.from_numpy(layer.bias.data))
    compare(layer, ref, rng.standard_normal((2, 4, 5)), rng)


@pytest.mark.parametrize("start,end,shape", [(1, -1, (2, 3, 4, 5)), (0, 1, (2, 3, 4)), (2, 3, (2, 3, 4, 5))])
def test_flatten(start, end, shape, rng):
    torch = torch_or_skip()
    compare(nn.Flatten(start, end), torch.nn.Flatten(start, end), rng.standard_normal(shape), rng)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_losses(reduction, rng):
    torch = torch_or_skip()
    F = torch.nn.functional
    z = rng.standard_normal((5, 4)) * 3
    t = rng.integers(0, 4, 5)
    probs = rng.uniform(0.05, 0.95, (5, 4))
    targets = rng.uniform(0, 1, (5, 4))
    cases = [
        (nn.CrossEntropyLoss(reduction), z, t, lambda a: F.cross_entropy(a, torch.from_numpy(t), reduction=reduction)),
        (nn.NLLLoss(reduction), z, t, lambda a: F.nll_loss(a, torch.from_numpy(t), reduction=reduction)),
        (nn.BCEWithLogitsLoss(reduction), z, targets,
         lambda a: F.binary_cross_entropy_with_logits(a, torch.from_numpy(targets), reduction=reduction)),
        (nn.BCELoss(reduction), probs, targets,
         lambda a: F.binary_cross_entropy(a, torch.from_numpy(targets), reduction=reduction)),
    ]
    for loss, pred, target, ref in cases:
        pt = torch.from_numpy(pred.copy()).requires_grad_(True)
        value = ref(pt)
        value.backward()
        assert float(loss(pred, target)) == pytest.approx(value.item(), rel=1e-12), type(loss).__name__
        np.testing.assert_allclose(loss.backward(), pt.grad.numpy(), rtol=1e-10, atol=1e-14)
