"""Inverted dropout.

In training, every element is kept with probability ``1 - p`` and scaled by
``1 / (1 - p)``, so the expected output equals the input::

    mask ~ Bernoulli(1 - p) / (1 - p)        y = x * mask        dx = dy * mask

Because the scaling happens at training time, evaluation is the identity.
"""
from __future__ import annotations

from .. import backend
from ..random import spawn
from .module import Module
from .validation import check_float, check_grad

__all__ = ["Dropout"]


class Dropout(Module):
    """``Dropout(p=0.5)``: zero each element with probability ``p`` in training mode."""

    def __init__(self, p: float = 0.5, rng=None):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = float(p)
        # Its own generator: the masks do not depend on how many weights were initialised before.
        self.rng = spawn(rng)

    def extra_repr(self):
        return f"p={self.p}"

    def forward(self, x):
        check_float(self, x)
        if not self.training or self.p == 0.0:
            self._save_for_backward(None, x.shape, x.dtype)
            return x
        mask = (self._uniform(x) >= self.p).astype(x.dtype)
        mask *= 1.0 / (1.0 - self.p)
        self._save_for_backward(mask, x.shape, x.dtype)
        return x * mask

    def _uniform(self, x):
        """U[0, 1) of x's shape, drawn on x's device (no host-to-device copy per batch)."""
        if not backend.is_cupy_array(x):
            return self.rng.random(x.shape)
        if getattr(self, "_device_rng", None) is None:
            xp = backend.get_array_module(x)
            self._device_rng = xp.random.default_rng(int(self.rng.integers(0, 2**63 - 1)))
        return self._device_rng.random(x.shape)

    def backward(self, dout):
        mask, shape, dtype = self._saved_for_backward()
        check_grad(self, dout, shape, dtype)
        return dout if mask is None else dout * mask
