"""2-D convolution as one matrix product: im2col, GEMM, col2im.

Notation (used throughout this module and in docs/derivations.md)::

    N          batch size
    C, C_out   input and output channels
    H, W       input height and width
    KH, KW     kernel height and width
    SH, SW     strides
    PH, PW     zero padding added on each side
    OH, OW     output height and width:  OH = (H + 2*PH - KH) // SH + 1
    K          C * KH * KW, the length of one receptive field
    M          N * OH * OW, the number of output positions

Forward.  Every output value is a dot product between a filter and the
receptive field under it::

    out[n, o, y, x] = b[o] + sum_{c,i,j} W[o, c, i, j] * xpad[n, c, SH*y + i, SW*x + j]

im2col copies every receptive field into a column of ``col`` (K, M), so that
all of them are computed by one matrix product (GEMM)::

    out2d (C_out, M) = W2d (C_out, K) @ col (K, M) + b[:, None]

Backward.  With ``dout2d`` the (C_out, M) matrix of dL/d(out)::

    dW2d = dout2d @ col.T                  (C_out, K)
    db   = dout2d.sum(axis=1)              (C_out,)
    dcol = W2d.T @ dout2d                  (K, M)
    dx   = col2im(dcol)                    each column added back where it was read

``col`` is laid out ``(C, KH, KW, OH, OW, N)``: rows in the order of the
weight's ``(C, KH, KW)`` axes (so ``W2d`` is a plain reshape of PyTorch's
``(C_out, C, KH, KW)`` weight) and columns in (OH, OW, N) order, which makes
the GEMM result a ``(C_out, OH, OW, N)`` buffer; see :mod:`tinynet.nn.layout`
for why the layer returns it as an NCHW view instead of copying.

Grouped convolution (``groups = G``, PyTorch's argument): the C input and
C_out output channels are split into G consecutive blocks, and output block g
sees only input block g, with a weight of shape (C_out, C/G, KH, KW).
``col``'s rows are ordered (C, KH, KW), so block g's receptive fields are the
g-th block of K/G rows, and the one GEMM becomes G of them, as one batched
matrix product::

    out2d[g] (C_out/G, M) = W[g] (C_out/G, K/G) @ col[g] (K/G, M)

and likewise in the backward.  ``groups = C`` is depthwise convolution.

im2col and col2im loop over the KH*KW kernel offsets and copy one strided
slice of the whole batch each time (as in "Deep Learning from Scratch"),
which is much faster than fancy indexing or ``np.add.at``.  They never build
a padded copy of the input: for kernel offset (i, j) only the output positions
whose input pixel lies inside the image are copied (:func:`kernel_offsets`),
and the rest of ``col`` is set to zero, which is what zero padding means.
The slow, obviously correct loop version lives in :mod:`tinynet.nn.reference`
and is the tests' oracle.

Stride-1 3x3 convolutions (groups=1) may instead run as Winograd minimal
filtering F(2x2, 3x3) (:mod:`tinynet.nn.winograd`), which needs 4 instead of
9 multiplications per output and keeps a 4x copy of the input for the
backward instead of col's 9x.  :func:`choose_algorithm` picks one per layer
shape, by the measurements of ``benchmarks/winograd.py``; im2col + GEMM stays
the reference and the fallback (other kernels, strides, groups, GPU arrays).
:func:`algorithm` forces a choice::

    with tinynet.nn.conv.algorithm("im2col"):      # or "winograd_f2", "winograd_f4"
        out = model(x)
"""
from __future__ import annotations

import contextlib
import threading
from typing import NamedTuple

from .. import backend, kernels
from .geometry import conv_output_size, kernel_offsets, pair, positive_int
from .init import uniform_fan_in
from .layout import channel_matrix, from_channel_matrix, from_chwn, to_chwn
from .module import Module, Parameter, is_grad_enabled
from .validation import check_grad, check_input
from .winograd import WinogradCache, v_shape, winograd_backward, winograd_forward

__all__ = ["ConvCache", "im2col", "col2im", "conv2d_forward", "conv2d_backward", "Conv2d",
           "ALGORITHMS", "algorithm", "choose_algorithm", "winograd_applies",
           "WINOGRAD_MIN_WORK", "WINOGRAD_MIN_WORK_NO_GRAD",
           # window geometry lives in tinynet.nn.geometry; these names stay importable from here
           "conv_output_size", "pair", "kernel_offsets"]


class ConvCache(NamedTuple):
    """What :func:`conv2d_backward` needs from :func:`conv2d_forward`."""

    col: object          #: (K, M) receptive fields; x itself (a view) for a 1x1 stride-1 unpadded conv
    x_shape: tuple       #: (N, C, H, W)
    weight: object       #: (C_out, C, KH, KW), the weight the forward used
    stride: tuple        #: (SH, SW)
    padding: tuple       #: (PH, PW)
    has_bias: bool
    groups: int = 1      #: G: output block g sees input block g


def _is_pointwise(kernel, stride, padding) -> bool:
    """A 1x1 stride-1 unpadded convolution reads every pixel once: col is x and col2im the identity."""
    return tuple(kernel) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)


def _zero_outside(a, rows: slice, cols: slice) -> None:
    """Zero the border of ``a`` (C, OH, OW, N) outside ``rows x cols``: the positions that read padding."""
    a[:, :rows.start] = 0
    a[:, rows.stop:] = 0
    a[:, rows, :cols.start] = 0
    a[:, rows, cols.stop:] = 0


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
    (:func:`tinynet.backend.parallel_for`), the same copies on any number.
    """
    c, h, w, n = xc.shape
    oh, ow = out.shape[3:5]
    cells = list(kernel_offsets(kernel, stride, padding, (h, w), (oh, ow)))

    def fill(a, b):
        for i, j, rows, cols, in_rows, in_cols in cells:
            # Every receptive-field entry at kernel offset (i, j), for the whole batch.
            out[a:b, i, j, rows, cols] = xc[a:b, in_rows, in_cols]
            _zero_outside(out[a:b, i, j], rows, cols)

    if backend.is_cupy_array(xc):  # (without fused kernels) the GPU needs no host threads
        fill(0, c)
    else:
        backend.parallel_for(c, fill, elements=out.size)
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
        backend.parallel_for(c, add_up, elements=dcol.size)
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
#: The convolution algorithms: im2col + GEMM, and Winograd F(m x m, 3 x 3) with m = 2 or 4.
ALGORITHMS = ("im2col", "winograd_f2", "winograd_f4")
_WINOGRAD_M = {"winograd_f2": 2, "winograd_f4": 4}
_forced = threading.local()


@contextlib.contextmanager
def algorithm(name: str):
    """Force the convolution algorithm in this thread, inside a ``with`` block.

    ``name`` is one of :data:`ALGORITHMS`, or ``"auto"`` for :func:`choose_algorithm`'s measured
    rule.  A Winograd choice applies only where Winograd is defined (:func:`winograd_applies`);
    every other convolution keeps im2col.  Blocks nest; the setting is per thread.
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
#: With gradients enabled (forward + backward), and under ``no_grad`` (the forward alone, where
#: im2col needs no backward and Winograd's share of transform work is larger).
WINOGRAD_MIN_WORK = 1 << 26
WINOGRAD_MIN_WORK_NO_GRAD = 1 << 28


def choose_algorithm(x, w_shape, stride=(1, 1), padding=(0, 0), groups=1) -> str:
    """The algorithm :func:`conv2d_forward` uses for input ``x`` (N, C, H, W) and a (C_out, C/G, KH, KW) weight.

    An :func:`algorithm` block decides first.  Otherwise, for the 3x3 stride-1 ungrouped
    convolutions of NumPy arrays, F(2x2, 3x3) where ``C >= 32``, ``OH * OW >= 16`` and
    ``C * C_out * N * OH * OW >= 2**26`` (:data:`WINOGRAD_MIN_WORK`), or ``>= 2**28`` under
    ``no_grad`` (:data:`WINOGRAD_MIN_WORK_NO_GRAD`); im2col everywhere else.

    Measured with ``benchmarks/winograd.py`` (forward + backward, float32, 2 cores, median of
    11-15 alternating rounds, ms im2col -> F(2,3)), the rule picks the faster one for every shape:

    * ResNet18 at 64 px, batch 64 (work 2^26 each): 64@16 40.7 -> 32.1, 128@8 25.8 -> 20.7,
      256@4 22.2 -> 16.7; 512@2 (2x2 output) 22.5 -> 21.8, a tie, kept on im2col.
    * ResNet18 at 64 px, batch 16 (work 2^24): 64@16 8.6 -> 10.2, 128@8 6.5 -> 6.6,
      256@4 5.6 -> 5.8, 512@2 8.2 -> 16.3: im2col.
    * ResNet18 at 224 px, batch 16 (work 2^27.6): 64@56 118.7 -> 104.1, 128@28 86.9 -> 66.0,
      256@14 69.2 -> 45.1, 512@7 61.3 -> 53.6; batch 64 gains more (64@56 721 -> 422).
    * The CNN, batch 64 (work <= 2^25): 3->32@64 32.3 -> 72.1, 32->64@16 19.9 -> 24.0,
      64->128@8 15.0 -> 16.0: im2col.  Few input channels leave the transforms of the
      (batch-innermost, so short-run) tiles dominant.

    The forward alone (``benchmarks/winograd.py --forward``): ResNet18 at 224 px, batch 64 (work
    2^29.6): 64@56 159.4 -> 146.6, 128@28 120.2 -> 94.2, 256@14 94.7 -> 59.8, 512@7 84.5 -> 68.0;
    at batch 16 (2^27.6) 48.5 -> 59.3, 33.8 -> 35.2, 26.0 -> 24.7, 24.8 -> 23.2, and at 64 px,
    batch 64 (2^26) 15.5 -> 15.5, 10.2 -> 10.6, 8.6 -> 8.2, 8.0 -> 10.1: ties or losses, im2col.

    F(4x4, 3x3) is never chosen: its float32 error is 10-50x im2col's and PyTorch's
    (tests/test_winograd.py, benchmarks/winograd.py); force it with :func:`algorithm`.
    On the GPU im2col stays (not measured there).
    """
    kernel = tuple(w_shape[2:])
    if not winograd_applies(kernel, stride, groups):
        return "im2col"
    forced = getattr(_forced, "name", "auto")
    if forced != "auto":
        return forced
    if backend.is_cupy_array(x):
        return "im2col"
    n, c, h, w = x.shape
    out_pixels = (h + 2 * padding[0] - 2) * (w + 2 * padding[1] - 2)
    work = c * w_shape[0] * n * out_pixels
    min_work = WINOGRAD_MIN_WORK if is_grad_enabled() else WINOGRAD_MIN_WORK_NO_GRAD
    return "winograd_f2" if c >= 32 and out_pixels >= 16 and work >= min_work else "im2col"


def _cached_shape(algorithm_name, x_shape, kernel, stride, padding):
    """Shape of the buffer the forward of ``algorithm_name`` keeps for the backward (None: nothing)."""
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
        Winograd's V (shapes from ``_cached_shape``); the cache then refers to
        it, so its owner must not refill it before the backward of this call
        has run
    algorithm : one of :data:`ALGORITHMS`; None: :func:`choose_algorithm`

    Returns
    -------
    out : (N, C_out, OH, OW), an NCHW view of a new (C_out, OH, OW, N) array
    cache : :class:`ConvCache` (im2col) or :class:`~tinynet.nn.winograd.WinogradCache`,
        what :func:`conv2d_backward` needs
    """
    if algorithm is None:
        algorithm = choose_algorithm(x, w.shape, stride, padding, groups)
    if algorithm != "im2col":
        return winograd_forward(x, w, b, tuple(padding), _WINOGRAD_M[algorithm], v_buffer=col_buffer)
    c_out, _, kh, kw = w.shape
    n, _, h, wd = x.shape
    oh, ow = conv_output_size(h, kh, stride[0], padding[0]), conv_output_size(wd, kw, stride[1], padding[1])
    col = im2col(x, (kh, kw), stride, padding, out=col_buffer)  # (K, M)
    if groups == 1:
        out2d = w.reshape(c_out, -1) @ col  # W2d (C_out, K) @ col (K, M)
    else:  # G products (C_out/G, K/G) @ (K/G, M), stacked into (C_out, M)
        out2d = (w.reshape(groups, c_out // groups, -1) @ _grouped(col, groups)).reshape(c_out, -1)
    if b is not None:
        out2d += b[:, None]
    out = from_channel_matrix(out2d, (n, c_out, oh, ow))
    return out, ConvCache(col, x.shape, w, tuple(stride), tuple(padding), b is not None, groups)


def conv2d_backward(dout, cache, need_dx: bool = True):
    """Gradients of :func:`conv2d_forward`.

    Parameters
    ----------
    dout : (N, C_out, OH, OW), dL/d(out); not modified
    cache : :class:`ConvCache` or :class:`~tinynet.nn.winograd.WinogradCache` from
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
    col, x_shape, w, stride, padding, has_bias, groups = cache
    c_out, _, kh, kw = w.shape
    dout2d = channel_matrix(dout)  # (C_out, M)
    db = dout2d.sum(axis=1) if has_bias else None
    if groups == 1:
        dw = (dout2d @ col.T).reshape(w.shape)  # dW2d = dout2d @ col.T
        w_t, dout_g = w.reshape(c_out, -1).T, dout2d  # W2d.T (K, C_out)
    else:  # per group: dW[g] = dout[g] @ col[g].T, dcol[g] = W[g].T @ dout[g]
        dout_g = _grouped(dout2d, groups)
        dw = (dout_g @ _grouped(col, groups).transpose(0, 2, 1)).reshape(w.shape)
        w_t = w.reshape(groups, c_out // groups, -1).transpose(0, 2, 1)  # (G, K/G, C_out/G)
    dx = None
    if need_dx:
        if _is_pointwise((kh, kw), stride, padding):
            dcol = w_t @ dout_g  # col2im is the identity: dcol *is* dx, so it must be a new array
        else:
            # dcol only lives until col2im has summed it into a new dx: this thread's scratch buffer
            # (see backend.scratch), refilled by the next convolution's backward.
            xp = backend.get_array_module(dout2d)
            dcol = backend.scratch("conv2d_backward.dcol", col.shape, dout2d.dtype, like=dout2d)
            xp.matmul(w_t, dout_g, out=dcol if groups == 1 else _grouped(dcol, groups))  # dcol = W2d.T @ dout2d
        dx = col2im(dcol.reshape(col.shape), x_shape, (kh, kw), stride, padding)
    return dx, dw, db


class Conv2d(Module):
    """``Conv2d(in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, groups=1)``.

    Input (N, C, H, W) -> output (N, C_out, OH, OW).  Parameters ``weight``
    (C_out, C/groups, KH, KW) and ``bias`` (C_out,), initialised as in PyTorch
    (see :mod:`tinynet.nn.init`).  ``groups`` splits the channels into
    independent blocks (grouped convolution; ``groups=C``: depthwise).
    """

    #: ``_free_cols``: im2col (or Winograd V) buffers this layer owns, free to refill (see :meth:`_take_col_buffer`).
    _transient = Module._transient + ("_free_cols",)

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 rng=None, dtype="float32", groups=1):
        super().__init__()
        self.in_channels = positive_int(in_channels, "in_channels", "Conv2d")
        self.out_channels = positive_int(out_channels, "out_channels", "Conv2d")
        self.kernel_size = pair(kernel_size, "kernel_size", "Conv2d")
        self.stride = pair(stride, "stride", "Conv2d")
        self.padding = pair(padding, "padding", "Conv2d")
        self.groups = positive_int(groups, "groups", "Conv2d")
        object.__setattr__(self, "_free_cols", [])
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"Conv2d: groups={groups} must divide both in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        if min(self.kernel_size) <= 0 or min(self.stride) <= 0 or min(self.padding) < 0:
            raise ValueError(
                f"Conv2d: kernel_size and stride must be positive and padding non-negative, got "
                f"kernel_size={kernel_size}, stride={stride}, padding={padding}"
            )
        shape = (self.out_channels, self.in_channels // self.groups) + self.kernel_size
        fan_in = shape[1] * self.kernel_size[0] * self.kernel_size[1]
        self.weight = Parameter(uniform_fan_in(shape, fan_in, rng, dtype))
        self.bias = Parameter(uniform_fan_in((self.out_channels,), fan_in, rng, dtype)) if bias else None

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")
        s += "" if self.groups == 1 else f", groups={self.groups}"
        return s + ("" if self.bias is not None else ", bias=False")

    def forward(self, x):
        check_input(self, x, f"(N, {self.in_channels}, H, W)", 4, self.in_channels)
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        if x.shape[2] + 2 * ph < kh or x.shape[3] + 2 * pw < kw:
            raise ValueError(
                f"{self._describe()}: input of spatial size {tuple(x.shape[2:])} (padded by {self.padding}) "
                f"is smaller than the kernel {self.kernel_size}"
            )
        b = self.bias.data if self.bias is not None else None
        algo = choose_algorithm(x, self.weight.shape, self.stride, self.padding, self.groups)
        buffer = self._take_col_buffer(x, algo)
        out, cache = conv2d_forward(x, self.weight.data, b, self.stride, self.padding, buffer, self.groups, algo)
        self._save_for_backward(cache, out.shape, buffer)
        return out

    def _take_col_buffer(self, x, algorithm="im2col"):
        """Where im2col writes this call's columns, or Winograd its V (None: col is x itself).

        With gradients enabled, ``col`` is kept until this call's backward, so
        the layer owns its buffers: the forward takes a free one (or allocates
        it) and the backward hands it back, to be refilled by the next step
        (allocated once, not per call: a fresh 38 MB array costs page faults
        worth more than the copy).  A layer called twice before a backward owns
        two.  Without gradients, ``col`` dies with the matrix product, and this
        thread's scratch buffer (:func:`tinynet.backend.scratch`) serves every
        layer.  Winograd's transformed input V is kept the same way.
        """
        shape = _cached_shape(algorithm, x.shape, self.kernel_size, self.stride, self.padding)
        if shape is None:
            return None
        if not is_grad_enabled():
            return backend.scratch("conv2d_forward.col", shape, x.dtype, like=x)
        free = self._free_cols
        while free:
            buf = free.pop()
            if (buf.shape == shape and buf.dtype == x.dtype
                    and backend.is_cupy_array(buf) == backend.is_cupy_array(x)):
                return buf
            # another shape, dtype or device: dropped, the new one replaces it
        return backend.get_array_module(x).empty(shape, dtype=x.dtype)

    def backward(self, dout):
        cache, out_shape, buffer = self._saved_for_backward()
        check_grad(self, dout, out_shape, self.weight.dtype)
        dx, dw, db = conv2d_backward(dout, cache, need_dx=self.input_grad)
        if buffer is not None:
            self._free_cols.append(buffer)  # this call's columns are consumed: free to refill
        self.weight.accumulate_grad(dw)
        if db is not None:
            self.bias.accumulate_grad(db)
        return dx

    def _drop_saved(self) -> None:
        for _, _, buffer in self._saved:
            if buffer is not None:
                self._free_cols.append(buffer)  # nobody will read these columns again
        self._saved.clear()
