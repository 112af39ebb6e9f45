"""ReLU and softmax as layers.

    y = max(x, 0)                 dL/dx = dL/dy * [y > 0]

The backward keeps the *output* (as Chainer does), not the input: the next
layer holds it anyway, so the mask costs no extra memory.  At x = 0 the
derivative is taken as 0, as in PyTorch.

``ReLU(inplace=True)`` writes ``y`` over ``x``, saving an allocation and a
pass over fresh memory.  That is safe exactly when nothing else still needs
``x``: after a convolution (its backward keeps ``col``), a BatchNorm (keeps
``xhat``) or a residual sum, as in tinynet's models; not on an input that
another branch also reads.
"""
from __future__ import annotations

from .. import backend, kernels
from .functional import softmax
from .module import Module
from .validation import check_float, check_grad

__all__ = ["relu_forward", "relu_backward", "ReLU", "Softmax"]


def relu_forward(x, inplace: bool = False):
    """``y = max(x, 0)`` (written over ``x`` when ``inplace``); the cache is ``y`` itself."""
    xp = backend.get_array_module(x)
    y = xp.maximum(x, 0, out=x if inplace else None)
    return y, y


def relu_backward(dy, y):
    """``dx = dy * [y > 0]``, a new array (``dy`` is left untouched).

    Multiplying by the boolean mask is several times faster in NumPy than
    ``where(y > 0, dy, 0)``; the mask converts exactly to 0.0 and 1.0.
    """
    if kernels.enabled(dy):
        return kernels.relu_backward(dy, y)
    return dy * (y > 0)


class ReLU(Module):
    """Rectified linear unit, element-wise, any shape."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = bool(inplace)

    def extra_repr(self):
        return "inplace=True" if self.inplace else ""

    def forward(self, x):
        check_float(self, x)
        y, cache = relu_forward(x, self.inplace)
        self._save_for_backward(cache)
        return y

    def backward(self, dout):
        (y,) = self._saved_for_backward()
        check_grad(self, dout, y.shape, y.dtype)
        return relu_backward(dout, y)


class Softmax(Module):
    """Softmax along ``dim`` as a layer.

    Backward is the Jacobian-vector product of ``J = diag(y) - y y^T``
    (:func:`tinynet.nn.functional.softmax_jacobian`)::

        dx = J^T dy = y * (dy - sum_k dy_k y_k)

    Use it for probabilities at inference.  Do not put it in front of
    :class:`~tinynet.nn.CrossEntropyLoss`, which applies its own log-softmax:
    the two together squash the logits and slow learning.
    """

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim

    def extra_repr(self):
        return f"dim={self.dim}"

    def forward(self, x):
        check_float(self, x)
        y = softmax(x, axis=self.dim)
        self._save_for_backward(y)
        return y

    def backward(self, dout):
        (y,) = self._saved_for_backward()
        check_grad(self, dout, y.shape, y.dtype)
        return y * (dout - (dout * y).sum(axis=self.dim, keepdims=True))
