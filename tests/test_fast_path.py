"""The one switch (tinynet.fast_path, TINYNET_FAST): the plain path is the fast path's oracle."""
import os
import subprocess
import sys

import numpy as np
import pytest

import tinynet
from tinynet import nn
from tinynet.models import simple_cnn
from tinynet.nn import fast


def _rel(a, b):
    return np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(np.max(np.abs(np.asarray(b))), 1e-300)


def _step(model, x, t):
    """One float64 training step's logits, loss and every parameter gradient."""
    model.zero_grad()
    loss_fn = nn.CrossEntropyLoss()
    logits = model(x)
    loss = loss_fn(logits, t)
    model.backward(loss_fn.backward())
    grads = {name: p.grad.copy() for name, p in model.named_parameters()}
    return np.array(logits), float(loss), grads


def test_a_float64_cnn_training_step_is_the_same_on_both_paths(rng):
    # (ResNet18's: tests/test_residual_and_models.py.)  The CNN runs its ReLU/max-pool pairs
    # reordered on the fast path and in their own order on the plain path.
    model = simple_cnn(10, rng=rng).to(dtype="float64").train()
    x, t = rng.standard_normal((4, 3, 64, 64)), rng.integers(0, 10, 4)
    with tinynet.fast_path(True):
        fast_logits, fast_loss, fast_grads = _step(model, x, t)
    with tinynet.fast_path(False):
        logits, loss, grads = _step(model, x, t)
    assert _rel(logits, fast_logits) < 1e-10
    assert abs(loss - fast_loss) <= 1e-10 * abs(fast_loss)
    assert grads.keys() == fast_grads.keys()
    for name in grads:
        assert _rel(grads[name], fast_grads[name]) < 1e-10, name


def test_the_switch_is_a_function_and_a_context_manager(monkeypatch):
    monkeypatch.delenv("TINYNET_FAST", raising=False)
    assert fast.enabled()
    with tinynet.fast_path(False):
        assert not fast.enabled()
        with tinynet.fast_path(True):
            assert fast.enabled()
        assert not fast.enabled()
    assert fast.enabled()
    monkeypatch.setenv("TINYNET_FAST", "0")
    assert not fast.enabled()
    with tinynet.fast_path(True):  # the API overrides the environment
        assert fast.enabled()
    assert not fast.enabled()
    with pytest.raises(TypeError, match="True or False"):
        tinynet.fast_path("no")


@pytest.mark.parametrize("layer, shape", [
    (lambda rng: nn.Conv2d(3, 4, 3, padding=1, rng=rng, dtype="float64"), (2, 3, 6, 5)),
    (lambda rng: nn.Conv2d(4, 4, 1, rng=rng, dtype="float64"), (2, 4, 5, 5)),
    (lambda rng: nn.BatchNorm2d(3, dtype="float64"), (2, 3, 4, 5)),
    (lambda rng: nn.BatchNorm1d(3, dtype="float64"), (4, 3)),
    (lambda rng: nn.MaxPool2d(3, 2, 1), (2, 3, 7, 6)),
    (lambda rng: nn.AvgPool2d(2), (2, 3, 6, 6)),
    (lambda rng: nn.AdaptiveAvgPool2d(1), (2, 3, 5, 4)),
    (lambda rng: nn.ReLU(), (2, 3, 4, 4)),
])
def test_the_plain_path_is_the_fast_paths_oracle_and_returns_plain_nchw(layer, shape, rng):
    layer = layer(rng)
    x = rng.standard_normal(shape)
    for mode in ("train", "eval"):
        getattr(layer, mode)()
        results = {}
        for on in (True, False):
            with tinynet.fast_path(on):
                y = layer(x)
                dout = np.random.default_rng(1).standard_normal(y.shape)
                results[on] = (np.array(y), np.array(layer.backward(dout)))
                if not on:
                    assert y.flags.c_contiguous and results[on][1].shape == x.shape
        for a, b in zip(results[True], results[False]):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_backward_follows_the_path_of_its_forward(rng):
    layer = nn.Conv2d(3, 4, 3, padding=1, rng=rng, dtype="float64")
    x, dout = rng.standard_normal((2, 3, 5, 5)), rng.standard_normal((2, 4, 5, 5))
    with tinynet.fast_path(False):
        layer(x)
    dx_mixed = layer.backward(dout)  # forward plain, backward with the fast path on
    layer(x)
    np.testing.assert_allclose(dx_mixed, layer.backward(dout), rtol=1e-12, atol=1e-12)


def test_the_plain_path_starts_no_thread(rng):
    code = ("import threading, numpy as np, tinynet; from tinynet import optim; "
            "from tinynet.models import resnet18; "
            "m = resnet18(10, width=16); o = optim.Adam(m.parameters()); x = np.ones((16, 3, 64, 64), 'f'); "
            "y = m(x); m.backward(np.ones_like(y)); o.step(); "
            "print(sorted(t.name for t in threading.enumerate()))")
    env = dict(os.environ, TINYNET_FAST="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "tinynet" not in out, out
    env["TINYNET_FAST"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    if (os.cpu_count() or 1) > 1:
        assert "tinynet" in out, out  # the check above can fail: the fast path does start them
