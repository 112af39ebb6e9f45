"""Workspaces: the reusable host buffers of the fast path, each with one owner and one rule.

Allocating a fresh 30-40 MB array per call costs page faults on every first touch (on the
machines measured, more than the copy that fills it), so the fast path keeps its large
temporary arrays.  There are exactly two kinds of owner, and one rule for each:

* :func:`scratch`: the *calling thread* owns one buffer per name; it is valid only until the
  function that asked for it returns (never returned, never kept in a cache).
* :class:`LayerBuffers`: a *layer* owns the buffers its forward fills for its own backward
  (Conv2d's im2col columns, Winograd's V, or kn2row's copy of x); a buffer is lent to one call from its forward
  until its backward (or :meth:`~tinynet.nn.Module.release_saved`) hands it back.

The plain path (:mod:`tinynet.nn.fast` off) uses neither: every array is allocated fresh.
"""
from __future__ import annotations

import math
import threading

import numpy

from ... import backend

__all__ = ["scratch", "LayerBuffers"]


_scratch = threading.local()


def scratch(name: str, shape, dtype, like):
    """A reusable host buffer of ``shape`` for intermediate results that never leave a function.

    Allocating a fresh 30-40 MB array per call costs page faults on every
    first touch (on these machines, more than the copy that fills it); a
    buffer kept per (name, dtype) and thread is faulted in once.

    Owner and lifetime: the calling thread owns one buffer per (name, dtype),
    for the life of the thread, grown to the largest size asked for.  The
    contents are undefined, and the buffer is handed out again on the next
    call with the same name, so a caller uses it only until it returns: it
    never returns the buffer, a view of it, or keeps it in a cache.  Users:
    ``conv2d_backward.dcol`` (summed into a new dx by col2im),
    ``conv2d_forward.col`` (im2col, or Winograd's V, under ``no_grad``, consumed
    by the GEMM), ``conv2d_forward.chunk`` (one chunk of im2col's columns, each
    host thread's own, in :func:`tinynet.nn.fast.conv.forward_in_chunks`), ``winograd.*`` (the padded tiles, half-transformed tiles and
    the products M, dM, dV of :mod:`tinynet.nn.winograd`, each used within one
    forward or backward), ``kn2row.*`` (the taps' weights, their side-by-side columns and
    products in :mod:`tinynet.nn.fast.kn2row`, each used within one forward or backward) and
    ``adam.tmp``.  On the GPU, CuPy's memory pool already recycles
    allocations, so a fresh array is returned.
    """
    xp = backend.get_array_module(like)
    if xp is not numpy:
        return xp.empty(shape, dtype=dtype)
    size = math.prod(shape)
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    key = (name, numpy.dtype(dtype).str)
    buf = buffers.get(key)
    if buf is None or buf.size < size:
        buf = buffers[key] = numpy.empty(size, dtype=dtype)
    return buf[:size].reshape(shape)


class LayerBuffers:
    """The buffers a layer lends to its pending calls: a free list, refilled step after step.

    With gradients enabled a forward keeps what it filled until its backward, so the layer owns
    those buffers: :meth:`take` gives a free one of the right shape, dtype and device (or a new
    one), :meth:`give_back` returns it once the backward has read it.  A layer called twice before
    a backward owns two.  A buffer of another shape, dtype or device found on the free list is
    dropped (the new one replaces it).  Without gradients nothing is kept between calls, so this
    thread's :func:`scratch` buffer serves every layer.
    """

    def __init__(self, free: list):
        self.free = free  #: the layer's own list (a ``_transient`` attribute: not deep-copied)

    def take(self, name: str, shape, like, keep: bool):
        """A buffer of ``shape`` in ``like``'s dtype and device; ``keep``: lent until :meth:`give_back`."""
        if not keep:
            return scratch(name, shape, like.dtype, like=like)
        free = self.free
        while free:
            buf = free.pop()
            if (buf.shape == shape and buf.dtype == like.dtype
                    and backend.is_cupy_array(buf) == backend.is_cupy_array(like)):
                return buf
            # another shape, dtype or device: dropped, the new one replaces it
        return backend.get_array_module(like).empty(shape, dtype=like.dtype)

    def give_back(self, buffer) -> None:
        """``buffer``'s contents are consumed: free to refill."""
        if buffer is not None:
            self.free.append(buffer)
