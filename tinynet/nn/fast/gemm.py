"""Matrix products on tinynet's own threads, with the BLAS library on one thread.

Two thread pools used to share the cores: OpenBLAS's, for the matrix products, and tinynet's
(:mod:`.threads`), for the memory-bound passes between them.  OpenBLAS's threads wait for
their next product by *spinning* (about 0.1 s, its ``THREAD_TIMEOUT``), so every pass that
followed a product found one core taken by a spinning BLAS thread.  Measured on the 2-core VM
(``benchmarks/gemm_threads.py``, three runs): a 64 MB element-wise pass split over 2 threads took
5.8-6.5 ms right after a 2-thread sgemm, 3.1-4.5 ms after a 1-thread one.  That is the likely
reason why BatchNorm's and max pooling's 2-thread passes were no faster than 1-thread ones inside
a training step, and why the Winograd transforms were slower on a second thread.

So on the fast path a product (:func:`matmul`) is cut into pieces that run on tinynet's pool,
each piece one single-threaded BLAS call, and BLAS is kept on one thread: the first product sets
it to one and it stays there (:func:`release_blas_threads` gives it its count back), so no BLAS
thread wakes up to spin.  Measured in one process, alternating rounds
(``benchmarks/gemm_threads.py --no-torch``): a ResNet18 training step 626 -> 542 ms, its eval
forward 218 -> 204 ms, the CNN's step 98 -> 92 ms (docs/performance.md has every case).  The pieces:

* a batched product ``(B, M, K) @ (B, K, N)`` (Winograd's alpha^2 products, a grouped
  convolution's G): whole batch entries;
* a small result over a long K (a convolution's dW): blocks of :data:`K_BLOCK` of K, whose
  products are added in order (the same sums on any number of threads, one included; not the
  bits of one BLAS call);
* otherwise, blocks of :data:`COLUMN_BLOCK` columns of the result when it has enough of them
  (im2col's ``W2d @ col``: the pixels), else blocks of rows.

Apart from the K blocks, a piece is whole blocks of :data:`COLUMN_BLOCK` columns (or whole rows,
or whole batch entries) and K is not cut, so each output element is a sum over the same K in the
same order.
Measured with OpenBLAS 0.3.31 (``tests/test_gemm.py``): in float32 every shape tried gives the
bits of one single-threaded BLAS call on any number of threads (OpenBLAS's own threads do not:
its 2-thread sgemm differs from its 1-thread one in the last bit for (300, 3000) @ (3000, 256));
in float64 the last, partial block of columns can differ in the last bit (seen for N = 300).
Small products (below :data:`SPLIT_MIN_MACS`) run whole, still on one BLAS thread.  Where threadpoolctl finds
no BLAS library it can set (:func:`owns_threads` is False), or cannot set it from this thread (another
thread controls it, :func:`hold_blas_threads`), :func:`matmul` is ``numpy.matmul`` and BLAS keeps its
own threads.  CuPy arrays go straight to ``cupy.matmul``.
"""
from __future__ import annotations

import threading

import numpy as np

from ... import backend
from .threads import num_threads, parallel_for

__all__ = ["matmul", "hold_blas_threads", "owns_threads", "release_blas_threads", "linear_forward", "linear_backward",
           "COLUMN_BLOCK", "SPLIT_MIN_MACS", "K_BLOCK"]

#: Columns of the result per piece are a multiple of this (whole register tiles of the BLAS kernels).
COLUMN_BLOCK = 64
#: Products with fewer multiply-adds than this are not split (a hand-off costs ~20-50 us).
SPLIT_MIN_MACS = 1 << 22
#: A product with a small result and a long K (a convolution's ``dW = dout2d @ col.T``, whose K is
#: every output pixel of the batch) is cut along K into blocks of this many, and their products
#: are summed in order; cut by rows or columns, every thread would read the whole of one operand
#: (the CNN's first dW, (32, 262144) @ (262144, 27): 12.1 ms on BLAS's 2 threads, 8.8 ms in K
#: blocks on tinynet's 2; cut by rows, its layer's backward went from 14 to 22 ms).
K_BLOCK = 1 << 14

_lock = threading.Lock()
_blas = None        # the threadpoolctl controllers of the BLAS libraries, found at the first product
_held = None        # each library's thread count before tinynet set it to one (None: not held)


def _blas_libraries() -> list:
    global _blas
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController

            _blas = list(ThreadpoolController().select(user_api="blas").lib_controllers)
        except Exception:  # noqa: BLE001  (no threadpoolctl, or it cannot read this process: BLAS keeps its threads)
            _blas = []
    return _blas


def owns_threads() -> bool:
    """Whether :func:`matmul` runs the products on tinynet's threads (it can set BLAS to one thread)."""
    return bool(_blas_libraries())


def _set_blas_threads(counts) -> bool:
    """Set each BLAS library's thread count from this thread; whether every count took.

    threadpoolctl 3.8 lets only one thread change OpenBLAS's count: the first that sets it becomes
    the "controlling thread", and a set from any other thread silently does nothing.  tinynet sets
    the count once, with no ``with`` block to end, so it hands that control back at once (unless
    this thread is inside a ``threadpool_limits`` block of its own); otherwise the first thread to
    hold BLAS, one of tinynet's pool threads say, would own it for the life of the process.  A set
    that did not take (another thread holds control) is reported, not raised.
    """
    try:
        import threadpoolctl
    except ImportError:  # pragma: no cover  (no controllers without it)
        return False
    ownership = getattr(threadpoolctl, "CONTROLLING_THREAD_OWNERSHIP", None)
    for lib, n in zip(_blas, counts):
        lib.set_num_threads(n)
        clear = getattr(type(lib), "clear_controlling_thread", None)
        if clear is not None and getattr(ownership, "count", 0) <= 0:
            clear()  # only if this thread controls it: another thread's control is left alone
    return all(lib.get_num_threads() == n for lib, n in zip(_blas, counts))


def hold_blas_threads() -> bool:
    """Set BLAS to one thread from this thread, unless it is there already; whether it is at one now.

    The count it had is remembered for :func:`release_blas_threads`.  Call it on the thread that
    then hands pieces to tinynet's pool, not inside a piece.  False when BLAS could not be set
    (no library that threadpoolctl can set, or another thread controls it): the products should
    then run as whole calls on BLAS's own threads.
    """
    global _held
    if not _blas_libraries():
        return False
    counts = [lib.get_num_threads() for lib in _blas]
    if all(n == 1 for n in counts):
        return True
    with _lock:
        if _set_blas_threads([1] * len(counts)):
            _held = counts
            return True
        return all(lib.get_num_threads() == 1 for lib in _blas)


def release_blas_threads() -> None:
    """Give BLAS back the thread count it had before tinynet's first product set it to one.

    tinynet does not do this by itself between products: setting OpenBLAS back to several threads
    and to one again around every product was measured to cost more than it saves (ResNet18
    eval forward 192 -> 288 ms), and a step's products follow one another.  Call it when
    NumPy code of your own, outside tinynet, wants BLAS's threads again; the next product of
    the fast path takes them back.  :func:`tinynet.cores.set_threads` sets both pools.
    """
    global _held
    with _lock:
        if _held is not None:
            _set_blas_threads(_held)
            _held = None


#: Where each kind of piece cuts the result: ``(axis, unit)``.
_CUTS = {"batch": (0, 1), "columns": (-1, COLUMN_BLOCK), "rows": (-2, 1)}


def _split(shape, k):
    """How the result (its last two axes (M, N)) is cut: "k", "batch", "columns", "rows", or None to run it whole."""
    m, n = shape[-2:]
    if len(shape) == 2 and k >= 2 * K_BLOCK and k >= 4 * m * n:
        return "k"
    if len(shape) > 2 and shape[0] > 1:
        return "batch"
    if n >= 2 * COLUMN_BLOCK:
        return "columns"
    if m >= 2:
        return "rows"
    return None


def matmul(a, b, out=None):
    """``a @ b`` (NumPy's rules, broadcasting included), into ``out`` if given; see the module's docstring."""
    if not isinstance(a, np.ndarray) or not isinstance(b, np.ndarray) or not owns_threads():
        return backend.get_array_module(a, b).matmul(a, b, out=out)  # CuPy's matmul on the GPU
    if not hold_blas_threads():  # another thread controls BLAS's count: one call, on BLAS's threads
        return np.matmul(a, b, out=out)
    if a.ndim < 2 or b.ndim < 2:  # a vector: one call
        return np.matmul(a, b, out=out)
    shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
    if out is None:
        out = np.empty(shape, np.result_type(a, b))
    k = a.shape[-1]
    kind = _split(shape, k)
    if kind == "k":  # on any number of threads, one thread included: the same sums
        return _sum_over_k_blocks(a, b, out)
    if kind is None or num_threads() == 1 or int(np.prod(shape)) * k < SPLIT_MIN_MACS:
        return np.matmul(a, b, out=out)
    axis, unit = _CUTS[kind]
    if len(shape) > 2:  # broadcast the batch axes, so that a piece can slice either operand
        a, b = np.broadcast_to(a, shape[:-2] + a.shape[-2:]), np.broadcast_to(b, shape[:-2] + b.shape[-2:])

    def piece(start, stop):
        lo, hi = start * unit, min(stop * unit, shape[axis])
        if kind == "batch":
            np.matmul(a[lo:hi], b[lo:hi], out=out[lo:hi])
        elif kind == "columns":  # columns of the result are columns of b
            np.matmul(a, b[..., lo:hi], out=out[..., lo:hi])
        else:  # rows of the result are rows of a
            np.matmul(a[..., lo:hi, :], b, out=out[..., lo:hi, :])

    parallel_for(-(-shape[axis] // unit), piece)
    return out


def _sum_over_k_blocks(a, b, out):
    """``out = sum_i a[:, K_i] @ b[K_i, :]`` over the blocks K_i of :data:`K_BLOCK`, added in order."""
    k = a.shape[1]
    blocks = -(-k // K_BLOCK)
    partial = np.empty((blocks,) + out.shape, out.dtype)

    def piece(start, stop):
        for i in range(start, stop):
            cut = slice(i * K_BLOCK, min((i + 1) * K_BLOCK, k))
            np.matmul(a[:, cut], b[cut], out=partial[i])

    parallel_for(blocks, piece)
    out[...] = partial[0]
    for i in range(1, blocks):
        out += partial[i]
    return out


# ---------------------------------------------------------------------------
# Linear's products (the plain tinynet.nn.linear, with matmul for @)
# ---------------------------------------------------------------------------
def linear_forward(x, w, b):
    """:func:`tinynet.nn.linear.linear_forward` with its product on tinynet's threads."""
    from ..linear import LinearCache

    y = matmul(x, w.T)
    if b is not None:
        y += b
    return y, LinearCache(x, w, b is not None)


def linear_backward(dy, cache, need_dx: bool = True):
    """:func:`tinynet.nn.linear.linear_backward` with its products on tinynet's threads."""
    x, w, has_bias = cache
    dw = matmul(dy.T, x)
    db = dy.sum(axis=0) if has_bias else None
    dx = matmul(dy, w) if need_dx else None
    return dx, dw, db
