"""L2 weight decay as an explicit penalty term.

The assignment adds ``lambda * sum(W^2)`` to the loss.  Its gradient is
``2 lambda W``, so plain gradient descent becomes::

    W <- W - lr * (dL/dW + 2 lambda W)

:class:`L2Penalty` computes the value (add it to the loss you report) and adds
the gradient into each parameter's ``.grad`` (call ``backward()`` after the
model's backward, before the optimizer step), so the gradient check covers it
like any other loss.

By default only weights of rank >= 2 (conv kernels and linear matrices) are
penalised: biases and BatchNorm's gamma/beta are excluded, as is standard
practice, because shrinking them towards zero does not reduce the capacity the
penalty is meant to limit.  Pass ``include_all=True`` to penalise every parameter.

Relation to the optimizers' ``weight_decay`` argument: PyTorch (and tinynet's
SGD/Adam) add ``weight_decay * W`` to the gradient, which is this penalty with
``lambda = weight_decay / 2``, applied to every parameter it is given.
"""
from __future__ import annotations

__all__ = ["L2Penalty"]


class L2Penalty:
    """``lambda * sum(W^2)`` over a model's weights, with value and gradient."""

    def __init__(self, model, lam: float, include_all: bool = False):
        lam = float(lam)
        if not lam >= 0:  # also rejects nan
            raise ValueError(f"L2Penalty: lambda must be a non-negative number, got {lam}")
        self.lam = lam
        self.names, self.params = [], []
        for name, p in model.named_parameters():
            if include_all or p.ndim >= 2:
                self.names.append(name)
                self.params.append(p)

    def value(self):
        """``lambda * sum over penalised W of sum(W^2)`` as a 0-d array (float 0.0 with no parameters)."""
        total = 0.0
        for p in self.params:
            flat = p.data.reshape(-1)
            total = total + flat @ flat
        return self.lam * total

    __call__ = value

    def backward(self) -> None:
        """Add ``2 lambda W`` into every penalised parameter's ``.grad``."""
        for p in self.params:
            p.accumulate_grad(p.data * (2.0 * self.lam))
