"""Module, Parameter and the containers every layer builds on.

There is no autograd.  A layer is an object with two methods:

* ``forward(x) -> y`` computes the output and, while gradients are enabled,
  keeps in ``self`` exactly what its backward will need (its *cache*);
* ``backward(dy) -> dx`` receives ``dL/dy``, adds ``dL/dW`` into each
  parameter's ``.grad`` and returns ``dL/dx``.

A network runs its layers' forwards in order and their backwards in reverse
order (the chain rule, written out by hand).

Caches are per call, and calls belong to *passes*.  Every forward run with
gradients enabled pushes its cache onto the layer's stack; every backward pops
the newest one.  A layer called twice in one forward (weight sharing:
``lin(x1) + lin(x2)``) keeps two caches, and the two backwards undo the calls
in reverse order, as autograd would; their parameter gradients add up.
``backward`` drops the cache it consumed, so memory held for the backward pass
is released as the pass proceeds; under :func:`no_grad` nothing is stored.

PyTorch frees a graph when nobody holds its output any more; without a graph,
tinynet bounds the caches by counting *passes*.  A pass is one call of an
outermost module (one your code calls, not one called from another module's
forward) with everything that call runs.  A layer keeps the caches of its
last :attr:`Module.max_pending_passes` passes that no backward has consumed
(8), and of its last pass only when the module that started the pass is in
eval mode; a new pass drops the oldest pass's caches.  So the habits PyTorch
users bring work with bounded memory:

* a validation loss computed under ``model.eval()`` without ``no_grad``
  holds one forward's caches, not one per batch;
* a finite-difference check that calls a layer or a loss again and again
  keeps at most 8 of those calls;
* a backward in eval mode (saliency maps, Grad-CAM) consumes the newest pass,
  and weight sharing inside a model's forward is one pass however often the
  layer runs.

A backward that needs a dropped cache raises an error that says so (two
top-level calls backpropagated in eval mode, or more than 8 in training mode:
call them from one module's forward, or raise ``max_pending_passes``), and so
does a backward called more often than forward.  Call modules, not their
``forward`` method: a ``forward`` called directly is a pass for each layer it
runs.  :meth:`Module.release_saved` drops every pending cache at once.

``backward`` never writes into its ``dy`` argument: a gradient that fans out
(the two branches of a residual block) is read by several layers.

State-dict keys follow PyTorch's names (``weight``, ``bias``,
``running_mean``, ``running_var``, ``num_batches_tracked``, nested as
``layer1.0.conv1.weight``), so weights move between the two without a mapping.
"""
from __future__ import annotations

import itertools
import threading
import weakref
from collections import OrderedDict
from typing import Iterator, NamedTuple

import numpy as np

from .. import backend
from . import fast

__all__ = [
    "Parameter",
    "Module",
    "Sequential",
    "Identity",
    "no_grad",
    "enable_grad",
    "is_grad_enabled",
    "LoadResult",
    "StateDictError",
    "keep_output",
    "check_overwritable",
]

# ---------------------------------------------------------------------------
# Gradient mode
# ---------------------------------------------------------------------------
_mode = threading.local()


def is_grad_enabled() -> bool:
    """Whether forwards keep what their backward needs (thread-local, default True)."""
    return getattr(_mode, "enabled", True)


class _GradMode:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        self.previous = is_grad_enabled()
        _mode.enabled = self.enabled

    def __exit__(self, *exc):
        _mode.enabled = self.previous
        return False


def no_grad() -> _GradMode:
    """Context manager: forwards inside keep no cache (evaluation, inference)."""
    return _GradMode(False)


def enable_grad() -> _GradMode:
    return _GradMode(True)


# ---------------------------------------------------------------------------
# Forward passes: which caches belong together
# ---------------------------------------------------------------------------
_calls = threading.local()  # depth: how many Module calls are running; number, evaluating: the current pass's
_pass_numbers = itertools.count(1)


def _begin_call(module) -> int:
    """Enter a module call; an outermost call starts a new pass.  Returns the depth to restore."""
    depth = getattr(_calls, "depth", 0)
    if depth == 0:
        _calls.number = next(_pass_numbers)
        _calls.evaluating = not module.training
    _calls.depth = depth + 1
    return depth


def _current_pass(module) -> tuple:
    """(number, evaluating) of the pass a cache pushed now belongs to.

    A ``forward`` called directly, outside any module call, is a pass of its own.
    """
    if getattr(_calls, "depth", 0) > 0:
        return _calls.number, _calls.evaluating
    return next(_pass_numbers), not module.training


# ---------------------------------------------------------------------------
# Outputs kept for a backward: an in-place op must not overwrite them
# ---------------------------------------------------------------------------
_kept_outputs: dict = {}  # id(array) -> (weak reference to it, the layer that keeps it)


def keep_output(layer, y) -> None:
    """Record that ``layer``'s backward will read its output ``y`` (Softmax keeps ``y``).

    An in-place layer handed ``y`` then refuses to overwrite it
    (:func:`check_overwritable`) instead of silently corrupting the backward.
    The record goes when ``y`` is freed or the layer's backward has run
    (:func:`release_output`).
    """
    if not is_grad_enabled():
        return  # no backward will come
    key = id(y)
    try:
        ref = weakref.ref(y, lambda _, key=key: _kept_outputs.pop(key, None))
    except TypeError:  # an array type without weak references: not checked (never kept alive by us)
        return
    _kept_outputs[key] = (ref, layer._describe())


def release_output(y) -> None:
    """``y`` is no longer needed by a backward: it may be overwritten."""
    _kept_outputs.pop(id(y), None)


def check_overwritable(layer, x) -> None:
    """Raise if ``x`` is an output that another layer keeps for its backward."""
    entry = _kept_outputs.get(id(x))
    if entry is not None and entry[0]() is x:
        raise RuntimeError(
            f"{layer._describe()}: would write in place over the output of {entry[1]}, which keeps that output "
            f"for its backward; use inplace=False here"
        )


# ---------------------------------------------------------------------------
# Parameter
# ---------------------------------------------------------------------------
class Parameter:
    """A trainable array ``data`` and its gradient ``grad`` (None until a backward)."""

    __slots__ = ("data", "grad")

    def __init__(self, data):
        self.data = data
        self.grad = None

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self):
        return self.data.size

    @property
    def ndim(self):
        return self.data.ndim

    def accumulate_grad(self, g) -> None:
        """``grad += g`` (gradients from several backwards add up, as in PyTorch)."""
        if self.grad is None:
            self.grad = g
        else:
            self.grad += g

    def __repr__(self):
        return f"Parameter(shape={tuple(self.data.shape)}, dtype={self.data.dtype}, device={backend.device_of(self.data)})"


class LoadResult(NamedTuple):
    """What ``load_state_dict`` did not load."""

    missing_keys: list
    unexpected_keys: list
    mismatched_keys: list  # (key, expected shape, received shape)


class StateDictError(KeyError):
    """A state dict that does not fit the module (``strict=True``)."""

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0])


# ---------------------------------------------------------------------------
# Module
# ---------------------------------------------------------------------------
class Module:
    """Base class of every layer and model.

    Sub-classes assign ``Parameter``s and sub-``Module``s as attributes; they
    are registered automatically, in assignment order.  Non-trainable state
    saved in the state dict (BatchNorm's running statistics) is registered
    with :meth:`register_buffer`.
    """

    #: Layers that can skip computing dL/dx (Conv2d, Linear) honour this flag;
    #: see :meth:`set_input_grad`.
    input_grad = True

    #: How many passes may wait for their backward (module docstring): a new pass beyond them drops
    #: the oldest pass's caches.  Each pass holds its caches (ResNet18, batch 64, 64x64 px: ~240 MiB), so the
    #: bound is small enough to cap the memory of forwards that never get a backward, and large
    #: enough for weight sharing across top-level calls (a siamese pair, a few unrolled steps).  A
    #: pass started by a module in eval mode keeps one.  Raise it on the class or the instance.
    max_pending_passes = 8

    #: Attributes that live only between a forward and its backward, or are workspaces the
    #: layer refills: never copied by ``copy.deepcopy`` and never part of a state dict.
    _transient = ("_saved",)

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_non_persistent", set())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_path", "")
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_saved", [])  # (pass number, cache) of each call waiting for its backward
        object.__setattr__(self, "_dropped_passes", 0)  # passes dropped since the stack was last empty

    # -- registration -------------------------------------------------------
    def __setattr__(self, name, value):
        params, buffers, modules = self._parameters, self._buffers, self._modules
        if isinstance(value, Parameter):
            buffers.pop(name, None)
            modules.pop(name, None)
            params[name] = value
        elif isinstance(value, Module):
            params.pop(name, None)
            buffers.pop(name, None)
            modules[name] = value
            value._set_path(f"{self._path}.{name}" if self._path else name)
        elif name in buffers:
            buffers[name] = value
        elif name in params or name in modules:
            if value is not None:
                raise TypeError(
                    f"cannot assign {type(value).__name__} to {name!r} of {self._describe()}: "
                    f"expected a Parameter or Module (or None)"
                )
            params.pop(name, None)
            modules.pop(name, None)
        object.__setattr__(self, name, value)

    def register_buffer(self, name: str, value, persistent: bool = True) -> None:
        """Register non-trainable state; :meth:`to` moves and casts it like a parameter.

        ``persistent=False`` keeps it out of the state dict (BatchNorm's constant
        gamma and beta without ``affine``), as PyTorch's argument of that name.
        """
        self._buffers[name] = value
        if persistent:
            self._non_persistent.discard(name)
        else:
            self._non_persistent.add(name)
        object.__setattr__(self, name, value)

    def _set_path(self, path: str) -> None:
        object.__setattr__(self, "_path", path)
        for name, child in self._modules.items():
            child._set_path(f"{path}.{name}")

    def _describe(self) -> str:
        """``Conv2d 'layer1.0.conv1'`` for error messages."""
        cls = type(self).__name__
        return f"{cls} '{self._path}'" if self._path else cls

    # -- running --------------------------------------------------------------
    def forward(self, x):
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def backward(self, dout):
        raise NotImplementedError(f"{type(self).__name__} has no backward()")

    def __call__(self, *args, **kwargs):
        depth = _begin_call(self)
        try:
            return self.forward(*args, **kwargs)
        finally:
            _calls.depth = depth

    def _save_for_backward(self, *values) -> None:
        """Push this call's cache (what its backward needs); nothing under :func:`no_grad`."""
        if not is_grad_enabled():
            return
        number, evaluating = _current_pass(self)
        saved = self._saved
        if not saved:
            object.__setattr__(self, "_dropped_passes", 0)
        elif saved[-1][0] != number:  # this layer's first call in a new pass: make room for it
            self._keep_newest_passes((1 if evaluating else self.max_pending_passes) - 1)
        saved.append((number, values))

    def _keep_newest_passes(self, count: int) -> None:
        """Drop the caches of all but this layer's ``count`` newest pending passes."""
        saved = self._saved  # pass numbers only grow, so the stack holds the oldest passes first
        numbers = sorted({number for number, _ in saved})
        dropped = numbers[:max(len(numbers) - count, 0)]
        if not dropped:
            return
        cut = sum(1 for number, _ in saved if number <= dropped[-1])
        for _, values in saved[:cut]:
            self._discard(values)
        del saved[:cut]
        object.__setattr__(self, "_dropped_passes", self._dropped_passes + len(dropped))

    def _saved_for_backward(self):
        """Pop the newest call's cache for backward, with a clear error if there is none."""
        if not self._saved:
            if self._dropped_passes:
                raise RuntimeError(
                    f"{self._describe()}: the cache this backward needs was dropped: newer forward passes ran "
                    f"without a backward (a layer keeps its last {self.max_pending_passes} passes, its last one "
                    f"when the pass starts in eval mode); backpropagate sooner, call the shared layer from one "
                    f"module's forward, or raise max_pending_passes"
                )
            raise RuntimeError(
                f"{self._describe()}: backward() called before forward(), or more often than forward "
                f"(twice for one forward), or after a forward run under tinynet.no_grad()"
            )
        return self._saved.pop()[1]

    @property
    def pending_calls(self) -> int:
        """How many forwards of this module (not its children) still wait for their backward."""
        return len(self._saved)

    def release_saved(self) -> "Module":
        """Drop every cache this module and its children keep for a backward that will not come.

        For instance after a forward whose loss is not finite, when the step is skipped.
        """
        for m in self.modules():
            m._drop_saved()
        return self

    def _drop_saved(self) -> None:
        """Forget this module's pending caches."""
        for _, values in self._saved:
            self._discard(values)
        self._saved.clear()
        object.__setattr__(self, "_dropped_passes", 0)

    def _discard(self, values) -> None:
        """A cache no backward will read (a layer owning workspaces takes them back here)."""

    def __deepcopy__(self, memo):
        """A deep copy without the transient state (pending caches, workspaces): a new module starts empty."""
        import copy

        new = object.__new__(type(self))
        memo[id(self)] = new
        transient = set(type(self)._transient)
        for key, value in self.__dict__.items():
            if key in transient:
                value = [] if isinstance(value, list) else None
            else:
                value = copy.deepcopy(value, memo)
            object.__setattr__(new, key, value)
        return new

    def set_input_grad(self, flag: bool) -> "Module":
        """Say whether backward must return dL/d(input).

        Training a classifier never needs the gradient with respect to the
        images; ``model.set_input_grad(False)`` lets the first layer skip that
        work (for the ResNet stem, a col2im of 38 MB per step) and makes
        ``model.backward`` return None.  Containers pass the flag to the layer
        that first touches their input.
        """
        object.__setattr__(self, "input_grad", bool(flag))
        return self

    # -- traversal ----------------------------------------------------------------
    def named_children(self) -> Iterator[tuple]:
        yield from self._modules.items()

    def children(self):
        for _, m in self.named_children():
            yield m

    def named_modules(self, prefix: str = ""):
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        for _, m in self.named_modules():
            yield m

    def _named(self, registry: str, prefix: str, recurse: bool):
        for name, value in getattr(self, registry).items():
            yield (f"{prefix}.{name}" if prefix else name), value
        if recurse:
            for cname, child in self._modules.items():
                yield from child._named(registry, f"{prefix}.{cname}" if prefix else cname, True)

    def named_parameters(self, prefix: str = "", recurse: bool = True):
        yield from self._named("_parameters", prefix, recurse)

    def parameters(self, recurse: bool = True):
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix: str = "", recurse: bool = True):
        yield from self._named("_buffers", prefix, recurse)

    def buffers(self, recurse: bool = True):
        for _, b in self.named_buffers(recurse=recurse):
            yield b

    # -- modes ------------------------------------------------------------------
    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    # -- devices and dtypes -----------------------------------------------------------
    def to(self, device=None, dtype=None) -> "Module":
        """Move every parameter, gradient and buffer to ``device`` and/or cast floats to ``dtype``."""
        if device is not None:
            device = backend.check_device(device)

        def convert(a):
            if a is None:
                return None
            if device is not None:
                a = backend.to_device(a, device)
            if dtype is not None and np.issubdtype(a.dtype, np.floating):
                a = a.astype(dtype, copy=False)
            return a

        for m in self.modules():
            for p in m._parameters.values():
                p.data = convert(p.data)
                p.grad = convert(p.grad)
            for name, b in list(m._buffers.items()):
                setattr(m, name, convert(b))
        return self

    def double(self) -> "Module":
        return self.to(dtype=np.float64)

    def float(self) -> "Module":
        return self.to(dtype=np.float32)

    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda"``: where the first parameter (or buffer) lives."""
        for a in (p.data for p in self.parameters()):
            return backend.device_of(a)
        for b in self.buffers():
            return backend.device_of(b)
        return "cpu"

    def _check_device(self, x, reference) -> None:
        backend.check_same_device(x, reference, self._describe())

    # -- state dicts --------------------------------------------------------------
    def state_dict(self) -> "OrderedDict[str, object]":
        """Parameters then buffers, module by module, with PyTorch's key names.

        The values are the module's own arrays (not copies); convert with
        ``tinynet.backend.to_numpy`` before saving from the GPU.
        """
        out = OrderedDict()
        for prefix, m in self.named_modules():
            dot = f"{prefix}." if prefix else ""
            for name, p in m._parameters.items():
                out[dot + name] = p.data
            for name, b in m._buffers.items():
                if name not in m._non_persistent:
                    out[dot + name] = b
        return out

    def load_state_dict(self, state_dict, strict: bool = True) -> LoadResult:
        """Copy arrays from ``state_dict`` into this module.

        Every problem is collected before anything is raised: with
        ``strict=True`` a dict with missing, unexpected or mis-shaped keys
        raises :class:`StateDictError` listing all of them and loads nothing;
        with ``strict=False`` whatever fits is loaded and the rest is returned.
        Values may be NumPy or CuPy arrays (or anything ``np.asarray``
        accepts); each is converted to the device and dtype of the array it
        replaces.
        """
        targets = {}  # key -> (module, name, kind)
        for prefix, m in self.named_modules():
            dot = f"{prefix}." if prefix else ""
            for name in m._parameters:
                targets[dot + name] = (m, name, "param")
            for name in m._buffers:
                if name not in m._non_persistent:
                    targets[dot + name] = (m, name, "buffer")

        missing = [k for k in targets if k not in state_dict]
        unexpected = [k for k in state_dict if k not in targets]
        mismatched, fits = [], []
        for key, (m, name, kind) in targets.items():
            if key not in state_dict:
                continue
            value = state_dict[key]
            current = m._parameters[name].data if kind == "param" else m._buffers[name]
            shape = tuple(getattr(value, "shape", np.shape(value)))
            if shape != tuple(current.shape):
                mismatched.append((key, tuple(current.shape), shape))
            else:
                fits.append((key, m, name, kind, value, current))

        if strict and (missing or unexpected or mismatched):
            lines = [f"load_state_dict into {type(self).__name__} failed:"]
            if missing:
                lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
            if unexpected:
                lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
            for key, want, got in mismatched:
                lines.append(f"  shape mismatch for {key}: expected {want}, received {got}")
            lines.append("  (pass strict=False to load the keys that fit)")
            raise StateDictError("\n".join(lines))

        converted = []  # every value first, so that one that cannot be converted leaves the module untouched
        for key, m, name, kind, value, current in fits:
            try:
                # A copy on every path: ``asarray`` would return the source itself when it is already
                # on the device with the right dtype, and two models would then share their weights.
                new = backend.copy_to_device_of(value, current, dtype=current.dtype)
            except (TypeError, ValueError) as error:
                raise ValueError(f"load_state_dict into {type(self).__name__}: {key!r} holds "
                                 f"{getattr(value, 'dtype', type(value).__name__)} values that cannot become "
                                 f"{current.dtype} ({error}); nothing was loaded") from None
            converted.append((m, name, kind, new))
        for m, name, kind, new in converted:
            if kind == "param":
                m._parameters[name].data = new
            else:
                setattr(m, name, new)
        return LoadResult(missing, unexpected, mismatched)

    # -- printing ---------------------------------------------------------------
    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        if self._modules:
            for name, child in self._modules.items():
                child_repr = repr(child).replace("\n", "\n  ")
                lines.append(f"  ({name}): {child_repr}")
            return "\n".join(lines) + "\n)"
        return lines[0] + ")"


class Sequential(Module):
    """Layers applied in order; backward runs them in reverse."""

    def __init__(self, *layers: Module):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Module):
                raise TypeError(f"Sequential: item {i} is a {type(layer).__name__}, not a Module")
            setattr(self, str(i), layer)

    def append(self, layer: Module) -> "Sequential":
        index = len(self._modules)
        while str(index) in self._modules:  # a slice keeps its layers' original keys
            index += 1
        setattr(self, str(index), layer)
        return self

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, index):
        if isinstance(index, slice):
            # A view of some of the layers, under their own keys (as PyTorch's slices): the layers still
            # belong to this Sequential, and keep their paths (error messages name 'layer1.0.conv1').
            part = Sequential()
            for key, layer in list(self._modules.items())[index]:
                part._modules[key] = layer
                object.__setattr__(part, key, layer)
            return part
        return list(self._modules.values())[index]

    def _run_order(self):
        """The layers in the order :meth:`forward` runs them (:meth:`backward`: reversed).

        On the fast path a ``ReLU`` directly followed by a ``MaxPool2d`` runs after the pool: the
        two commute, outputs and gradients alike, and the ReLU then touches 4-16x fewer values
        (:func:`tinynet.nn.fast.epilogues.reorder_relu_maxpool`).  The layers keep their keys.
        """
        layers = list(self._modules.values())
        if fast.enabled():
            from .fast.epilogues import reorder_relu_maxpool  # the fast path lives above this module
            return reorder_relu_maxpool(layers)
        return layers

    def forward(self, x):
        order = self._run_order()
        for layer in order:
            x = layer(x)
        self._save_for_backward(order)  # the backward undoes this order, even if the switch moves
        return x

    def backward(self, dout):
        # (a subclass whose own forward saved no order runs the layers as _run_order lists them)
        (order,) = self._saved_for_backward() if self._saved else (self._run_order(),)
        for layer in reversed(order):
            dout = layer.backward(dout)
        return dout

    def set_input_grad(self, flag: bool) -> "Sequential":
        object.__setattr__(self, "input_grad", bool(flag))
        layers = list(self._modules.values())
        if layers:
            layers[0].set_input_grad(flag)
        return self


class Identity(Module):
    """y = x."""

    def forward(self, x):
        return x

    def backward(self, dout):
        return dout
