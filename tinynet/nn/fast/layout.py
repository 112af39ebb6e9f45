"""Memory layout of activations on the fast path: logical NCHW, physical channels-first and batch-last.

Every tensor a layer receives or returns has the *logical* shape
``(N, C, H, W)``, as in PyTorch.  Its *physical* layout in memory is free:
NumPy and CuPy arrays are strided views, and every operation reads them
correctly whatever their strides.

The fast convolution computes all output channels of all images with one
matrix product ``W (C_out, K) @ col (K, M)``, whose result has one row per
output channel.  It orders the M columns as ``(OH, OW, N)``, so the
product's buffer is ``(C_out, OH, OW, N)``: channels first, batch last
("CHWN").  Copying it to NCHW order would cost a full extra pass over the
largest arrays of the network, and the layers that follow do not need it:

* BatchNorm reduces over each channel's values, which are one contiguous row
  of a CHWN buffer;
* ReLU and the residual additions are element-wise;
* im2col, col2im and the pools copy *window slices* ``[:, rows, cols, :]``;
  with the batch innermost, every slice is made of contiguous runs of at
  least N values (OW*N at stride 1), even where the spatial size is 2x2
  (ResNet's last stage) or the stride is 2.  In NCHW order the same copies
  move runs of 1 or 2 values.

So on the fast path Conv2d, BatchNorm and the pools return an NCHW *view* of a
CHWN buffer.  (On the plain path every layer returns C-contiguous NCHW arrays.)

:func:`channel_matrix` gets the ``(C, H*W*N)`` matrix of a tensor (a view when
it is CHWN in memory, a copy otherwise); :func:`from_channel_matrix` turns such
a matrix back into the logical NCHW view.  The same holds for any rank:
``(N, C, *S)`` is stored ``(C, *S, N)``.

Element-wise results keep the layout only if asked: NumPy's ufuncs follow
their inputs' strides, but CuPy's return C-contiguous (NCHW) arrays, which
the next layer would then copy back.  Layers therefore write element-wise
results into ``empty_like(input)`` (which keeps strides on both), as
:func:`add` does for the residual sums.  The passes are split over the host
threads by :mod:`tinynet.nn.fast.threads`.
"""
from __future__ import annotations

from ... import backend
from .threads import for_flat_pieces

__all__ = ["to_chwn", "from_chwn", "channel_matrix", "from_channel_matrix", "add"]


def to_chwn(x):
    """``(N, C, *S) -> (C, *S, N)`` view (no copy)."""
    return x.transpose(*range(1, x.ndim), 0)


def from_chwn(a):
    """``(C, *S, N) -> (N, C, *S)`` view (no copy)."""
    return a.transpose(a.ndim - 1, *range(a.ndim - 1))


def channel_matrix(x):
    """The ``(C, H*W*N)`` matrix of an ``(N, C, H, W)`` tensor; a view when the layout allows.

    Row ``c`` holds every value of channel ``c``, in (h, w, n) order: the
    per-channel reductions of BatchNorm and the bias gradient of a
    convolution sum along rows.
    """
    return to_chwn(x).reshape(x.shape[1], -1)


def from_channel_matrix(m, shape):
    """Inverse of :func:`channel_matrix`: a ``(C, H*W*N)`` matrix as the NCHW view of logical shape ``shape``."""
    return from_chwn(m.reshape(tuple(shape[1:]) + (shape[0],)))


def add(a, b, out=None):
    """``a + b`` in a new array laid out like ``a`` (CHWN stays CHWN on CuPy too), or in ``out``.

    Split between the threads when ``a``, ``b`` and ``out`` share a layout (:func:`for_flat_pieces`).
    """
    xp = backend.get_array_module(a)
    out = xp.empty_like(a) if out is None else out
    for_flat_pieces(lambda a, b, out: xp.add(a, b, out=out), a, b, out)
    return out
