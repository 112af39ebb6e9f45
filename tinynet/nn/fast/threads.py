"""Host threads for the memory-bound passes, and the two ways a pass is split over them.

NumPy releases the GIL inside its ufuncs, copies and matrix products, so pieces of one pass on
two threads use two cores; on the fast path the matrix products are cut into pieces on these
threads too, with BLAS on one thread (:mod:`.gemm` says why).  :func:`parallel_for` runs
``body(start, stop)`` over pieces of a range; :func:`for_channel_blocks` (channels are
independent: blocks of a few channels, so a chain of passes over a block stays in the core's
cache) and :func:`for_flat_pieces` (one element-wise pass over the flat memory of arrays laid
out alike) are the two splits the layers use.  Each gives the same bits on any number of
threads.

Part of the fast path (:mod:`tinynet.nn.fast`): with the fast path off, :func:`parallel_for`
runs every body on the calling thread and no thread is ever started.  (Measurements:
docs/performance.md.)
"""
from __future__ import annotations

import os
import threading

import numpy

from . import enabled as _fast_enabled

__all__ = ["num_threads", "set_num_threads", "parallel_for", "PARALLEL_MIN_ELEMENTS",
           "BLOCK_ELEMENTS", "FLAT_SPLIT_MIN_ELEMENTS", "for_channel_blocks", "flat_views", "for_flat_pieces"]


def _on_host(x) -> bool:
    """Only host (NumPy) arrays are split: a GPU array needs neither threads nor blocks."""
    return isinstance(x, numpy.ndarray)


_pool_lock = threading.Lock()
_pool = None  # concurrent.futures.ThreadPoolExecutor, made at the first parallel_for that splits
_pool_workers = 0
_pool_pid = None  # the process that made _pool
_num_threads = None  # None: one per CPU this process may run on
_in_pool = threading.local()

#: Below this many elements a pass is not split: handing work to a thread costs ~20-50 us.
PARALLEL_MIN_ELEMENTS = 1 << 17


def num_threads() -> int:
    """Threads :func:`parallel_for` splits a pass over (default: the CPUs this process may use)."""
    if _num_threads is not None:
        return _num_threads
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no sched_getaffinity on macOS and Windows
        return max(1, os.cpu_count() or 1)


def set_num_threads(n: int | None) -> None:
    """Use ``n`` threads for the memory-bound passes (1: run them on the calling thread; None: the default).

    On the fast path the matrix products are cut over these threads too (:mod:`.gemm`, with BLAS
    on one thread); on the plain path they run on the BLAS library's own threads.
    """
    global _num_threads, _pool, _pool_workers
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"set_num_threads: expected a positive int or None, got {n!r}")
    with _pool_lock:
        _num_threads = n
        if _pool is not None:
            _pool.shutdown(wait=True)
            _pool, _pool_workers = None, 0


def _get_pool(workers: int):
    global _pool, _pool_workers, _pool_pid
    with _pool_lock:
        # A forked child inherits the executor but not its threads: it would queue work nobody runs.
        if _pool is not None and _pool_pid != os.getpid():
            _pool, _pool_workers = None, 0
        if _pool is None or _pool_workers != workers:
            from concurrent.futures import ThreadPoolExecutor

            if _pool is not None:
                _pool.shutdown(wait=True)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tinynet",
                                       initializer=setattr, initargs=(_in_pool, "active", True))
            _pool_workers, _pool_pid = workers, os.getpid()
        return _pool


def parallel_for(n: int, body, elements: int | None = None) -> None:
    """Run ``body(start, stop)`` over consecutive pieces of ``range(n)``, one per thread, and wait.

    For the memory-bound passes (copies, element-wise ufuncs, per-channel
    reductions) and the pieces of :func:`tinynet.nn.fast.gemm.matmul`: NumPy
    releases the GIL inside them, so pieces of one pass on two threads use two
    cores.  ``body`` must write only its own piece (pieces never overlap) and
    must not call a matrix product other than a piece of ``gemm.matmul``'s
    (BLAS on one thread).  ``elements`` is the size of the whole pass: below
    :data:`PARALLEL_MIN_ELEMENTS`, or on one thread, or when called from
    inside a piece, ``body(0, n)`` runs here.  The calling thread runs the
    first piece itself; an exception in any piece is raised here after all
    pieces have ended.  CuPy arrays need no host threads: pass them straight
    to ``body(0, n)`` (callers do).  With the fast path off (:func:`tinynet.nn.fast.enabled`)
    ``body(0, n)`` runs here and no thread is started.
    """
    threads = min(num_threads(), n)
    if (threads <= 1 or not _fast_enabled() or (elements is not None and elements < PARALLEL_MIN_ELEMENTS)
            or getattr(_in_pool, "active", False)):
        body(0, n)
        return
    bounds = [n * k // threads for k in range(threads + 1)]
    futures = [_get_pool(threads - 1).submit(body, bounds[k], bounds[k + 1]) for k in range(1, threads)]
    error = None
    _in_pool.active = True  # a parallel_for inside this piece runs whole, as it does on the workers
    try:
        body(bounds[0], bounds[1])
    except BaseException as e:  # noqa: BLE001  (re-raised below, after the other pieces ended)
        error = e
    finally:
        _in_pool.active = False
    for f in futures:
        try:
            f.result()
        except BaseException as e:  # noqa: BLE001
            error = error or e
    if error is not None:
        raise error


#: Elements per block of the memory-bound passes (256 KB of float32): a block's few arrays stay
#: in the 1 MB L2 cache of one core while several passes run over them, so main memory is read
#: and written once per array instead of once per pass.
BLOCK_ELEMENTS = 1 << 16

#: One pass over fewer elements than this is not split between threads.  Higher than
#: ``PARALLEL_MIN_ELEMENTS``: a single cheap pass (a ReLU, a sum) is shorter than a thread's
#: hand-off (docs/performance.md, "ReLU").
FLAT_SPLIT_MIN_ELEMENTS = 1 << 20


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
    threads of :func:`tinynet.parallel_for`.  On CuPy ``body(0,
    channels)`` runs once: the GPU needs neither threads nor blocks.

    ``body`` must write only channels ``[a, b)`` and give, for each channel,
    a result that does not depend on which block the channel was in (true
    for element-wise passes and per-row reductions), so the result is the
    same, bit for bit, on any number of threads.  ``threads=False`` runs every block on the
    calling thread (the Winograd transforms, when BLAS keeps threads of its own).
    """
    if not _on_host(like):
        body(0, channels)
        return
    step = max(1, block_elements // max(1, per_channel))

    def piece(start, stop):
        for a in range(start, stop, step):
            body(a, min(a + step, stop))

    if threads:
        parallel_for(channels, piece, elements=channels * per_channel)
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
    if not _on_host(arrays[0]) or arrays[0].size < FLAT_SPLIT_MIN_ELEMENTS:
        body(*arrays)
        return
    views = flat_views(*arrays)
    if views is None:
        body(*arrays)
        return
    parallel_for(views[0].size, lambda a, b: body(*(v[a:b] for v in views)), elements=views[0].size)
