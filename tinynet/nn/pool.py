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

Like convolution, the pools read window slices of the channels-first,
batch-last view (C, H, W, N) of their input and return NCHW views of CHWN
buffers (see :mod:`tinynet.nn.layout`).  Padding is never materialised:
:func:`tinynet.nn.geometry.kernel_offsets` gives, for every window cell, the
output positions where that cell falls on a real pixel.  For max pooling the
other positions read ``-inf`` and can be skipped; for average pooling they
read 0 and add nothing.

Speed (max pooling on the CPU).  The forward makes 4 passes per window cell
(compare, index, keep the index, keep the maximum) and the backward 3
(compare, route, add); over a whole 16 MB activation every pass went to main
memory.  Channels are independent, so both run on blocks of a few channels
(about 256 KB, :func:`tinynet.nn.layout.for_channel_blocks`), where the passes
stay in the core's cache, and the blocks are shared between the two cores.
Non-overlapping windows (stride >= kernel) write their routed gradient
instead of adding it to a zeroed dx.  Measured (benchmarks/passes.py, old and
new alternating in one process, medians, 2 cores, batch 64): the ResNet stem's
3/2/1 pool on 64@32x32 forward 13.6 -> 6.5 ms, backward 15.7 -> 13.1 ms; the
CNN's MaxPool2d(4) on 32@64x64 forward 11.2 -> 5.5 ms, backward 12.8 -> 6.0 ms.
The result is the same, bit for bit, on any number of threads.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .. import backend, kernels
from .geometry import conv_output_size, kernel_offsets, pair
from .layout import for_channel_blocks, from_chwn, to_chwn
from .module import Module
from .validation import check_grad, check_input

__all__ = [
    "MaxPoolCache", "AvgPoolCache", "AdaptiveAvgPoolCache",
    "max_pool2d_forward", "max_pool2d_backward",
    "avg_pool2d_forward", "avg_pool2d_backward",
    "adaptive_avg_pool2d_forward", "adaptive_avg_pool2d_backward",
    "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d",
]


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
class MaxPoolCache(NamedTuple):
    """What :func:`max_pool2d_backward` needs from :func:`max_pool2d_forward`."""

    argmax: object   #: (C, OH, OW, N) window index k = i*KW + j of each maximum: uint8 (int16 beyond 256 cells)
    x_shape: tuple   #: (N, C, H, W)
    kernel: tuple
    stride: tuple
    padding: tuple


_MAX_POOL_FORWARD = kernels.define(
    "max_pool_forward", f"raw T x, {kernels.GEOMETRY_PARAMS}", "T out, S argmax",
    """
        // Output element i is (c, oy, ox, b) of (C, OH, OW, N).
        ptrdiff_t t = i;
        const int b = t % N; t /= N;
        const int ox = t % OW; t /= OW;
        const int oy = t % OH;
        const ptrdiff_t c = t / OH;
        T best = -CUDART_INF_F;
        int arg = 0;
        for (int ki = 0; ki < KH; ++ki) {
            const int y = oy * SH + ki - PH;
            if (y < 0 || y >= H) continue;              // padding reads -inf: never the maximum
            for (int kj = 0; kj < KW; ++kj) {
                const int z = ox * SW + kj - PW;
                if (z < 0 || z >= W) continue;
                const T v = x[((c * H + y) * W + z) * N + b];
                // Strict: the first maximum wins a tie.  A NaN always wins (so the last NaN), and
                // once best is NaN no number beats it: PyTorch's rule.
                if (v > best || isnan(v)) { best = v; arg = ki * KW + kj; }
            }
        }
        out = best;
        argmax = arg;
    """)


def _max_pool_chwn_fused(xc, kernel, stride, padding, out_size, index_dtype):
    """The GPU twin of :func:`_max_pool_chwn`: one thread per output, scanning its window."""
    xp = backend.get_array_module(xc)
    xc = xp.ascontiguousarray(xc)
    c, h, w, n = xc.shape
    oh, ow = out_size
    out = xp.empty((c, oh, ow, n), dtype=xc.dtype)
    argmax = xp.empty((c, oh, ow, n), dtype=index_dtype)
    _MAX_POOL_FORWARD(xc, *kernels.geometry_args(h, w, n, kernel, stride, padding, oh, ow), out, argmax)
    return out, argmax


@kernels.fused(_max_pool_chwn_fused)
def _max_pool_chwn(xc, kernel, stride, padding, out_size, index_dtype):
    """``(out, argmax)``, both (C, OH, OW, N), of ``xc`` (C, H, W, N).

    Channels are independent: :func:`_max_pool_channels` runs on blocks of a
    few channels, shared between the threads (:func:`for_channel_blocks`).
    """
    xp = backend.get_array_module(xc)
    c, h, w, n = xc.shape
    oh, ow = out_size
    out = xp.empty((c, oh, ow, n), dtype=xc.dtype)
    argmax = xp.empty(out.shape, dtype=index_dtype)
    cells = list(kernel_offsets(kernel, stride, padding, (h, w), (oh, ow)))
    for_channel_blocks(c, oh * ow * n, lambda a, b: _max_pool_channels(xc[a:b], out[a:b], argmax[a:b], cells,
                                                                        kernel[1]), like=xc)
    return out, argmax


def _max_pool_channels(xc, out, argmax, cells, kw):
    """Fill ``out`` and ``argmax`` (C', OH, OW, N) for the channels ``xc`` (C', H, W, N).

    On a block of a few channels (about 256 KB of output), the 4 passes per
    window cell below run in the cache; over the whole 16 MB stem input they
    went to main memory each time.
    """
    xp = backend.get_array_module(xc)
    out.fill(-xp.inf)  # the padding's value
    argmax.fill(0)
    won = xp.empty(out.shape, dtype=argmax.dtype)
    for i, j, rows, cols, in_rows, in_cols in cells:
        cand, best, arg, k_if_won = xc[:, in_rows, in_cols], out[:, rows, cols], argmax[:, rows, cols], won[:, rows, cols]
        # k_if_won = k where this cell beats the maximum so far, else 0.  Strictly greater:
        # on a tie the earlier cell keeps the maximum (the documented rule).
        xp.greater(cand, best, out=k_if_won)
        k_if_won *= i * kw + j
        # The cell index k grows through the loop, so max(argmax, k_if_won) is k exactly where
        # this cell won and the old index elsewhere: a masked assignment without a mask (masked
        # stores with a random mask are ten times slower in NumPy).
        xp.maximum(arg, k_if_won, out=arg)
        xp.maximum(best, cand, out=best)  # maximum propagates NaN: out is NaN where a window holds one
    # Where the maximum is NaN, the loop's comparisons (all False against NaN) routed nowhere in
    # particular; the gradient belongs to the window's last NaN (PyTorch's rule).  One test of the
    # output in the common case (its maximum is NaN exactly when one entry is: one reduction, no
    # temporary array); on CuPy (this code runs there only without fused kernels) the fix-up always
    # runs, to avoid a device-to-host synchronisation.
    if xp is not np or (out.size and np.isnan(out.max())):
        nan_out = xp.isnan(out)
        for i, j, rows, cols, in_rows, in_cols in cells:
            at_nan = nan_out[:, rows, cols] & xp.isnan(xc[:, in_rows, in_cols])
            arg = argmax[:, rows, cols]
            arg[...] = xp.where(at_nan, i * kw + j, arg)


def max_pool2d_forward(x, kernel, stride, padding):
    """Returns ``(out, cache)``: out (N, C, OH, OW) and a :class:`MaxPoolCache`."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    xp = backend.get_array_module(x)
    index_dtype = xp.uint8 if kh * kw <= 256 else xp.int16
    out, argmax = _max_pool_chwn(to_chwn(x), tuple(kernel), tuple(stride), tuple(padding), (oh, ow), index_dtype)
    return from_chwn(out), MaxPoolCache(argmax, x.shape, tuple(kernel), tuple(stride), tuple(padding))


_MAX_POOL_BACKWARD = kernels.define(
    "max_pool_backward", f"raw T dout, raw S argmax, {kernels.GEOMETRY_PARAMS}", "T dx",
    kernels.PIXEL_INDEX + """
        T acc = 0;   // the dout of every window whose maximum this pixel was
        """ + kernels.FOR_EACH_READER.format(body="""
                const ptrdiff_t o = ((c * OH + oy) * OW + ox) * N + b;
                if (argmax[o] == ki * KW + kj) acc += dout[o];""") + """
        dx = acc;
    """)


def _route_chwn_fused(doutc, argmax, x_chwn_shape, kernel, stride, padding):
    """The GPU twin of :func:`_route_chwn`: a gather, one thread per input pixel."""
    xp = backend.get_array_module(doutc)
    c, h, w, n = x_chwn_shape
    oh, ow = argmax.shape[1:3]
    dx = xp.empty(x_chwn_shape, dtype=doutc.dtype)
    _MAX_POOL_BACKWARD(xp.ascontiguousarray(doutc), argmax,
                       *kernels.geometry_args(h, w, n, kernel, stride, padding, oh, ow), dx)
    return dx


@kernels.fused(_route_chwn_fused)
def _route_chwn(doutc, argmax, x_chwn_shape, kernel, stride, padding):
    """dx (C, H, W, N): each ``doutc`` (C, OH, OW, N) value added to its window's maximum.

    Per block of channels, as the forward (:func:`_route_channels`).
    """
    xp = backend.get_array_module(doutc)
    c, h, w, n = x_chwn_shape
    oh, ow = argmax.shape[1:3]
    dx = xp.empty(x_chwn_shape, dtype=doutc.dtype)
    cells = list(kernel_offsets(kernel, stride, padding, (h, w), (oh, ow)))
    # Windows that do not overlap (stride >= kernel) give every input cell at most one gradient:
    # it can be written (=) instead of accumulated, one pass less per window cell.
    overlap = stride[0] < kernel[0] or stride[1] < kernel[1]
    for_channel_blocks(c, h * w * n, lambda a, b: _route_channels(doutc[a:b], argmax[a:b], dx[a:b], cells,
                                                                   kernel[1], overlap), like=doutc)
    return dx


def _route_channels(doutc, argmax, dx, cells, kw, overlap):
    """``dx`` (C', H, W, N) <- the routed ``doutc`` (C', OH, OW, N) of a block of channels."""
    xp = backend.get_array_module(doutc)
    dx.fill(0)
    won = xp.empty(argmax.shape, dtype=bool)
    routed = xp.empty(doutc.shape, dtype=doutc.dtype) if overlap else None
    for i, j, rows, cols, in_rows, in_cols in cells:
        is_max = xp.equal(argmax[:, rows, cols], i * kw + j, out=won[:, rows, cols])
        if overlap:
            # += : with overlapping windows (stride < kernel) one cell can win several windows.
            dx[:, in_rows, in_cols] += xp.multiply(doutc[:, rows, cols], is_max, out=routed[:, rows, cols])
        else:
            xp.multiply(doutc[:, rows, cols], is_max, out=dx[:, in_rows, in_cols])


def max_pool2d_backward(dout, cache):
    """Route each ``dout`` value to the input cell that was the maximum of its window."""
    argmax, x_shape, kernel, stride, padding = cache
    n, c, h, w = x_shape
    return from_chwn(_route_chwn(to_chwn(dout), argmax, (c, h, w, n), kernel, stride, padding))


# ---------------------------------------------------------------------------
# Average pooling
# ---------------------------------------------------------------------------
class AvgPoolCache(NamedTuple):
    """What :func:`avg_pool2d_backward` needs: only the geometry (average pooling is linear)."""

    x_shape: tuple
    kernel: tuple
    stride: tuple
    padding: tuple
    count_include_pad: bool


class AdaptiveAvgPoolCache(NamedTuple):
    """What :func:`adaptive_avg_pool2d_backward` needs."""

    x_shape: tuple
    output_size: tuple


def _avg_scale(kernel, stride, padding, in_size, out_size, count_include_pad, like):
    """``1 / D`` for every output position: a number, or an array (1, OH, OW, 1) without padded cells."""
    kh, kw = kernel
    if count_include_pad:
        return 1.0 / (kh * kw)
    counts = np.zeros(out_size)
    for _, _, rows, cols, _, _ in kernel_offsets(kernel, stride, padding, in_size, out_size):
        counts[rows, cols] += 1
    xp = backend.get_array_module(like)
    return xp.asarray((1.0 / counts)[None, :, :, None], dtype=like.dtype)


def avg_pool2d_forward(x, kernel, stride, padding, count_include_pad=True):
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    xp = backend.get_array_module(x)
    xc = to_chwn(x)
    out = xp.zeros((c, oh, ow, n), dtype=x.dtype)
    for _, _, rows, cols, in_rows, in_cols in kernel_offsets(kernel, stride, padding, (h, w), (oh, ow)):
        out[:, rows, cols] += xc[:, in_rows, in_cols]
    out *= _avg_scale(kernel, stride, padding, (h, w), (oh, ow), count_include_pad, out)
    return from_chwn(out), AvgPoolCache(x.shape, tuple(kernel), tuple(stride), tuple(padding), count_include_pad)


def avg_pool2d_backward(dout, cache):
    x_shape, kernel, stride, padding, count_include_pad = cache
    n, c, h, w = x_shape
    xp = backend.get_array_module(dout)
    oh, ow = dout.shape[2:]
    # each window cell receives 1/D of its window's dout
    share = to_chwn(dout) * _avg_scale(kernel, stride, padding, (h, w), (oh, ow), count_include_pad, dout)
    dx = xp.zeros((c, h, w, n), dtype=dout.dtype)
    for _, _, rows, cols, in_rows, in_cols in kernel_offsets(kernel, stride, padding, (h, w), (oh, ow)):
        dx[:, in_rows, in_cols] += share[:, rows, cols]
    return from_chwn(dx)


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
        return x.mean(axis=(2, 3), keepdims=True), AdaptiveAvgPoolCache(x.shape, tuple(output_size))
    out = xp.empty((n, c, oh, ow), dtype=x.dtype)
    for y, (r0, r1) in enumerate(_adaptive_bins(h, oh)):
        for z, (c0, c1) in enumerate(_adaptive_bins(w, ow)):
            out[:, :, y, z] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return out, AdaptiveAvgPoolCache(x.shape, tuple(output_size))


def adaptive_avg_pool2d_backward(dout, cache):
    x_shape, (oh, ow) = cache
    n, c, h, w = x_shape
    xp = backend.get_array_module(dout)
    if (oh, ow) == (1, 1):
        # dx[n, c, :, :] = dout[n, c] / (H*W), written CHWN like the other layers' gradients.
        dx = xp.empty((c, h, w, n), dtype=dout.dtype)
        dx[...] = (dout[:, :, 0, 0].T * (1.0 / (h * w)))[:, None, None, :]
        return from_chwn(dx)
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

    _forward_fn = _backward_fn = None

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
        out, cache = type(self)._forward_fn(x, self.kernel_size, self.stride, self.padding, **self._options())
        self._save_for_backward(cache, out.shape, out.dtype)
        return out

    def backward(self, dout):
        cache, shape, dtype = self._saved_for_backward()
        check_grad(self, dout, shape, dtype)
        return type(self)._backward_fn(dout, cache)

    def _options(self) -> dict:
        return {}


class MaxPool2d(_Pool2d):
    """``MaxPool2d(kernel_size, stride=None, padding=0)``; stride defaults to the kernel size."""

    _forward_fn, _backward_fn = max_pool2d_forward, max_pool2d_backward


class AvgPool2d(_Pool2d):
    """``AvgPool2d(kernel_size, stride=None, padding=0, count_include_pad=True)``, as PyTorch's."""

    _forward_fn, _backward_fn = avg_pool2d_forward, avg_pool2d_backward

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
        out, cache = adaptive_avg_pool2d_forward(x, self.output_size)
        self._save_for_backward(cache, out.shape, out.dtype)
        return out

    def backward(self, dout):
        cache, shape, dtype = self._saved_for_backward()
        check_grad(self, dout, shape, dtype)
        return adaptive_avg_pool2d_backward(dout, cache)
