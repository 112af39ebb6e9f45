"""Slow, obviously correct loop implementations: the tests' oracles.

Each function follows its defining formula index by index, with no im2col, no
strides and no vectorisation tricks.  They run in float64 on NumPy and are only
meant for small inputs.  Notation as in :mod:`tinynet.nn.conv`.
"""
from __future__ import annotations

import numpy as np

__all__ = ["conv2d", "conv2d_grads", "max_pool2d", "max_pool2d_grad", "avg_pool2d"]


def _pad(x, ph, pw, value=0.0):
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


def conv2d(x, w, b, stride, padding):
    """``out[n,o,y,x] = b[o] + sum_{c,i,j} w[o,c,i,j] * xpad[n,c,SH*y+i,SW*x+j]``."""
    (sh, sw), (ph, pw) = stride, padding
    n, c, h, wd = x.shape
    co, _, kh, kw = w.shape
    oh, ow = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    xpad = _pad(np.asarray(x, np.float64), ph, pw)
    out = np.zeros((n, co, oh, ow))
    for ni in range(n):
        for o in range(co):
            for y in range(oh):
                for z in range(ow):
                    window = xpad[ni, :, sh * y:sh * y + kh, sw * z:sw * z + kw]
                    out[ni, o, y, z] = np.sum(window * w[o]) + (b[o] if b is not None else 0.0)
    return out


def conv2d_grads(x, w, dout, stride, padding):
    """``(dx, dw, db)`` of :func:`conv2d` by scattering every output's gradient over its window."""
    (sh, sw), (ph, pw) = stride, padding
    n, c, h, wd = x.shape
    co, _, kh, kw = w.shape
    xpad = _pad(np.asarray(x, np.float64), ph, pw)
    dxpad = np.zeros_like(xpad)
    dw = np.zeros(w.shape)
    db = np.zeros(co)
    for ni in range(n):
        for o in range(co):
            for y in range(dout.shape[2]):
                for z in range(dout.shape[3]):
                    g = dout[ni, o, y, z]
                    rows, cols = slice(sh * y, sh * y + kh), slice(sw * z, sw * z + kw)
                    dxpad[ni, :, rows, cols] += g * w[o]
                    dw[o] += g * xpad[ni, :, rows, cols]
                    db[o] += g
    return dxpad[:, :, ph:ph + h, pw:pw + wd], dw, db


def max_pool2d(x, kernel, stride, padding):
    """Returns ``(out, argmax)``: the window maximum and the (row, col) in x of the first maximum."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    xpad = _pad(np.asarray(x, np.float64), ph, pw, -np.inf)
    out = np.zeros((n, c, oh, ow))
    where = np.zeros((n, c, oh, ow, 2), dtype=int)
    for ni in range(n):
        for ci in range(c):
            for y in range(oh):
                for z in range(ow):
                    best, arg = -np.inf, None
                    for i in range(kh):
                        for j in range(kw):
                            v = xpad[ni, ci, sh * y + i, sw * z + j]
                            if arg is None or v > best:  # strictly greater: first maximum wins
                                best, arg = v, (sh * y + i - ph, sw * z + j - pw)
                    out[ni, ci, y, z] = best
                    where[ni, ci, y, z] = arg
    return out, where


def max_pool2d_grad(x, dout, kernel, stride, padding):
    """dx of max pooling: each dout value added to its window's first maximum."""
    _, where = max_pool2d(x, kernel, stride, padding)
    dx = np.zeros(x.shape)
    n, c, oh, ow = dout.shape
    for ni in range(n):
        for ci in range(c):
            for y in range(oh):
                for z in range(ow):
                    r, s = where[ni, ci, y, z]
                    dx[ni, ci, r, s] += dout[ni, ci, y, z]
    return dx


def avg_pool2d(x, kernel, stride, padding):
    """Window mean, padded zeros included (count_include_pad=True)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    xpad = _pad(np.asarray(x, np.float64), ph, pw)
    out = np.zeros((n, c, oh, ow))
    for y in range(oh):
        for z in range(ow):
            out[:, :, y, z] = xpad[:, :, sh * y:sh * y + kh, sw * z:sw * z + kw].mean(axis=(2, 3))
    return out
