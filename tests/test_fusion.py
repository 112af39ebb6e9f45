"""tinynet.nn.fusion: the fused evaluation forward equals the layers one by one, and runs only without a backward."""
import numpy as np
import pytest

import tinynet
from tinynet import nn
from tinynet.models import resnet18
from tinynet.nn.fast import epilogues as fusion  # the evaluation-time epilogues (once tinynet.nn.fusion)
from fastpath import fast_path_on  # noqa: F401  (a fixture)

pytestmark = pytest.mark.usefixtures("fast_path_on")  # tests of the fast path itself (tinynet.nn.fast)


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
    original = fusion.can_run_in_place
    fusion.can_run_in_place = lambda *a, **k: False
    try:
        with tinynet.no_grad():
            return model(x)
    finally:
        fusion.can_run_in_place = original


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


# ---------------------------------------------------------------------------
# ReLU and max pooling commute: the models run the pool first
# ---------------------------------------------------------------------------
def _run_in_order(layers, x, g):
    """Forward through ``layers`` in the given order, then backward reversed; the output and dx."""
    for layer in layers:
        x = layer(x)
    out = x.copy()
    for layer in reversed(layers):
        g = layer.backward(g)
    return out, g


def _awkward_input(rng, shape, dtype):
    """Values with ties, exact zeros, windows that are all negative, and a NaN."""
    x = rng.standard_normal(shape)
    x[rng.random(shape) < 0.2] = 0.0
    x = np.round(x, 1)  # many ties
    x[0, 0, :4, :4] = -1.5  # an all-negative window
    x[-1, -1, 1, 2] = np.nan
    return x.astype(dtype)


@pytest.mark.parametrize("pool", [(4, None, 0), (2, None, 0), (3, 2, 1), (2, 1, 0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_then_max_pool_equals_max_pool_then_relu_bit_for_bit(pool, dtype):
    from tinynet.nn.fusion import pool_before_relu

    rng = np.random.default_rng(7)
    x = _awkward_input(rng, (3, 4, 12, 12), dtype)
    layers = [nn.ReLU(), nn.MaxPool2d(*pool)]
    swapped = pool_before_relu(layers)
    assert [type(m) for m in swapped] == [nn.MaxPool2d, nn.ReLU]
    g = rng.standard_normal(layers[1](layers[0](x)).shape).astype(dtype)
    layers[0].release_saved(), layers[1].release_saved()
    out_ref, dx_ref = _run_in_order(layers, x, g)
    out, dx = _run_in_order(swapped, x, g)
    np.testing.assert_array_equal(out, out_ref)
    np.testing.assert_array_equal(dx, dx_ref)


def test_pool_before_relu_swaps_only_exact_adjacent_pairs():
    from tinynet.nn.fusion import pool_before_relu

    class MyReLU(nn.ReLU):
        pass

    relu, pool, conv = nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(1, 1, 1)
    assert pool_before_relu([relu, conv, pool]) == [relu, conv, pool]
    assert pool_before_relu([conv, relu, pool, relu]) == [conv, pool, relu, relu]
    mine = MyReLU()
    assert pool_before_relu([mine, pool]) == [mine, pool]
    assert pool_before_relu([relu, nn.AvgPool2d(2)])[0] is relu


@pytest.mark.parametrize("model_name", ["cnn", "resnet18"])
def test_models_running_the_pool_first_match_the_listed_order(model_name):
    from tinynet.models import resnet18, simple_cnn

    rng = np.random.default_rng(11)
    tinynet.manual_seed(0)
    if model_name == "cnn":
        model = simple_cnn(5, image_size=16).double()
        listed = list(model)
    else:
        model = resnet18(5, width=4).double()
        listed = [model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3,
                  model.layer4, model.avgpool, model.flatten, model.fc]
    x = _awkward_input(rng, (2, 3, 16, 16), np.float64)
    x[-1, -1, 1, 2] = 0.5  # no NaN here: it would make every gradient NaN
    g = rng.standard_normal((2, 5))

    def grads():
        return {k: p.grad.copy() for k, p in model.named_parameters()}

    model.zero_grad()
    out_ref, dx_ref = _run_in_order(listed, x, g)
    ref = grads()
    model.zero_grad()
    out = model(x)
    dx = model.backward(g)
    np.testing.assert_array_equal(out, out_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    for k, v in grads().items():
        np.testing.assert_array_equal(v, ref[k], err_msg=k)


def _user_cnn():
    """A CNN as a user writes it: conv -> ReLU -> max pool, an in-place ReLU, an overlapping pool."""
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).double()


@pytest.mark.parametrize("fast_forward", [True, False])
def test_resnet_backward_follows_the_order_of_its_forward(rng, fast_forward):
    """The stem's ReLU and max pool run in another order on the fast path; a switch moved between forward
    and backward used to make the backward undo the other order (a shape error)."""
    from tinynet.models import resnet18

    tinynet.manual_seed(0)
    model = resnet18(5, width=4).double()
    x = rng.standard_normal((2, 3, 16, 16))
    g = rng.standard_normal((2, 5))
    with tinynet.fast_path(fast_forward):
        model(x)
        expected = model.backward(g)
        model.zero_grad()
        model(x)
    with tinynet.fast_path(not fast_forward):
        dx = model.backward(g)
    np.testing.assert_allclose(dx, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("switch_before_backward", [False, True])
def test_any_sequential_runs_each_relu_after_its_max_pool_bit_for_bit(rng, switch_before_backward):
    """Issue 23: the reordering is automatic for a user's Sequential, not only for simple_cnn."""
    model = _user_cnn()
    order = model._run_order()
    assert [type(m).__name__ for m in order[:6]] == ["Conv2d", "MaxPool2d", "ReLU", "Conv2d", "MaxPool2d", "ReLU"]
    x = _awkward_input(rng, (2, 3, 16, 16), np.float64)
    x[-1, -1, 1, 2] = 0.5  # no NaN: it would make every gradient NaN
    g = rng.standard_normal((2, 5))

    def grads():
        return {k: p.grad.copy() for k, p in model.named_parameters()}

    model.zero_grad()
    out_ref, dx_ref = _run_in_order(list(model), x, g)
    ref = grads()
    model.zero_grad()
    out = model(x)
    with tinynet.fast_path(not switch_before_backward):  # the backward follows the forward's order
        dx = model.backward(g)
    np.testing.assert_array_equal(out, out_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    for k, v in grads().items():
        np.testing.assert_array_equal(v, ref[k], err_msg=k)
    with tinynet.fast_path(False):
        assert model._run_order() == list(model)  # the plain path runs the layers as written
