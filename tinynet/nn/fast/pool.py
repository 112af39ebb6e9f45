"""The fast pools: window slices of the CHWN layout, blocked and threaded, and their CUDA twins.

The math (and the rules for ties, NaN and overlapping windows) is the plain
:mod:`tinynet.nn.pool`'s (read it first).  Here the pools read window slices
``[:, rows, cols]`` of the channels-first, batch-last view (C, H, W, N) of their
input and return NCHW views of CHWN buffers (:mod:`tinynet.nn.fast.layout`).
Padding is never materialised: :func:`tinynet.nn.geometry.kernel_offsets`
gives, for every window cell, the output positions where that cell falls on a
real pixel (for max pooling the others read ``-inf`` and are skipped, for
average pooling they read 0 and add nothing).

Max pooling makes 4 passes per window cell forward and 3 backward; channels
are independent, so both run on blocks of a few channels (about 256 KB forward,
4 MB backward: :data:`ROUTE_BLOCK_ELEMENTS`;
:func:`tinynet.nn.fast.threads.for_channel_blocks`), where the passes stay in
the caches, shared between the threads.  Non-overlapping windows
(stride >= kernel) write their routed gradient instead of adding it to a zeroed
dx.  The result is the same, bit for bit, on any number of threads.  On CuPy
the forward and the backward are one CUDA kernel each (:mod:`tinynet.kernels`).
Measurements: docs/performance.md.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ... import backend, kernels
from ..geometry import conv_output_size, kernel_offsets
from .layout import from_chwn, to_chwn
from .threads import for_channel_blocks

__all__ = ["MaxPoolCache", "AvgPoolCache", "max_pool2d_forward", "max_pool2d_backward",
           "avg_pool2d_forward", "avg_pool2d_backward", "global_avg_pool2d_backward"]


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


#: Elements of dx per block of the max-pool backward (4 MB of float32): its three passes per window
#: cell are short, so with the forward's 256 KB blocks (one channel of the ResNet stem's input) the
#: NumPy calls cost more than the cache saves.  Stem pool backward (64 channels, 32x32, batch 64):
#: 11.2 ms in 64K-element blocks, 5.6 in 256K, 5.3 in 1M; the CNN's 4x4 pool 5.4 -> 4.4 ms (2 threads,
#: one process, alternating).  The forward keeps 64K: it gained nothing from larger blocks.
ROUTE_BLOCK_ELEMENTS = 1 << 20


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
                                                                   kernel[1], overlap), like=doutc,
                       block_elements=ROUTE_BLOCK_ELEMENTS)
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


class AvgPoolCache(NamedTuple):
    """What :func:`avg_pool2d_backward` needs: only the geometry (average pooling is linear)."""

    x_shape: tuple
    kernel: tuple
    stride: tuple
    padding: tuple
    count_include_pad: bool


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
    """Average pooling on the CHWN view of ``x``: ``(out, cache)``, out an NCHW view of a CHWN buffer."""
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
    """dx of :func:`avg_pool2d_forward`, CHWN in memory."""
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


def global_avg_pool2d_backward(dout, x_shape):
    """dx of global average pooling, ``dx[n, c, :, :] = dout[n, c] / (H*W)``, written CHWN like the other layers'."""
    n, c, h, w = x_shape
    xp = backend.get_array_module(dout)
    dx = xp.empty((c, h, w, n), dtype=dout.dtype)
    dx[...] = (dout[:, :, 0, 0].T * (1.0 / (h * w)))[:, None, None, :]
    return from_chwn(dx)
