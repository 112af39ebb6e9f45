"""Pooling: max, average and global (adaptive) average.

Notation as in :mod:`tinynet.nn.conv`: input (N, C, H, W), window KH x KW,
strides SH, SW, padding PH, PW, output (N, C, OH, OW) with
``OH = (H + 2*PH - KH) // SH + 1``.

Max pooling::

    out[n, c, y, x] = max_{i,j} xpad[n, c, SH*y + i, SW*x + j]

It is padded with ``-inf``, so a padded cell never wins.  Its gradient is
routed: the whole of ``dout[n, c, y, x]`` goes to the input cell that held the
maximum, and nothing to the others.  **Ties**: the first maximum in row-major
window order (smallest i, then smallest j) takes the gradient, as in PyTorch's
CPU kernel.  When windows overlap (stride < kernel, e.g. the ResNet stem's
3x3 / stride 2 / padding 1) one input cell can be the maximum of several
windows, so dx *accumulates* (``+=``) the routed gradients.

Average pooling (``count_include_pad=True``, as PyTorch's default)::

    out = (1 / (KH*KW)) * sum_{i,j} xpad[..., SH*y + i, SW*x + j]
    dx[cell] += dout / (KH*KW) for every window containing the cell.

Global average pooling over H x W: ``out = mean(x, axis=(2, 3))``,
``dx = dout / (H*W)`` broadcast over the window.

Like convolution, the pools work on channels-first (C, N, H, W) views and
return NCHW views of channels-first buffers (see :mod:`tinynet.nn.layout`).
"""
from __future__ import annotations

from .. import backend
from .conv import conv_output_size, pair
from .layout import channels_first
from .module import Module
from .validation import check_input

__all__ = [
    "max_pool2d_forward", "max_pool2d_backward",
    "avg_pool2d_forward", "avg_pool2d_backward",
    "adaptive_avg_pool2d_forward", "adaptive_avg_pool2d_backward",
    "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d",
]


def _padded(xc, ph, pw, fill):
    if ph == 0 and pw == 0:
        return xc
    xp = backend.get_array_module(xc)
    c, n, h, w = xc.shape
    out = xp.full((c, n, h + 2 * ph, w + 2 * pw), fill, dtype=xc.dtype)
    out[:, :, ph:ph + h, pw:pw + w] = xc
    return out


def _window_slices(kh, kw, sh, sw, oh, ow):
    """Yield ``(k, (rows, cols))``: the strided slice of every window's (i, j) cell, k = i*KW + j."""
    for i in range(kh):
        for j in range(kw):
            yield i * kw + j, (slice(i, i + sh * oh, sh), slice(j, j + sw * ow, sw))


def _check_window(layer, x, kernel, padding):
    (kh, kw), (ph, pw) = kernel, padding
    if ph > kh // 2 or pw > kw // 2:
        raise ValueError(f"{layer._describe()}: padding {padding} must be at most half the kernel {kernel}")
    if x.shape[2] + 2 * ph < kh or x.shape[3] + 2 * pw < kw:
        raise ValueError(
            f"{layer._describe()}: input of spatial size {tuple(x.shape[2:])} is smaller than the "
            f"window {kernel} (padding {padding})"
        )


# ---------------------------------------------------------------------------
# Max pooling
# ---------------------------------------------------------------------------
def max_pool2d_forward(x, kernel, stride, padding):
    """Returns ``(out, cache)``; out (N, C, OH, OW).

    ``argmax`` (C, N, OH, OW), uint8/int16, holds the window index k = i*KW + j of each maximum.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    xp = backend.get_array_module(x)
    xpad = _padded(channels_first(x), ph, pw, -xp.inf)  # (C, N, Hp, Wp)
    out = xpad[:, :, :sh * oh:sh, :sw * ow:sw].copy()  # window cell (0, 0)
    argmax = xp.zeros(out.shape, dtype=xp.uint8 if kh * kw < 256 else xp.int16)
    greater = xp.empty(out.shape, dtype=bool)
    for k, (rows, cols) in _window_slices(kh, kw, sh, sw, oh, ow):
        if k == 0:
            continue
        cand = xpad[:, :, rows, cols]
        # Strictly greater: on a tie the earlier cell keeps the maximum (the documented rule).
        xp.greater(cand, out, out=greater)
        argmax[greater] = k
        xp.maximum(out, cand, out=out)
    return channels_first(out), (argmax, x.shape, kernel, stride, padding)


def max_pool2d_backward(dout, cache):
    """Route each ``dout`` value to the input cell that was the maximum of its window."""
    argmax, x_shape, (kh, kw), (sh, sw), (ph, pw) = cache
    n, c, h, w = x_shape
    oh, ow = argmax.shape[2:]
    xp = backend.get_array_module(dout)
    doutc = channels_first(dout)
    dxpad = xp.zeros((c, n, h + 2 * ph, w + 2 * pw), dtype=dout.dtype)
    overlapping = sh < kh or sw < kw
    for k, (rows, cols) in _window_slices(kh, kw, sh, sw, oh, ow):
        routed = xp.where(argmax == k, doutc, 0)
        if overlapping:
            dxpad[:, :, rows, cols] += routed  # one cell can win several windows
        else:
            dxpad[:, :, rows, cols] = routed  # windows are disjoint: each cell is written once
    return channels_first(dxpad[:, :, ph:ph + h, pw:pw + w])


# ---------------------------------------------------------------------------
# Average pooling
# ---------------------------------------------------------------------------
def avg_pool2d_forward(x, kernel, stride, padding):
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    xpad = _padded(channels_first(x), ph, pw, 0)
    xp = backend.get_array_module(x)
    out = xp.zeros((c, n, oh, ow), dtype=x.dtype)
    for _, (rows, cols) in _window_slices(kh, kw, sh, sw, oh, ow):
        out += xpad[:, :, rows, cols]
    out *= 1.0 / (kh * kw)  # count_include_pad=True: padded zeros count in the mean
    return channels_first(out), (x.shape, kernel, stride, padding)


def avg_pool2d_backward(dout, cache):
    x_shape, (kh, kw), (sh, sw), (ph, pw) = cache
    n, c, h, w = x_shape
    xp = backend.get_array_module(dout)
    share = channels_first(dout) * (1.0 / (kh * kw))  # each window cell receives 1/(KH*KW) of dout
    oh, ow = share.shape[2:]
    dxpad = xp.zeros((c, n, h + 2 * ph, w + 2 * pw), dtype=dout.dtype)
    for _, (rows, cols) in _window_slices(kh, kw, sh, sw, oh, ow):
        dxpad[:, :, rows, cols] += share
    return channels_first(dxpad[:, :, ph:ph + h, pw:pw + w])


# ---------------------------------------------------------------------------
# Adaptive (global) average pooling
# ---------------------------------------------------------------------------
def _adaptive_bins(size, out_size):
    """PyTorch's bins: cell i covers [floor(i*size/out), ceil((i+1)*size/out))."""
    return [(i * size // out_size, -(-(i + 1) * size // out_size)) for i in range(out_size)]


def adaptive_avg_pool2d_forward(x, output_size):
    n, c, h, w = x.shape
    oh, ow = output_size
    xp = backend.get_array_module(x)
    if (oh, ow) == (1, 1):  # global average pooling
        return x.mean(axis=(2, 3), keepdims=True), (x.shape, output_size)
    out = xp.empty((n, c, oh, ow), dtype=x.dtype)
    for y, (r0, r1) in enumerate(_adaptive_bins(h, oh)):
        for z, (c0, c1) in enumerate(_adaptive_bins(w, ow)):
            out[:, :, y, z] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return out, (x.shape, output_size)


def adaptive_avg_pool2d_backward(dout, cache):
    x_shape, (oh, ow) = cache
    n, c, h, w = x_shape
    xp = backend.get_array_module(dout)
    if (oh, ow) == (1, 1):
        return xp.broadcast_to(dout * (1.0 / (h * w)), x_shape).copy()
    dx = xp.zeros(x_shape, dtype=dout.dtype)
    for y, (r0, r1) in enumerate(_adaptive_bins(h, oh)):
        for z, (c0, c1) in enumerate(_adaptive_bins(w, ow)):
            area = (r1 - r0) * (c1 - c0)
            dx[:, :, r0:r1, c0:c1] += dout[:, :, y:y + 1, z:z + 1] * (1.0 / area)
    return dx


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------
class _Pool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else pair(stride, "stride")
        self.padding = pair(padding, "padding")
        if min(self.kernel_size) <= 0 or min(self.stride) <= 0 or min(self.padding) < 0:
            raise ValueError(
                f"{type(self).__name__}: kernel_size and stride must be positive and padding non-negative, "
                f"got kernel_size={kernel_size}, stride={stride}, padding={padding}"
            )

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"

    def _check(self, x):
        check_input(self, x, "(N, C, H, W)", 4)
        _check_window(self, x, self.kernel_size, self.padding)


class MaxPool2d(_Pool2d):
    """``MaxPool2d(kernel_size, stride=None, padding=0)``; stride defaults to the kernel size."""

    def forward(self, x):
        self._check(x)
        out, cache = max_pool2d_forward(x, self.kernel_size, self.stride, self.padding)
        self._save_for_backward(cache)
        return out

    def backward(self, dout):
        (cache,) = self._saved_for_backward()
        return max_pool2d_backward(dout, cache)


class AvgPool2d(_Pool2d):
    """``AvgPool2d(kernel_size, stride=None, padding=0)`` (padded zeros count, as PyTorch's default)."""

    def forward(self, x):
        self._check(x)
        out, cache = avg_pool2d_forward(x, self.kernel_size, self.stride, self.padding)
        self._save_for_backward(cache)
        return out

    def backward(self, dout):
        (cache,) = self._saved_for_backward()
        return avg_pool2d_backward(dout, cache)


class AdaptiveAvgPool2d(Module):
    """``AdaptiveAvgPool2d(output_size)``; ``AdaptiveAvgPool2d(1)`` is global average pooling."""

    def __init__(self, output_size=1):
        super().__init__()
        self.output_size = pair(output_size, "output_size")
        if min(self.output_size) <= 0:
            raise ValueError(f"AdaptiveAvgPool2d: output_size must be positive, got {output_size}")

    def extra_repr(self):
        return f"output_size={self.output_size}"

    def forward(self, x):
        check_input(self, x, "(N, C, H, W)", 4)
        out, cache = adaptive_avg_pool2d_forward(x, self.output_size)
        self._save_for_backward(cache)
        return out

    def backward(self, dout):
        (cache,) = self._saved_for_backward()
        return adaptive_avg_pool2d_backward(dout, cache)
