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
tinynet does the same so that runs agree step by step (to float rounding).

Speed (CPU).  :func:`_adam_step_plain` is the update line by line;
:func:`_adam_step` computes it in 12 passes with one scratch array (13 passes
and two divisions before; the coupled weight decay no longer makes two fresh
arrays per parameter), and :func:`tinynet.optim.optimizer.split_updates` runs all host
parameters of a step as one :func:`tinynet.backend.parallel_for`, split by
element count into rows of the parameters, in blocks of
:data:`tinynet.optim.optimizer.CHUNK_ELEMENTS` so that a block's five arrays stay in the caches.
ResNet18's 11.2 M float32 parameters, one step, old vs new in one process,
medians of 21 alternated rounds (see also ``benchmarks/optim_step.py``)::

                   wall clock, 2 threads       CPU time, 1 thread
    Adam                    -                  26.97 -> 23.59 ms
    AdamW           29.07 -> 22.60 ms          29.41 -> 24.08 ms
    Adam, L2 5e-4   33.66 -> 25.34 ms          34.69 -> 26.84 ms

The wall clock was taken on a 2-core machine shared with other work: where its
second core was free, AdamW took 15.7 ms (minimum of 21) against 26.5 before.

What was measured and not done: flat buffers.  One flat ``exp_avg`` and
``exp_avg_sq`` would turn 62 parameters' ``m *= b1`` into one call but not
the passes that read ``p`` and ``g`` (those are separate arrays): ~0.2 ms.
Flat parameters and gradients would need every layer's backward to write its
gradient into the flat buffer and every ``Parameter.data`` to stay a view of
it, which ``load_state_dict``, ``model.to`` and user code assigning
``p.data = ...`` would silently break.
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend, kernels
from .optimizer import Optimizer, _check_number, split_updates

__all__ = ["Adam", "AdamW"]


_ADAM_UPDATE = kernels.define(
    "adam_update", "T g, T b1, T b2, T step_size, T sqrt_bc2, T eps", "T p, T m, T v",
    """
        m = b1 * m + (1 - b1) * g;
        v = b2 * v + (1 - b2) * g * g;
        p -= step_size * m / (sqrt(v) / sqrt_bc2 + eps);
    """)


def _adam_step_plain(p, g, m, v, b1, b2, step_size, sqrt_bc2, eps, weight_decay=0.0, decay=1.0) -> None:
    """The update of one parameter, line by line as the formulas at the top (the tests' oracle).

    ``decay`` is AdamW's factor ``1 - lr * wd`` (1: none), ``weight_decay`` Adam's coupled ``wd``
    (0: none).  Every line allocates its temporaries; :func:`_adam_step` computes the same
    with no allocation and fewer passes.
    """
    xp = backend.get_array_module(p)
    if decay != 1.0:
        p *= decay
    if weight_decay:
        g = g + weight_decay * p
    m[...] = b1 * m + (1.0 - b1) * g
    v[...] = b2 * v + (1.0 - b2) * g * g
    p -= step_size * m / (xp.sqrt(v) / sqrt_bc2 + eps)


def _adam_step_fused(p, g, m, v, b1, b2, step_size, sqrt_bc2, eps, weight_decay=0.0, decay=1.0) -> None:
    """The GPU twin of :func:`_adam_step`: one pass over the parameter (after the decay, if any)."""
    if decay != 1.0:
        p *= decay
    if weight_decay:
        g = g + weight_decay * p
    dt = p.dtype.type
    _ADAM_UPDATE(g, dt(b1), dt(b2), dt(step_size), dt(sqrt_bc2), dt(eps), p, m, v)


@kernels.fused(_adam_step_fused)
def _adam_step(p, g, m, v, b1, b2, step_size, sqrt_bc2, eps, weight_decay=0.0, decay=1.0) -> None:
    """:func:`_adam_step_plain` in 12 passes and no allocation (13 passes and two divisions before).

    Arguments are arrays of one shape (or the same rows of several parameters' arrays: the
    threaded step hands each thread a slice along axis 0); ``m``, ``v`` and ``p`` are updated
    in place.  The bias correction of ``v`` moves out of the element-wise work::

        step_size * m / (sqrt(v) / sqrt_bc2 + eps) = (step_size * sqrt_bc2) * m / (sqrt(v) + eps * sqrt_bc2)

    which is the same number up to float rounding and saves a division pass (a division
    costs about two multiplications here).
    """
    xp = backend.get_array_module(p)
    # One scratch array carries every intermediate: no allocation per parameter and step.  It is
    # this thread's (backend.scratch) and dies with this call.
    tmp = backend.scratch("adam.tmp", p.shape, p.dtype, like=p)
    if decay != 1.0:
        p *= decay  # AdamW: W <- W (1 - lr wd), then the Adam step
    if weight_decay:
        gd = backend.scratch("adam.decayed_grad", p.shape, p.dtype, like=p)
        xp.multiply(p, weight_decay, out=gd)
        gd += g  # g + wd W, without the two fresh arrays of ``g + wd * p``
        g = gd
    xp.multiply(g, 1.0 - b1, out=tmp)
    m *= b1
    m += tmp  # m = b1 m + (1 - b1) g
    xp.multiply(g, g, out=tmp)
    tmp *= 1.0 - b2
    v *= b2
    v += tmp  # v = b2 v + (1 - b2) g^2
    xp.sqrt(v, out=tmp)
    tmp += eps * sqrt_bc2
    xp.divide(m, tmp, out=tmp)
    tmp *= step_size * sqrt_bc2
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
        self._update_all([(p, group, state)])

    def _update_all(self, items):
        host = []  # the arguments of _adam_step for every host parameter, run below as one threaded pass
        for p, group, state in items:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            xp = backend.get_array_module(p.data)
            if not state:
                state["step"] = 0
                state["exp_avg"] = xp.zeros_like(p.data)
                state["exp_avg_sq"] = xp.zeros_like(p.data)
            state["step"] += 1
            t = state["step"]
            decay = 1.0 - lr * wd if wd and self._decoupled else 1.0
            coupled = wd if wd and not self._decoupled else 0.0
            step_size = lr / (1.0 - b1 ** t)
            sqrt_bc2 = math.sqrt(1.0 - b2 ** t)
            args = (p.data, p.grad, state["exp_avg"], state["exp_avg_sq"], b1, b2, step_size, sqrt_bc2, eps,
                    coupled, decay)
            if xp is np:
                host.append(args)
            else:
                _adam_step(*args)  # the fused kernel, one launch per parameter
        if host:
            split_updates(_adam_step, host, arrays=4, written=(0, 2, 3))


class AdamW(Adam):
    """Adam with decoupled weight decay (default 1e-2, as in PyTorch)."""

    _decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
