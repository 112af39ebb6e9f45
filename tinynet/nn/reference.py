"""Slow, obviously correct loop implementations: the tests' oracles.

Each function follows its defining formula index by index, with no im2col, no
strides and no vectorisation tricks.  They run in float64 on NumPy and are only
meant for small inputs.  Notation as in :mod:`tinynet.nn.conv`.
"""
from __future__ import annotations

import numpy as np

__all__ = ["conv2d", "conv2d_grads", "max_pool2d", "max_pool2d_grad", "avg_pool2d", "layer_norm",
           "layer_norm_input_grad"]


def _pad(x, ph, pw, value=0.0):
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


def _group_channels(o, co, c_per_group, groups):
    """The input channels output channel ``o`` reads: its group's block of C/G channels."""
    g = o // (co // groups)
    return slice(g * c_per_group, (g + 1) * c_per_group)


def conv2d(x, w, b, stride, padding, groups=1):
    """``out[n,o,y,x] = b[o] + sum_{c in group(o),i,j} w[o,c,i,j] * xpad[n,c,SH*y+i,SW*x+j]``."""
    (sh, sw), (ph, pw) = stride, padding
    n, c, h, wd = x.shape
    co, cg, kh, kw = w.shape
    oh, ow = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    xpad = _pad(np.asarray(x, np.float64), ph, pw)
    out = np.zeros((n, co, oh, ow))
    for ni in range(n):
        for o in range(co):
            chans = _group_channels(o, co, cg, groups)
            for y in range(oh):
                for z in range(ow):
                    window = xpad[ni, chans, sh * y:sh * y + kh, sw * z:sw * z + kw]
                    out[ni, o, y, z] = np.sum(window * w[o]) + (b[o] if b is not None else 0.0)
    return out


def conv2d_grads(x, w, dout, stride, padding, groups=1):
    """``(dx, dw, db)`` of :func:`conv2d` by scattering every output's gradient over its window."""
    (sh, sw), (ph, pw) = stride, padding
    n, c, h, wd = x.shape
    co, cg, kh, kw = w.shape
    xpad = _pad(np.asarray(x, np.float64), ph, pw)
    dxpad = np.zeros_like(xpad)
    dw = np.zeros(w.shape)
    db = np.zeros(co)
    for ni in range(n):
        for o in range(co):
            chans = _group_channels(o, co, cg, groups)
            for y in range(dout.shape[2]):
                for z in range(dout.shape[3]):
                    g = dout[ni, o, y, z]
                    rows, cols = slice(sh * y, sh * y + kh), slice(sw * z, sw * z + kw)
                    dxpad[ni, chans, rows, cols] += g * w[o]
                    dw[o] += g * xpad[ni, chans, rows, cols]
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


def layer_norm(x2, gamma, beta, eps):
    """Each row r of ``x2`` (R, D): ``(x - mean) / sqrt(var + eps) * gamma + beta``, entry by entry."""
    r, d = x2.shape
    out = np.zeros((r, d))
    for i in range(r):
        mean = sum(float(v) for v in x2[i]) / d
        var = sum((float(v) - mean) ** 2 for v in x2[i]) / d
        for j in range(d):
            out[i, j] = (x2[i, j] - mean) / np.sqrt(var + eps) * gamma[j] + beta[j]
    return out


def layer_norm_input_grad(x2, gamma, dy2, eps):
    """dx of :func:`layer_norm` as ``J^T dy`` with the Jacobian of each row written out entry by entry.

    ``d xhat_k / d x_m = s ([k = m] - 1/D) - s^3 (x_k - mu)(x_m - mu) / D`` with ``s = 1/sqrt(var + eps)``,
    and ``y_k = gamma_k xhat_k + beta_k``.
    """
    r, d = x2.shape
    dx = np.zeros((r, d))
    for i in range(r):
        mean = x2[i].sum() / d
        s = 1.0 / np.sqrt(((x2[i] - mean) ** 2).sum() / d + eps)
        for m in range(d):
            for k in range(d):
                jac = s * ((k == m) - 1.0 / d) - s ** 3 * (x2[i, k] - mean) * (x2[i, m] - mean) / d
                dx[i, m] += dy2[i, k] * gamma[k] * jac
    return dx
