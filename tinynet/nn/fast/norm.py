"""The fast batch norm: blocked, threaded passes over the channel matrix, and their CUDA twins.

The math is the plain :mod:`tinynet.nn.norm`'s (read it first).  The fast path works on the
``(C, M)`` channel matrix of the input (:func:`tinynet.nn.fast.layout.channel_matrix`: a view of
a CHWN activation, one contiguous row per channel) and writes into arrays allocated once:

* Channels are independent, so the training forward and backward run on blocks of a few rows
  (about 1 MB per array), shared between the threads (:mod:`tinynet.nn.fast.threads`).
* The two dot products per row (``var`` and ``dgamma``) are NumPy's ``vecdot``: faster and
  closer to the float64 sum than ``einsum``, and the same for a row whatever block it is in, so
  the results are the same, bit for bit, on any number of threads.
* On CuPy, normalisation and the input gradient are one CUDA kernel each (:mod:`tinynet.kernels`).

Measurements: docs/performance.md.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ... import backend, kernels
from .threads import for_channel_blocks

__all__ = ["BatchNormTrainCache", "BatchNormEvalCache", "batch_norm_forward_train", "batch_norm_backward_train",
           "batch_norm_input_grad", "batch_norm_forward_eval", "batch_norm_backward_eval"]


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


#: Elements per block of rows: 1 MB of float32 per array (smaller blocks measured slower:
#: docs/performance.md).
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
    (:func:`tinynet.nn.fast.threads.for_channel_blocks`; see the module docstring).
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


def _input_grad_fused(dy2, xhat, k, dbeta, dgamma, dx2, count=None):
    """The GPU twin of :func:`batch_norm_input_grad`, in one pass."""
    m = dy2.shape[1]  # the kernel's row length
    count = m if count is None else count
    return _BATCH_NORM_BACKWARD_DX(dy2, xhat, k, dbeta / count, dgamma / count, m, dx2)


@kernels.fused(_input_grad_fused)
def batch_norm_input_grad(dy2, xhat, k, dbeta, dgamma, dx2, count=None):
    """``dx = k (dy - dbeta/M - xhat dgamma/M)`` for the (C, M) matrices, ``k = gamma / sqrt(var + eps)``, into ``dx2``.

    ``M`` is ``count``, the number of values each channel's statistics were taken over: by default
    the rows' length; SyncBatchNorm passes the count over every rank, with ``dbeta`` and ``dgamma``
    summed over every rank (:mod:`tinynet.distributed.sync_batchnorm`).
    """
    xp = backend.get_array_module(dy2)
    m = dy2.shape[1] if count is None else count
    xp.multiply(xhat, (-k * dgamma / m)[:, None], out=dx2)
    dx2 += (-k * dbeta / m)[:, None]
    dx2 += dy2 * k[:, None]
    return dx2


def _backward_train_rows(dy2, xhat, k, dgamma, dbeta, dx2):
    """The training backward of the rows (channels) ``dy2``, written into the other arguments' rows."""
    dbeta[...] = dy2.sum(axis=1)
    dgamma[...] = _row_dots(dy2, xhat)
    batch_norm_input_grad(dy2, xhat, k, dbeta, dgamma, dx2)


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


def batch_norm_forward_eval(x2, inv_std, scale, shift, running_mean):
    """``y = scale * x + shift`` per row of ``x2`` (C, M), from :func:`tinynet.nn.norm.batch_norm_eval_scale_shift`.

    Returns ``(y2, cache)`` with ``cache`` a :class:`BatchNormEvalCache`.
    """
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
