"""Caches belong to passes (tinynet/nn/module.py): the habits PyTorch users bring work with bounded memory.

A validation loss under ``model.eval()`` without ``no_grad``, a hand-written finite-difference check that
calls a layer or a loss again and again, a backward in eval mode (saliency), and weight sharing (inside a
forward, or across top-level calls in training mode) all get the gradients autograd would give; a
backward whose cache was dropped says so.
"""
import tracemalloc

import numpy as np
import pytest

import tinynet
from tinynet import nn
from tinynet.models import resnet18


def small(dtype=np.float64):
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    return net.to(dtype=dtype)


def pending(model):
    return {name: m.pending_calls for name, m in model.named_modules()}


def one_forward_counts(make, x):
    model = make()
    model.eval()
    model(x)
    return pending(model)


def test_validation_loss_in_eval_mode_without_no_grad_keeps_one_forward(rng):
    """The PyTorch habit: a validation loop under eval() that forgets no_grad (failed at the 9th batch)."""
    x = rng.standard_normal((4, 3, 6, 6))
    y = rng.integers(0, 5, 4)
    model, crit = small(), nn.CrossEntropyLoss()
    model.eval()
    losses = [float(crit(model(x + 0.01 * i), y)) for i in range(30)]
    with tinynet.no_grad():
        expected = [float(crit(model(x + 0.01 * i), y)) for i in range(30)]
    assert losses == expected
    assert pending(model) == one_forward_counts(small, x)  # one pass kept, not thirty
    assert crit.pending_calls <= crit.max_pending_passes


def test_validation_loop_memory_is_flat(rng):
    model = resnet18(10, width=8)
    model.eval()
    x = rng.standard_normal((4, 3, 32, 32)).astype(np.float32)
    crit, y = nn.CrossEntropyLoss(), np.arange(4) % 10
    tracemalloc.start()
    try:
        for _ in range(3):
            crit(model(x), y)
        after_three = tracemalloc.get_traced_memory()[0]
        for _ in range(12):
            crit(model(x), y)
        after_fifteen = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after_fifteen < after_three * 1.1 + 100_000, (after_three, after_fifteen)


@pytest.mark.parametrize("analytic_first", [True, False])
def test_hand_written_finite_differences_call_the_layer_and_the_loss_again_and_again(rng, analytic_first):
    """Central differences over every weight: 2 * 24 calls of the layer and of the loss, no backward."""
    lin, crit = nn.Linear(4, 6).double(), nn.CrossEntropyLoss()
    x, y = rng.standard_normal((3, 4)), np.array([0, 5, 2])

    def analytic():
        crit(lin(x), y)
        lin.zero_grad()
        lin.backward(crit.backward())
        return lin.weight.grad.copy()

    grad = analytic() if analytic_first else None
    numeric = np.zeros_like(lin.weight.data)
    h = 1e-6
    for i in np.ndindex(*lin.weight.shape):
        keep = lin.weight.data[i]
        lin.weight.data[i] = keep + h
        up = float(crit(lin(x), y))
        lin.weight.data[i] = keep - h
        down = float(crit(lin(x), y))
        lin.weight.data[i] = keep
        numeric[i] = (up - down) / (2 * h)
    if not analytic_first:
        grad = analytic()
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)
    assert lin.pending_calls <= lin.max_pending_passes


def test_backward_in_eval_mode_after_forwards_without_one_gives_the_input_gradient(rng):
    """Saliency after a few evaluation forwards: the backward consumes the newest pass."""
    model = small()
    for p in model.parameters():
        p.data = rng.standard_normal(p.shape)
    model(rng.standard_normal((2, 3, 6, 6)))  # training forward: BatchNorm gets running statistics
    model.release_saved()
    model.eval()
    x = rng.standard_normal((2, 3, 6, 6))
    for _ in range(3):
        model(rng.standard_normal((2, 3, 6, 6)))
    g = rng.standard_normal((2, 5))
    model(x)
    dx = model.backward(g)
    numeric = np.zeros_like(x)
    h = 1e-6
    with tinynet.no_grad():
        for i in np.ndindex(*x.shape):
            xp, xm = x.copy(), x.copy()
            xp[i] += h
            xm[i] -= h
            numeric[i] = np.sum(g * (model(xp) - model(xm))) / (2 * h)
    np.testing.assert_allclose(dx, numeric, rtol=1e-6, atol=1e-8)


class Siamese(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch = nn.Linear(4, 3)

    def forward(self, pair):
        a, b = pair
        return self.branch(a) - self.branch(b)

    def backward(self, dout):
        db = self.branch.backward(-dout)
        da = self.branch.backward(dout)
        return da, db


def test_weight_sharing_inside_a_forward_is_one_pass_in_eval_mode(rng):
    net = Siamese().double().eval()
    a, b = rng.standard_normal((2, 4)), rng.standard_normal((2, 4))
    for _ in range(4):  # earlier passes without a backward are dropped, not this one's first call
        net((a, b))
    g = rng.standard_normal((2, 3))
    net((a, b))
    da, db = net.backward(g)
    np.testing.assert_allclose(net.branch.weight.grad, g.T @ a - g.T @ b, rtol=1e-12)
    np.testing.assert_allclose(da, g @ net.branch.weight.data, rtol=1e-12)
    np.testing.assert_allclose(db, -g @ net.branch.weight.data, rtol=1e-12)


def test_weight_sharing_across_top_level_calls_in_training_mode(rng):
    lin = nn.Linear(4, 3).double()
    xs = [rng.standard_normal((2, 4)) for _ in range(lin.max_pending_passes)]
    for x in xs:
        lin(x)
    g = rng.standard_normal((2, 3))
    for _ in xs:
        lin.backward(g)
    np.testing.assert_allclose(lin.weight.grad, sum(g.T @ x for x in xs), rtol=1e-12)


def test_a_backward_whose_cache_was_dropped_says_so(rng):
    lin = nn.Linear(4, 3).double()
    x, g = rng.standard_normal((2, 4)), np.ones((2, 3))
    for _ in range(lin.max_pending_passes + 1):
        lin(x)
    for _ in range(lin.max_pending_passes):
        lin.backward(g)
    with pytest.raises(RuntimeError, match=r"Linear: the cache this backward needs was dropped.*max_pending_passes"):
        lin.backward(g)
    lin.eval()
    lin(x), lin(x)  # two top-level passes in eval mode: the first is dropped
    lin.backward(g)
    with pytest.raises(RuntimeError, match=r"dropped.*eval mode"):
        lin.backward(g)
    lin(x)  # a fresh start: the plain error again once the stack was empty
    lin.backward(g)
    with pytest.raises(RuntimeError, match=r"backward\(\) called before forward\(\)"):
        lin.backward(g)


def test_max_pending_passes_can_be_raised_on_an_instance(rng):
    lin = nn.Linear(4, 3).double()
    lin.max_pending_passes = 20
    x = rng.standard_normal((2, 4))
    for _ in range(20):
        lin(x)
    assert lin.pending_calls == 20
    lin(x)
    assert lin.pending_calls == 20


@pytest.mark.parametrize("fast", [True, False])
def test_dropped_passes_give_their_workspaces_back(rng, fast):
    conv = nn.Conv2d(3, 8, 3, padding=1).eval()
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    with tinynet.fast_path(fast):
        for _ in range(20):
            conv(x)
    assert conv.pending_calls == 1
    assert len(conv._free_cols) <= 2  # the dropped passes' columns are refilled, not 20 new ones


def test_a_dropped_softmax_output_may_be_overwritten(rng):
    soft, relu = nn.Softmax(dim=1).eval(), nn.ReLU(inplace=True)
    first = soft(rng.standard_normal((2, 3)))
    with pytest.raises(RuntimeError, match="keeps that output"):
        relu(first)
    soft(rng.standard_normal((2, 3)))  # a new pass in eval mode: the first call's cache is dropped
    relu(first)


def test_frozen_batchnorm_in_a_training_model_follows_the_model(rng):
    """A fine-tune that puts BatchNorm in eval mode: the pass is a training pass (the model's mode)."""
    model = small()
    model[1].eval()
    x = rng.standard_normal((2, 3, 6, 6))
    for _ in range(3):
        model(x)
    assert model[1].pending_calls == 3 and model[0].pending_calls == 3
