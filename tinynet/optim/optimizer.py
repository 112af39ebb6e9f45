"""Optimizer base class: parameter groups, per-parameter state, state dicts.

As in PyTorch, an optimizer takes an iterable of :class:`~tinynet.nn.Parameter`
(or of dicts ``{"params": [...], "lr": ...}`` for groups with their own
settings).  ``step()`` updates every parameter whose ``.grad`` is set;
``zero_grad()`` clears the gradients.  Learning-rate schedules change
``group["lr"]``.

State follows its parameter.  Moment buffers are made on the parameter's
device, in its dtype, at its first step; when the parameter moved since
(``model.to("cuda")`` or ``model.double()`` after some steps, or after
``load_state_dict`` of a checkpoint), the next ``step()`` moves its state
along (one copy, then never again).  State of another *shape* than its
parameter cannot be meant for it: that is an error naming the parameter.
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..nn.module import Module, Parameter

__all__ = ["Optimizer"]


def _check_number(owner: str, name: str, value, low=0.0, high=None, high_open=False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: {name} must be a number, got {value!r}") from None
    if not math.isfinite(value) or value < low or (high is not None and (value >= high if high_open else value > high)):
        bound = f"[{low}, {high})" if high_open else (f"[{low}, {high}]" if high is not None else f">= {low}")
        raise ValueError(f"{owner}: {name} must be a finite number {bound}, got {value}")
    return value


class Optimizer:
    defaults: dict = {}

    def __init__(self, params, defaults: dict):
        name = type(self).__name__
        if isinstance(params, (Parameter, Module)):
            what = "a single Parameter" if isinstance(params, Parameter) else f"the {type(params).__name__} itself"
            raise TypeError(f"{name}: params must be an iterable of Parameters (e.g. model.parameters()), "
                            f"got {what}")
        groups = list(params)
        if not groups:
            raise ValueError(f"{name}: got an empty parameter list; pass model.parameters() of a model "
                             f"that has parameters")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.defaults = dict(defaults)
        self.param_groups = []
        seen = set()
        for i, group in enumerate(groups):
            group = dict(group)
            params_i = list(group["params"])
            for p in params_i:
                if not isinstance(p, Parameter):
                    raise TypeError(f"{name}: group {i} holds a {type(p).__name__}, expected Parameters")
                if id(p) in seen:
                    raise ValueError(f"{name}: a parameter appears in more than one group")
                seen.add(id(p))
            group["params"] = params_i
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            self._validate_group(group)
            self.param_groups.append(group)
        if not seen:
            raise ValueError(f"{name}: got an empty parameter list")
        self.state = {}  # id(param) -> dict

    def _validate_group(self, group: dict) -> None:
        name = type(self).__name__
        group["lr"] = _check_number(name, "lr", group["lr"])
        group["weight_decay"] = _check_number(name, "weight_decay", group.get("weight_decay", 0.0))

    def _params(self):
        for group in self.param_groups:
            for p in group["params"]:
                yield group, p

    def zero_grad(self) -> None:
        for _, p in self._params():
            p.grad = None

    def step(self) -> None:
        """Update every parameter whose ``.grad`` is set.

        Two phases: first every check (the learning rates, the devices, the gradients' and the
        state's shapes),
        then the updates (:meth:`_update_all`).  A step that raises therefore changes no
        parameter and no state: a half-done step (some parameters updated, their step counts
        advanced, the others not) would be silently wrong state that a retry cannot repair.
        """
        work = []
        for i, group in enumerate(self.param_groups):
            # A schedule, or code that sets group["lr"], can make it what the constructor refuses.
            _check_number(f"{type(self).__name__}.step, group {i}", "lr", group["lr"])
            for j, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if backend.is_cupy_array(p.grad) != backend.is_cupy_array(p.data):
                    raise RuntimeError(f"{type(self).__name__}: the gradient of group {i}, parameter {j} "
                                       f"(shape {tuple(p.shape)}) is on {backend.device_of(p.grad)} but the "
                                       f"parameter on {backend.device_of(p.data)}")
                if tuple(getattr(p.grad, "shape", ())) != tuple(p.shape):
                    # NumPy would broadcast some of these silently, and the threaded updates slice
                    # the gradient by the parameter's rows
                    raise ValueError(f"{type(self).__name__}: the gradient of group {i}, parameter {j} has "
                                     f"shape {tuple(getattr(p.grad, 'shape', ()))}, the parameter "
                                     f"{tuple(p.shape)}")
                state = self.state.get(id(p))
                if state:
                    self._check_state_shapes(state, p, f"group {i}, parameter {j}")
                work.append((group, p))
        items = []
        for group, p in work:
            state = self.state.setdefault(id(p), {})
            if state:
                self._follow_parameter(state, p)
            items.append((p, group, state))
        self._update_all(items)

    def _update_all(self, items) -> None:
        """Apply the update rule to every ``(parameter, group, state)`` of this step, in order.

        The plain version: one parameter after the other.  Adam overrides it to run the
        host parameters' updates as one threaded pass (see :mod:`tinynet.optim.adam`).
        """
        for p, group, state in items:
            self._update(p, group, state)

    def _check_state_shapes(self, state: dict, p, where: str) -> None:
        for key, value in state.items():
            if getattr(value, "ndim", 0) != 0 and tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"{type(self).__name__}: {where} has shape {tuple(p.shape)} but its state "
                                 f"{key!r} has shape {tuple(value.shape)}: the state was made for another "
                                 f"parameter (was the model rebuilt after the optimizer?)")

    def _follow_parameter(self, state: dict, p) -> None:
        """Move ``state``'s arrays to ``p``'s device and dtype if ``p`` moved since they were made."""
        for key, value in state.items():
            if getattr(value, "ndim", 0) == 0:
                continue  # the step count, or another plain number
            if value.dtype != p.dtype or backend.is_cupy_array(value) != backend.is_cupy_array(p.data):
                state[key] = backend.copy_to_device_of(value, p.data, dtype=p.dtype)

    def _update(self, p, group, state) -> None:
        raise NotImplementedError

    # -- state dicts ---------------------------------------------------------------
    def state_dict(self) -> dict:
        """``{"state": {index: {...}}, "param_groups": [...]}`` with parameters as indices, as PyTorch."""
        index = {}
        groups = []
        for group in self.param_groups:
            g = {k: v for k, v in group.items() if k != "params"}
            g["params"] = []
            for p in group["params"]:
                index.setdefault(id(p), len(index))
                g["params"].append(index[id(p)])
            groups.append(g)
        state = {}
        for _, p in self._params():
            if id(p) in self.state:
                state[index[id(p)]] = dict(self.state[id(p)])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        name = type(self).__name__
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ValueError(f"{name}.load_state_dict: expected {len(self.param_groups)} parameter group(s), "
                             f"got {len(groups) if isinstance(groups, list) else type(groups).__name__}")
        params = []
        for mine, theirs in zip(self.param_groups, groups):
            if len(theirs["params"]) != len(mine["params"]):
                raise ValueError(f"{name}.load_state_dict: a group has {len(theirs['params'])} parameters in the "
                                 f"saved state but {len(mine['params'])} here")
            params.extend(zip(theirs["params"], mine["params"]))
        new_state = {}
        saved = state_dict.get("state", {})
        for idx, p in params:
            entry = saved.get(idx, saved.get(str(idx)))
            if entry is None:
                continue
            converted = {}
            for key, value in entry.items():
                if hasattr(value, "shape") and getattr(value, "ndim", 0) > 0:
                    if tuple(value.shape) != tuple(p.shape):
                        raise ValueError(f"{name}.load_state_dict: state '{key}' of parameter {idx} has shape "
                                         f"{tuple(value.shape)}, expected {tuple(p.shape)}")
                    xp = backend.get_array_module(p.data)
                    value = xp.array(backend.to_numpy(value) if xp is np else value, dtype=p.dtype)
                converted[key] = value
            new_state[id(p)] = converted
        for mine, theirs in zip(self.param_groups, groups):
            for key, value in theirs.items():
                if key != "params":
                    mine[key] = value
            self._validate_group(mine)
        self.state = new_state

    def __repr__(self):
        settings = ", ".join(f"{k}={v}" for k, v in self.param_groups[0].items() if k != "params")
        return f"{type(self).__name__}({settings})"


# -- the update of many parameters as one threaded pass -----------------------------
#: Rows of a parameter are updated in blocks of about this many elements, so that a block's
#: arrays (parameter, gradient, state, scratch: 5 x 1 MB for Adam) stay in the caches.  Adam over
#: ResNet18's 11.2 M parameters, 2 threads, one process (2026-12-07): blocks of 64K elements
#: 21.4 ms, 128K 15.0, 256K 13.8, 1M 14.3; the smaller blocks' NumPy calls cost more than the
#: L2 cache saved (the 32 MB L3 holds a 256K block's arrays of both threads).
CHUNK_ELEMENTS = 1 << 18


def _rows_of(n: int, offset: int, rows: int, start: int, stop: int) -> tuple:
    """Rows ``[a, b)`` of an array with ``rows`` rows and ``n`` elements that lies at ``offset`` in a
    concatenation, for the piece ``[start, stop)`` of that concatenation.

    A row belongs to the piece that holds its first element, so the pieces of a
    :func:`tinynet.backend.parallel_for` split every array into disjoint rows that cover it.
    """
    per_row = n // rows

    def row(x):  # the first row that starts at or after element x of the concatenation
        return min(rows, max(0, -((offset - x) // per_row)))

    return row(start), row(stop)


def _memory_owner(a):
    """The object that owns ``a``'s memory: two arrays with different owners cannot overlap."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a if a.base is None else a.base


def _may_overlap(steps, arrays: int, written) -> bool:
    """Whether an array that one update writes shares its memory's owner with any array of another.

    Two threads must never write the same memory, nor one write what the other reads.  Each
    ``Parameter`` and each state buffer normally owns its memory; a parameter whose ``data``
    is a view of another's (or of one flat buffer), a gradient that is another parameter's
    array, or state set by hand to another's array, makes the whole step run on one thread,
    in order, as the plain loop does.  Arrays that are only read (gradients) may share an
    owner with each other.  Cost: ~50 us for ResNet18's 62 parameters.
    """
    owners = {}
    for k, args in enumerate(steps):
        for i in written:
            if args[i] is not None and owners.setdefault(id(_memory_owner(args[i])), k) != k:
                return True
    return any(args[i] is not None and owners.get(id(_memory_owner(args[i])), k) != k
               for k, args in enumerate(steps) for i in range(arrays) if i not in written)


def split_updates(kernel, steps, arrays: int, written) -> None:
    """Run ``kernel(*args)`` for every ``args`` of ``steps`` (host arrays), as one threaded pass.

    ``args[:arrays]`` are arrays of the parameter's shape (or None), the rest scalars;
    ``written`` are the indices of those the kernel writes.  The parameters are laid end to
    end (``offsets``) and :func:`tinynet.backend.parallel_for` cuts that concatenation into
    one piece per thread, balanced by element count; each thread runs the kernel on the rows
    (axis 0) of every parameter that fall in its piece, in blocks of :data:`CHUNK_ELEMENTS`.
    Rows of one array never go to two threads, and the slices ``a[r:e]`` are views of the
    caller's arrays, so every update lands in place.  ResNet18's 62 parameters thus take one
    ``parallel_for``, not 62 (a thread's start costs ~20-50 us).  The kernel is element-wise:
    its result on a slice is its result on the whole array, sliced.
    """
    sizes = [args[0].size for args in steps]
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    total = offsets[-1]

    def body(start, stop):
        for k, args in enumerate(steps):
            lo, hi = offsets[k], offsets[k + 1]
            if hi <= start or lo >= stop or sizes[k] == 0:
                continue
            p = args[0]
            if p.ndim == 0:  # a scalar parameter: whole, in the piece that holds it
                if start <= lo:
                    kernel(*args)
                continue
            a, b = _rows_of(sizes[k], lo, p.shape[0], start, stop)
            block = max(1, CHUNK_ELEMENTS * p.shape[0] // sizes[k])  # rows per block
            for r in range(a, b, block):
                e = min(b, r + block)
                kernel(*(x if x is None else x[r:e] for x in args[:arrays]), *args[arrays:])

    if _may_overlap(steps, arrays, written):
        body(0, total)  # one thread, in order: what the plain loop over parameters does
    else:
        backend.parallel_for(total, body, total)
