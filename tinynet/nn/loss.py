"""Loss functions: forward(pred, target) -> scalar, backward() -> dL/d(pred).

All losses average over the batch by default (``reduction="mean"``) and return
a 0-d array on the prediction's device (call ``float(loss)`` to read it; on a
GPU that waits for the device, so do it once per log interval, not per batch).
An empty batch is an error (a mean over nothing has no value), not a
ZeroDivisionError or a silent NaN.

Class targets are range-checked on both devices.  On the GPU the check is one
reduction on the device and one read-back of its result (a synchronisation
per step): CuPy's indexing *wraps* an out-of-range index where NumPy raises,
so an unchecked bad label would silently train another class.  The read-back
comes at the end of the forward, when the host must wait for the GPU's
forward anyway before queueing much of the backward; it costs about one
kernel launch (microseconds), not the step's overlap.

Cross-entropy from logits ``z`` (N, K) and integer targets ``t`` (N,)::

    L = -(1/N) sum_n log softmax(z_n)[t_n]
    dL/dz = (softmax(z) - onehot(t)) / N                      (y_hat - y)

The log-softmax goes through logsumexp (:mod:`tinynet.nn.functional`), never
``log(softmax)``: the latter underflows to ``log(0) = -inf``.

Binary cross-entropy on probabilities ``p`` with targets ``t`` in [0, 1]::

    BCE(t, p) = -(t log p + (1 - t) log(1 - p))
    dBCE/dp   = (p - t) / (p (1 - p))

In bits (log base 2), BCE(0, 0.9) = -log2(0.1) = 3.32; tinynet works in nats
(natural log, 2.303 for the same pair), like PyTorch; divide by ln 2 for bits.
As in PyTorch, each log is clamped at -100 so that p = 0 or 1 gives a finite
loss, and the gradient's denominator at 1e-12.  Prefer the logits version:

    BCEWithLogits(x, t) = max(x, 0) - x t + log(1 + exp(-|x|))
    d/dx                = sigmoid(x) - t

which is the same function of ``p = sigmoid(x)``, exact and finite for any x.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from .functional import log_softmax, sigmoid
from .module import Module

__all__ = ["CrossEntropyLoss", "NLLLoss", "BCEWithLogitsLoss", "BCELoss"]


class _Loss(Module):
    def __init__(self, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"{type(self).__name__}: reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction

    def extra_repr(self):
        return f"reduction={self.reduction!r}"

    def __call__(self, pred, target):
        return super().__call__(pred, target)

    def _scale(self, count):
        return 1.0 / count if self.reduction == "mean" else 1.0

    def _check_pred(self, pred, ndim=None):
        dtype = getattr(pred, "dtype", None)
        if dtype is None or not np.issubdtype(dtype, np.floating):
            raise ValueError(f"{self._describe()}: predictions must be a floating-point array, got "
                             f"{type(pred).__name__} of dtype {dtype}")
        if ndim is not None and pred.ndim != ndim:
            raise ValueError(f"{self._describe()}: expected predictions of shape (N, K), received {tuple(pred.shape)}")

    def _class_targets(self, pred, target):
        """Validate integer class targets (N,) against predictions (N, K); move them to pred's device."""
        self._check_pred(pred, ndim=2)
        n, k = pred.shape
        if not hasattr(target, "dtype"):
            target = np.asarray(target)
        if not np.issubdtype(target.dtype, np.integer):
            raise ValueError(f"{self._describe()}: targets must be integer class indices, got dtype {target.dtype}")
        if target.shape != (n,):
            raise ValueError(f"{self._describe()}: expected targets of shape ({n},) for predictions "
                             f"{tuple(pred.shape)}, received {tuple(target.shape)}")
        self._check_not_empty(n)
        # One reduction (on the device for device targets) and one read-back; the extremes are only
        # computed for the error message, once something is wrong.
        xp = backend.get_array_module(target)
        if bool(xp.logical_or(target < 0, target >= k).any()):
            lo, hi = int(target.min()), int(target.max())
            raise ValueError(f"{self._describe()}: targets must be in [0, {k - 1}] for {k} classes, "
                             f"got values in [{lo}, {hi}]")
        if backend.is_cupy_array(pred) != backend.is_cupy_array(target):
            target = backend.to_device(target, backend.device_of(pred))
        return target

    def _check_not_empty(self, count) -> None:
        if count == 0:
            raise ValueError(f"{self._describe()}: empty batch (no predictions); a loss needs at least one")

    def _same_shape_targets(self, pred, target):
        self._check_pred(pred)
        self._check_not_empty(pred.size)
        xp = backend.get_array_module(pred)
        if backend.is_cupy_array(pred) != backend.is_cupy_array(target):
            target = backend.to_device(target, backend.device_of(pred))
        target = xp.asarray(target)
        if target.shape != pred.shape:
            raise ValueError(f"{self._describe()}: targets must have the predictions' shape "
                             f"{tuple(pred.shape)}, received {tuple(target.shape)}")
        return target.astype(pred.dtype, copy=False)


class CrossEntropyLoss(_Loss):
    """Softmax cross-entropy from logits (N, K) and integer targets (N,)."""

    def forward(self, logits, target):
        target = self._class_targets(logits, target)
        xp = backend.get_array_module(logits)
        n = logits.shape[0]
        logp = log_softmax(logits, axis=1)
        rows = xp.arange(n)
        loss = -logp[rows, target].sum() * self._scale(n)
        self._save_for_backward(logp, target)
        return loss

    def backward(self, dloss=1.0):
        logp, target = self._saved_for_backward()
        xp = backend.get_array_module(logp)
        n = logp.shape[0]
        grad = xp.exp(logp)  # softmax probabilities y_hat
        grad[xp.arange(n), target] -= 1.0  # y_hat - y
        grad *= self._scale(n) * dloss
        return grad


class NLLLoss(_Loss):
    """Negative log-likelihood of log-probabilities (N, K) (e.g. from log_softmax) and targets (N,)."""

    def forward(self, logp, target):
        target = self._class_targets(logp, target)
        xp = backend.get_array_module(logp)
        n = logp.shape[0]
        loss = -logp[xp.arange(n), target].sum() * self._scale(n)
        self._save_for_backward(logp.shape, logp.dtype, target)
        return loss

    def backward(self, dloss=1.0):
        shape, dtype, target = self._saved_for_backward()
        xp = backend.get_array_module(target)
        grad = xp.zeros(shape, dtype=dtype)
        grad[xp.arange(shape[0]), target] = -self._scale(shape[0]) * dloss
        return grad


class BCEWithLogitsLoss(_Loss):
    """Binary cross-entropy from logits, any shape; targets in [0, 1] of the same shape."""

    def forward(self, x, target):
        target = self._same_shape_targets(x, target)
        xp = backend.get_array_module(x)
        # max(x, 0) - x t + log(1 + exp(-|x|)): no exp of a positive number anywhere.
        elementwise = xp.maximum(x, 0) - x * target + xp.log1p(xp.exp(-xp.abs(x)))
        self._save_for_backward(x, target)
        return elementwise.sum() * self._scale(x.size)

    def backward(self, dloss=1.0):
        x, target = self._saved_for_backward()
        return (sigmoid(x) - target) * (self._scale(x.size) * dloss)


class BCELoss(_Loss):
    """Binary cross-entropy on probabilities p in [0, 1], any shape; targets of the same shape."""

    def forward(self, p, target):
        target = self._same_shape_targets(p, target)
        xp = backend.get_array_module(p)
        if not backend.is_cupy_array(p) and p.size and (float(p.min()) < 0 or float(p.max()) > 1):
            raise ValueError(f"{self._describe()}: probabilities must lie in [0, 1], got values in "
                             f"[{float(p.min())}, {float(p.max())}]; use BCEWithLogitsLoss for logits")
        with np.errstate(divide="ignore"):  # log(0) = -inf is expected here, then clamped
            log_p = xp.maximum(xp.log(p), -100.0)  # PyTorch's clamp: finite at p = 0
            log_1mp = xp.maximum(xp.log1p(-p), -100.0)
        elementwise = -(target * log_p + (1 - target) * log_1mp)
        self._save_for_backward(p, target)
        return elementwise.sum() * self._scale(p.size)

    def backward(self, dloss=1.0):
        p, target = self._saved_for_backward()
        xp = backend.get_array_module(p)
        return (p - target) / xp.maximum(p * (1 - p), 1e-12) * (self._scale(p.size) * dloss)
