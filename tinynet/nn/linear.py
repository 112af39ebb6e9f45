"""Fully connected layer.

Notation: ``x`` (N, F_in), ``W`` (F_out, F_in) as in PyTorch, ``b`` (F_out,)::

    y = x @ W.T + b                      (N, F_out)

Backward, with ``dy = dL/dy`` (N, F_out)::

    dW = dy.T @ x                        (F_out, F_in)
    db = dy.sum(axis=0)                  (F_out,)
    dx = dy @ W                          (N, F_in)

Leading axes beyond the first are allowed (``(*, F_in)``), as in PyTorch; they
are flattened into N for the products.
"""
from __future__ import annotations

from typing import NamedTuple

from . import fast
from .fast import gemm as _fast
from .geometry import positive_int
from .init import uniform_fan_in
from .module import Module, Parameter
from .validation import check_grad, check_input

__all__ = ["LinearCache", "linear_forward", "linear_backward", "Linear"]


class LinearCache(NamedTuple):
    """What :func:`linear_backward` needs from :func:`linear_forward`."""

    x: object        #: (N, F_in) input
    weight: object   #: (F_out, F_in)
    has_bias: bool


def linear_forward(x, w, b):
    """``y = x @ W.T + b`` for ``x`` (N, F_in); returns ``(y, cache)``, a :class:`LinearCache`."""
    y = x @ w.T
    if b is not None:
        y += b
    return y, LinearCache(x, w, b is not None)


def linear_backward(dy, cache, need_dx: bool = True):
    """Returns ``(dx, dW, db)``; ``dx`` is None when ``need_dx`` is False, ``db`` when there is no bias."""
    x, w, has_bias = cache
    dw = dy.T @ x
    db = dy.sum(axis=0) if has_bias else None
    dx = dy @ w if need_dx else None
    return dx, dw, db


class Linear(Module):
    """``Linear(in_features, out_features, bias=True)``: (*, F_in) -> (*, F_out)."""

    def __init__(self, in_features, out_features, bias=True, rng=None, dtype="float32"):
        super().__init__()
        self.in_features = positive_int(in_features, "in_features", "Linear")
        self.out_features = positive_int(out_features, "out_features", "Linear")
        self.weight = Parameter(uniform_fan_in((self.out_features, self.in_features), self.in_features, rng, dtype))
        self.bias = Parameter(uniform_fan_in((self.out_features,), self.in_features, rng, dtype)) if bias else None

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x):
        check_input(self, x, f"(N, {self.in_features})", tuple(range(1, 9)), self.in_features, channel_axis=-1)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        b = self.bias.data if self.bias is not None else None
        on_fast = fast.enabled()  # the fast path: the same products on tinynet's threads (tinynet.nn.fast.gemm)
        y, cache = (_fast.linear_forward if on_fast else linear_forward)(x2, self.weight.data, b)
        self._save_for_backward(cache, lead, on_fast)
        return y.reshape(lead + (self.out_features,))

    def backward(self, dout):
        cache, lead, on_fast = self._saved_for_backward()
        check_grad(self, dout, lead + (self.out_features,), cache.weight.dtype)
        backward = _fast.linear_backward if on_fast else linear_backward
        dx, dw, db = backward(dout.reshape(-1, self.out_features), cache, need_dx=self.input_grad)
        self.weight.accumulate_grad(dw)
        if db is not None:
            self.bias.accumulate_grad(db)
        return None if dx is None else dx.reshape(lead + (self.in_features,))
