"""Check hand-written gradients against central finite differences.

For a layer ``y = f(x; W)`` and a *random* upstream gradient ``g`` (never all
ones: that can make a wrong gradient look right, e.g. BatchNorm's dx is
analytically zero for ``g = 1``), the scalar ``L = sum(g * f(x; W))`` has
gradients ``dL/dx = backward(g)`` and ``dL/dW = W.grad``.  Each entry is
compared with the central difference

    dL/dx_i ~ (L(x + h e_i) - L(x - h e_i)) / (2 h)

whose error is O(h^2).  Everything runs in float64 on the host (in float32
the rounding error of L swamps the difference), on a copy of the layer, so
the original's parameters, buffers and random generators are left as they
were.  The copy takes no pending caches or workspaces (im2col buffers) along
(see ``Module.__deepcopy__``), and the differencing forwards run under
``no_grad``, so they store nothing.  Random layers (Dropout) have their generator rewound before every
forward, so all evaluations see the same mask.

    report = tinynet.gradcheck.gradcheck(tinynet.nn.Conv2d(3, 4, 3, stride=2), x)
    print(report)            # max relative error per input and parameter
    report.assert_ok()

A pass means ``allclose(analytic, numeric, rtol, atol)`` for every checked
entry (Chainer's criterion).  The report also gives, per tensor, the largest
absolute error and the relative error ``||a - n|| / max(||a||, ||n||)`` over
the checked entries (a norm, so that entries near zero do not dominate).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from . import backend
from .nn.module import no_grad

__all__ = ["gradcheck", "numerical_gradient", "GradcheckReport", "GradcheckError"]


class GradcheckError(AssertionError):
    pass


@dataclass
class TensorResult:
    name: str
    checked: int
    total: int
    max_abs_error: float
    rel_error: float
    ok: bool


@dataclass
class GradcheckReport:
    layer: str
    results: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def max_rel_error(self) -> float:
        return max((r.rel_error for r in self.results), default=0.0)

    def __str__(self):
        lines = [f"gradcheck {self.layer}: {'OK' if self.ok else 'FAILED'}"]
        for r in self.results:
            lines.append(f"  {r.name:<28} {r.checked:>6}/{r.total:<6} entries  max abs err {r.max_abs_error:.2e}"
                         f"  rel err {r.rel_error:.2e}  {'ok' if r.ok else 'MISMATCH'}")
        return "\n".join(lines)

    def assert_ok(self) -> "GradcheckReport":
        if not self.ok:
            raise GradcheckError(str(self))
        return self


def numerical_gradient(f, x, indices, eps=1e-6):
    """Central differences of scalar ``f()`` with respect to ``x.flat[i]`` for i in ``indices`` (x changed in place and restored)."""
    flat = x.reshape(-1)
    if not np.shares_memory(flat, x):
        raise ValueError("numerical_gradient needs a contiguous array")
    grad = np.zeros(len(indices))
    for k, i in enumerate(indices):
        old = flat[i]
        flat[i] = old + eps
        f_plus = f()
        flat[i] = old - eps
        f_minus = f()
        flat[i] = old
        grad[k] = (f_plus - f_minus) / (2 * eps)
    return grad


def _rng_states(module):
    return [(m, copy.deepcopy(m.rng.bit_generator.state)) for m in module.modules()
            if isinstance(getattr(m, "rng", None), np.random.Generator)]


def _restore(states):
    for m, state in states:
        m.rng.bit_generator.state = copy.deepcopy(state)


def _choose(total, max_checks, rng):
    if max_checks is None or total <= max_checks:
        return np.arange(total)
    return np.sort(rng.choice(total, size=max_checks, replace=False))


def _compare(name, analytic, numeric, total, rtol, atol):
    err = np.abs(analytic - numeric)
    scale = max(np.linalg.norm(analytic), np.linalg.norm(numeric), 1e-300)
    return TensorResult(name, len(numeric), total, float(err.max(initial=0.0)),
                        float(np.linalg.norm(analytic - numeric) / scale),
                        bool(np.allclose(analytic, numeric, rtol=rtol, atol=atol)))


def gradcheck(layer, x, target=None, eps=1e-6, rtol=1e-4, atol=1e-5, max_checks=400, seed=0,
              check_params=True) -> GradcheckReport:
    """Compare ``layer``'s backward with central differences.

    Parameters
    ----------
    layer : a Module (``forward(x)``/``backward(dout)``) or a loss
        (``forward(pred, target)``/``backward()``, when ``target`` is given).
    x : input array (copied to float64 on the host).
    target : the loss target, for losses.
    eps : finite-difference step h.
    rtol, atol : tolerance of ``allclose(analytic, numeric)``.
    max_checks : at most this many randomly chosen entries per tensor are
        differenced (None: all of them).
    seed : seeds the upstream gradient and the choice of entries.
    check_params : also check every parameter's gradient.
    """
    rng = np.random.default_rng(seed)
    layer = copy.deepcopy(layer)
    layer.to(device="cpu", dtype=np.float64)
    x = np.array(backend.to_numpy(x), dtype=np.float64, copy=True)
    is_loss = target is not None
    if is_loss:
        target = backend.to_numpy(target)
    rng_states = _rng_states(layer)  # Dropout: every forward must draw the same mask

    def run():
        _restore(rng_states)
        x_in = x.copy()  # a layer working in place (ReLU(inplace=True)) must not disturb the differences
        return layer.forward(x_in, target) if is_loss else layer.forward(x_in)

    y = run()
    g = rng.standard_normal(np.shape(y))  # random upstream gradient, never all ones
    if is_loss:
        g = float(g)

    def objective():
        with no_grad():  # the differencing forwards keep no cache
            return float(np.sum(g * run()))

    layer.zero_grad()
    dx = layer.backward(g)
    analytic = {"input": np.asarray(dx, dtype=np.float64).reshape(-1)}
    params = list(layer.named_parameters()) if check_params else []
    for name, p in params:
        if p.grad is None:
            raise GradcheckError(f"gradcheck {type(layer).__name__}: backward left no gradient in {name}")
        analytic[name] = np.asarray(p.grad, dtype=np.float64).reshape(-1).copy()

    report = GradcheckReport(layer._describe() if hasattr(layer, "_describe") else type(layer).__name__)
    idx = _choose(x.size, max_checks, rng)
    numeric = numerical_gradient(objective, x, idx, eps)
    report.results.append(_compare("input", analytic["input"][idx], numeric, x.size, rtol, atol))
    for name, p in params:
        data = p.data
        if not data.flags.c_contiguous:
            p.data = data = np.ascontiguousarray(data)
        idx = _choose(data.size, max_checks, rng)
        numeric = numerical_gradient(objective, data, idx, eps)
        report.results.append(_compare(name, analytic[name][idx], numeric, data.size, rtol, atol))
    return report
