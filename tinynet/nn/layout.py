"""Memory layout of activations: logical NCHW, physical channels-first and batch-last.

Every tensor a layer receives or returns has the *logical* shape
``(N, C, H, W)``, as in PyTorch.  Its *physical* layout in memory is free:
NumPy and CuPy arrays are strided views, and every operation reads them
correctly whatever their strides.

tinynet's convolution computes all output channels of all images with one
matrix product ``W (C_out, K) @ col (K, M)``, whose result has one row per
output channel.  tinynet orders the M columns as ``(OH, OW, N)``, so the
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

So Conv2d, BatchNorm and the pools return an NCHW *view* of a CHWN buffer.

:func:`channel_matrix` gets the ``(C, H*W*N)`` matrix of a tensor (a view when
it is CHWN in memory, a copy otherwise); :func:`from_channel_matrix` turns such
a matrix back into the logical NCHW view.  The same holds for any rank:
``(N, C, *S)`` is stored ``(C, *S, N)``.

Element-wise results keep the layout only if asked: NumPy's ufuncs follow
their inputs' strides, but CuPy's return C-contiguous (NCHW) arrays, which
the next layer would then copy back.  Layers therefore write element-wise
results into ``empty_like(input)`` (which keeps strides on both), as
:func:`add` does for the residual sums.

The memory-bound passes (pools, BatchNorm, ReLU, residual sums, im2col and
col2im) use both cores through :func:`tinynet.backend.parallel_for`, split in
one of two ways, each giving the same bits on any number of threads:
:func:`for_channel_blocks` (channels are independent: blocks of a few
channels, about 256 KB, so a chain of passes over a block stays in the
core's cache) and :func:`for_flat_pieces` (one element-wise pass over the
flat memory of arrays laid out alike).  The numbers are in each layer's
module docstring.
"""
from __future__ import annotations

from .. import backend

__all__ = ["to_chwn", "from_chwn", "channel_matrix", "from_channel_matrix", "add",
           "BLOCK_ELEMENTS", "FLAT_SPLIT_MIN_ELEMENTS", "for_channel_blocks", "flat_views", "for_flat_pieces"]

#: Elements per block of the memory-bound passes (256 KB of float32): a block's few arrays stay
#: in the 1 MB L2 cache of one core while several passes run over them, so main memory is read
#: and written once per array instead of once per pass.
BLOCK_ELEMENTS = 1 << 16

#: One pass over fewer elements than this is not split between threads.  Higher than
#: ``backend.PARALLEL_MIN_ELEMENTS``: a single cheap pass (a ReLU, a sum) over 512K float32
#: values takes 0.1 ms on one core, and handing half of it to a second thread cost more
#: (0.12 -> 0.19 ms measured for a ReLU backward of 128@8x8, batch 64).
FLAT_SPLIT_MIN_ELEMENTS = 1 << 20


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


# ---------------------------------------------------------------------------
# Splitting a memory-bound pass: over threads, and into blocks that fit a cache
# ---------------------------------------------------------------------------
def for_channel_blocks(channels: int, per_channel: int, body, like, block_elements: int = BLOCK_ELEMENTS,
                       threads: bool = True) -> None:
    """Run ``body(a, b)`` over consecutive blocks ``[a, b)`` of ``range(channels)``, on all threads.

    For passes whose work is independent per channel (a window slice ``[a:b]``
    of a CHWN buffer, a row block of a channel matrix).  Blocks hold about
    ``block_elements`` elements (``per_channel`` each), so a chain of
    passes over one block runs in cache; the blocks are shared between the
    threads of :func:`tinynet.backend.parallel_for`.  On CuPy ``body(0,
    channels)`` runs once: the GPU needs neither threads nor blocks.

    ``body`` must write only channels ``[a, b)`` and give, for each channel,
    a result that does not depend on which block the channel was in (true
    for element-wise passes and per-row reductions), so the result is the
    same, bit for bit, on any number of threads.  ``threads=False`` runs every block on the
    calling thread (the Winograd transforms, where a second thread was measured slower).
    """
    if backend.is_cupy_array(like):
        body(0, channels)
        return
    step = max(1, block_elements // max(1, per_channel))

    def piece(start, stop):
        for a in range(start, stop, step):
            body(a, min(a + step, stop))

    if threads:
        backend.parallel_for(channels, piece, elements=channels * per_channel)
    else:
        piece(0, channels)


def flat_views(*arrays):
    """1-D views of the memory of ``arrays``, in memory order, or None if there is none.

    Every array must be dense (no gaps), of one shape, and laid out in the
    same axis order (e.g. all CHWN, as ``empty_like`` makes them); then
    element ``k`` of every view is the same logical element.  An element-wise
    pass can then run on pieces of the views.
    """
    first = arrays[0]
    order = sorted(range(first.ndim), key=lambda d: -first.strides[d])
    views = []
    for a in arrays:
        if a.shape != first.shape:
            return None
        if a.ndim and sorted(range(a.ndim), key=lambda d: -a.strides[d]) != order:
            return None
        t = a.transpose(order)
        if not t.flags.c_contiguous:
            return None
        views.append(t.reshape(-1))
    return views


def for_flat_pieces(body, *arrays) -> None:
    """Run the element-wise pass ``body(*pieces)`` over ``arrays``, one piece per thread.

    ``body`` receives consecutive pieces of the :func:`flat_views` of
    ``arrays`` and must compute each output element from the same element
    of the inputs.  Small arrays (below :data:`FLAT_SPLIT_MIN_ELEMENTS`), arrays that share no flat
    layout, and CuPy arrays: ``body`` runs once on the arrays themselves.
    (Smaller chunks, for a two-pass body to re-read its first pass from the
    cache, did not pay: the 32 MB L3 cache holds these arrays anyway.)
    """
    if backend.is_cupy_array(arrays[0]) or arrays[0].size < FLAT_SPLIT_MIN_ELEMENTS:
        body(*arrays)
        return
    views = flat_views(*arrays)
    if views is None:
        body(*arrays)
        return
    backend.parallel_for(views[0].size, lambda a, b: body(*(v[a:b] for v in views)), elements=views[0].size)
