"""kn2row: a convolution as one matrix product per kernel offset, over only the pixels it reads.

Notation as in :mod:`tinynet.nn.conv` (N, C, C_out, H, W, KH, KW, SH, SW, PH, PW, OH, OW); every
array here is CHWN (:mod:`tinynet.nn.fast.layout`), so one pixel of every image, ``x[:, p, q]``, is
a (C, N) matrix.

Read the convolution one kernel offset (a *tap*) ``(i, j)`` at a time.  At tap (i, j) every output
position (y, x) reads the input pixel ``(SH*y + i - PH, SW*x + j - PW)`` and multiplies it by the
same (C_out, C) matrix ``W_ij = W[:, :, i, j]``::

    out[:, y, x] = b + sum_(i,j) W_ij @ x[:, SH*y + i - PH, SW*x + j - PW]

For each tap, the output positions whose pixel lies inside the image form a rectangle ``R_ij``
(:func:`~tinynet.nn.geometry.kernel_offsets`), reading a strided rectangle ``S_ij`` of the input;
the other positions read zero padding and add nothing.  So the convolution is KH*KW matrix
products, each over the pixels that tap really reads::

    X_ij (C, |R_ij| N)      = x[:, S_ij]                gathered once per tap
    Y_ij (C_out, |R_ij| N)  = W_ij @ X_ij               one GEMM per tap, K = C
    out[:, R_ij]           += Y_ij                      added in tap order

im2col computes the same sums with the padding's zeros inside them: KH*KW*OH*OW products of a
(C_out, C) block per image, where kn2row computes ``sum |R_ij|`` of them (:func:`valid_fraction`).
On a small map most of im2col's are zeros: a 3x3 convolution with padding 1 has 16 live (output,
tap) pairs of 36 on a 2x2 map and 1 of 9 on a 1x1 map (ResNet18's last stage at 64 and 32 px).
That is the case kn2row is chosen for (:func:`tinynet.nn.fast.conv.choose_algorithm`); on larger
maps its products, with K = C instead of im2col's C*KH*KW, run slower than im2col's one
(docs/performance.md, "kn2row on small maps").

The backward is the adjoint of each step, with ``dY`` the upstream gradient::

    dY_ij  = dY[:, R_ij]                     (C_out, |R_ij| N)
    dW_ij  = dY_ij @ X_ij^T                  (C_out, C); zero for a tap that reads only padding
    dX_ij  = W_ij^T @ dY_ij                  (C, |R_ij| N)
    dx[:, S_ij] += dX_ij                     in tap order: a pixel read by several taps gets each
    db     = dY summed over (OH, OW, N)

How it runs.  ``W_ij`` is a strided slice of W, which a GEMM cannot read, so the forward and the
backward each copy the live taps to ``Wt`` (KH, KW, C_out, C), a scratch buffer (kept from the
forward to the backward instead, the copies of three 512-channel layers added 24 MB to a ResNet18
step's peak).  The forward keeps a copy of x (C, H, W, N) for the backward, smaller than im2col's
col.  The taps' columns are laid side by side in one (C, sum |R_ij| N) matrix.  Each tap's products are cut
into pieces of at most :data:`PIECE_COLUMNS` columns (dW's into :data:`PIECE_ROWS` rows), each one
single-threaded GEMM (:mod:`tinynet.nn.fast.gemm`), and the pieces are shared between tinynet's
threads by their cost.  The cuts depend on the shapes only, and the sums into ``out`` and ``dx``
run in tap order within each block of channels, so the bits do not depend on the number of
threads.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

from ... import backend
from ..geometry import conv_output_size, kernel_offsets
from .gemm import hold_blas_threads
from .layout import channel_matrix, from_chwn, to_chwn
from .threads import for_channel_blocks, num_threads, parallel_for
from .workspace import scratch

__all__ = ["Kn2rowCache", "kn2row_forward", "kn2row_backward", "valid_fraction", "live_taps",
           "PIECE_COLUMNS", "PIECE_ROWS"]

#: Columns per piece of a tap's products, at most.  Narrower pieces cost more calls than they
#: balance: one thread's forward products of 512@2 at batch 64 took 8.1 ms in pieces of 64
#: columns, 6.9 in pieces of 256, 6.8 whole (docs/performance.md, "kn2row on small maps").
PIECE_COLUMNS = 512
#: Rows of dW (output channels) per piece of its products, at most.
PIECE_ROWS = 256


class Kn2rowCache(NamedTuple):
    """What :func:`kn2row_backward` needs from :func:`kn2row_forward`."""

    x: object            #: (C, H, W, N), a copy of the input (the buffer, when one was given)
    weight: object       #: (C_out, C, KH, KW), the weight the forward used
    stride: tuple        #: (SH, SW)
    padding: tuple       #: (PH, PW)
    has_bias: bool


class _Tap(NamedTuple):
    i: int
    j: int
    rows: slice          #: R_ij's output rows
    cols: slice          #: R_ij's output columns
    in_rows: slice       #: S_ij's input rows (strided by SH)
    in_cols: slice       #: S_ij's input columns (strided by SW)
    start: int           #: where its columns begin in the side-by-side matrix
    stop: int


def _extent(s: slice) -> int:
    return s.stop - s.start


def live_taps(x_shape, kernel, stride, padding):
    """The taps that read at least one pixel of an ``x_shape`` (N, C, H, W) input, and their column ranges.

    Returns ``(taps, (OH, OW), columns)``: ``taps`` a tuple of ``_Tap``, in (i, j) order;
    ``columns`` is ``sum |R_ij| N``, the width of the side-by-side matrix of every tap's columns.
    """
    return _live_taps(tuple(x_shape), tuple(kernel), tuple(stride), tuple(padding))


@functools.lru_cache(maxsize=256)
def _live_taps(x_shape, kernel, stride, padding):
    n, _, h, w = x_shape
    oh, ow = (conv_output_size(size, k, s, p) for size, k, s, p in zip((h, w), kernel, stride, padding))
    taps, start = [], 0
    for i, j, rows, cols, in_rows, in_cols in kernel_offsets(kernel, stride, padding, (h, w), (oh, ow)):
        width = _extent(rows) * _extent(cols) * n
        if width:
            taps.append(_Tap(i, j, rows, cols, in_rows, in_cols, start, start + width))
            start += width
    return tuple(taps), (oh, ow), start


def valid_fraction(x_shape, kernel, stride, padding) -> float:
    """``sum |R_ij| / (KH*KW*OH*OW)``: the share of im2col's (output, tap) products that read a pixel."""
    _, (oh, ow), columns = live_taps(x_shape, kernel, stride, padding)
    return columns / (kernel[0] * kernel[1] * oh * ow * x_shape[0])


# ---------------------------------------------------------------------------
# The pieces, and running them
# ---------------------------------------------------------------------------
def _column_pieces(taps):
    """Each tap's columns in pieces of at most :data:`PIECE_COLUMNS`: ``(tap, lo, hi)`` (the shapes decide, not the threads)."""
    pieces = []
    for tap in taps:
        count = -(-(tap.stop - tap.start) // PIECE_COLUMNS)
        bounds = [tap.start + (tap.stop - tap.start) * k // count for k in range(count + 1)]
        pieces += [(tap, lo, hi) for lo, hi in zip(bounds, bounds[1:])]
    return pieces


def _run(pieces, cost, body, like):
    """``body(piece)`` for every piece, shared between tinynet's threads by ``cost(piece)``.

    Each piece is one single-threaded BLAS call (BLAS held on one thread).  Which thread runs a
    piece does not change its bits.  When BLAS keeps its own threads (tinynet cannot set them),
    and on the GPU, the pieces run one after another here.
    """
    if backend.is_cupy_array(like) or not hold_blas_threads():
        for piece in pieces:
            body(piece)
        return
    groups = [[] for _ in range(min(num_threads(), len(pieces)))]
    loads = [0] * len(groups)
    for piece in sorted(pieces, key=cost, reverse=True):  # the largest first, to the least loaded thread
        k = loads.index(min(loads))
        groups[k].append(piece)
        loads[k] += cost(piece)
    parallel_for(len(groups), lambda a, b: [body(p) for group in groups[a:b] for p in group])


def _columns_cost(piece):
    return piece[2] - piece[1]


def _tap_weights(w, taps):
    """``Wt[i, j] = W[:, :, i, j]`` (C_out, C) for every live tap, in this thread's scratch buffer."""
    c_out, c, kh, kw = w.shape
    wt = scratch("kn2row.weights", (kh, kw, c_out, c), w.dtype, like=w)
    every = len(taps) == kh * kw

    def copy(a, b):
        if every:  # one transposing copy
            wt[:, :, a:b] = w[a:b].transpose(2, 3, 0, 1)
        else:
            for tap in taps:
                wt[tap.i, tap.j, a:b] = w[a:b, :, tap.i, tap.j]

    per_channel = c * len(taps)  # one block per thread: the copy has no intermediates to keep in cache
    for_channel_blocks(c_out, per_channel, copy, w, block_elements=c_out * per_channel)
    return wt


def _gather(xc, taps, columns, name):
    """The side-by-side matrix (C, columns): tap (i, j)'s block is ``x[:, S_ij]``, (C, |R_ij|, N) flattened."""
    c = xc.shape[0]
    out = scratch(name, (c, columns), xc.dtype, like=xc)

    def copy(a, b):
        for tap in taps:
            _block(out[a:b], tap)[...] = xc[a:b, tap.in_rows, tap.in_cols]

    for_channel_blocks(c, columns, copy, xc)
    return out


def _block(a, tap):
    """Tap ``tap``'s columns of the side-by-side matrix ``a`` as a (rows, |R|, N) view."""
    block = a[:, tap.start:tap.stop]
    return block.reshape(a.shape[0], _extent(tap.rows), _extent(tap.cols), -1)  # the columns are contiguous: a view


# ---------------------------------------------------------------------------
# Forward and backward
# ---------------------------------------------------------------------------
def kn2row_forward(x, w, b, stride=(1, 1), padding=(0, 0), buffer=None):
    """The convolution by one product per live tap; the result of :func:`tinynet.nn.fast.conv.conv2d_forward`.

    Parameters
    ----------
    x : (N, C, H, W)
    w : (C_out, C, KH, KW)  (ungrouped)
    b : (C_out,) or None
    stride, padding : pairs
    buffer : optional (C, H, W, N) array for the copy of x the backward reads; the cache then
        refers to it, so its owner must not refill it before the backward of this call has run

    Returns
    -------
    out : (N, C_out, OH, OW), an NCHW view of a new (C_out, OH, OW, N) array
    cache : :class:`Kn2rowCache`
    """
    xp = backend.get_array_module(x)
    c_out, c, kh, kw = w.shape
    n = x.shape[0]
    taps, (oh, ow), columns = live_taps(x.shape, (kh, kw), stride, padding)
    xc = to_chwn(x)                                              # (C, H, W, N) view
    x_copy = xp.empty(xc.shape, dtype=x.dtype) if buffer is None else buffer
    x_copy[...] = xc
    wt = _tap_weights(w, taps)
    cols = _gather(x_copy, taps, columns, "kn2row.columns")      # (C, columns): every X_ij side by side
    prods = scratch("kn2row.products", (c_out, columns), x.dtype, like=x)

    def product(piece):                                          # Y_ij = W_ij @ X_ij, a block of columns
        tap, lo, hi = piece
        xp.matmul(wt[tap.i, tap.j], cols[:, lo:hi], out=prods[:, lo:hi])

    _run(_column_pieces(taps), _columns_cost, product, x)
    out = xp.empty((c_out, oh, ow, n), dtype=x.dtype)

    def add_up(a, z):                                            # out[:, R_ij] += Y_ij, in tap order
        out[a:z] = 0 if b is None else b[a:z, None, None, None]
        for tap in taps:
            out[a:z, tap.rows, tap.cols] += _block(prods[a:z], tap)

    for_channel_blocks(c_out, oh * ow * n, add_up, x)
    return from_chwn(out), Kn2rowCache(x_copy, w, tuple(stride), tuple(padding), b is not None)


def kn2row_backward(dout, cache, need_dx=True):
    """Gradients of :func:`kn2row_forward` (the contract of :func:`tinynet.nn.fast.conv.conv2d_backward`).

    Returns
    -------
    dx : (N, C, H, W), a new array (CHWN in memory), or None
    dw : (C_out, C, KH, KW)
    db : (C_out,) or None
    """
    xp = backend.get_array_module(dout)
    xc, w, stride, padding, has_bias = cache
    c_out, c, kh, kw = w.shape
    h, wd, n = xc.shape[1:]
    taps, _, columns = live_taps((n, c, h, wd), (kh, kw), stride, padding)
    db = channel_matrix(dout).sum(axis=1) if has_bias else None
    dy = _gather(to_chwn(dout), [t._replace(in_rows=t.rows, in_cols=t.cols) for t in taps], columns,
                 "kn2row.dout")                                  # (C_out, columns): every dY_ij side by side
    cols = _gather(xc, taps, columns, "kn2row.columns")           # (C, columns): every X_ij

    dw = xp.empty(w.shape, dtype=dout.dtype)
    live = {(tap.i, tap.j) for tap in taps}
    for i in range(kh):
        for j in range(kw):
            if (i, j) not in live:
                dw[:, :, i, j] = 0                               # a tap that reads only padding
    row_pieces = [(tap, r, min(r + PIECE_ROWS, c_out)) for tap in taps for r in range(0, c_out, PIECE_ROWS)]

    def weight_gradient(piece):                                  # dW_ij = dY_ij @ X_ij^T, a block of rows
        tap, r, s = piece
        dw[r:s, :, tap.i, tap.j] = dy[r:s, tap.start:tap.stop] @ cols[:, tap.start:tap.stop].T

    _run(row_pieces, lambda p: (p[2] - p[1]) * (p[0].stop - p[0].start), weight_gradient, dout)
    if not need_dx:
        return None, dw, db

    wt = _tap_weights(w, taps)
    dcols = scratch("kn2row.dcolumns", (c, columns), dout.dtype, like=dout)

    def input_gradient(piece):                                   # dX_ij = W_ij^T @ dY_ij, a block of columns
        tap, lo, hi = piece
        xp.matmul(wt[tap.i, tap.j].T, dy[:, lo:hi], out=dcols[:, lo:hi])

    _run(_column_pieces(taps), _columns_cost, input_gradient, dout)
    dx = xp.empty((c, h, wd, n), dtype=dout.dtype)

    def add_back(a, z):                                          # dx[:, S_ij] += dX_ij, in tap order
        dx[a:z] = 0
        for tap in taps:
            dx[a:z, tap.in_rows, tap.in_cols] += _block(dcols[a:z], tap)

    for_channel_blocks(c, h * wd * n, add_back, dout)
    return from_chwn(dx), dw, db
