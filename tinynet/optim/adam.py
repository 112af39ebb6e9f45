"""Adam and AdamW, PyTorch's update rules.

Adam, step ``t`` (starting at 1), gradient ``g``::

    g  <- g + wd * W                          (L2 decay, coupled: it passes through m and v)
    m  <- b1 m + (1 - b1) g                   first-moment estimate
    v  <- b2 v + (1 - b2) g^2                 second-moment estimate
    m_hat = m / (1 - b1^t),  v_hat = v / (1 - b2^t)      bias corrections
    W  <- W - lr * m_hat / (sqrt(v_hat) + eps)

AdamW decouples the decay from the adaptive step (Loshchilov & Hutter)::

    W  <- W * (1 - lr * wd),   then the Adam step without the wd term.

PyTorch computes the last line as ``W -= (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``;
tinynet does the same so that runs agree step by step.
"""
from __future__ import annotations

import math

from .. import backend, kernels
from .optimizer import Optimizer, _check_number

__all__ = ["Adam", "AdamW"]


_ADAM_UPDATE = kernels.define(
    "adam_update", "T g, T b1, T b2, T step_size, T sqrt_bc2, T eps", "T p, T m, T v",
    """
        m = b1 * m + (1 - b1) * g;
        v = b2 * v + (1 - b2) * g * g;
        p -= step_size * m / (sqrt(v) / sqrt_bc2 + eps);
    """)


def _adam_step_fused(p, g, m, v, b1, b2, step_size, sqrt_bc2, eps) -> None:
    """The GPU twin of :func:`_adam_step`: one pass over the parameter."""
    dt = p.dtype.type
    _ADAM_UPDATE(g, dt(b1), dt(b2), dt(step_size), dt(sqrt_bc2), dt(eps), p, m, v)


@kernels.fused(_adam_step_fused)
def _adam_step(p, g, m, v, b1, b2, step_size, sqrt_bc2, eps) -> None:
    """Update ``m``, ``v`` and the parameter array ``p`` in place (the formulas at the top)."""
    xp = backend.get_array_module(p)
    # One scratch array carries every intermediate: no allocation per parameter and step.  It is
    # this thread's (backend.scratch) and dies with this call.
    tmp = backend.scratch("adam.tmp", p.shape, p.dtype, like=p)
    m *= b1
    xp.multiply(g, 1.0 - b1, out=tmp)
    m += tmp  # m = b1 m + (1 - b1) g
    v *= b2
    xp.multiply(g, g, out=tmp)
    tmp *= 1.0 - b2
    v += tmp  # v = b2 v + (1 - b2) g^2
    xp.sqrt(v, out=tmp)
    tmp /= sqrt_bc2
    tmp += eps  # denominator sqrt(v_hat) + eps
    xp.divide(m, tmp, out=tmp)
    tmp *= step_size
    p -= tmp


class Adam(Optimizer):
    _decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _validate_group(self, group):
        super()._validate_group(group)
        name = type(self).__name__
        b1, b2 = group["betas"]
        group["betas"] = (_check_number(name, "betas[0]", b1, 0.0, 1.0, high_open=True),
                          _check_number(name, "betas[1]", b2, 0.0, 1.0, high_open=True))
        group["eps"] = _check_number(name, "eps", group["eps"])

    def _update(self, p, group, state):
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        xp = backend.get_array_module(p.data)
        if not state:
            state["step"] = 0
            state["exp_avg"] = xp.zeros_like(p.data)
            state["exp_avg_sq"] = xp.zeros_like(p.data)
        state["step"] += 1
        t = state["step"]
        g = p.grad
        if wd and self._decoupled:
            p.data *= 1.0 - lr * wd
        elif wd:
            g = g + wd * p.data
        step_size = lr / (1.0 - b1 ** t)
        sqrt_bc2 = math.sqrt(1.0 - b2 ** t)
        _adam_step(p.data, g, state["exp_avg"], state["exp_avg_sq"], b1, b2, step_size, sqrt_bc2, eps)


class AdamW(Adam):
    """Adam with decoupled weight decay (default 1e-2, as in PyTorch)."""

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
