"""Seeding.

Every random choice tinynet makes (weight initialisation, dropout masks, data
shuffling and augmentation) draws from a :class:`numpy.random.Generator`.  Pass
one explicitly (``Conv2d(..., rng=np.random.default_rng(0))``) or seed the
package-wide default once::

    tinynet.manual_seed(42)   # the next model built and run draws the same numbers

Initialisation always happens on the host with NumPy, so a model built with the
same seed has the same weights whether it later moves to the GPU or not.
"""
from __future__ import annotations

import numpy as np

_default = np.random.default_rng()


def manual_seed(seed: int) -> np.random.Generator:
    """Reset the package-wide generator to ``seed`` and return it."""
    global _default
    _default = np.random.default_rng(seed)
    return _default


def default_generator() -> np.random.Generator:
    return _default


def get_rng(rng=None) -> np.random.Generator:
    """``rng`` itself, a new generator seeded by an int ``rng``, or the default one."""
    if rng is None:
        return _default
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)):
        return np.random.default_rng(int(rng))
    raise TypeError(f"expected a numpy.random.Generator, an int seed or None, got {type(rng).__name__}")


def spawn(rng=None) -> np.random.Generator:
    """An independent child generator (for a layer that keeps drawing, like Dropout)."""
    return np.random.default_rng(get_rng(rng).integers(0, 2**63 - 1))
