"""tinynet.nn.fusion: the fused evaluation forward equals the layers one by one, and runs only without a backward."""
import numpy as np
import pytest

import tinynet
from tinynet import nn
from tinynet.models import resnet18
from tinynet.nn import fusion


def _randomise_batch_norms(model, rng):
    """Non-trivial running statistics and affine parameters, so that folding them is visible."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean[...] = rng.standard_normal(c)
            m.running_var[...] = rng.uniform(0.3, 3.0, c)
            if m.affine:
                m.weight.data[...] = rng.standard_normal(c)
                m.bias.data[...] = rng.standard_normal(c)


def _unfused(model, x):
    """The eval forward with every layer by itself (fusion switched off)."""
    original = fusion.can_fuse
    fusion.can_fuse = lambda *a, **k: False
    try:
        with tinynet.no_grad():
            return model(x)
    finally:
        fusion.can_fuse = original


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fused_resnet18_eval_forward_equals_the_layers(dtype, rng):
    model = resnet18(10, width=8, rng=rng)
    _randomise_batch_norms(model, rng)
    model.to(dtype=dtype).eval()
    x = rng.standard_normal((3, 3, 32, 32)).astype(dtype)
    with tinynet.no_grad():
        fused = model(x)
    # the same operations in the same order: equal bit for bit (stronger than 1e-10 or float32 rounding)
    np.testing.assert_array_equal(fused, _unfused(model, x))


def test_fusion_runs_only_in_eval_mode_without_gradients(rng, monkeypatch):
    model = resnet18(10, width=8, rng=rng)
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    calls = []
    real = fusion.conv_bn_eval
    monkeypatch.setattr(fusion, "conv_bn_eval", lambda *a, **k: calls.append(1) or real(*a, **k))
    model.train()
    model(x)
    model.release_saved()
    with tinynet.no_grad():
        model(x)  # training mode under no_grad: batch statistics, never fused
    model.eval()
    model(x)  # eval with gradients enabled: the backward needs every layer's cache
    model.release_saved()
    assert calls == []
    with tinynet.no_grad():
        model(x)
    assert len(calls) == 1 + 8 * 2 + 3  # the stem, two per block, three downsamples


def test_eval_with_gradients_still_backpropagates(rng):
    model = resnet18(10, width=8, rng=rng).eval()
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    out = model(x)
    model.backward(np.ones_like(out))
    assert model.conv1.weight.grad is not None


def test_no_cached_fold_after_in_place_changes(rng):
    model = resnet18(10, width=8, rng=rng)
    _randomise_batch_norms(model, rng)
    model.to(dtype="float64").eval()
    x = rng.standard_normal((2, 3, 32, 32))
    with tinynet.no_grad():
        before = model(x)
    model.layer1[0].bn1.running_mean += 0.5  # as a training step or load_state_dict would, in place
    model.layer1[0].conv1.weight.data *= 1.5
    with tinynet.no_grad():
        after = model(x)
    assert not np.allclose(before, after)
    np.testing.assert_array_equal(after, _unfused(model, x))


@pytest.mark.parametrize("bias, affine", [(True, True), (False, False)])
@pytest.mark.parametrize("relu, residual", [(False, False), (True, False), (True, True)])
def test_conv_bn_eval_equals_the_plain_version(bias, affine, relu, residual, rng):
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=bias, rng=rng, dtype="float64")
    bn = nn.BatchNorm2d(6, affine=affine, dtype="float64")
    _randomise_batch_norms(bn, rng)
    conv.eval(), bn.eval()
    x = rng.standard_normal((3, 4, 9, 9))
    shortcut = rng.standard_normal((3, 6, 5, 5)) if residual else None
    kept = None if shortcut is None else shortcut.copy()
    with tinynet.no_grad():
        got = fusion.conv_bn_eval(conv, bn, x, relu=relu, residual=shortcut)
        expected = fusion.conv_bn_eval_plain(conv, bn, x, relu=relu, residual=shortcut)
    np.testing.assert_array_equal(got, expected)
    if residual:
        np.testing.assert_array_equal(shortcut, kept)  # the shortcut is only read


def test_a_block_with_another_downsample_or_relu_runs_unfused(rng):
    class Shortcut(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 1, stride=2, bias=False, rng=rng, dtype="float64")

        def forward(self, x):
            return self.conv(x)

    block = nn.BasicBlock(4, 8, stride=2, downsample=Shortcut(), rng=rng, dtype="float64").eval()
    _randomise_batch_norms(block, rng)
    x = rng.standard_normal((2, 4, 8, 8))
    with tinynet.no_grad():
        fused = block(x)
    np.testing.assert_array_equal(fused, _unfused(block, x))


def test_fused_forward_keeps_the_layers_input_checks(rng):
    model = resnet18(10, width=8, rng=rng).eval()
    with tinynet.no_grad(), pytest.raises(ValueError, match="conv1"):
        model(rng.standard_normal((2, 4, 32, 32)).astype(np.float32))
    with tinynet.no_grad(), pytest.raises(ValueError, match="dtype"):
        model(rng.standard_normal((2, 3, 32, 32)))  # float64 into a float32 model
