"""The fast path: everything tinynet does for speed, kept apart from the math.

The family modules (:mod:`tinynet.nn.conv`, :mod:`~tinynet.nn.norm`, :mod:`~tinynet.nn.pool`,
:mod:`~tinynet.nn.activation`) open with plain NCHW functions, written as the math in
docs/derivations.md.  This package holds what makes the same layers fast, and is tested
against those plain functions:

==========================  ===============================================================
module                      what it holds
==========================  ===============================================================
:mod:`.layout`              the CHWN memory layout (channels first, batch last) and its views
:mod:`.threads`             the host thread pool (:func:`~.threads.parallel_for`) and the two
                            ways a memory-bound pass is split over it
:mod:`.gemm`                the matrix products, cut into pieces on that pool with BLAS held on
                            one thread (OpenBLAS's own threads spin beside the pool's passes)
:mod:`.workspace`           the reusable host buffers (scratch and a layer's own columns)
:mod:`.conv`                im2col/col2im on CHWN, the convolution algorithms and the choice
                            between them
:mod:`.winograd`            Winograd F(m x m, 3 x 3)
:mod:`.kn2row`              one product per kernel offset over only the pixels it reads (small maps)
:mod:`.norm`, :mod:`.pool`,  the blocked, threaded passes of BatchNorm, pooling and ReLU
:mod:`.activation`
:mod:`.epilogues`           evaluation-time in-place BatchNorm/sum/ReLU on a conv's output,
                            and the ReLU/max-pool reordering
==========================  ===============================================================

and the fused CUDA twins of the NumPy passes stand in these modules, right below the function
each replaces (the mechanism is :mod:`tinynet.kernels`).

**One switch.**  :func:`enabled` says whether the fast path runs.  It is on by default;
``TINYNET_FAST=0`` in the environment, or :func:`fast_path` (a function and a context
manager, also ``tinynet.fast_path``), runs the whole library on the plain path instead, on
NumPy and CuPy alike: no fused kernel, no thread started, every layer receiving and returning
plain C-contiguous NCHW arrays::

    tinynet.fast_path(False)            # from here on
    with tinynet.fast_path(False):      # inside the block only
        out = model(x)

A layer decides once per call, in its ``forward``, and its cache remembers which path made it,
so ``backward`` follows the forward even if the switch moved in between.
"""
from __future__ import annotations

import os

__all__ = ["enabled", "fast_path"]

_override = None  # None: follow TINYNET_FAST; True/False: set by fast_path()


def enabled() -> bool:
    """Whether the fast path runs: :func:`fast_path`'s setting, else ``TINYNET_FAST`` (default on)."""
    if _override is not None:
        return _override
    return os.environ.get("TINYNET_FAST", "1") != "0"


class fast_path:
    """``fast_path(enabled)``: switch the fast path on or off for the whole process.

    Called as a function it takes effect at once and stays; used as a ``with`` block, the
    previous setting (or the environment's) comes back at the end of the block.  It overrides
    ``TINYNET_FAST``.  Process-wide, not per thread: switch it between steps, not while another
    thread is running layers.
    """

    def __init__(self, enabled: bool = True):
        global _override
        if not isinstance(enabled, bool):
            raise TypeError(f"fast_path: expected True or False, got {enabled!r}")
        self._previous = _override
        _override = enabled

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _override
        _override = self._previous
        return False
