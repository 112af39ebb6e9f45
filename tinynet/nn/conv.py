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

im2col and col2im loop over the KH*KW kernel offsets and copy one strided
slice of the whole batch each time (as in "Deep Learning from Scratch"),
which is much faster than fancy indexing or ``np.add.at``.  They never build
a padded copy of the input: for kernel offset (i, j) only the output positions
whose input pixel lies inside the image are copied (:func:`kernel_offsets`),
and the rest of ``col`` is set to zero, which is what zero padding means.
The slow, obviously correct loop version lives in :mod:`tinynet.nn.reference`
and is the tests' oracle.
"""
from __future__ import annotations

from .. import backend, kernels
from .init import uniform_fan_in
from .layout import channel_matrix, from_channel_matrix, from_chwn, to_chwn
from .module import Module, Parameter, is_grad_enabled
from .validation import check_grad, check_input

__all__ = ["conv_output_size", "pair", "kernel_offsets", "im2col", "col2im", "conv2d_forward", "conv2d_backward",
           "Conv2d"]


def pair(value, name: str = "value") -> tuple:
    """``3 -> (3, 3)``; ``(3, 1)`` stays; anything else is an error."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        a, b = value
    else:
        a = b = value
    try:
        return int(a), int(b)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None


def conv_output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """``(size + 2*pad - kernel) // stride + 1``."""
    return (size + 2 * pad - kernel) // stride + 1


def _inside(offset: int, pad: int, stride: int, size: int, out_size: int):
    """Output positions ``[lo, hi)`` whose input index ``stride*o + offset - pad`` lies in ``[0, size)``.

    Returns ``(lo, hi, first)`` with ``first`` the input index read at ``lo``.
    """
    lo = max(0, -((offset - pad) // stride))  # ceil((pad - offset) / stride)
    hi = min(out_size, (size - 1 + pad - offset) // stride + 1)
    hi = max(hi, lo)
    return lo, hi, stride * lo + offset - pad


def kernel_offsets(kernel, stride, padding, in_size, out_size):
    """For every kernel offset (i, j), where it reads inside the image.

    Yields ``(i, j, out_rows, out_cols, in_rows, in_cols)``: the output
    positions (slices of OH and OW) whose window cell (i, j) falls on a real
    pixel, and the strided slices of the input (of H and W) they read.
    Positions outside ``out_rows x out_cols`` read padding.  Shared by
    convolution and pooling.
    """
    (kh, kw), (sh, sw), (ph, pw), (h, w), (oh, ow) = kernel, stride, padding, in_size, out_size
    for i in range(kh):
        y0, y1, r0 = _inside(i, ph, sh, h, oh)
        for j in range(kw):
            x0, x1, c0 = _inside(j, pw, sw, w, ow)
            yield (i, j, slice(y0, y1), slice(x0, x1),
                   slice(r0, r0 + sh * (y1 - y0), sh), slice(c0, c0 + sw * (x1 - x0), sw))


def _zero_outside(a, rows: slice, cols: slice) -> None:
    """Zero the border of ``a`` (C, OH, OW, N) outside ``rows x cols``: the positions that read padding."""
    a[:, :rows.start] = 0
    a[:, rows.stop:] = 0
    a[:, rows, :cols.start] = 0
    a[:, rows, cols.stop:] = 0


def im2col(x, kernel, stride, padding, out=None):
    """Receptive fields of ``x`` (N, C, H, W) as the columns of ``col`` (K, M).

    ``col[(c, i, j), (y, x, n)] = xpad[n, c, SH*y + i, SW*x + j]``.  ``out``
    may be a buffer of shape (C, KH, KW, OH, OW, N) to fill; a 1x1 stride-1
    convolution without padding reads every pixel once, and ``col`` is then
    ``x`` itself (a view when ``x`` is CHWN in memory).
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    xc = to_chwn(x)  # (C, H, W, N)
    if kh == kw == 1 and sh == sw == 1 and ph == pw == 0:
        return xc.reshape(c, h * w * n)
    if not xc.flags.c_contiguous:
        # An input that is not CHWN in memory (the images entering the first layer are NCHW)
        # is reordered once: KH*KW strided gathers from NCHW would each move runs of one value.
        xc = backend.get_array_module(x).ascontiguousarray(xc)
    if out is None:
        out = backend.get_array_module(x).empty((c, kh, kw, oh, ow, n), dtype=x.dtype)
    if kernels.enabled(x):  # the same copy as one fused GPU kernel
        return kernels.im2col(xc, kernel, stride, padding, oh, ow, out).reshape(c * kh * kw, oh * ow * n)
    for i, j, rows, cols, in_rows, in_cols in kernel_offsets(kernel, stride, padding, (h, w), (oh, ow)):
        # Every receptive-field entry at kernel offset (i, j), for the whole batch.
        out[:, i, j, rows, cols] = xc[:, in_rows, in_cols]
        _zero_outside(out[:, i, j], rows, cols)
    return out.reshape(c * kh * kw, oh * ow * n)


def col2im(dcol, x_shape, kernel, stride, padding):
    """Adjoint of :func:`im2col`: add every column entry back onto the pixel it was copied from.

    Returns dx with logical shape ``x_shape`` (N, C, H, W), CHWN in memory.
    Entries that were copied from the padding have no pixel and are dropped.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x_shape
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    if kh == kw == 1 and sh == sw == 1 and ph == pw == 0:
        return from_channel_matrix(dcol, x_shape)
    xp = backend.get_array_module(dcol)
    dcol = dcol.reshape(c, kh, kw, oh, ow, n)
    if kernels.enabled(dcol):  # a gather: each pixel sums its own contributions, no atomics
        return from_chwn(kernels.col2im(dcol, (c, h, w, n), kernel, stride, padding, oh, ow))
    dx = xp.zeros((c, h, w, n), dtype=dcol.dtype)
    for i, j, rows, cols, in_rows, in_cols in kernel_offsets(kernel, stride, padding, (h, w), (oh, ow)):
        # += and not =: when the stride is smaller than the kernel, neighbouring
        # windows overlap and a pixel receives one gradient from each window
        # that read it (dL/dx is the sum over every use of x).
        dx[:, in_rows, in_cols] += dcol[:, i, j, rows, cols]
    return from_chwn(dx)


def conv2d_forward(x, w, b, stride=(1, 1), padding=(0, 0), col_buffer=None):
    """Convolution (cross-correlation, as in PyTorch).

    Parameters
    ----------
    x : (N, C, H, W)
    w : (C_out, C, KH, KW)
    b : (C_out,) or None
    stride, padding : pairs (SH, SW), (PH, PW)
    col_buffer : optional (C, KH, KW, OH, OW, N) array for im2col to fill

    Returns
    -------
    out : (N, C_out, OH, OW), an NCHW view of a (C_out, OH, OW, N) buffer
    cache : what :func:`conv2d_backward` needs
    """
    c_out, _, kh, kw = w.shape
    n, _, h, wd = x.shape
    oh, ow = conv_output_size(h, kh, stride[0], padding[0]), conv_output_size(wd, kw, stride[1], padding[1])
    col = im2col(x, (kh, kw), stride, padding, out=col_buffer)  # (K, M)
    w2d = w.reshape(c_out, -1)  # (C_out, K)
    out2d = w2d @ col  # (C_out, M)
    if b is not None:
        out2d += b[:, None]
    out = from_channel_matrix(out2d, (n, c_out, oh, ow))
    return out, (col, x.shape, w, stride, padding, b is not None)


def conv2d_backward(dout, cache, need_dx: bool = True):
    """Gradients of :func:`conv2d_forward`.

    Parameters
    ----------
    dout : (N, C_out, OH, OW), dL/d(out); not modified
    cache : from :func:`conv2d_forward`
    need_dx : skip dL/dx (returns None) when the input needs no gradient

    Returns
    -------
    dx : (N, C, H, W) or None
    dw : (C_out, C, KH, KW)
    db : (C_out,) or None
    """
    col, x_shape, w, stride, padding, has_bias = cache
    c_out, _, kh, kw = w.shape
    dout2d = channel_matrix(dout)  # (C_out, M)
    dw = (dout2d @ col.T).reshape(w.shape)  # dW2d = dout2d @ col.T
    db = dout2d.sum(axis=1) if has_bias else None
    dx = None
    if need_dx:
        xp = backend.get_array_module(dout2d)
        # dcol only lives until col2im has summed it into dx: a reused scratch buffer.
        dcol = backend.scratch("conv2d_backward.dcol", col.shape, dout2d.dtype, like=dout2d)
        xp.matmul(w.reshape(c_out, -1).T, dout2d, out=dcol)  # dcol = W2d.T @ dout2d, (K, M)
        dx = col2im(dcol, x_shape, (kh, kw), stride, padding)
    return dx, dw, db


class Conv2d(Module):
    """2-D convolution layer, ``Conv2d(in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True)``.

    Input (N, C, H, W) -> output (N, C_out, OH, OW).  Parameters ``weight``
    (C_out, C, KH, KW) and ``bias`` (C_out,), initialised as in PyTorch
    (see :mod:`tinynet.nn.init`).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True,
                 rng=None, dtype="float32"):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.padding = pair(padding, "padding")
        if self.in_channels <= 0 or self.out_channels <= 0:
            raise ValueError(f"Conv2d: channel counts must be positive, got {in_channels} -> {out_channels}")
        if min(self.kernel_size) <= 0 or min(self.stride) <= 0 or min(self.padding) < 0:
            raise ValueError(
                f"Conv2d: kernel_size and stride must be positive and padding non-negative, got "
                f"kernel_size={kernel_size}, stride={stride}, padding={padding}"
            )
        shape = (self.out_channels, self.in_channels) + self.kernel_size
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        self.weight = Parameter(uniform_fan_in(shape, fan_in, rng, dtype))
        self.bias = Parameter(uniform_fan_in((self.out_channels,), fan_in, rng, dtype)) if bias else None

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding}")
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
        out, cache = conv2d_forward(x, self.weight.data, b, self.stride, self.padding, self._col_buffer(x))
        self._save_for_backward(cache, out.shape)
        return out

    def _col_buffer(self, x):
        """Where im2col writes.

        With gradients enabled, ``col`` is kept until backward, so each layer
        owns its buffer and refills it every step (allocated once, not per
        call: a fresh 38 MB array costs page faults worth more than the copy).
        Without gradients, ``col`` dies with the matrix product and one shared
        scratch buffer serves every layer.
        """
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        if kh == kw == 1 and sh == sw == 1 and ph == pw == 0:
            return None  # col is x itself
        n, c, h, w = x.shape
        shape = (c, kh, kw, conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw), n)
        if not is_grad_enabled():
            return backend.scratch("conv2d_forward.col", shape, x.dtype, like=x)
        buf = self.__dict__.get("_col")
        if (buf is None or buf.shape != shape or buf.dtype != x.dtype
                or backend.is_cupy_array(buf) != backend.is_cupy_array(x)):
            buf = backend.get_array_module(x).empty(shape, dtype=x.dtype)
            object.__setattr__(self, "_col", buf)
        return buf

    def backward(self, dout):
        cache, out_shape = self._saved_for_backward()
        check_grad(self, dout, out_shape, self.weight.dtype)
        dx, dw, db = conv2d_backward(dout, cache, need_dx=self.input_grad)
        self.weight.accumulate_grad(dw)
        if db is not None:
            self.bias.accumulate_grad(db)
        return dx
