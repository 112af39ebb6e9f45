"""Batch normalisation.

Every channel ``c`` is normalised with statistics over all of its ``M``
values: M = N for BatchNorm1d on (N, C), N*L on (N, C, L), and N*H*W for
BatchNorm2d on (N, C, H, W) (per-channel statistics over N, H and W, never per
pixel).

Training forward, per channel::

    mu    = (1/M) sum_m x_m
    var   = (1/M) sum_m (x_m - mu)^2            (biased: what normalises the batch)
    xhat  = (x - mu) / sqrt(var + eps)
    y     = gamma * xhat + beta

Running statistics, as PyTorch updates them (``momentum`` m, default 0.1)::

    running_mean <- (1 - m) running_mean + m mu
    running_var  <- (1 - m) running_var  + m var * M / (M - 1)    (unbiased)

(``momentum=None`` gives the cumulative average, factor 1/num_batches_tracked.)
Evaluation uses them: ``y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta``.

Training backward (derived in docs/derivations.md), with ``dy = dL/dy``::

    dbeta  = sum_m dy_m
    dgamma = sum_m dy_m xhat_m
    dx     = gamma / (M sqrt(var + eps)) * (M dy - dbeta - xhat * dgamma)

Every sample's output depends on every other sample of the channel through
mu and var; the last two terms are those paths.  In evaluation mode the
statistics are constants and ``dx = dy * gamma / sqrt(running_var + eps)``.

The functions below are the plain path, on (N, C), (N, C, L) or (N, C, H, W)
arrays as they are; the blocked, threaded passes and CUDA kernels of the fast
path are :mod:`tinynet.nn.fast.norm`, tested against these.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import backend
from . import fast
from .fast import norm as _fast
from .fast.layout import channel_matrix, from_channel_matrix
from .geometry import positive_int
from .module import Module, Parameter
from .validation import check_grad, check_input

__all__ = [
    "BatchNormCache", "BatchNormEvalCache", "batch_norm_forward", "batch_norm_backward",
    "batch_norm_eval_scale_shift", "batch_norm_eval_forward", "batch_norm_eval_backward",
    "BatchNorm1d", "BatchNorm2d",
    "LayerNormCache", "layer_norm_forward", "layer_norm_backward", "LayerNorm",
]


# ---------------------------------------------------------------------------
# The plain path: batch norm on the array as it is
# ---------------------------------------------------------------------------
class BatchNormCache(NamedTuple):
    """What :func:`batch_norm_backward` needs from :func:`batch_norm_forward`."""

    xhat: object     #: like x, the normalised input
    gamma: object    #: (1, C, 1, ...) broadcastable against x
    inv_std: object  #: (1, C, 1, ...) 1 / sqrt(var + eps)


def batch_norm_forward(x, gamma, beta, eps):
    """Training forward: ``(y, mean, var, cache)`` with the batch's (C,) ``mean`` and biased ``var``."""
    axes = _stat_axes(x)
    mu = x.mean(axis=axes, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
    inv_std = 1.0 / backend.get_array_module(x).sqrt(var + eps)
    xhat = (x - mu) * inv_std
    y = _per_channel(gamma, x) * xhat + _per_channel(beta, x)
    return y, mu.reshape(-1), var.reshape(-1), BatchNormCache(xhat, _per_channel(gamma, x), inv_std)


def batch_norm_backward(dy, cache):
    """``(dx, dgamma, dbeta)``: ``dx = gamma / (M sqrt(var + eps)) * (M dy - dbeta - xhat * dgamma)``."""
    xhat, gamma, inv_std = cache
    axes = _stat_axes(dy)
    m = dy.size // dy.shape[1]
    dbeta = dy.sum(axis=axes, keepdims=True)
    dgamma = (dy * xhat).sum(axis=axes, keepdims=True)
    dx = gamma * inv_std / m * (m * dy - dbeta - xhat * dgamma)
    return dx, dgamma.reshape(-1), dbeta.reshape(-1)


def _stat_axes(x):
    """Every axis but the channels' (axis 1): (0,) for (N, C), (0, 2) for (N, C, L), (0, 2, 3) for (N, C, H, W)."""
    return (0,) + tuple(range(2, x.ndim))


def _per_channel(v, x):
    """A (C,) vector shaped (1, C, 1, ...) to broadcast against ``x``."""
    return v.reshape((1, -1) + (1,) * (x.ndim - 2))


def batch_norm_eval_scale_shift(gamma, beta, running_mean, running_var, eps, dtype):
    """Evaluation's constants ``(inv_std, scale, shift)``, each (C,): ``y = scale * x + shift``.

    ``inv_std = 1 / sqrt(running_var + eps)``, ``scale = gamma * inv_std`` and
    ``shift = beta - running_mean * gamma * inv_std``; the one place this formula is written
    (the fast path and its in-place epilogue use it too).
    """
    inv_std = 1.0 / backend.get_array_module(running_var).sqrt(running_var + eps)
    scale = (gamma * inv_std).astype(dtype, copy=False)
    shift = (beta - running_mean * gamma * inv_std).astype(dtype, copy=False)
    return inv_std, scale, shift


class BatchNormEvalCache(NamedTuple):
    """What :func:`batch_norm_eval_backward` needs from :func:`batch_norm_eval_forward`."""

    xhat: object   #: like x, ``(x - running_mean) * inv_std``
    scale: object  #: (C,) gamma * inv_std


def batch_norm_eval_forward(x, gamma, beta, running_mean, running_var, eps):
    """``y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta``; returns ``(y, cache)``."""
    inv_std, scale, shift = batch_norm_eval_scale_shift(gamma, beta, running_mean, running_var, eps, x.dtype)
    y = x * _per_channel(scale, x) + _per_channel(shift, x)
    xhat = (x - _per_channel(running_mean, x)) * _per_channel(inv_std, x)
    return y, BatchNormEvalCache(xhat, scale)


def batch_norm_eval_backward(dy, cache):
    """``(dx, dgamma, dbeta)``: the statistics are constants, so ``dx = dy * gamma / sqrt(running_var + eps)``."""
    xhat, scale = cache
    axes = _stat_axes(dy)
    dgamma = (dy * xhat).sum(axis=axes).astype(dy.dtype, copy=False)
    return dy * _per_channel(scale, dy), dgamma, dy.sum(axis=axes)


# ---------------------------------------------------------------------------
# The layers
# ---------------------------------------------------------------------------
class _BatchNorm(Module):
    _ranks: tuple = ()
    _expected = ""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 dtype="float32"):
        super().__init__()
        self.num_features = positive_int(num_features, "num_features", type(self).__name__)
        if eps <= 0:
            raise ValueError(f"{type(self).__name__}: eps must be positive, got {eps}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"{type(self).__name__}: momentum must be in [0, 1] or None, got {momentum}")
        self.eps, self.momentum = float(eps), momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        c = self.num_features
        # Without affine, gamma = 1 and beta = 0 are fixed constants, not parameters: buffers, so that
        # .to() moves and casts them with the layer, but not persistent (PyTorch's state dict has no
        # weight or bias for affine=False).
        self.weight = Parameter(np.ones(c, dtype=dtype)) if affine else None
        self.bias = Parameter(np.zeros(c, dtype=dtype)) if affine else None
        if not affine:
            self.register_buffer("_gamma", np.ones(c, dtype=dtype), persistent=False)
            self.register_buffer("_beta", np.zeros(c, dtype=dtype), persistent=False)
        if track_running_stats:
            self.register_buffer("running_mean", np.zeros(c, dtype=dtype))
            self.register_buffer("running_var", np.ones(c, dtype=dtype))
            self.register_buffer("num_batches_tracked", np.array(0, dtype=np.int64))

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"

    def _affine_params(self, x):
        if self.affine:
            return self.weight.data, self.bias.data
        self._check_device(x, self._gamma)
        return self._gamma.astype(x.dtype, copy=False), self._beta.astype(x.dtype, copy=False)

    def _update_running_stats(self, mean, var, m):
        self.num_batches_tracked += 1
        if self.momentum is None:  # cumulative moving average
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        unbiased = var * (m / (m - 1)) if m > 1 else var
        dtype = self.running_mean.dtype
        self.running_mean *= 1.0 - factor
        self.running_mean += (factor * mean).astype(dtype, copy=False)
        self.running_var *= 1.0 - factor
        self.running_var += (factor * unbiased).astype(dtype, copy=False)

    def forward(self, x):
        check_input(self, x, self._expected.format(c=self.num_features), self._ranks, self.num_features)
        gamma, beta = self._affine_params(x)
        path = "fast" if fast.enabled() else "plain"  # the one dispatch point: tinynet.nn.fast.norm
        use_batch_stats = self.training or not self.track_running_stats
        if use_batch_stats:
            m = x.size // x.shape[1]
            if self.training and m <= 1:
                raise ValueError(
                    f"{self._describe()}: training needs more than one value per channel to compute a "
                    f"variance, got input of shape {tuple(x.shape)}"
                )
            if path == "fast":
                y2, mean, var, cache = _fast.batch_norm_forward_train(channel_matrix(x), gamma, beta, self.eps)
                y = from_channel_matrix(y2, x.shape)
            else:
                y, mean, var, cache = batch_norm_forward(x, gamma, beta, self.eps)
            if self.training and self.track_running_stats:
                self._update_running_stats(mean, var, m)
            self._save_for_backward("train", path, cache, x.shape, x.dtype)
        else:
            if path == "fast":
                inv_std, scale, shift = batch_norm_eval_scale_shift(gamma, beta, self.running_mean,
                                                                    self.running_var, self.eps, x.dtype)
                y2, cache = _fast.batch_norm_forward_eval(channel_matrix(x), inv_std, scale, shift,
                                                          self.running_mean)
                y = from_channel_matrix(y2, x.shape)
            else:
                y, cache = batch_norm_eval_forward(x, gamma, beta, self.running_mean, self.running_var, self.eps)
            self._save_for_backward("eval", path, cache, x.shape, x.dtype)
        return y

    def backward(self, dout):
        mode, path, cache, shape, dtype = self._saved_for_backward()
        check_grad(self, dout, shape, dtype)
        if path == "plain":
            backward = batch_norm_backward if mode == "train" else batch_norm_eval_backward
            dx, dgamma, dbeta = backward(dout, cache)
        else:
            backward = _fast.batch_norm_backward_train if mode == "train" else _fast.batch_norm_backward_eval
            dx2, dgamma, dbeta = backward(channel_matrix(dout), cache)
            dx = from_channel_matrix(dx2, dout.shape)
        if self.affine:
            self.weight.accumulate_grad(dgamma)
            self.bias.accumulate_grad(dbeta)
        return dx


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) or (N, C, L) input; statistics per feature over N (and L)."""

    _ranks = (2, 3)
    _expected = "(N, {c}) or (N, {c}, L)"


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, C, H, W) input; statistics per channel over N, H and W."""

    _ranks = (4,)
    _expected = "(N, {c}, H, W)"


# ---------------------------------------------------------------------------
# Layer normalisation
# ---------------------------------------------------------------------------
class LayerNormCache(NamedTuple):
    """What :func:`layer_norm_backward` needs from :func:`layer_norm_forward`."""

    xhat: object     #: (R, D) normalised input
    inv_std: object  #: (R,) 1 / sqrt(var + eps) of each row
    gamma: object    #: (D,) or None without affine


def layer_norm_forward(x2, gamma, beta, eps):
    """Normalise each *row* of ``x2`` (R, D) over its D features; ``gamma``, ``beta`` (D,) or None.

    Per row r (one sample, or one position of a sequence)::

        mu_r = (1/D) sum_d x_rd,  var_r = (1/D) sum_d (x_rd - mu_r)^2,
        xhat = (x - mu) / sqrt(var + eps),   y = gamma * xhat + beta   (gamma, beta per feature)

    Unlike BatchNorm, the statistics are the sample's own: no running
    statistics, the same computation in training and evaluation.  Returns
    ``(y2, cache)``.
    """
    xp = backend.get_array_module(x2)
    d = x2.shape[1]
    xhat = x2 - x2.mean(axis=1, keepdims=True)  # centred; becomes xhat in place
    var = xp.einsum("rd,rd->r", xhat, xhat) / d
    inv_std = (1.0 / xp.sqrt(var + eps)).astype(x2.dtype, copy=False)
    xhat *= inv_std[:, None]
    if gamma is None:
        return xhat.copy(), LayerNormCache(xhat, inv_std, None)
    y2 = xhat * gamma
    y2 += beta
    return y2, LayerNormCache(xhat, inv_std, gamma)


def layer_norm_backward(dy2, cache):
    """``(dx2, dgamma, dbeta)`` for :func:`layer_norm_forward` (None, None without affine).

    With ``g = gamma * dy`` (the gradient reaching ``xhat``), per row, the
    derivation of BatchNorm's dx with the roles of the axes exchanged
    (docs/derivations.md)::

        dx = inv_std / D * (D g - sum_d g - xhat * sum_d g xhat)
    """
    xp = backend.get_array_module(dy2)
    xhat, inv_std, gamma = cache
    d = dy2.shape[1]
    if gamma is None:
        g, dgamma, dbeta = dy2, None, None
    else:
        dbeta = dy2.sum(axis=0)
        dgamma = xp.einsum("rd,rd->d", dy2, xhat)
        g = dy2 * gamma
    sum_g = g.sum(axis=1, keepdims=True)
    sum_gx = xp.einsum("rd,rd->r", g, xhat)[:, None]
    dx2 = g * d
    dx2 -= sum_g
    dx2 -= xhat * sum_gx
    dx2 *= (inv_std / d)[:, None]
    return dx2, dgamma, dbeta


class LayerNorm(Module):
    """``LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True)``, as PyTorch's.

    Normalises over the trailing dimensions ``normalized_shape`` (an int for
    the last one, or a tuple): input ``(*, *normalized_shape)``, output of the
    same shape.  Parameters ``weight`` and ``bias`` of shape
    ``normalized_shape`` (ones and zeros) when ``elementwise_affine``.
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine: bool = True, dtype="float32"):
        super().__init__()
        shape = (normalized_shape,) if not isinstance(normalized_shape, (tuple, list)) else normalized_shape
        self.normalized_shape = tuple(positive_int(s, "normalized_shape", "LayerNorm") for s in shape)
        if not self.normalized_shape:
            raise ValueError("LayerNorm: normalized_shape must name at least one dimension, got ()")
        if not eps > 0:
            raise ValueError(f"LayerNorm: eps must be positive, got {eps}")
        self.eps, self.elementwise_affine = float(eps), bool(elementwise_affine)
        self.weight = Parameter(np.ones(self.normalized_shape, dtype=dtype)) if elementwise_affine else None
        self.bias = Parameter(np.zeros(self.normalized_shape, dtype=dtype)) if elementwise_affine else None

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"

    def forward(self, x):
        k = len(self.normalized_shape)
        check_input(self, x, f"(*, {', '.join(map(str, self.normalized_shape))})", tuple(range(k, 9)))
        if tuple(x.shape[x.ndim - k:]) != self.normalized_shape:
            raise ValueError(f"{self._describe()}: expected input of shape (*, "
                             f"{', '.join(map(str, self.normalized_shape))}), received {tuple(x.shape)}")
        d = int(np.prod(self.normalized_shape))
        x2 = x.reshape(-1, d)  # (R, D): a view when the trailing dimensions are contiguous
        gamma = self.weight.data.reshape(d) if self.elementwise_affine else None
        beta = self.bias.data.reshape(d) if self.elementwise_affine else None
        y2, cache = layer_norm_forward(x2, gamma, beta, self.eps)
        self._save_for_backward(cache, x.shape, x.dtype)
        return y2.reshape(x.shape)

    def backward(self, dout):
        cache, shape, dtype = self._saved_for_backward()
        check_grad(self, dout, shape, dtype)
        dx2, dgamma, dbeta = layer_norm_backward(dout.reshape(-1, cache.xhat.shape[1]), cache)
        if self.elementwise_affine:
            self.weight.accumulate_grad(dgamma.reshape(self.normalized_shape))
            self.bias.accumulate_grad(dbeta.reshape(self.normalized_shape))
        return dx2.reshape(shape)
