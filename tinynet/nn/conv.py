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

``col`` is laid out ``(C, KH, KW, N, OH, OW)``: rows in the order of the
weight's ``(C, KH, KW)`` axes (so ``W2d`` is a plain reshape of PyTorch's
``(C_out, C, KH, KW)`` weight) and columns channels-first, which makes the GEMM
result come out as a ``(C_out, N, OH, OW)`` buffer; see :mod:`tinynet.nn.layout`
for why the layer returns it as an NCHW view instead of copying.

im2col and col2im loop over the KH*KW kernel offsets and copy one strided slice
of the whole batch each time (as in "Deep Learning from Scratch"), which is
much faster than fancy indexing or ``np.add.at``.  The slow, obviously correct
loop version lives in :mod:`tinynet.nn.reference` and is the tests' oracle.
"""
from __future__ import annotations

from .. import backend
from .init import uniform_fan_in
from .layout import channels_first, channel_matrix, from_channel_matrix
from .module import Module, Parameter
from .validation import check_input

__all__ = ["conv_output_size", "pair", "im2col", "col2im", "conv2d_forward", "conv2d_backward", "Conv2d"]


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


def _pad(xc, ph: int, pw: int):
    """Zero-pad the spatial axes of a channels-first (C, N, H, W) array."""
    if ph == 0 and pw == 0:
        return xc
    xp = backend.get_array_module(xc)
    c, n, h, w = xc.shape
    out = xp.zeros((c, n, h + 2 * ph, w + 2 * pw), dtype=xc.dtype)
    out[:, :, ph:ph + h, pw:pw + w] = xc
    return out


def im2col(x, kernel, stride, padding):
    """Receptive fields of ``x`` (N, C, H, W) as the columns of ``col`` (K, M).

    ``col[(c, i, j), (n, y, x)] = xpad[n, c, SH*y + i, SW*x + j]``.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    xpad = _pad(channels_first(x), ph, pw)  # (C, N, H + 2PH, W + 2PW)
    if kh == kw == 1 and sh == sw == 1:  # a 1x1 conv reads each pixel once: col is x itself
        return xpad.reshape(c, n * oh * ow)
    xp = backend.get_array_module(x)
    col = xp.empty((c, kh, kw, n, oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            # All receptive-field entries at kernel offset (i, j), for the whole batch.
            col[:, i, j] = xpad[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw]
    return col.reshape(c * kh * kw, n * oh * ow)


def col2im(dcol, x_shape, kernel, stride, padding):
    """Adjoint of :func:`im2col`: add every column entry back onto the pixel it was copied from.

    Returns dx with logical shape ``x_shape`` (N, C, H, W).
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x_shape
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    if kh == kw == 1 and sh == sw == 1 and ph == pw == 0:
        return from_channel_matrix(dcol, x_shape)
    xp = backend.get_array_module(dcol)
    dcol = dcol.reshape(c, kh, kw, n, oh, ow)
    dxpad = xp.zeros((c, n, h + 2 * ph, w + 2 * pw), dtype=dcol.dtype)
    for i in range(kh):
        for j in range(kw):
            # += and not =: when the stride is smaller than the kernel, neighbouring
            # windows overlap and a pixel receives one gradient from each window
            # that read it (dL/dx is the sum over every use of x).
            dxpad[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw] += dcol[:, i, j]
    return channels_first(dxpad[:, :, ph:ph + h, pw:pw + w])


def conv2d_forward(x, w, b, stride=(1, 1), padding=(0, 0)):
    """Convolution (cross-correlation, as in PyTorch).

    Parameters
    ----------
    x : (N, C, H, W)
    w : (C_out, C, KH, KW)
    b : (C_out,) or None
    stride, padding : pairs (SH, SW), (PH, PW)

    Returns
    -------
    out : (N, C_out, OH, OW), an NCHW view of a (C_out, N, OH, OW) buffer
    cache : what :func:`conv2d_backward` needs
    """
    c_out, _, kh, kw = w.shape
    n, _, h, wd = x.shape
    oh, ow = conv_output_size(h, kh, stride[0], padding[0]), conv_output_size(wd, kw, stride[1], padding[1])
    col = im2col(x, (kh, kw), stride, padding)  # (K, M)
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
        dcol = w.reshape(c_out, -1).T @ dout2d  # (K, M)
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
        out, cache = conv2d_forward(x, self.weight.data, b, self.stride, self.padding)
        self._save_for_backward(cache)
        return out

    def backward(self, dout):
        (cache,) = self._saved_for_backward()
        dx, dw, db = conv2d_backward(dout, cache, need_dx=self.input_grad)
        self.weight.accumulate_grad(dw)
        if db is not None:
            self.bias.accumulate_grad(db)
        return dx
