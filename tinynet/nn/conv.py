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

Grouped convolution (``groups = G``): output block g of C_out/G channels sees
only input block g of C/G, so the one GEMM becomes G of them, one batched
product ``out2d[g] = W[g] @ col[g]`` (``col``'s rows are in (C, KH, KW) order:
block g of K/G rows is group g).  ``groups = C`` is depthwise convolution.

The functions below are the plain path: NCHW in, C-contiguous NCHW out, the
math and nothing else.  The loop version in :mod:`tinynet.nn.reference` is
their oracle.  The fast path (CHWN layout, threads, CUDA twins, Winograd, kn2row) is
:mod:`tinynet.nn.fast.conv`, tested against these; :class:`Conv2d` takes one
or the other (:func:`tinynet.fast_path`).
"""
from __future__ import annotations

from typing import NamedTuple

from .. import backend
from . import fast
from .fast import conv as _fast
from .fast.conv import ALGORITHMS, WINOGRAD_MIN_WORK, algorithm, choose_algorithm, winograd_applies  # noqa: F401
from .fast.workspace import LayerBuffers
from .geometry import conv_output_size, kernel_offsets, pair, positive_int
from .init import uniform_fan_in
from .module import Module, Parameter, is_grad_enabled
from .validation import check_grad, check_input

__all__ = ["ConvCache", "im2col", "col2im", "conv2d_forward", "conv2d_backward", "Conv2d",
           # window geometry lives in tinynet.nn.geometry; these names stay importable from here
           "conv_output_size", "pair", "kernel_offsets"]


# ---------------------------------------------------------------------------
# The plain path: NCHW, as the math says
# ---------------------------------------------------------------------------
class ConvCache(NamedTuple):
    """What :func:`conv2d_backward` needs from :func:`conv2d_forward`."""

    col: object      #: (K, M) receptive fields, columns in (N, OH, OW) order
    x_shape: tuple   #: (N, C, H, W)
    weight: object   #: (C_out, C/G, KH, KW)
    stride: tuple    #: (SH, SW)
    padding: tuple   #: (PH, PW)
    has_bias: bool
    groups: int      #: G


def conv2d_forward(x, w, b, stride=(1, 1), padding=(0, 0), groups=1):
    """``out = W2d @ im2col(x) + b``: x (N, C, H, W), w (C_out, C/G, KH, KW), b (C_out,) or None.

    Returns ``(out, cache)``: out (N, C_out, OH, OW), C-contiguous, and a :class:`ConvCache`.
    """
    n, c_out = x.shape[0], w.shape[0]
    col = im2col(x, w.shape[2:], stride, padding)                                     # (K, M)
    out2d = (w.reshape(groups, c_out // groups, -1) @ col.reshape(groups, -1, col.shape[1]))
    out2d = out2d.reshape(c_out, -1)                                                  # W2d @ col, per group
    if b is not None:
        out2d = out2d + b[:, None]
    out = out2d.reshape(c_out, n, -1).transpose(1, 0, 2)                              # (N, C_out, OH*OW)
    oh, ow = (conv_output_size(x.shape[2 + a], w.shape[2 + a], stride[a], padding[a]) for a in (0, 1))
    out = backend.get_array_module(x).ascontiguousarray(out).reshape(n, c_out, oh, ow)
    return out, ConvCache(col, tuple(x.shape), w, tuple(stride), tuple(padding), b is not None, groups)


def conv2d_backward(dout, cache):
    """``(dx, dw, db)`` for :func:`conv2d_forward`; ``dout`` (N, C_out, OH, OW) is not modified."""
    col, x_shape, w, stride, padding, has_bias, groups = cache
    c_out = w.shape[0]
    dout2d = dout.transpose(1, 0, 2, 3).reshape(c_out, -1)                            # (C_out, M)
    dout_g = dout2d.reshape(groups, c_out // groups, -1)                              # (G, C_out/G, M)
    col_g = col.reshape(groups, -1, col.shape[1])                                     # (G, K/G, M)
    w_g = w.reshape(groups, c_out // groups, -1)                                      # (G, C_out/G, K/G)
    dw = (dout_g @ col_g.transpose(0, 2, 1)).reshape(w.shape)                         # dW2d = dout2d @ col.T
    db = dout2d.sum(axis=1) if has_bias else None                                     # db = sum over M
    dcol = (w_g.transpose(0, 2, 1) @ dout_g).reshape(col.shape)                       # dcol = W2d.T @ dout2d
    dx = col2im(dcol, x_shape, w.shape[2:], stride, padding)
    return dx, dw, db


def im2col(x, kernel, stride, padding):
    """``col[(c, i, j), (n, y, x)] = xpad[n, c, SH*y + i, SW*x + j]``: the (K, M) receptive fields of ``x`` (N, C, H, W)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    xp = backend.get_array_module(x)
    xpad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    col = xp.empty((c, kh, kw, n, oh, ow), dtype=x.dtype)
    for i in range(kh):  # one strided slice of the whole batch per kernel offset (i, j)
        for j in range(kw):
            col[:, i, j] = xpad[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw].transpose(1, 0, 2, 3)
    return col.reshape(c * kh * kw, n * oh * ow)


def col2im(dcol, x_shape, kernel, stride, padding):
    """Adjoint of :func:`im2col`: each entry of ``dcol`` (K, M) added back onto the pixel it was copied from."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x_shape
    oh, ow = conv_output_size(h, kh, sh, ph), conv_output_size(w, kw, sw, pw)
    xp = backend.get_array_module(dcol)
    dxpad = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=dcol.dtype)
    dcol = dcol.reshape(c, kh, kw, n, oh, ow)
    for i in range(kh):
        for j in range(kw):
            # += and not =: when the stride is smaller than the kernel, windows overlap and a pixel
            # receives one gradient from every window that read it (dL/dx sums over every use of x).
            dxpad[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw] += dcol[:, i, j].transpose(1, 0, 2, 3)
    return xp.ascontiguousarray(dxpad[:, :, ph:ph + h, pw:pw + w])  # the padding's gradient is dropped


# ---------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------
class Conv2d(Module):
    """``Conv2d(in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, groups=1)``.

    Input (N, C, H, W) -> output (N, C_out, OH, OW).  Parameters ``weight``
    (C_out, C/groups, KH, KW) and ``bias`` (C_out,), initialised as in PyTorch
    (see :mod:`tinynet.nn.init`).  ``groups`` splits the channels into
    independent blocks (grouped convolution; ``groups=C``: depthwise).
    """

    #: ``_free_cols``: the fast path's im2col (or Winograd V) buffers this layer owns, free to refill
    #: (:class:`tinynet.nn.fast.workspace.LayerBuffers`).
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
        if fast.enabled():  # the one dispatch point: tinynet.nn.fast.conv, Winograd included
            out, cache, buffer = _fast.layer_forward(x, self.weight.data, b, self.stride, self.padding, self.groups,
                                                     LayerBuffers(self._free_cols), keep=is_grad_enabled())
        else:
            (out, cache), buffer = conv2d_forward(x, self.weight.data, b, self.stride, self.padding, self.groups), None
        self._save_for_backward(cache, out.shape, buffer)
        return out

    def backward(self, dout):
        cache, out_shape, buffer = self._saved_for_backward()
        check_grad(self, dout, out_shape, self.weight.dtype)
        if isinstance(cache, ConvCache):
            dx, dw, db = conv2d_backward(dout, cache)
            dx = dx if self.input_grad else None
        else:  # the fast path's cache (it names its algorithm)
            dx, dw, db = _fast.conv2d_backward(dout, cache, need_dx=self.input_grad)
            LayerBuffers(self._free_cols).give_back(buffer)  # this call's columns are consumed: free to refill
        self.weight.accumulate_grad(dw)
        if db is not None:
            self.bias.accumulate_grad(db)
        return dx

    def _discard(self, values) -> None:
        LayerBuffers(self._free_cols).give_back(values[2])  # nobody will read these columns again
