"""Fault injection, numerics: extreme logits stay finite in float32; a non-finite loss stops (or skips) cleanly.

tests/test_loss.py checks one cross-entropy case with logits of +-1e4 and
log-softmax of +-1000; tests/test_train.py stops on NaN *images* at a known
batch and skips them with ``on_nan="skip"`` in-process.  This file adds every
loss and the softmax layer in float32 at +-1e4 (values, gradients and dtypes),
an infinite loss, a NaN *gradient* behind a finite loss, and the command line:
a NaN injected at a known step names the epoch and batch, exits 1 and leaves
the last checkpoint loadable; ``--on-nan skip`` counts the batch and goes on.
"""
import json

import numpy as np
import pytest

import tinynet
from tinynet import nn, optim
from tinynet.data import ArrayDataset, DataLoader
from tinynet.models import simple_cnn
from tinynet.nn import functional as F
from tinynet.train import NonFiniteLossError, fit, load_checkpoint

from fault_inject import QUICK, call_main, image_folder, inject

BIG = 1e4

EXTREME_LOGITS = {
    "target largest": ([[BIG, -BIG, 0.0]], [0]),
    "target smallest": ([[BIG, -BIG, 0.0]], [1]),
    "all tied at +1e4": ([[BIG, BIG, BIG]], [2]),
    "all tied at -1e4": ([[-BIG, -BIG, -BIG]], [0]),
    "two huge, target between": ([[BIG, -BIG, BIG - 1]], [2]),
}


def reference_cross_entropy(z, t):
    """float64 loss and dL/dz, computed independently of tinynet."""
    z = np.asarray(z, np.float64)
    shifted = z - z.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = len(t)
    grad = np.exp(logp)
    grad[np.arange(n), t] -= 1
    return -logp[np.arange(n), t].mean(), grad / n


@pytest.mark.parametrize("case", list(EXTREME_LOGITS))
def test_cross_entropy_float32_extreme_logits_give_finite_exact_loss_and_gradient(case):
    z, t = EXTREME_LOGITS[case]
    z, t = np.array(z, np.float32), np.array(t)
    loss_fn = nn.CrossEntropyLoss()
    loss = loss_fn(z, t)
    grad = loss_fn.backward()
    assert loss.dtype == np.float32 and grad.dtype == np.float32
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    want_loss, want_grad = reference_cross_entropy(z, t)
    assert float(loss) == pytest.approx(want_loss, rel=1e-6, abs=1e-6)
    np.testing.assert_allclose(grad, want_grad, atol=1e-6)


def test_nll_of_float32_log_softmax_of_extreme_logits_is_finite():
    z = np.array([[BIG, -BIG], [-BIG, BIG]], np.float32)
    logp = F.log_softmax(z, axis=1)
    loss_fn = nn.NLLLoss()
    loss = loss_fn(logp, np.array([1, 1]))
    assert logp.dtype == np.float32 and float(loss) == pytest.approx(BIG, rel=1e-6)
    assert np.all(np.isfinite(loss_fn.backward()))


def test_bce_with_logits_float32_extreme_logits_are_finite_and_exact():
    x = np.array([BIG, -BIG, BIG, -BIG], np.float32)
    t = np.array([1.0, 0.0, 0.0, 1.0], np.float32)
    loss_fn = nn.BCEWithLogitsLoss()
    loss = loss_fn(x, t)
    grad = loss_fn.backward()
    assert loss.dtype == np.float32 and grad.dtype == np.float32
    assert float(loss) == pytest.approx(BIG / 2, rel=1e-6)  # two right (0 each), two wrong by 1e4 each
    np.testing.assert_allclose(grad, [0.0, 0.0, 0.25, -0.25], atol=1e-7)


def test_bce_on_saturated_float32_probabilities_is_finite():
    p = np.array([0.0, 1.0, 0.0, 1.0], np.float32)
    t = np.array([0.0, 1.0, 1.0, 0.0], np.float32)
    loss_fn = nn.BCELoss()
    loss = loss_fn(p, t)
    grad = loss_fn.backward()
    assert float(loss) == pytest.approx(50.0)  # PyTorch's clamp at -100 for the two wrong ones
    assert np.all(np.isfinite(grad)) and grad.dtype == np.float32


def test_softmax_layer_float32_extreme_logits_forward_and_backward_are_finite(rng):
    # The --softmax-before-loss path: a Softmax layer in front of the loss.
    layer = nn.Softmax(dim=1)
    z = np.array([[BIG, -BIG, 0.0], [-BIG, -BIG, BIG]], np.float32)
    y = layer(z)
    np.testing.assert_allclose(y, [[1, 0, 0], [0, 0, 1]], atol=1e-7)
    dz = layer.backward(rng.standard_normal(y.shape).astype(np.float32))
    assert y.dtype == dz.dtype == np.float32 and np.all(np.isfinite(dz))


# ---------------------------------------------------------------------------
# Non-finite losses in fit
# ---------------------------------------------------------------------------
def toy(seed=0):
    tinynet.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (48, 16, 16, 3)).astype(np.uint8)
    data = ArrayDataset(images, np.arange(48) % 2, ["a", "b"])
    model = simple_cnn(2, image_size=16)
    return (model, optim.Adam(model.parameters(), lr=1e-3), DataLoader(data, np.arange(32), 8, shuffle=True),
            DataLoader(data, np.arange(32, 48), 8))


class FaultyLoss(nn.CrossEntropyLoss):
    """Cross-entropy whose training step ``at`` (1-based, over epochs) has an infinite loss or a NaN gradient."""

    def __init__(self, at, fault):
        super().__init__()
        self.at, self.fault, self.steps = at, fault, 0

    def forward(self, logits, target):
        loss = super().forward(logits, target)
        if tinynet.is_grad_enabled():
            self.steps += 1
            if self.steps == self.at and self.fault == "inf":
                return loss + np.float32(np.inf)
        return loss

    def backward(self, dloss=1.0):
        grad = super().backward(dloss)
        return grad * np.float32(np.nan) if self.steps == self.at and self.fault == "nan grad" else grad


def test_infinite_loss_stops_with_epoch_and_batch(tmp_path):
    model, opt, train, val = toy()
    with pytest.raises(NonFiniteLossError, match=r"loss became inf in epoch 2, batch 3") as info:
        fit(model, opt, FaultyLoss(7, "inf"), train, val, epochs=3, checkpoint_path=tmp_path / "c.npz",
            progress=False, log=None)
    assert (info.value.epoch, info.value.batch) == (1, 2)
    assert load_checkpoint(tmp_path / "c.npz", simple_cnn(2, image_size=16))["epoch"] == 1


def test_nan_gradient_behind_a_finite_loss_never_overwrites_the_last_good_checkpoint(tmp_path):
    # Step 8 is the last batch of epoch 2: its loss is finite, its gradient NaN, so the weights
    # that epoch 2 ends with are NaN.  They must not replace epoch 1's checkpoint.
    model, opt, train, val = toy()
    path = tmp_path / "c.npz"
    message = r"0\.weight is not finite in epoch 2, although every loss was finite"
    with pytest.raises(NonFiniteLossError, match=message) as info:
        fit(model, opt, FaultyLoss(8, "nan grad"), train, val, epochs=3, checkpoint_path=path, progress=False,
            log=None)
    assert info.value.checkpoint == path
    fresh = simple_cnn(2, image_size=16)
    assert load_checkpoint(path, fresh)["epoch"] == 1
    assert all(np.all(np.isfinite(value)) for value in fresh.state_dict().values())


def test_a_skipped_batch_leaves_no_cache_behind():
    """Caches are per call: a forward whose backward never comes must not keep its memory for ever."""
    model, opt, train, val = toy()
    fit(model, opt, FaultyLoss(2, "inf"), train, val, epochs=1, on_nan="skip", progress=False, log=None)
    assert all(m.pending_calls == 0 for m in model.modules())


# ---------------------------------------------------------------------------
# Through the command line (2 training steps per epoch: 14 images, batches of 7)
# ---------------------------------------------------------------------------
def test_cli_nan_at_a_known_step_names_epoch_and_batch_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    data, out = image_folder(tmp_path / "data"), tmp_path / "out"
    inject("nan", 3, patch=monkeypatch.setattr)
    status, _, err = call_main(capsys, "cnn", "--data", data, "--out", out, *QUICK)
    assert status == 1 and len(err.strip().splitlines()) == 1
    assert "loss became nan in epoch 2, batch 1" in err
    assert f"the last good checkpoint is {out / 'checkpoint.npz'}" in err
    fresh = simple_cnn(2, image_size=16)
    assert load_checkpoint(out / "checkpoint.npz", fresh)["epoch"] == 1
    assert all(np.all(np.isfinite(value)) for value in fresh.state_dict().values())


def test_cli_on_nan_skip_skips_and_counts_the_batch(tmp_path, capsys, monkeypatch):
    data, out = image_folder(tmp_path / "data"), tmp_path / "out"
    inject("nan", 3, patch=monkeypatch.setattr)
    status, stdout, err = call_main(capsys, "cnn", "--data", data, "--out", out, *QUICK, "--on-nan", "skip")
    assert status == 0, err
    assert "skipped 1 non-finite batches" in stdout
    epochs = json.loads((out / "metrics.json").read_text())["history"]["epochs"]
    assert [e["skipped_batches"] for e in epochs] == [0, 1]
    fresh = simple_cnn(2, image_size=16)
    load_checkpoint(out / "checkpoint.npz", fresh)
    assert all(np.all(np.isfinite(value)) for value in fresh.state_dict().values())
