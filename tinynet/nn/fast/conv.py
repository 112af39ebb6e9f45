"""The fast convolution: im2col/col2im on the CHWN layout, and the choice between im2col and Winograd.

The math is the plain :mod:`tinynet.nn.conv`'s (read it first; the notation is its own).  What
this module adds, and why:

* **Layout.**  ``col`` is laid out ``(C, KH, KW, OH, OW, N)``: rows in the order of the
  weight's ``(C, KH, KW)`` axes (so ``W2d`` is a plain reshape of PyTorch's weight) and columns
  in (OH, OW, N) order, which makes the GEMM result a ``(C_out, OH, OW, N)`` buffer, returned as
  an NCHW view (:mod:`tinynet.nn.fast.layout` says why that is cheaper than copying).
* **No padded copy.**  im2col and col2im loop over the KH*KW kernel offsets and copy one strided
  slice of the whole batch each time; for kernel offset (i, j) only the output positions whose
  input pixel lies inside the image are copied (:func:`~tinynet.nn.geometry.kernel_offsets`), and
  the rest of ``col`` is set to zero, which is what zero padding means.
* **1x1 aliasing.**  A 1x1 stride-1 unpadded convolution reads every pixel once: ``col`` is
  ``x`` itself (a view) and col2im the identity.
* **Threads.**  im2col and col2im split the channels over the host threads
  (:mod:`tinynet.nn.fast.threads`), and the products are cut into pieces on the same threads,
  with BLAS held on one (:func:`tinynet.nn.fast.gemm.matmul`).
* **CUDA twins.**  On CuPy, im2col and col2im run as one kernel each (:mod:`tinynet.kernels`);
  col2im as a gather, each pixel summing its own contributions (deterministic, no atomics).
* **Buffers.**  ``col`` (or Winograd's V) is written into a buffer the layer owns, and ``dcol``
  into this thread's scratch buffer (:mod:`tinynet.nn.fast.workspace`).
* **Chunks without gradients.**  Under ``no_grad`` nothing keeps ``col``, so a large im2col
  convolution fills and multiplies it a few output rows at a time, each chunk on one thread while
  it is in that core's cache (:func:`forward_in_chunks`), with the bits of the whole product.
* **Algorithms.**  Stride-1 3x3 ungrouped convolutions may run as Winograd F(2x2, 3x3)
  (:mod:`tinynet.nn.fast.winograd`): 4 instead of 9 multiplications per output, and a 4x copy of
  the input kept for the backward instead of col's 9x.  On small maps, where most of im2col's
  products read padding, kn2row (:mod:`tinynet.nn.fast.kn2row`) computes one product per kernel
  offset over only the pixels it reads.  :func:`choose_algorithm` picks one per
  layer shape, *never* by the grad mode (a layer gives the same bits with and without
  gradients); :func:`algorithm` forces a choice, for benchmarks and tests::

      with tinynet.nn.fast.conv.algorithm("im2col"):      # or "winograd_f2", "winograd_f4", "kn2row"
          out = model(x)

  The cache names the algorithm that made it: :class:`Im2colCache`,
  :class:`~tinynet.nn.fast.winograd.WinogradCache` or :class:`~tinynet.nn.fast.kn2row.Kn2rowCache`.
"""
from __future__ import annotations

import contextlib
import threading
from typing import NamedTuple

import numpy as np

from ... import backend, kernels
from ..geometry import conv_output_size, kernel_offsets
from .layout import channel_matrix, from_channel_matrix, from_chwn, to_chwn
from .gemm import SPLIT_MIN_MACS, hold_blas_threads, matmul, owns_threads
from .kn2row import Kn2rowCache, kn2row_backward, kn2row_forward, live_taps
from .threads import num_threads, parallel_for
from .winograd import WinogradCache, v_shape, winograd_backward, winograd_forward
from .workspace import LayerBuffers, scratch

__all__ = ["Im2colCache", "ConvCache", "im2col", "col2im", "conv2d_forward", "conv2d_backward", "layer_forward",
           "forward_in_chunks", "CHUNKED_MIN_COL_BYTES", "CHUNK_BYTES",
           "ALGORITHMS", "algorithm", "choose_algorithm", "winograd_applies", "WINOGRAD_MIN_WORK",
           "KN2ROW_MAX_FRACTION", "KN2ROW_MIN_WORK", "KN2ROW_MIN_SKIPPED"]


class Im2colCache(NamedTuple):
    """What :func:`conv2d_backward` needs from :func:`conv2d_forward` when im2col + GEMM ran."""

    col: object          #: (K, M) receptive fields; x itself (a view) for a 1x1 stride-1 unpadded conv
    x_shape: tuple       #: (N, C, H, W)
    weight: object       #: (C_out, C, KH, KW), the weight the forward used
    stride: tuple        #: (SH, SW)
    padding: tuple       #: (PH, PW)
    has_bias: bool
    groups: int = 1      #: G: output block g sees input block g


ConvCache = Im2colCache  # its older name


def _is_pointwise(kernel, stride, padding) -> bool:
    """A 1x1 stride-1 unpadded convolution reads every pixel once: col is x and col2im the identity."""
    return tuple(kernel) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)


def _zero_outside(a, rows: slice, cols: slice) -> None:
    """Zero the border of ``a`` (C, OH, OW, N) outside ``rows x cols``: the positions that read padding."""
    a[:, :rows.start] = 0
    a[:, rows.stop:] = 0
    a[:, rows, :cols.start] = 0
    a[:, rows, cols.stop:] = 0


def _copy_fields(xc, cells, sh, col, r0, r1):
    """``col`` (c, KH, KW, r1 - r0, OW, N) <- the receptive fields of output rows ``[r0, r1)`` of ``xc`` (c, H, W, N).

    ``cells`` are :func:`~tinynet.nn.geometry.kernel_offsets`'s; ``sh`` the stride along H.
    """
    for i, j, rows, cols, in_rows, in_cols in cells:
        # Every receptive-field entry at kernel offset (i, j), for the whole batch: the output rows
        # y0..y1 of [r0, r1) whose cell (i, j) lies inside the image read input rows first, first+sh, ...
        y0, y1 = max(rows.start, r0), min(rows.stop, r1)
        dst = col[:, i, j]
        if y0 >= y1:
            dst[...] = 0
            continue
        first = in_rows.start + sh * (y0 - rows.start)
        dst[:, y0 - r0:y1 - r0, cols] = xc[:, first:first + sh * (y1 - y0):sh, in_cols]
        _zero_outside(dst, slice(y0 - r0, y1 - r0), cols)


_IM2COL = kernels.define(
    "im2col", f"raw T x, {kernels.GEOMETRY_PARAMS}", "T col",
    """
        // Output element i is (c, ki, kj, oy, ox, b) of col (C, KH, KW, OH, OW, N).
        ptrdiff_t t = i;
        const int b = t % N; t /= N;
        const int ox = t % OW; t /= OW;
        const int oy = t % OH; t /= OH;
        const int kj = t % KW; t /= KW;
        const int ki = t % KH;
        const ptrdiff_t c = t / KH;
        const int y = oy * SH + ki - PH, z = ox * SW + kj - PW;   // the input pixel it reads
        col = (y >= 0 && y < H && z >= 0 && z < W) ? x[((c * H + y) * W + z) * N + b] : (T)0;
    """)


def _fill_columns_fused(xc, kernel, stride, padding, out):
    """The GPU twin of :func:`_fill_columns`: one thread per entry of ``col``."""
    c, h, w, n = xc.shape
    oh, ow = out.shape[3:5]
    _IM2COL(xc, *kernels.geometry_args(h, w, n, kernel, stride, padding, oh, ow), out)
    return out


@kernels.fused(_fill_columns_fused)
def _fill_columns(xc, kernel, stride, padding, out):
    """``out`` (C, KH, KW, OH, OW, N) <- the receptive fields of ``xc`` (C, H, W, N), C-contiguous.

    Channels are independent: channels ``[a, b)`` are copied by one thread
    (:func:`tinynet.parallel_for`), the same copies on any number.
    """
    c, h, w, n = xc.shape
    oh, ow = out.shape[3:5]
    cells = list(kernel_offsets(kernel, stride, padding, (h, w), (oh, ow)))

    def fill(a, b):
        _copy_fields(xc[a:b], cells, stride[0], out[a:b], 0, oh)

    if backend.is_cupy_array(xc):  # (without fused kernels) the GPU needs no host threads
        fill(0, c)
    else:
        parallel_for(c, fill, elements=out.size)
    return out


def im2col(x, kernel, stride, padding, out=None):
    """Receptive fields of ``x`` (N, C, H, W) as the columns of ``col`` (K, M).

    ``col[(c, i, j), (y, x, n)] = xpad[n, c, SH*y + i, SW*x + j]``.  ``out``
    may be a buffer of shape (C, KH, KW, OH, OW, N) to fill (the result is
    then a view of it); a 1x1 stride-1 convolution without padding reads every
    pixel once, and ``col`` is then ``x`` itself (a view when ``x`` is CHWN in
    memory).
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    xc = to_chwn(x)  # (C, H, W, N)
    if _is_pointwise(kernel, stride, padding):
        return xc.reshape(c, h * w * n)
    xp = backend.get_array_module(x)
    if not xc.flags.c_contiguous:
        # An input that is not CHWN in memory (the images entering the first layer are NCHW)
        # is reordered once: KH*KW strided gathers from NCHW would each move runs of one value.
        xc = xp.ascontiguousarray(xc)
    if out is None:
        out = xp.empty((c, kh, kw, oh, ow, n), dtype=x.dtype)
    return _fill_columns(xc, kernel, stride, padding, out).reshape(c * kh * kw, oh * ow * n)


_COL2IM = kernels.define(
    "col2im", f"raw T dcol, {kernels.GEOMETRY_PARAMS}", "T dx",
    kernels.PIXEL_INDEX + """
        T acc = 0;
        """ + kernels.FOR_EACH_READER.format(body="""
                acc += dcol[((((c * KH + ki) * KW + kj) * OH + oy) * OW + ox) * N + b];""") + """
        dx = acc;
    """)


def _sum_columns_fused(dcol, x_chwn_shape, kernel, stride, padding):
    """The GPU twin of :func:`_sum_columns`: a gather, each pixel sums its own contributions (no atomics)."""
    xp = backend.get_array_module(dcol)
    c, h, w, n = x_chwn_shape
    oh, ow = dcol.shape[3:5]
    dx = xp.empty(x_chwn_shape, dtype=dcol.dtype)
    _COL2IM(xp.ascontiguousarray(dcol), *kernels.geometry_args(h, w, n, kernel, stride, padding, oh, ow), dx)
    return dx


@kernels.fused(_sum_columns_fused)
def _sum_columns(dcol, x_chwn_shape, kernel, stride, padding):
    """dx (C, H, W, N), a new array, from ``dcol`` (C, KH, KW, OH, OW, N)."""
    xp = backend.get_array_module(dcol)
    c, h, w, n = x_chwn_shape
    oh, ow = dcol.shape[3:5]
    dx = xp.empty(x_chwn_shape, dtype=dcol.dtype)
    cells = list(kernel_offsets(kernel, stride, padding, (h, w), (oh, ow)))

    def add_up(a, b):  # channels [a, b), on one thread: the same sums, in the same order, on any number
        dx[a:b] = 0
        for i, j, rows, cols, in_rows, in_cols in cells:
            # += and not =: when the stride is smaller than the kernel, neighbouring
            # windows overlap and a pixel receives one gradient from each window
            # that read it (dL/dx is the sum over every use of x).
            dx[a:b, in_rows, in_cols] += dcol[a:b, i, j, rows, cols]

    if backend.is_cupy_array(dcol):  # (without fused kernels) the GPU needs no host threads
        add_up(0, c)
    else:
        parallel_for(c, add_up, elements=dcol.size)
    return dx


def col2im(dcol, x_shape, kernel, stride, padding):
    """Adjoint of :func:`im2col`: add every column entry back onto the pixel it was copied from.

    Returns dx with logical shape ``x_shape`` (N, C, H, W), CHWN in memory.
    Entries that were copied from the padding have no pixel and are dropped.
    For a 1x1 stride-1 unpadded convolution the adjoint is the identity and dx
    is a view of ``dcol`` itself; otherwise it is a new array.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x_shape
    if _is_pointwise(kernel, stride, padding):
        return from_channel_matrix(dcol, x_shape)
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    return from_chwn(_sum_columns(dcol.reshape(c, kh, kw, oh, ow, n), (c, h, w, n), kernel, stride, padding))


def _grouped(a, groups: int):
    """A (rows, M) matrix as (G, rows/G, M): block g of rows is group g (a view)."""
    return a.reshape(groups, a.shape[0] // groups, a.shape[1])


# ---------------------------------------------------------------------------
# Which algorithm
# ---------------------------------------------------------------------------
#: The convolution algorithms: im2col + GEMM, Winograd F(m x m, 3 x 3) with m = 2 or 4, and kn2row
#: (one product per kernel offset, over only the pixels it reads: :mod:`tinynet.nn.fast.kn2row`).
ALGORITHMS = ("im2col", "winograd_f2", "winograd_f4", "kn2row")
_WINOGRAD_M = {"winograd_f2": 2, "winograd_f4": 4}
_forced = threading.local()


@contextlib.contextmanager
def algorithm(name: str):
    """Force the convolution algorithm in this thread, inside a ``with`` block.

    ``name`` is one of :data:`ALGORITHMS`, or ``"auto"`` for :func:`choose_algorithm`'s measured
    rule.  A Winograd choice applies only where Winograd is defined (:func:`winograd_applies`),
    kn2row to every ungrouped convolution; every other convolution keeps im2col.  Blocks nest; the
    setting is per thread.
    """
    if name != "auto" and name not in ALGORITHMS:
        raise ValueError(f"conv.algorithm: expected 'auto' or one of {ALGORITHMS}, got {name!r}")
    previous = getattr(_forced, "name", "auto")
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = previous


def winograd_applies(kernel, stride, groups=1) -> bool:
    """Winograd F(m x m, 3 x 3) computes exactly the 3x3, stride-1, ungrouped convolutions (any padding)."""
    return tuple(kernel) == (3, 3) and tuple(stride) == (1, 1) and groups == 1


#: F(2x2, 3x3) is chosen when ``C * C_out * N * OH * OW`` (the multiplications it saves, over 5)
#: reaches this; below it, the transforms' cost per tile outweighs the smaller matrix products.
#: The same threshold with and without gradients: a layer's result must not depend on the grad
#: mode (same input, same weights, same bits), so the forward alone pays what a training step
#: gains (docs/performance.md, "Grad-mode independence").
WINOGRAD_MIN_WORK = 1 << 26

#: kn2row is chosen when at most this share of im2col's (output, tap) products read a pixel
#: (:func:`~tinynet.nn.fast.kn2row.valid_fraction`; the rest read padding, which kn2row skips; a
#: 3x3 convolution with padding 1 reads 49 of 81 on a 3x3 map, 16 of 36 on 2x2, 1 of 9 on 1x1) ...
KN2ROW_MAX_FRACTION = 0.62
#: ... and im2col's multiply-adds, ``C * C_out * KH * KW * OH * OW * N``, reach this (below it,
#: kn2row's per-tap calls cost more than the products it skips) ...
KN2ROW_MIN_WORK = 1 << 26
#: ... and the products it skips, per (input, output) channel pair, are at least this many times its
#: live taps: each live tap's (C_out, C) weights are copied for the forward and written back for dW,
#: whatever the batch (512@2 at batch 16 skips 36 per tap and was measured no faster).
KN2ROW_MIN_SKIPPED = 48


def _kn2row_pays(x_shape, w_shape, stride, padding) -> bool:
    """The auto rule's kn2row condition (:data:`KN2ROW_MAX_FRACTION`, :data:`KN2ROW_MIN_WORK`, :data:`KN2ROW_MIN_SKIPPED`)."""
    n, c, h, w = x_shape
    c_out, _, kh, kw = w_shape
    if kh * kw > 9:  # measured on 3x3 kernels; a 7x7 one (49 taps' Python loops) was no faster
        return False
    taps, (oh, ow), live = live_taps(x_shape, (kh, kw), stride, padding)
    every = kh * kw * oh * ow * n  # im2col's products per (input, output) channel pair; kn2row's: live
    return (c * c_out * every >= KN2ROW_MIN_WORK and live <= KN2ROW_MAX_FRACTION * every
            and every - live >= KN2ROW_MIN_SKIPPED * len(taps))


def choose_algorithm(x, w_shape, stride=(1, 1), padding=(0, 0), groups=1) -> str:
    """The algorithm :func:`conv2d_forward` uses for input ``x`` (N, C, H, W) and a (C_out, C/G, KH, KW) weight.

    An :func:`algorithm` block decides first.  Otherwise, for the ungrouped convolutions of NumPy
    arrays: kn2row for kernels of up to 9 taps where padding makes at least 38 % of im2col's products
    (:data:`KN2ROW_MAX_FRACTION`; maps of 3x3 or smaller, such as ResNet18's last stage at 32-96 px),
    im2col would make at least 2**26 multiply-adds (:data:`KN2ROW_MIN_WORK`) and the batch is
    large enough for the skipped products to pay for the taps' weight copies
    (:data:`KN2ROW_MIN_SKIPPED`);
    else, for the 3x3 stride-1 ones, F(2x2, 3x3) where ``C >= 32``, ``OH * OW >= 16`` and
    ``C * C_out * N * OH * OW >= 2**26`` (:data:`WINOGRAD_MIN_WORK`); im2col everywhere else.
    The same choice with and without gradients.

    The thresholds are where ``benchmarks/winograd.py`` and ``benchmarks/kn2row.py`` measured the
    algorithm faster for a training step (docs/performance.md, "Convolution algorithms" and
    "kn2row on small maps").  F(4x4, 3x3) is never chosen: its float32 error is 10-50x im2col's; force it with
    :func:`algorithm`.  On the GPU im2col stays (the others are not measured there).
    """
    kernel = tuple(w_shape[2:])
    if groups != 1 or backend.is_cupy_array(x):  # before the forced choice: the others are CPU algorithms here
        return "im2col"
    forced = getattr(_forced, "name", "auto")
    if forced in _WINOGRAD_M:
        return forced if winograd_applies(kernel, stride, groups) else "im2col"
    if forced != "auto":
        return forced
    if _kn2row_pays(x.shape, w_shape, stride, padding):
        return "kn2row"
    if not winograd_applies(kernel, stride, groups):
        return "im2col"
    n, c, h, w = x.shape
    out_pixels = (h + 2 * padding[0] - 2) * (w + 2 * padding[1] - 2)
    work = c * w_shape[0] * n * out_pixels
    return "winograd_f2" if c >= 32 and out_pixels >= 16 and work >= WINOGRAD_MIN_WORK else "im2col"


def _cached_shape(algorithm_name, x_shape, w_shape, stride, padding):
    """Shape of the buffer the forward of ``algorithm_name`` keeps for the backward (None: nothing)."""
    kernel = tuple(w_shape[2:])
    if algorithm_name == "kn2row":
        n, c, h, w = x_shape
        return (c, h, w, n)  # a copy of x, CHWN
    if algorithm_name != "im2col":
        return v_shape(x_shape, padding, _WINOGRAD_M[algorithm_name])
    if _is_pointwise(kernel, stride, padding):
        return None
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x_shape
    return (c, kh, kw, conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw), n)


# ---------------------------------------------------------------------------
# Forward and backward
# ---------------------------------------------------------------------------
def conv2d_forward(x, w, b, stride=(1, 1), padding=(0, 0), col_buffer=None, groups=1, algorithm=None):
    """Convolution (cross-correlation, as in PyTorch).

    Parameters
    ----------
    x : (N, C, H, W)
    w : (C_out, C/G, KH, KW)
    b : (C_out,) or None
    stride, padding : pairs (SH, SW), (PH, PW)
    col_buffer : optional array for what the forward keeps for the backward:
        (C, KH, KW, OH, OW, N) for im2col to fill, (alpha^2, C, P) for
        Winograd's V, (C, H, W, N) for kn2row's copy of x (shapes from
        ``_cached_shape``); the cache then refers to it, so its owner must not
        refill it before the backward of this call has run
    algorithm : one of :data:`ALGORITHMS`; None: :func:`choose_algorithm`

    Returns
    -------
    out : (N, C_out, OH, OW), an NCHW view of a new (C_out, OH, OW, N) array
    cache : :class:`Im2colCache` (im2col), :class:`~tinynet.nn.fast.winograd.WinogradCache` or
        :class:`~tinynet.nn.fast.kn2row.Kn2rowCache`,
        what :func:`conv2d_backward` needs
    """
    if algorithm is None:
        algorithm = choose_algorithm(x, w.shape, stride, padding, groups)
    if algorithm == "kn2row":
        return kn2row_forward(x, w, b, tuple(stride), tuple(padding), buffer=col_buffer)
    if algorithm != "im2col":
        return winograd_forward(x, w, b, tuple(padding), _WINOGRAD_M[algorithm], v_buffer=col_buffer)
    c_out, _, kh, kw = w.shape
    n, _, h, wd = x.shape
    oh, ow = conv_output_size(h, kh, stride[0], padding[0]), conv_output_size(wd, kw, stride[1], padding[1])
    col = im2col(x, (kh, kw), stride, padding, out=col_buffer)  # (K, M)
    if groups == 1:
        out2d = matmul(w.reshape(c_out, -1), col)  # W2d (C_out, K) @ col (K, M)
    else:  # G products (C_out/G, K/G) @ (K/G, M), stacked into (C_out, M)
        out2d = matmul(w.reshape(groups, c_out // groups, -1), _grouped(col, groups)).reshape(c_out, -1)
    if b is not None:
        out2d += b[:, None]
    out = from_channel_matrix(out2d, (n, c_out, oh, ow))
    return out, Im2colCache(col, x.shape, w, tuple(stride), tuple(padding), b is not None, groups)


def conv2d_backward(dout, cache, need_dx: bool = True):
    """Gradients of :func:`conv2d_forward`.

    Parameters
    ----------
    dout : (N, C_out, OH, OW), dL/d(out); not modified
    cache : :class:`Im2colCache`, :class:`~tinynet.nn.fast.winograd.WinogradCache` or
        :class:`~tinynet.nn.fast.kn2row.Kn2rowCache` from
        :func:`conv2d_forward`; it says which algorithm ran
    need_dx : skip dL/dx (returns None) when the input needs no gradient

    Returns
    -------
    dx : (N, C, H, W), a new array (CHWN in memory), or None
    dw : (C_out, C, KH, KW)
    db : (C_out,) or None
    """
    if isinstance(cache, WinogradCache):
        return winograd_backward(dout, cache, need_dx)
    if isinstance(cache, Kn2rowCache):
        return kn2row_backward(dout, cache, need_dx)
    col, x_shape, w, stride, padding, has_bias, groups = cache
    c_out, _, kh, kw = w.shape
    dout2d = channel_matrix(dout)  # (C_out, M)
    db = dout2d.sum(axis=1) if has_bias else None
    if groups == 1:
        dw = matmul(dout2d, col.T).reshape(w.shape)  # dW2d = dout2d @ col.T
        w_t, dout_g = w.reshape(c_out, -1).T, dout2d  # W2d.T (K, C_out)
    else:  # per group: dW[g] = dout[g] @ col[g].T, dcol[g] = W[g].T @ dout[g]
        dout_g = _grouped(dout2d, groups)
        dw = matmul(dout_g, _grouped(col, groups).transpose(0, 2, 1)).reshape(w.shape)
        w_t = w.reshape(groups, c_out // groups, -1).transpose(0, 2, 1)  # (G, K/G, C_out/G)
    dx = None
    if need_dx:
        if _is_pointwise((kh, kw), stride, padding):
            dcol = matmul(w_t, dout_g)  # col2im is the identity: dcol *is* dx, so it must be a new array
        else:
            # dcol only lives until col2im has summed it into a new dx: this thread's scratch buffer
            # (see workspace.scratch), refilled by the next convolution's backward.
            dcol = scratch("conv2d_backward.dcol", col.shape, dout2d.dtype, like=dout2d)
            matmul(w_t, dout_g, out=dcol if groups == 1 else _grouped(dcol, groups))  # dcol = W2d.T @ dout2d
        dx = col2im(dcol.reshape(col.shape), x_shape, (kh, kw), stride, padding)
    return dx, dw, db


#: Without gradients, an im2col convolution whose columns would take at least this many bytes is
#: computed in chunks of output rows (:func:`forward_in_chunks`).  Below it the whole product
#: measured as fast (docs/performance.md, "im2col in chunks without gradients").
CHUNKED_MIN_COL_BYTES = 8 << 20
#: About this many bytes of columns per chunk (at least one output row, and at least two chunks
#: per thread where the rows allow it).
CHUNK_BYTES = 4 << 20


def _chunk_geometry(x, w_shape, stride, padding):
    """``(OH, OW, K, rows per chunk)`` of :func:`forward_in_chunks` for input ``x``."""
    (n, c, h, wd), (_, _, kh, kw) = x.shape, w_shape
    oh, ow = conv_output_size(h, kh, stride[0], padding[0]), conv_output_size(wd, kw, stride[1], padding[1])
    k = c * kh * kw
    return oh, ow, k, max(1, min(CHUNK_BYTES // (k * ow * n * x.itemsize), -(-oh // (2 * num_threads()))))


def _chunks_pay(x, w_shape, stride, padding, groups) -> bool:
    """Whether :func:`layer_forward` without gradients runs :func:`forward_in_chunks`.

    Host arrays, ungrouped, not a 1x1 that reads ``x`` itself, products on tinynet's threads,
    ``col`` of at least :data:`CHUNKED_MIN_COL_BYTES`, and one output row's product at least
    :data:`~tinynet.nn.fast.gemm.SPLIT_MIN_MACS` multiply-adds: BLAS libraries run small products
    through other kernels (OpenBLAS below about 10^6), whose sums may round differently.
    """
    if groups != 1 or _is_pointwise(tuple(w_shape[2:]), stride, padding) or backend.is_cupy_array(x) \
            or not owns_threads():
        return False
    oh, ow, k, _ = _chunk_geometry(x, w_shape, stride, padding)
    row = ow * x.shape[0]
    return k * oh * row * x.itemsize >= CHUNKED_MIN_COL_BYTES and w_shape[0] * k * row >= SPLIT_MIN_MACS


def forward_in_chunks(x, w, b, stride=(1, 1), padding=(0, 0)):
    """The im2col convolution without what a backward needs: ``out`` of :func:`conv2d_forward`, bit for bit.

    The output rows are cut into chunks; each thread fills one chunk's columns into its own
    scratch buffer and multiplies them at once, while they are still in its core's cache, instead
    of writing the whole ``col`` to memory and reading it back.  A column of the result is the
    same dot products over the same K either way (the whole product is cut into column blocks as
    well, :mod:`tinynet.nn.fast.gemm`), so the bits are those of the forward that keeps ``col``.
    For ungrouped convolutions of host arrays, when the products run on tinynet's threads.
    """
    if not hold_blas_threads():  # BLAS keeps threads of its own: no products inside the pool's pieces
        col = scratch("conv2d_forward.col", _cached_shape("im2col", x.shape, w.shape, stride, padding), x.dtype,
                      like=x)
        return conv2d_forward(x, w, b, stride, padding, col, algorithm="im2col")[0]
    c_out, c, kh, kw = w.shape
    n, _, h, wd = x.shape
    oh, ow, k, rows = _chunk_geometry(x, w.shape, stride, padding)
    xc = to_chwn(x)
    if not xc.flags.c_contiguous:
        xc = np.ascontiguousarray(xc)  # the images entering the first layer are NCHW (see im2col)
    cells = list(kernel_offsets((kh, kw), stride, padding, (h, wd), (oh, ow)))
    w2d, row = w.reshape(c_out, k), ow * n  # a row of output pixels is ow * n columns
    out2d = np.empty((c_out, oh * row), dtype=np.result_type(x, w))

    def chunks(first, stop):
        buffer = scratch("conv2d_forward.chunk", (k * rows * row,), x.dtype, like=x)
        for chunk in range(first, stop):
            r0, r1 = chunk * rows, min(oh, (chunk + 1) * rows)
            col = buffer[:k * (r1 - r0) * row].reshape(c, kh, kw, r1 - r0, ow, n)
            _copy_fields(xc, cells, stride[0], col, r0, r1)
            part = out2d[:, r0 * row:r1 * row]
            np.matmul(w2d, col.reshape(k, -1), out=part)  # one BLAS call, BLAS held on one thread above
            if b is not None:
                part += b[:, None]

    parallel_for(-(-oh // rows), chunks)
    return from_channel_matrix(out2d, (n, c_out, oh, ow))


def layer_forward(x, w, b, stride, padding, groups, buffers: LayerBuffers, keep: bool):
    """:class:`~tinynet.nn.Conv2d`'s fast forward: ``(out, cache, buffer)``.

    The algorithm is :func:`choose_algorithm`'s; what it keeps for the backward (im2col's columns
    or Winograd's V) goes into a buffer from the layer's ``buffers``, lent until the backward gives
    it back (``keep``: gradients enabled), or into this thread's scratch buffer, dead once the
    forward returns (``keep=False``).  ``buffer`` is None where nothing is kept (a 1x1 conv).
    """
    algo = choose_algorithm(x, w.shape, stride, padding, groups)
    if not keep and algo == "im2col" and _chunks_pay(x, w.shape, stride, padding, groups):
        return forward_in_chunks(x, w, b, stride, padding), None, None
    shape = _cached_shape(algo, x.shape, w.shape, stride, padding)
    buffer = None if shape is None else buffers.take("conv2d_forward.col", shape, x, keep)
    out, cache = conv2d_forward(x, w, b, stride, padding, buffer, groups, algo)
    return out, cache, buffer
