"""Stochastic gradient descent with momentum, PyTorch's update rule.

With gradient ``g``, weight decay ``wd``, momentum ``mu``, dampening ``d``::

    g <- g + wd * W                          (L2 decay: the gradient of (wd/2) ||W||^2)
    buf <- g                   on the first step
    buf <- mu * buf + (1 - d) * g            afterwards
    g <- g + mu * buf          if nesterov, else g <- buf
    W <- W - lr * g

Without momentum this is the assignment's ``W <- W - lr (dL/dW + 2 lambda W)``
with ``wd = 2 lambda``.
"""
from __future__ import annotations

from .optimizer import Optimizer, _check_number

__all__ = ["SGD"]


class SGD(Optimizer):
    def __init__(self, params, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    def _validate_group(self, group):
        super()._validate_group(group)
        group["momentum"] = _check_number("SGD", "momentum", group["momentum"])
        group["dampening"] = _check_number("SGD", "dampening", group["dampening"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("SGD: nesterov momentum needs momentum > 0 and dampening 0")

    def _update(self, p, group, state):
        g = p.grad
        if group["weight_decay"]:
            g = g + group["weight_decay"] * p.data
        mu = group["momentum"]
        if mu:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.copy()
            else:
                buf *= mu
                buf += (1.0 - group["dampening"]) * g
            g = g + mu * buf if group["nesterov"] else buf
        p.data -= group["lr"] * g
