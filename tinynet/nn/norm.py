"""Batch normalisation.

Every channel ``c`` is normalised with statistics over all of its ``M``
values: M = N for BatchNorm1d on (N, C), N*L on (N, C, L), and N*H*W for
BatchNorm2d on (N, C, H, W) (per-channel statistics over N, H and W, never per
pixel).  The kernels below work on the ``(C, M)`` channel matrix of the input
(:func:`tinynet.nn.layout.channel_matrix`), one row per channel.

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

Speed (CPU).  Channels are independent, so the training forward and backward
run on blocks of a few rows of the channel matrix (about 1 MB per array),
shared between the two cores (:func:`tinynet.nn.layout.for_channel_blocks`),
writing into arrays allocated once.  The two dot products per row (``var``
and ``dgamma``) are NumPy's ``vecdot`` instead of ``einsum``: 5x faster, 4x
closer to the float64 sum (sums of 65536 float32 products; a rounding change
against the old code of about 1e-5 relative), and the same for a row whatever
block it is in, so the results are the same, bit for bit, on any number of
threads.  Measured (benchmarks/passes.py, old and new alternating in one
process, medians of 15 rounds, 64 channels of 64x32x32, while other jobs kept
the machine loaded): forward 8.9 -> 5.6 ms and backward 9.7 -> 6.2 ms on two
threads (9.1 -> 7.7 and 10.0 -> 7.3 on one); 128@8x8 (2 MB) unchanged
(0.65 ms).  Blocks of 256 KB (for the L2 cache) were slower: 8 more calls
per block cost more than the cache saved, the 32 MB L3 holding these arrays
anyway.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import backend, kernels
from .geometry import positive_int
from .layout import channel_matrix, for_channel_blocks, from_channel_matrix
from .module import Module, Parameter
from .validation import check_grad, check_input

__all__ = [
    "BatchNormTrainCache", "BatchNormEvalCache",
    "batch_norm_forward_train", "batch_norm_forward_eval", "batch_norm_backward_train",
    "batch_norm_backward_eval", "BatchNorm1d", "BatchNorm2d",
    "LayerNormCache", "layer_norm_forward", "layer_norm_backward", "LayerNorm",
]


class BatchNormTrainCache(NamedTuple):
    """What :func:`batch_norm_backward_train` needs from :func:`batch_norm_forward_train`."""

    xhat: object     #: (C, M) normalised input
    gamma: object    #: (C,)
    inv_std: object  #: (C,) 1 / sqrt(var + eps)


class BatchNormEvalCache(NamedTuple):
    """What :func:`batch_norm_backward_eval` needs from :func:`batch_norm_forward_eval`."""

    x2: object            #: (C, M) input
    running_mean: object  #: (C,)
    inv_std: object       #: (C,) 1 / sqrt(running_var + eps)
    scale: object         #: (C,) gamma * inv_std, in the input's dtype


_BATCH_NORM_NORMALIZE = kernels.define(
    "batch_norm_normalize", "T x, raw T mean, raw T inv_std, raw T gamma, raw T beta, int64 m", "T xhat, T y",
    """
        const ptrdiff_t c = i / m;                      // row of the (C, M) channel matrix
        xhat = (x - mean[c]) * inv_std[c];
        y = xhat * gamma[c] + beta[c];
    """)


def _normalize_fused(x2, centred, mean, inv_std, gamma, beta, y2):
    """The GPU twin of :func:`_normalize`: both outputs in one pass (xhat written over ``centred``)."""
    _BATCH_NORM_NORMALIZE(x2, mean, inv_std, gamma.astype(x2.dtype, copy=False), beta.astype(x2.dtype, copy=False),
                          x2.shape[1], centred, y2)
    return centred, y2


@kernels.fused(_normalize_fused)
def _normalize(x2, centred, mean, inv_std, gamma, beta, y2):
    """``(xhat, y2)`` with ``xhat = centred * inv_std`` (in place) and ``y2 = gamma xhat + beta`` (written into ``y2``).

    ``centred`` is ``x2 - mean``, which the variance needed already.
    """
    xp = backend.get_array_module(x2)
    xhat = centred
    xhat *= inv_std[:, None]
    xp.multiply(xhat, gamma[:, None], out=y2)
    y2 += beta[:, None]
    return xhat, y2


#: Elements per block of rows: 1 MB of float32 per array.  Smaller blocks (256 KB, for the L2 cache)
#: cost more in calls than they saved: the 32 MB L3 cache holds these arrays anyway.
_BLOCK_ELEMENTS = 1 << 18


def _row_dots(a, b):
    """``sum_m a[c, m] * b[c, m]`` for every row ``c`` of two (C, M) matrices.

    NumPy's ``vecdot`` computes each row on its own (a generalised ufunc, one
    dot product per row: 5x faster than ``einsum``'s loop here, and 4x closer
    to the float64 sum), so a channel's result does not depend on the block it
    falls in; ``einsum`` takes another path, with other rounding, for a block
    of one row.  NumPy older than 2.0 has no ``vecdot``: one ``dot`` per row.
    """
    xp = backend.get_array_module(a)
    if xp is not np:
        return xp.einsum("cm,cm->c", a, b)
    if hasattr(np, "vecdot"):
        return np.vecdot(a, b)
    return np.array([np.dot(u, v) for u, v in zip(a, b)], dtype=np.result_type(a, b))


def _forward_train_rows(x2, gamma, beta, eps, mean, var, inv_std, xhat, y2):
    """The training forward of the rows (channels) ``x2``, written into the other arguments' rows."""
    xp = backend.get_array_module(x2)
    m = x2.shape[1]
    mean[...] = x2.mean(axis=1)
    centred = xp.subtract(x2, mean[:, None], out=xhat)  # becomes xhat in place
    var[...] = _row_dots(centred, centred) / m
    inv_std[...] = 1.0 / xp.sqrt(var + eps)
    _normalize(x2, centred, mean, inv_std, gamma, beta, y2)


def batch_norm_forward_train(x2, gamma, beta, eps):
    """Normalise each row of ``x2`` (C, M) with its own mean and variance.

    Returns ``(y2, mean, var, cache)``: ``var`` is the biased batch variance,
    ``cache`` a :class:`BatchNormTrainCache`.  The rows are independent: they
    are computed in blocks of a few channels, shared between the threads
    (:func:`tinynet.nn.layout.for_channel_blocks`; see the module docstring).
    """
    xp = backend.get_array_module(x2)
    c, m = x2.shape
    mean, var, inv_std = (xp.empty(c, dtype=x2.dtype) for _ in range(3))
    xhat, y2 = xp.empty_like(x2), xp.empty_like(x2)
    for_channel_blocks(c, m, lambda a, b: _forward_train_rows(x2[a:b], gamma[a:b], beta[a:b], eps, mean[a:b],
                                                              var[a:b], inv_std[a:b], xhat[a:b], y2[a:b]), like=x2,
                       block_elements=_BLOCK_ELEMENTS)
    return y2, mean, var, BatchNormTrainCache(xhat, gamma, inv_std)


_BATCH_NORM_BACKWARD_DX = kernels.define(
    "batch_norm_backward_dx", "T dy, T xhat, raw T k, raw T dbeta_m, raw T dgamma_m, int64 m", "T dx",
    """
        const ptrdiff_t c = i / m;
        dx = k[c] * (dy - dbeta_m[c] - xhat * dgamma_m[c]);
    """)


def _input_grad_fused(dy2, xhat, k, dbeta, dgamma, dx2):
    """The GPU twin of :func:`_input_grad`, in one pass."""
    m = dy2.shape[1]
    return _BATCH_NORM_BACKWARD_DX(dy2, xhat, k, dbeta / m, dgamma / m, m, dx2)


@kernels.fused(_input_grad_fused)
def _input_grad(dy2, xhat, k, dbeta, dgamma, dx2):
    """``dx = k (dy - dbeta/M - xhat dgamma/M)`` for the (C, M) matrices, ``k = gamma / sqrt(var + eps)``, into ``dx2``."""
    xp = backend.get_array_module(dy2)
    m = dy2.shape[1]
    xp.multiply(xhat, (-k * dgamma / m)[:, None], out=dx2)
    dx2 += (-k * dbeta / m)[:, None]
    dx2 += dy2 * k[:, None]
    return dx2


def _backward_train_rows(dy2, xhat, k, dgamma, dbeta, dx2):
    """The training backward of the rows (channels) ``dy2``, written into the other arguments' rows."""
    xp = backend.get_array_module(dy2)
    dbeta[...] = dy2.sum(axis=1)
    dgamma[...] = _row_dots(dy2, xhat)
    _input_grad(dy2, xhat, k, dbeta, dgamma, dx2)


def batch_norm_backward_train(dy2, cache):
    """``(dx2, dgamma, dbeta)`` for :func:`batch_norm_forward_train`; ``dy2`` (C, M) is not modified.

    In blocks of channels shared between the threads, as the forward.
    """
    xp = backend.get_array_module(dy2)
    xhat, gamma, inv_std = cache
    c, m = dy2.shape
    k = gamma * inv_std
    dbeta, dgamma = xp.empty(c, dtype=dy2.dtype), xp.empty(c, dtype=dy2.dtype)
    dx2 = xp.empty_like(dy2)
    for_channel_blocks(c, m, lambda a, b: _backward_train_rows(dy2[a:b], xhat[a:b], k[a:b], dgamma[a:b],
                                                               dbeta[a:b], dx2[a:b]), like=dy2,
                       block_elements=_BLOCK_ELEMENTS)
    return dx2, dgamma, dbeta


def batch_norm_forward_eval(x2, gamma, beta, running_mean, running_var, eps):
    """``y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta``, as one scale and shift.

    Returns ``(y2, cache)`` with ``cache`` a :class:`BatchNormEvalCache`.
    """
    xp = backend.get_array_module(x2)
    inv_std = 1.0 / xp.sqrt(running_var + eps)
    scale = (gamma * inv_std).astype(x2.dtype, copy=False)
    shift = (beta - running_mean * gamma * inv_std).astype(x2.dtype, copy=False)
    y2 = x2 * scale[:, None]
    y2 += shift[:, None]
    return y2, BatchNormEvalCache(x2, running_mean, inv_std, scale)


def batch_norm_backward_eval(dy2, cache):
    """``(dx2, dgamma, dbeta)`` for :func:`batch_norm_forward_eval`; ``dy2`` (C, M) is not modified."""
    x2, running_mean, inv_std, scale = cache
    xp = backend.get_array_module(dy2)
    dbeta = dy2.sum(axis=1)
    # dgamma = sum dy * xhat with xhat = (x - running_mean) * inv_std
    dgamma = (xp.einsum("cm,cm->c", dy2, x2) - running_mean * dbeta) * inv_std
    dx2 = dy2 * scale[:, None]
    return dx2, dgamma.astype(dy2.dtype, copy=False), dbeta


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
        x2 = channel_matrix(x)  # (C, M)
        gamma, beta = self._affine_params(x)
        use_batch_stats = self.training or not self.track_running_stats
        if use_batch_stats:
            m = x2.shape[1]
            if self.training and m <= 1:
                raise ValueError(
                    f"{self._describe()}: training needs more than one value per channel to compute a "
                    f"variance, got input of shape {tuple(x.shape)}"
                )
            y2, mean, var, cache = batch_norm_forward_train(x2, gamma, beta, self.eps)
            if self.training and self.track_running_stats:
                self._update_running_stats(mean, var, m)
            self._save_for_backward("train", cache, x.shape, x.dtype)
        else:
            y2, cache = batch_norm_forward_eval(x2, gamma, beta, self.running_mean, self.running_var, self.eps)
            self._save_for_backward("eval", cache, x.shape, x.dtype)
        return from_channel_matrix(y2, x.shape)

    def backward(self, dout):
        mode, cache, shape, dtype = self._saved_for_backward()
        check_grad(self, dout, shape, dtype)
        dy2 = channel_matrix(dout)
        if mode == "train":
            dx2, dgamma, dbeta = batch_norm_backward_train(dy2, cache)
        else:
            dx2, dgamma, dbeta = batch_norm_backward_eval(dy2, cache)
        if self.affine:
            self.weight.accumulate_grad(dgamma)
            self.bias.accumulate_grad(dbeta)
        return from_channel_matrix(dx2, dout.shape)


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
