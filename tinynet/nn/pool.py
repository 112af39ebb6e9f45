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
CPU kernel.  **NaN**, as in PyTorch (CPU and CUDA alike): a NaN is the maximum
of every window it lies in, so the output is NaN and the gradient goes to it
(to the last NaN of the window in row-major order, if there are several):
a divergence stays visible instead of being hidden behind a finite maximum.  When windows overlap (stride < kernel, e.g. the ResNet stem's
3x3 / stride 2 / padding 1) one input cell can be the maximum of several
windows, so dx *accumulates* (``+=``) the routed gradients.

Average pooling::

    out = (1 / D) * sum_{i,j} xpad[..., SH*y + i, SW*x + j]
    dx[cell] += dout / D for every window containing the cell,

with ``D = KH*KW`` (padded zeros count: ``count_include_pad=True``, PyTorch's
default) or ``D`` = the number of the window's cells inside the image.

Global average pooling over H x W: ``out = mean(x, axis=(2, 3))``,
``dx = dout / (H*W)`` broadcast over the window.

The functions below are the plain path: NCHW in, C-contiguous NCHW out, each
window cell (i, j) one strided slice of the padded input.  The fast path
(CHWN window slices, blocks, threads, CUDA twins) is :mod:`tinynet.nn.fast.pool`,
tested against these; the loop versions in :mod:`tinynet.nn.reference` are
their oracle.
"""
from __future__ import annotations

from typing import NamedTuple

from .. import backend
from . import fast
from .fast import pool as _fast
from .geometry import conv_output_size, pair
from .module import Module
from .validation import check_grad, check_input

__all__ = [
    "MaxPoolCache", "AvgPoolCache", "AdaptiveAvgPoolCache",
    "max_pool2d_forward", "max_pool2d_backward",
    "avg_pool2d_forward", "avg_pool2d_backward",
    "adaptive_avg_pool2d_forward", "adaptive_avg_pool2d_backward",
    "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d",
]


# ---------------------------------------------------------------------------
# The plain path: one strided slice of the padded input per window cell
# ---------------------------------------------------------------------------
def _windows(xpad, kernel, stride, out_size):
    """``[(i, j, xpad[:, :, SH*y + i, SW*x + j] for every (y, x))]``: the (N, C, OH, OW) slice of each window cell."""
    (kh, kw), (sh, sw), (oh, ow) = kernel, stride, out_size
    return [(i, j, xpad[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw]) for i in range(kh) for j in range(kw)]


def _pad(x, padding, value):
    (ph, pw) = padding
    return backend.get_array_module(x).pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


def _out_size(x_shape, kernel, stride, padding):
    return tuple(conv_output_size(x_shape[2 + a], kernel[a], stride[a], padding[a]) for a in (0, 1))


class MaxPoolCache(NamedTuple):
    """What :func:`max_pool2d_backward` needs from :func:`max_pool2d_forward`."""

    argmax: object   #: (N, C, OH, OW) window cell k = i*KW + j of each maximum
    x_shape: tuple   #: (N, C, H, W)
    kernel: tuple
    stride: tuple
    padding: tuple


def max_pool2d_forward(x, kernel, stride, padding):
    """``out = max over the window`` of ``x`` (N, C, H, W) padded with ``-inf``; returns ``(out, cache)``."""
    xp = backend.get_array_module(x)
    cells = _windows(_pad(x, padding, -xp.inf), kernel, stride, _out_size(x.shape, kernel, stride, padding))
    windows = xp.stack([v for _, _, v in cells], axis=-1)         # (N, C, OH, OW, KH*KW)
    argmax = windows.argmax(axis=-1)                              # ties: the first maximum wins
    nan = xp.isnan(windows)                                       # a NaN wins: the window's last NaN
    argmax = xp.where(nan.any(axis=-1), nan.shape[-1] - 1 - nan[..., ::-1].argmax(axis=-1), argmax)
    out = xp.take_along_axis(windows, argmax[..., None], axis=-1)[..., 0]
    return out, MaxPoolCache(argmax, tuple(x.shape), tuple(kernel), tuple(stride), tuple(padding))


def max_pool2d_backward(dout, cache):
    """Route each ``dout`` value to the cell that was its window's maximum; ``+=`` where windows overlap."""
    argmax, x_shape, kernel, stride, (ph, pw) = cache
    n, c, h, w = x_shape
    xp = backend.get_array_module(dout)
    dxpad = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=dout.dtype)
    for i, j, dx_cell in _windows(dxpad, kernel, stride, dout.shape[2:]):
        dx_cell += dout * (argmax == i * kernel[1] + j)
    return xp.ascontiguousarray(dxpad[:, :, ph:ph + h, pw:pw + w])


class AvgPoolCache(NamedTuple):
    """What :func:`avg_pool2d_backward` needs: only the geometry and ``D`` (average pooling is linear)."""

    x_shape: tuple   #: (N, C, H, W)
    window: tuple    #: (kernel, stride, padding)
    divisor: object  #: D: KH*KW, or (OH, OW) counts of each window's cells inside the image


def _avg_divisor(x_shape, kernel, stride, padding, count_include_pad, like):
    """``D``: KH*KW, or (OH, OW) counts of each window's cells inside the image."""
    if count_include_pad:
        return kernel[0] * kernel[1]
    xp = backend.get_array_module(like)
    inside = _pad(xp.ones((1, 1) + tuple(x_shape[2:]), dtype=like.dtype), padding, 0)
    return sum(v for _, _, v in _windows(inside, kernel, stride, _out_size(x_shape, kernel, stride, padding)))


def avg_pool2d_forward(x, kernel, stride, padding, count_include_pad=True):
    """``out = (1/D) sum over the window`` of ``x`` padded with zeros; returns ``(out, cache)``."""
    cells = _windows(_pad(x, padding, 0), kernel, stride, _out_size(x.shape, kernel, stride, padding))
    divisor = _avg_divisor(x.shape, kernel, stride, padding, count_include_pad, x)
    out = sum(v for _, _, v in cells) / divisor
    return out, AvgPoolCache(tuple(x.shape), (tuple(kernel), tuple(stride), tuple(padding)), divisor)


def avg_pool2d_backward(dout, cache):
    """Each window cell receives ``1/D`` of its window's ``dout``, added up where windows overlap."""
    x_shape, (kernel, stride, (ph, pw)), divisor = cache
    n, c, h, w = x_shape
    xp = backend.get_array_module(dout)
    share = dout / divisor
    dxpad = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=dout.dtype)
    for _, _, dx_cell in _windows(dxpad, kernel, stride, dout.shape[2:]):
        dx_cell += share
    return xp.ascontiguousarray(dxpad[:, :, ph:ph + h, pw:pw + w])


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
# Adaptive (global) average pooling
# ---------------------------------------------------------------------------
def _adaptive_bins(size, out_size):
    """PyTorch's bins: cell i covers [floor(i*size/out), ceil((i+1)*size/out))."""
    return [(i * size // out_size, -(-(i + 1) * size // out_size)) for i in range(out_size)]


class AdaptiveAvgPoolCache(NamedTuple):
    """What :func:`adaptive_avg_pool2d_backward` needs."""

    x_shape: tuple
    output_size: tuple


def adaptive_avg_pool2d_forward(x, output_size):
    """``out[n, c, y, z]`` = the mean of PyTorch's bin (y, z) of ``x[n, c]``; returns ``(out, cache)``."""
    n, c, h, w = x.shape
    oh, ow = output_size
    xp = backend.get_array_module(x)
    if (oh, ow) == (1, 1):  # global average pooling
        return x.mean(axis=(2, 3), keepdims=True), AdaptiveAvgPoolCache(x.shape, tuple(output_size))
    out = xp.empty((n, c, oh, ow), dtype=x.dtype)
    for y, (r0, r1) in enumerate(_adaptive_bins(h, oh)):
        for z, (c0, c1) in enumerate(_adaptive_bins(w, ow)):
            out[:, :, y, z] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return out, AdaptiveAvgPoolCache(x.shape, tuple(output_size))


def adaptive_avg_pool2d_backward(dout, cache):
    """Each bin's ``dout`` spread evenly over its cells."""
    x_shape, (oh, ow) = cache
    n, c, h, w = x_shape
    xp = backend.get_array_module(dout)
    if (oh, ow) == (1, 1):  # dx[n, c, :, :] = dout[n, c] / (H*W)
        return xp.ascontiguousarray(xp.broadcast_to(dout * (1.0 / (h * w)), x_shape))
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
    """A pooling layer around a pair of ``*_forward(x, kernel, stride, padding)`` / ``*_backward(dout, cache)`` functions."""

    _forward_fn = _backward_fn = None   # the plain pair
    _fast_forward_fn = _fast_backward_fn = None  # the fast pair (tinynet.nn.fast.pool)

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        owner = type(self).__name__
        self.kernel_size = pair(kernel_size, "kernel_size", owner)
        self.stride = self.kernel_size if stride is None else pair(stride, "stride", owner)
        self.padding = pair(padding, "padding", owner)
        if min(self.kernel_size) <= 0 or min(self.stride) <= 0 or min(self.padding) < 0:
            raise ValueError(
                f"{type(self).__name__}: kernel_size and stride must be positive and padding non-negative, "
                f"got kernel_size={kernel_size}, stride={stride}, padding={padding}"
            )

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"

    def forward(self, x):
        check_input(self, x, "(N, C, H, W)", 4)
        _check_window(self, x, self.kernel_size, self.padding)
        path = "fast" if fast.enabled() else "plain"  # the one dispatch point: tinynet.nn.fast.pool
        forward = type(self)._fast_forward_fn if path == "fast" else type(self)._forward_fn
        out, cache = forward(x, self.kernel_size, self.stride, self.padding, **self._options())
        self._save_for_backward(path, cache, out.shape, out.dtype)
        return out

    def backward(self, dout):
        path, cache, shape, dtype = self._saved_for_backward()
        check_grad(self, dout, shape, dtype)
        backward = type(self)._fast_backward_fn if path == "fast" else type(self)._backward_fn
        return backward(dout, cache)

    def _options(self) -> dict:
        return {}


class MaxPool2d(_Pool2d):
    """``MaxPool2d(kernel_size, stride=None, padding=0)``; stride defaults to the kernel size."""

    _forward_fn, _backward_fn = max_pool2d_forward, max_pool2d_backward
    _fast_forward_fn, _fast_backward_fn = _fast.max_pool2d_forward, _fast.max_pool2d_backward


class AvgPool2d(_Pool2d):
    """``AvgPool2d(kernel_size, stride=None, padding=0, count_include_pad=True)``, as PyTorch's."""

    _forward_fn, _backward_fn = avg_pool2d_forward, avg_pool2d_backward
    _fast_forward_fn, _fast_backward_fn = _fast.avg_pool2d_forward, _fast.avg_pool2d_backward

    def __init__(self, kernel_size, stride=None, padding=0, count_include_pad: bool = True):
        super().__init__(kernel_size, stride, padding)
        self.count_include_pad = bool(count_include_pad)

    def extra_repr(self):
        return super().extra_repr() + ("" if self.count_include_pad else ", count_include_pad=False")

    def _options(self) -> dict:
        return {"count_include_pad": self.count_include_pad}


class AdaptiveAvgPool2d(Module):
    """``AdaptiveAvgPool2d(output_size)``; ``AdaptiveAvgPool2d(1)`` is global average pooling."""

    def __init__(self, output_size=1):
        super().__init__()
        self.output_size = pair(output_size, "output_size", "AdaptiveAvgPool2d")
        if min(self.output_size) <= 0:
            raise ValueError(f"AdaptiveAvgPool2d: output_size must be positive, got {output_size}")

    def extra_repr(self):
        return f"output_size={self.output_size}"

    def forward(self, x):
        check_input(self, x, "(N, C, H, W)", 4)
        out, cache = adaptive_avg_pool2d_forward(x, self.output_size)  # the same on both paths
        self._save_for_backward(fast.enabled(), cache, out.shape, out.dtype)
        return out

    def backward(self, dout):
        on_fast_path, cache, shape, dtype = self._saved_for_backward()
        check_grad(self, dout, shape, dtype)
        if cache.output_size == (1, 1) and on_fast_path:  # the fast path writes dx CHWN
            return _fast.global_avg_pool2d_backward(dout, cache.x_shape)
        return adaptive_avg_pool2d_backward(dout, cache)
