"""The fast ReLU: passes split over the host threads, and the backward's CUDA twin.

The math is the plain :mod:`tinynet.nn.activation`'s.  Over a large activation the forward and
backward run in one piece per core (:func:`tinynet.nn.fast.threads.for_flat_pieces`,
element-wise, so the same bits on any number of threads); arrays under 1M elements run whole.
Both keep the input's memory layout (``empty_like``).  Measurements: docs/performance.md.
"""
from __future__ import annotations

from ... import backend, kernels
from .threads import for_flat_pieces

__all__ = ["relu_forward", "relu_backward"]


def relu_forward(x, inplace: bool = False, need_mask: bool = True):
    """``y = max(x, 0)`` (written over ``x`` when ``inplace``); the cache is the mask ``[y > 0]`` (bool).

    Both arrays keep ``x``'s memory layout (``empty_like``): CuPy's ufuncs would
    return C-contiguous arrays and turn a CHWN activation into NCHW.  With
    ``need_mask=False`` (no backward will run: ``no_grad``) the mask is not
    computed and None is returned in its place.
    """
    xp = backend.get_array_module(x)
    y = x if inplace else xp.empty_like(x)
    if not need_mask:
        for_flat_pieces(lambda x, y: xp.maximum(x, 0, out=y), x, y)
        return y, None
    mask = xp.empty_like(y, dtype=bool)

    def rectify(x, y, mask):
        xp.maximum(x, 0, out=y)
        xp.greater(y, 0, out=mask)

    for_flat_pieces(rectify, x, y, mask)
    return y, mask


_RELU_BACKWARD = kernels.define("relu_backward", "T dy, bool mask", "T dx", "dx = dy * (T)mask;")


def _relu_backward_fused(dy, mask):
    """The GPU twin of :func:`relu_backward`, written into an array laid out like ``dy``."""
    xp = backend.get_array_module(dy)
    return _RELU_BACKWARD(dy, mask, xp.empty_like(dy))


@kernels.fused(_relu_backward_fused)
def relu_backward(dy, mask):
    """``dx = dy * mask`` with ``mask = [y > 0]``, a new array (``dy`` is left untouched).

    A product and not ``where(mask, dy, 0)``: several times faster in NumPy
    (the mask converts exactly to 0.0 and 1.0), and a NaN gradient stays NaN
    where it is masked, so the NaN guard still sees a divergence.
    """
    xp = backend.get_array_module(dy)
    dx = xp.empty_like(dy)
    for_flat_pieces(lambda dy, mask, dx: xp.multiply(dy, mask, out=dx), dy, mask, dx)
    return dx
