"""Numerically stable softmax, log-softmax and sigmoid.

Softmax of logits ``z`` along the class axis::

    y_k = exp(z_k) / sum_u exp(z_u)

computed naively, ``exp(1000)`` overflows to inf and the result is nan.
Softmax does not change when a constant is subtracted from every logit
(the factor ``exp(-c)`` cancels), so we subtract the maximum first: the largest
exponent is then ``exp(0) = 1`` and nothing overflows.  For the *log* of the
softmax, taking ``log(softmax(z))`` would underflow small probabilities to 0
and give ``-inf``; instead::

    log y_k = z_k - logsumexp(z),   logsumexp(z) = max(z) + log sum_u exp(z_u - max(z))

which is exact and finite for logits like ``[1000, 0, -1000]``.

Softmax Jacobian (see :func:`softmax_jacobian`)::

    dy_k / dz_k = y_k (1 - y_k),        dy_k / dz_u = -y_u y_k   (u != k)

i.e. ``J = diag(y) - y y^T``.

Sigmoid ``1 / (1 + exp(-x))`` overflows ``exp(-x)`` for very negative x; with
``e = exp(-|x|)`` (always <= 1) it is ``1 / (1 + e)`` for x >= 0 and
``e / (1 + e)`` for x < 0.
"""
from __future__ import annotations

from .. import backend

__all__ = ["logsumexp", "log_softmax", "softmax", "sigmoid", "softmax_jacobian"]


def logsumexp(z, axis=-1, keepdims=False):
    """``log(sum(exp(z), axis))`` without overflow."""
    xp = backend.get_array_module(z)
    zmax = z.max(axis=axis, keepdims=True)
    # An all -inf row would give -inf - -inf = nan; shift such rows by 0 instead.
    zmax = xp.where(xp.isfinite(zmax), zmax, 0)
    out = xp.log(xp.exp(z - zmax).sum(axis=axis, keepdims=True)) + zmax
    return out if keepdims else out.squeeze(axis)


def log_softmax(z, axis=-1):
    """``z - logsumexp(z)`` along ``axis``, as ``(z - max z) - log sum exp(z - max z)``.

    Subtracting the maximum first keeps the small numbers small: for tied
    logits of 1e4 in float32 the result is ``-log K`` exactly, where
    ``z - logsumexp(z)`` would lose it to the rounding of ``1e4 + log K``.
    """
    xp = backend.get_array_module(z)
    zmax = z.max(axis=axis, keepdims=True)
    shifted = z - xp.where(xp.isfinite(zmax), zmax, 0)  # an all -inf row: shifted by 0, as in logsumexp
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


def softmax(z, axis=-1):
    """``exp(z - max z) / sum exp(z - max z)`` along ``axis``."""
    xp = backend.get_array_module(z)
    e = xp.exp(z - z.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def sigmoid(x):
    """``1 / (1 + exp(-x))`` for any x without overflow."""
    xp = backend.get_array_module(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype, copy=False)


def softmax_jacobian(y):
    """``J[k, u] = dy_k / dz_u = y_k (delta_ku - y_u)`` for one probability vector ``y`` (K,)."""
    xp = backend.get_array_module(y)
    return xp.diag(y) - xp.outer(y, y)
