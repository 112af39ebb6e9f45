"""Losses and the stable functions, including the assignment's worked values."""
import math

import numpy as np
import pytest

from tinynet import nn
from tinynet.gradcheck import gradcheck
from tinynet.nn import functional as F

from conftest import torch_or_skip
from fastpath import path  # noqa: F401  (a fixture: the test runs on the fast and the plain path)

LN2 = math.log(2)


def bce(t, p):
    loss = nn.BCELoss()
    return float(loss(np.array([p], np.float64), np.array([t], np.float64)))


def test_bce_worked_values_from_the_assignment():
    assert bce(0, 0.9) == pytest.approx(2.302585, abs=1e-6)  # nats
    assert bce(0, 0.9) / LN2 == pytest.approx(3.32, abs=5e-3)  # bits
    pairs = np.array([[1, 0.1], [0, 0.2], [0, 0.7]])
    mean_nats = float(nn.BCELoss()(pairs[:, 1].copy(), pairs[:, 0].copy()))
    assert mean_nats / LN2 == pytest.approx(1.79, abs=5e-3)
    assert mean_nats == pytest.approx(np.mean([bce(t, p) for t, p in pairs]))


def test_bce_gradient_formula(rng):
    p = rng.uniform(0.05, 0.95, (4, 3))
    t = rng.integers(0, 2, (4, 3)).astype(np.float64)
    loss = nn.BCELoss()
    loss(p, t)
    np.testing.assert_allclose(loss.backward(), (p - t) / (p * (1 - p)) / p.size)
    gradcheck(nn.BCELoss(), p, target=t).assert_ok()


def test_bce_rejects_probabilities_outside_unit_interval():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        nn.BCELoss()(np.array([1.5]), np.array([1.0]))


def test_bce_with_logits_stable_and_consistent(rng):
    x = rng.standard_normal((5, 2)) * 3
    t = rng.uniform(0, 1, (5, 2))
    gradcheck(nn.BCEWithLogitsLoss(), x, target=t).assert_ok()
    via_probs = float(nn.BCELoss()(F.sigmoid(x), t))
    assert float(nn.BCEWithLogitsLoss()(x, t)) == pytest.approx(via_probs, rel=1e-10)
    extreme = np.array([1e4, -1e4, 0.0], np.float32)
    loss = nn.BCEWithLogitsLoss()
    value = float(loss(extreme, np.array([0.0, 1.0, 1.0], np.float32)))
    assert math.isfinite(value) and value == pytest.approx((1e4 + 1e4 + LN2) / 3, rel=1e-6)
    assert np.all(np.isfinite(loss.backward()))


def test_cross_entropy_gradient_is_yhat_minus_y(rng):
    z = rng.standard_normal((4, 5))
    t = np.array([0, 3, 4, 1])
    loss = nn.CrossEntropyLoss()
    value = loss(z, t)
    y_hat = F.softmax(z, axis=1)
    onehot = np.eye(5)[t]
    np.testing.assert_allclose(loss.backward(), (y_hat - onehot) / 4)
    assert float(value) == pytest.approx(-np.mean(np.log(y_hat[np.arange(4), t])))
    gradcheck(nn.CrossEntropyLoss(), z, target=t).assert_ok()
    gradcheck(nn.CrossEntropyLoss(reduction="sum"), z, target=t).assert_ok()


def test_cross_entropy_extreme_logits_are_finite():
    z = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]], np.float32)
    loss = nn.CrossEntropyLoss()
    value = float(loss(z, np.array([1, 1])))
    assert value == pytest.approx(1e4, rel=1e-6)
    g = loss.backward()
    assert np.all(np.isfinite(g))


def test_cross_entropy_bad_targets():
    z = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"in \[0, 3\] for 4 classes.*\[0, 4\]"):
        nn.CrossEntropyLoss()(z, np.array([0, 1, 4]))
    with pytest.raises(ValueError, match="integer class indices"):
        nn.CrossEntropyLoss()(z, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"targets of shape \(3,\)"):
        nn.CrossEntropyLoss()(z, np.array([0, 1]))
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        nn.CrossEntropyLoss()(np.zeros(4, np.float32), np.array([0]))


def test_nll_loss_matches_cross_entropy(rng):
    z = rng.standard_normal((4, 3))
    t = np.array([2, 0, 1, 1])
    nll = nn.NLLLoss()
    assert float(nll(F.log_softmax(z, axis=1), t)) == pytest.approx(float(nn.CrossEntropyLoss()(z, t)))
    gradcheck(nn.NLLLoss(), z, target=t).assert_ok()


def test_log_softmax_exact_for_huge_logits():
    z = np.array([1000.0, 0.0, -1000.0])
    out = F.log_softmax(z)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, [0.0, -1000.0, -2000.0])
    np.testing.assert_allclose(F.softmax(z), [1.0, 0.0, 0.0])
    z32 = z.astype(np.float32)
    assert np.all(np.isfinite(F.log_softmax(z32))) and F.log_softmax(z32).dtype == np.float32


def test_softmax_jacobian_entries(rng):
    z = rng.standard_normal(4)
    y = F.softmax(z)
    jac = F.softmax_jacobian(y)
    for k in range(4):
        assert jac[k, k] == pytest.approx(y[k] * (1 - y[k]))
        for u in range(4):
            if u != k:
                assert jac[k, u] == pytest.approx(-y[u] * y[k])
    # and it is the true derivative
    h = 1e-6
    for u in range(4):
        e = np.zeros(4)
        e[u] = h
        np.testing.assert_allclose((F.softmax(z + e) - F.softmax(z - e)) / (2 * h), jac[:, u], atol=1e-8)


def test_sigmoid_stable():
    x = np.array([-1000.0, -30.0, 0.0, 30.0, 1000.0])
    s = F.sigmoid(x)
    assert np.all(np.isfinite(s))
    expected = [math.exp(v) / (1 + math.exp(v)) if v < 0 else 1 / (1 + math.exp(-v)) for v in x]
    np.testing.assert_allclose(s, expected, rtol=1e-12)


def test_cross_entropy_pytorch_parity(path, rng):
    torch = torch_or_skip()
    z = rng.standard_normal((6, 5)).astype(np.float32) * 4
    t = rng.integers(0, 5, 6)
    zt = torch.from_numpy(z).requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(zt, torch.from_numpy(t))
    ref.backward()
    loss = nn.CrossEntropyLoss()
    assert float(loss(z, t)) == pytest.approx(ref.item(), rel=1e-6)
    np.testing.assert_allclose(loss.backward(), zt.grad.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss, pred, target", [
    (nn.CrossEntropyLoss(), np.zeros((0, 3), np.float32), np.zeros(0, np.int64)),
    (nn.NLLLoss(), np.zeros((0, 3), np.float32), np.zeros(0, np.int64)),
    (nn.BCEWithLogitsLoss(), np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)),
    (nn.BCELoss(), np.zeros(0, np.float32), np.zeros(0, np.float32)),
])
def test_an_empty_batch_is_a_clear_error(loss, pred, target):
    with pytest.raises(ValueError, match=rf"{type(loss).__name__}: empty batch"):
        loss(pred, target)


def test_targets_on_the_device_are_range_checked_too(monkeypatch):
    """On CuPy, an out-of-range index wraps around; the check must not be skipped for device targets.

    A NumPy subclass stands in for device arrays, so the branch runs on the CPU.
    """
    from tinynet import backend

    class DeviceArray(np.ndarray):
        pass

    monkeypatch.setattr(backend, "is_cupy_array", lambda x: isinstance(x, DeviceArray))
    z = np.zeros((3, 4), np.float32).view(DeviceArray)
    for bad in ([0, 1, 4], [0, -1, 2]):
        with pytest.raises(ValueError, match=r"in \[0, 3\] for 4 classes"):
            nn.CrossEntropyLoss()(z, np.array(bad).view(DeviceArray))
