"""Memory layout of NCHW activations.

Every tensor a layer receives or returns has the *logical* shape
``(N, C, H, W)``, as in PyTorch.  Its *physical* layout in memory is free:
NumPy and CuPy arrays are strided views, and every operation reads them
correctly whatever their strides.

tinynet's convolution computes all output channels of all images with one
matrix product ``W (C_out, C*KH*KW) @ col (C*KH*KW, N*OH*OW)``, whose result is
laid out channels-first: ``(C_out, N, OH, OW)``.  Copying it to NCHW order
would cost a full extra pass over the largest arrays of the network, and the
layers that follow do not need it: BatchNorm reduces per channel (contiguous
rows of the channels-first buffer), ReLU and additions are element-wise, and
the next convolution's im2col reads strided slices either way.  So Conv2d,
BatchNorm2d and the pools return ``buffer.transpose(1, 0, 2, 3)``, an NCHW
*view* of a ``(C, N, H, W)`` buffer.

:func:`channel_matrix` gets the ``(C, N*H*W)`` matrix of such a tensor
without a copy (and with one when the tensor really is NCHW in memory);
:func:`from_channel_matrix` turns a ``(C, N*H*W)`` result back into the
logical NCHW view.
"""
from __future__ import annotations

__all__ = ["channel_matrix", "from_channel_matrix", "channels_first"]


def channels_first(x):
    """``(N, C, H, W) -> (C, N, H, W)`` view (no copy)."""
    return x.transpose(1, 0, *range(2, x.ndim))


def channel_matrix(x):
    """The ``(C, N*H*W)`` matrix of an ``(N, C, ...)`` tensor; a view when the layout allows.

    Row ``c`` holds every value of channel ``c``: the per-channel reductions
    of BatchNorm and the bias gradient of a convolution sum along rows.
    """
    c = x.shape[1]
    return channels_first(x).reshape(c, -1)


def from_channel_matrix(m, shape):
    """Inverse of :func:`channel_matrix`: a ``(C, N*H*W)`` matrix as the NCHW view of shape ``shape``."""
    n, c = shape[0], shape[1]
    return m.reshape((c, n) + tuple(shape[2:])).transpose(1, 0, *range(2, len(shape)))
