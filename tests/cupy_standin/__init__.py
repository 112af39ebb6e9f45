"""A strict CuPy stand-in for running tinynet's GPU code path on a machine without a GPU.

tinynet's GPU path is its NumPy code run on ``cupy`` arrays, plus a few fused
``ElementwiseKernel``s.  CI has no GPU, so this package plays ``cupy``: it is
installed as the ``cupy`` module by ``tests/cupy_standin/pytest_plugin.py`` (for the tests in
``tests/gpu``) or, in a subprocess or under ``mpiexec``, by putting
``tests/cupy_standin/shim`` on ``PYTHONPATH`` with ``TINYNET_CUPY_STANDIN=1``
(see :func:`standin_env`).  "Device memory" is host memory held by NumPy arrays.  About 1,650
lines of Python (this file, ``cuda.py``, ``_kernel.py``, the plugin and the shim), plus
``cupy14_api.json`` (CuPy's names and signatures) and ``recorded_calls.json`` (for the replay).

Strict where CuPy 14 is strict, so code that passes here does not fail on a GPU for these reasons:

* :class:`ndarray` is not a NumPy subclass; ``numpy.asarray(a)`` / ``__array__`` raise TypeError
  ("Implicit conversion to a NumPy array is not allowed...") as CuPy does;
* the module has only the names ``cupy`` 14.2 exports, ndarray only CuPy's methods, each with
  CuPy's keyword signature (both from ``cupy14_api.json``, generated from CuPy's source by
  ``generate_api.py``): a keyword NumPy accepts and CuPy does not raises TypeError; a NumPy
  function with no CuPy twin, called on a CuPy array, raises TypeError (NumPy's dispatch);
* ufuncs and functions refuse ``numpy.ndarray`` operands (and ufuncs refuse lists), so do the
  operators (``cupy_array + numpy_array``); assigning a non-scalar NumPy array with basic indices
  raises ValueError (CuPy hands it to ``fill``), with array indices it is copied over as in CuPy;
* reductions and integer indexing return 0-d arrays, never host scalars;
* ``ElementwiseKernel`` binds its arguments by CuPy's rules (argument count, type placeholders
  resolved from arrays only, exact dtypes for typed parameters, broadcasting of non-``raw``
  arrays, outputs given or allocated, ``size=``) and runs the real kernel body, compiled by g++
  as C++ (:mod:`._kernel`) and cached on disk;
* ``cuda``: N fake devices (``TINYNET_CUPY_STANDIN_DEVICES``, default 1), ``Device``,
  ``runtime`` (with a fake GPU name, CUDA 13.0 driver and runtime versions), ``Stream``,
  ``Event``, ``MemoryPool``; ``cuda.nccl`` runs collectives over MPI, and as on a GPU a
  collective is only queued by its call: it runs (and waits for the other ranks) at the host's
  next synchronisation or before the next operation, so a rank left waiting by another waits
  where it would on a GPU.

Counters (:data:`stats`): host-device synchronisations (``float()``, ``int()``, ``bool()``,
``.item()``, ``.get()``, ``.tolist()``, ``asnumpy``, ``repr``, stream/event/device
``synchronize`` and ``done``) each with the tinynet ``file:line`` that caused it; live and peak
"device" bytes (buffers held by stand-in arrays, freed when the last view dies); "kernel launches"
(every ufunc, reduction, copy, BLAS call and ElementwiseKernel: an estimate of CuPy's count,
which may launch 0 or 2 kernels where this counts 1); every entry point called, with its
dtypes, ndims and keywords (:func:`entry_points`); and, when asked (:func:`record_calls`,
``TINYNET_CUPY_STANDIN_CALLS``), one example of each call with its outcome, which
``benchmarks/conformance_replay.py`` replays on a real CuPy to find where the two differ.

What it cannot see (a real GPU must): compile errors of the kernels (NVRTC does:
tests/test_kernels_nvrtc.py; g++ accepts C++ that NVRTC may not, and back); CUDA numerics
(cuBLAS, TF32, FMA contraction, ``sqrtf``/``expf`` ulps, summation order of CuPy's reductions:
results here are NumPy's); streams and asynchrony beyond NCCL's queue (every other operation is
done when it returns, so a missing synchronisation between two streams is invisible, and so is a
kernel that hangs); the memory pool and fragmentation (bytes counted are exact array bytes);
speed, and the launch count is an estimate; peer access between devices (every fake device sees
all memory); float16 kernels; NCCL's own failure modes (its collectives here are MPI's, on
one machine); CuPy behaviours where its list of names is right but its semantics differ from
NumPy's in ways not written here (e.g. out-of-range integer indices wrap in CuPy and raise here;
CuPy's type promotion of Python scalars where it differs from NumPy 2's); and any call no test
made (the replay checks only those).
"""
from __future__ import annotations

import builtins as _builtins
import collections
import functools
import inspect
import json
import os
import pathlib
import sys
import threading
import weakref

import numpy

_HERE = str(pathlib.Path(__file__).resolve().parent)
API = json.loads((pathlib.Path(_HERE) / "cupy14_api.json").read_text())
__version__ = "14.2.0+standin"
is_standin = True


# ---------------------------------------------------------------------------------------------
# Counters
# ---------------------------------------------------------------------------------------------
class Stats:
    """What the stand-in saw since :meth:`reset`."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.syncs = []                         #: [(kind, "file:line")], one per host-device synchronisation
        self.launches = 0                       #: kernel launches (estimate, see the module docstring)
        self.launch_names = collections.Counter()
        self.h2d = 0                            #: host-to-device copies
        self.peak_bytes = self.live_bytes = _live[0]

    def sync_sites(self):
        return collections.Counter(where for _, where in self.syncs)


_live = [0]
stats = Stats()
_entry_points: dict = {}


def entry_points():
    """Every CuPy entry point called in this process: ``[{name, args, kwargs}]`` (args as "float32/2d" etc)."""
    return [dict(name=k[0], args=list(k[1]), kwargs=list(k[2])) for k in _entry_points]


def _describe(v):
    if isinstance(v, ndarray):
        return f"{v.dtype}/{v.ndim}d"
    if isinstance(v, numpy.generic):
        return f"np.{v.dtype}"
    if isinstance(v, (list, tuple)):
        return type(v).__name__ + "[" + ",".join(_describe(x) for x in v[:4]) + "]"
    return type(v).__name__


def _record(name, args, kwargs, flush=True):
    if flush:  # the GPU runs this after the collectives queued before it (see cuda.py)
        cuda.flush()
    stats.launches += 1
    stats.launch_names[name] += 1
    key = (name, tuple(_describe(a) for a in args), tuple(sorted(kwargs)))
    _entry_points[key] = _entry_points.get(key, 0) + 1


def _caller():
    """``file:line`` of the innermost tinynet frame that led here (else the first frame outside the stand-in)."""
    f, first = sys._getframe(2), None
    while f is not None:
        name = f.f_code.co_filename
        if not name.startswith(_HERE):
            if first is None:
                first = f"{name}:{f.f_lineno}"
            if f"{os.sep}tinynet{os.sep}" in name and f"{os.sep}tests{os.sep}" not in name:
                return f"tinynet{name.rsplit(os.sep + 'tinynet', 1)[1]}:{f.f_lineno}"
        f = f.f_back
    return first or "?"


def _sync(kind):
    cuda.flush()  # the host waits for what the device was given, NCCL's queued collectives included
    stats.syncs.append((kind, _caller()))


def _release(nbytes):
    _live[0] -= nbytes
    stats.live_bytes = _live[0]


_tracked: dict = {}


def _track(a):
    root = a
    while isinstance(root.base, numpy.ndarray):
        root = root.base
    key = id(root)
    if key not in _tracked:
        _tracked[key] = True
        _live[0] += root.nbytes
        stats.live_bytes = _live[0]
        stats.peak_bytes = _builtins.max(stats.peak_bytes, _live[0])
        weakref.finalize(root, _untrack, key, root.nbytes)


def _untrack(key, nbytes):
    _tracked.pop(key, None)
    _release(nbytes)


# ---------------------------------------------------------------------------------------------
# Calls, for the conformance replay (benchmarks/conformance_replay.py)
# ---------------------------------------------------------------------------------------------
#: With ``TINYNET_CUPY_STANDIN_CALLS=FOLDER`` (or after :func:`record_calls`) every entry point tinynet
#: calls is kept: its name, its arguments (arrays as dtype and shape, other values as they are), its
#: keywords and its outcome (what it returned, as dtypes and shapes, or the exception it raised).  One
#: example per (name, argument dtypes/ndims, keyword names, returned or raised): the smallest.  Only the
#: outermost call counts (``cupy.asnumpy`` calling ``ndarray.get`` is one call: ``asnumpy``).
_calls: dict | None = None
_calls_lock = threading.Lock()
_inside = threading.local()  # .depth: how many traced calls this thread is in (each thread its own)


def record_calls() -> dict:
    """Start keeping calls (see ``_calls``); returns the dict they are kept in (key -> (size, example))."""
    global _calls
    if _calls is None:
        _calls = {}
    return _calls


def recorded_calls() -> list:
    """The calls kept so far, one example each, sorted by name and arguments."""
    return [example for _, (_, example) in sorted((_call_key_text(k), v) for k, v in (_calls or {}).items())]


def _call_key_text(key):
    return json.dumps(key, default=str)


def _traced(name, args, kwargs, call):
    """``call()``; when calls are kept, it is one: ``name`` called with ``args`` and ``kwargs``."""
    if _calls is None or getattr(_inside, "depth", 0):
        return call()
    _inside.depth = 1
    try:
        result = call()
    except Exception as error:
        _inside.depth = 0
        _keep_call(name, args, kwargs, {"raises": type(error).__name__})
        raise
    _inside.depth = 0
    _keep_call(name, args, kwargs, {"returns": _encode(result, values=False)})
    return result


def _keep_call(name, args, kwargs, outcome):
    key = (name, [_describe(a) for a in args], sorted(kwargs), next(iter(outcome)))
    example = {"name": name, "args": [_encode(a) for a in args],
               "kwargs": {k: _encode(v) for k, v in sorted(kwargs.items())}, "outcome": outcome}
    size = (_elements(example), json.dumps(example, sort_keys=True))
    key = _call_key_text(key)
    with _calls_lock:  # the loader's threads call CuPy too
        if key not in _calls or size < _calls[key][0]:
            _calls[key] = (size, example)


def _elements(encoded) -> int:
    """Array elements in an encoded value (to keep the smallest example)."""
    if isinstance(encoded, dict):
        own = int(numpy.prod(encoded["shape"])) if "shape" in encoded else 0
        return own + _builtins.sum(_elements(v) for v in encoded.values() if isinstance(v, (dict, list)))
    if isinstance(encoded, list):
        return _builtins.sum(_elements(v) for v in encoded)
    return 0


def _encode(v, values=True):
    """A JSON description of an argument (``values``) or of a result (dtypes, shapes and types only)."""
    if isinstance(v, ndarray):
        out = {"array": v.dtype.name, "shape": list(v.shape)}
        if values and not v._a.flags.c_contiguous:
            out["contiguous"] = False
        return out
    if isinstance(v, numpy.ndarray):
        return {"host": v.dtype.name, "shape": list(v.shape)}
    if isinstance(v, numpy.generic):
        return {"scalar": v.dtype.name, "value": _encode(v.item())["value"]} if values else {"scalar": v.dtype.name}
    if v is None:
        return {"none": True}
    if isinstance(v, (bool, int, float, complex, str)):
        if not values:
            return {"type": type(v).__name__}
        value = ([v.real, v.imag] if isinstance(v, complex) else v) if not isinstance(v, float) else repr(v)
        return {type(v).__name__: True, "value": value}
    if isinstance(v, (list, tuple)):
        if values and len(v) > 16 and _builtins.all(isinstance(x, (bool, int, float)) for x in v):
            return {"host_list": numpy.asarray(v).dtype.name, "shape": [len(v)]}
        return {type(v).__name__: [_encode(x, values) for x in v]}
    if isinstance(v, slice):
        return {"slice": [_encode(x) for x in (v.start, v.stop, v.step)]}
    if v is Ellipsis:
        return {"ellipsis": True}
    if isinstance(v, numpy.dtype) or (isinstance(v, type) and issubclass(v, (numpy.generic, bool, int, float,
                                                                              complex))):
        return {"dtype": numpy.dtype(v).name}
    return {"other": type(v).__name__}


# ---------------------------------------------------------------------------------------------
# Signatures from CuPy's source
# ---------------------------------------------------------------------------------------------
def _signature(spec):
    if not spec or spec.get("params") is None:
        return None
    P = inspect.Parameter
    params = [P(n, P.POSITIONAL_OR_KEYWORD, default=None) for n in spec["params"]]
    if spec["varargs"]:
        params.append(P("args", P.VAR_POSITIONAL))
    params += [P(n, P.KEYWORD_ONLY, default=None) for n in spec["kwonly"]]
    if spec["varkw"]:
        params.append(P("kwargs", P.VAR_KEYWORD))
    return inspect.Signature(params)


def _check_call(where, sig, args, kwargs):
    if sig is not None:
        try:
            sig.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(f"{where}() in CuPy 14: {error}") from None


# ---------------------------------------------------------------------------------------------
# The array
# ---------------------------------------------------------------------------------------------
def _refused(name, args, kwargs):
    """Keep a call of a NumPy function that no operand implements (NumPy then raises TypeError)."""
    if _calls is not None and not getattr(_inside, "depth", 0):
        _keep_call(name, args, kwargs, {"raises": "TypeError"})


def _unsupported(v):
    return TypeError(f"Unsupported type {type(v)}")


def _unwrap(v, where, lists_ok=True):
    """Stand-in arrays -> their NumPy buffers, recursively; refuse host arrays as CuPy does."""
    if isinstance(v, ndarray):
        return v._a
    if isinstance(v, numpy.ndarray):
        raise _unsupported(v)
    if isinstance(v, (list, tuple)):
        if not lists_ok:
            raise _unsupported(v)
        return type(v)(_unwrap(x, where) for x in v)
    return v


def _unwrap_any(v):
    """Stand-in arrays -> their buffers, host data as it is (for the functions that accept both)."""
    if isinstance(v, ndarray):
        return v._a
    if isinstance(v, (list, tuple)):
        return type(v)(_unwrap_any(x) for x in v)
    return v


def _wrap(r, outs=()):
    for o in outs:
        if isinstance(o, ndarray) and r is o._a:
            return o
    if isinstance(r, numpy.ndarray):
        if r.dtype == object:
            raise TypeError("cupy does not support dtype=object")
        return ndarray._from(r)
    if isinstance(r, numpy.generic):
        return ndarray._from(numpy.asarray(r))
    if isinstance(r, tuple):
        return tuple(_wrap(x, outs) for x in r)
    if isinstance(r, list):
        return [_wrap(x, outs) for x in r]
    return r


def _entry(name, method=True):
    """Decorator: a CuPy entry point, kept by the call recorder (a method's ``self`` is its first argument)."""
    def decorate(fn):
        if method:
            @functools.wraps(fn)
            def call(self, *args, **kwargs):
                return _traced(name, (self, *args), kwargs, lambda: fn(self, *args, **kwargs))
        else:
            @functools.wraps(fn)
            def call(*args, **kwargs):
                return _traced(name, args, kwargs, lambda: fn(*args, **kwargs))
        return call
    return decorate


def _ufunc_entry(suffix):
    """Decorator: a ufunc's method, kept by the call recorder as ``<ufunc name><suffix>``."""
    def decorate(fn):
        @functools.wraps(fn)
        def call(self, *args, **kwargs):
            return _traced(self.name + suffix, args, kwargs, lambda: fn(self, *args, **kwargs))
        return call
    return decorate


#: data pointer -> the NumPy buffer behind it, for the pointers handed out by ``ndarray.data`` (NCCL's
#: queued collectives keep their buffers alive through it, as CuPy's stream-ordered memory pool does)
_pointers = weakref.WeakValueDictionary()


class _MemoryPointer:
    def __init__(self, a, device):
        self.ptr = a.ctypes.data
        self.device_id = device
        _pointers[self.ptr] = a

    @property
    def device(self):
        return cuda.Device(self.device_id)


class ndarray:
    """A CuPy array: a NumPy buffer ("device memory") that refuses to become a NumPy array implicitly."""

    __slots__ = ("_a", "_device", "__weakref__")
    __array_priority__ = 100
    __hash__ = None

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        if memptr is not None or strides is not None:
            raise NotImplementedError("cupy stand-in: ndarray(memptr=..., strides=...)")
        self._a = numpy.empty(shape, dtype, order=order)
        self._device = cuda._current[0]
        _track(self._a)

    @classmethod
    def _from(cls, a):
        self = object.__new__(cls)
        self._a = a
        self._device = cuda._current[0]
        _track(a)
        return self

    # -- attributes (CuPy's cdef readonly members and properties)
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    strides = property(lambda self: self._a.strides)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: _wrap(self._a.T))
    mT = property(lambda self: _wrap(numpy.swapaxes(self._a, -1, -2)))
    data = property(lambda self: _MemoryPointer(self._a, self._device))
    device = property(lambda self: cuda.Device(self._device))
    base = property(lambda self: _wrap(self._a.base) if isinstance(self._a.base, numpy.ndarray) else None)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (self._a.ctypes.data, False),
                "version": 3, "strides": None if self._a.flags.c_contiguous else self.strides}

    @shape.setter
    def shape(self, value):
        self._a.shape = value

    # -- no implicit conversion
    @_entry("ndarray.__array__")
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        func = _UFUNCS.get(ufunc.__name__)
        name = f"numpy.{ufunc.__name__}" + ("" if method == "__call__" else f".{method}")
        if func is None:
            _refused(name, inputs, kwargs)
            return NotImplemented
        if "out" in kwargs:
            kwargs["out"] = kwargs["out"][0]
        if method == "__call__":
            return _traced(name, inputs, kwargs, lambda: func(*inputs, **kwargs))
        return _traced(name, inputs, kwargs, lambda: getattr(func, method)(*inputs, **kwargs))

    def __array_function__(self, func, types, args, kwargs):
        module = sys.modules[__name__]
        for part in func.__module__.split(".")[1:]:
            module = getattr(module, part, None)
            if module is None:
                _refused(f"{func.__module__}.{func.__name__}", args, kwargs)
                return NotImplemented
        mine = getattr(module, func.__name__, None)
        name = f"{func.__module__}.{func.__name__}"
        if mine is None or mine is func:
            _refused(name, args, kwargs)
            return NotImplemented
        return _traced(name, args, kwargs, lambda: mine(*args, **kwargs))

    # -- synchronising conversions
    @_entry("ndarray.get")
    def get(self, stream=None, order="C", out=None, blocking=True):
        _record("ndarray.get", (self,), {})
        _sync("get")
        if out is not None:
            out[...] = self._a
            return out
        return numpy.array(self._a, order=order, copy=True)

    @_entry("ndarray.set")
    def set(self, arr, stream=None):
        _record("ndarray.set", (self,), {})
        stats.h2d += 1
        if not isinstance(arr, numpy.ndarray) or arr.shape != self.shape:
            raise ValueError("Shape mismatch. Old shape: {}, new shape: {}".format(self.shape, numpy.shape(arr)))
        self._a[...] = arr

    @_entry("ndarray.item")
    def item(self):
        _sync("item")
        return self._a.item()

    @_entry("ndarray.tolist")
    def tolist(self):
        _sync("tolist")
        return self._a.tolist()

    def _scalar(self, kind):
        _sync(kind)
        if self.size != 1:
            raise TypeError("only length-1 arrays can be converted to Python scalars")
        return self._a.reshape(()).item()

    @_entry("ndarray.__float__")
    def __float__(self):
        return float(self._scalar("float"))

    @_entry("ndarray.__int__")
    def __int__(self):
        return int(self._scalar("int"))

    @_entry("ndarray.__complex__")
    def __complex__(self):
        return complex(self._scalar("complex"))

    @_entry("ndarray.__bool__")
    def __bool__(self):
        if self.size == 0:
            return False
        if self.size > 1:
            raise ValueError("The truth value of an array with more than one element is ambiguous. "
                             "Use a.any() or a.all()")
        return bool(self._scalar("bool"))

    def __repr__(self):
        _sync("repr")
        return repr(self._a).replace("array(", "array(", 1)

    def __str__(self):
        _sync("str")
        return str(self._a)

    def __format__(self, spec):
        if self.ndim == 0:
            return format(self._scalar("format"), spec)
        return format(str(self), spec)

    def __reduce__(self):
        _sync("pickle")
        return (array, (numpy.array(self._a),))

    # -- copies
    @_entry("ndarray.copy")
    def copy(self, order="C"):
        _record("ndarray.copy", (self,), {})
        return _wrap(self._a.copy(order=order))

    __copy__ = copy

    def __deepcopy__(self, memo):
        return self.copy()

    @_entry("ndarray.astype")
    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        _record("ndarray.astype", (self,), {})
        return _wrap(self._a.astype(dtype, order=order, casting=casting or "unsafe", copy=copy))

    @_entry("ndarray.fill")
    def fill(self, value):
        if isinstance(value, numpy.ndarray):  # CuPy 14's ndarray.fill
            if value.shape != ():
                raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
            value = value.item()
        _record("ndarray.fill", (self,), {})
        self._a.fill(_unwrap(value, "fill"))

    @_entry("ndarray.view")
    def view(self, dtype=None, array_class=None):
        return _wrap(self._a.view() if dtype is None else self._a.view(dtype))

    @_entry("ndarray.reshape")
    def reshape(self, *shape, order="C", copy=None):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return _wrap(self._a.reshape(shape, order=order, copy=copy))

    @_entry("ndarray.transpose")
    def transpose(self, *axes):
        return _wrap(self._a.transpose(*axes))

    @_entry("ndarray.dot")
    def dot(self, b, out=None):
        return dot(self, b, out=out)

    # -- containers
    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of unsized object")
        return len(self._a)

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self)))

    @_entry("ndarray.__getitem__")
    def __getitem__(self, index):
        r = self._a[_index(index)]
        if not isinstance(r, numpy.ndarray) or not numpy.shares_memory(r, self._a):
            _record("ndarray.__getitem__", (self,), {})
        return _wrap(r)

    @_entry("ndarray.__setitem__")
    def __setitem__(self, index, value):
        # CuPy 14 (_routines_indexing.pyx, _scatter_op): with basic indices (ints, slices, None, ...) a
        # value that is not a CuPy array goes to ``fill``, which refuses a non-scalar NumPy array; with
        # array indices it is copied to the device (``core.array``) without a word.
        if isinstance(value, numpy.ndarray):
            if not _advanced(index):
                if value.shape != ():
                    raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
                value = value.item()
            else:
                stats.h2d += 1
                value = value.astype(self.dtype)
        _record("ndarray.__setitem__", (self, value), {})
        self._a[_index(index)] = value if isinstance(value, numpy.ndarray) else _unwrap(value, "__setitem__")


def _advanced(index) -> bool:
    """Whether ``index`` holds an array index (CuPy's advanced indexing), not only ints, slices, None, ``...``."""
    parts = index if isinstance(index, tuple) else (index,)
    return _builtins.any(isinstance(p, (ndarray, numpy.ndarray, list, tuple)) or isinstance(p, (bool, numpy.bool_))
                         for p in parts)


def _index(index):
    if isinstance(index, tuple):
        return tuple(x._a if isinstance(x, ndarray) else x for x in index)
    return index._a if isinstance(index, ndarray) else index


def _method(name, spec):
    sig = _signature(spec)

    @_entry(f"ndarray.{name}")
    def method(self, *args, **kwargs):
        _check_call(f"ndarray.{name}", sig, args, kwargs)
        _record(f"ndarray.{name}", (self, *args), kwargs)
        outs = [kwargs["out"]] if kwargs.get("out") is not None else []
        if outs and not isinstance(outs[0], ndarray):
            raise TypeError("Output arguments type must be cupy.ndarray")
        r = getattr(self._a, name)(*_unwrap(args, name), **{k: _unwrap(v, name) for k, v in kwargs.items()})
        return _wrap(r, outs)

    method.__name__ = name
    return method


_NOT_SUPPORTED = {"dump", "dumps", "tofile", "tobytes", "mdspan", "toDlpack", "reduced_view", "scatter_add",
                  "scatter_max", "scatter_min", "byteswap", "cstruct"}
for _name, _spec in API["ndarray_methods"].items():
    if _name.startswith("_") or _name in ndarray.__dict__ or _name in _NOT_SUPPORTED or _name in ("real", "imag"):
        continue
    setattr(ndarray, _name, _method(_name, _spec))
ndarray.real = property(lambda self: _wrap(self._a.real))
ndarray.imag = property(lambda self: _wrap(self._a.imag))
ndarray.flat = property(lambda self: (_ for _ in ()).throw(NotImplementedError("cupy stand-in: flat")))


# ---------------------------------------------------------------------------------------------
# ufuncs and functions
# ---------------------------------------------------------------------------------------------
_UFUNC_KWARGS = {"out", "dtype", "casting"}


class ufunc:
    """A CuPy ufunc: array or scalar operands only (no NumPy arrays, no lists)."""

    def __init__(self, name):
        self.__name__ = self.name = name
        self._np = getattr(numpy, name)
        self.nin, self.nout = self._np.nin, self._np.nout

    def __repr__(self):
        return f"<ufunc '{self.name}'>"

    def _operands(self, args, kwargs, method):
        extra = set(kwargs) - _UFUNC_KWARGS - ({"axis", "keepdims"} if method == "reduce" else set())
        if extra:
            raise TypeError(f"Wrong arguments {extra} for ufunc {self.name} (CuPy accepts {sorted(_UFUNC_KWARGS)})")
        if len(args) > self.nin + self.nout:
            raise TypeError(f"Wrong number of arguments for {self.name}")
        if len(args) > self.nin:
            if "out" in kwargs:
                raise ValueError("cannot specify 'out' as both a positional and keyword argument")
            kwargs["out"], args = args[self.nin], args[:self.nin]
        for a in args:
            if not isinstance(a, (ndarray, int, float, complex, bool, numpy.generic)):
                raise _unsupported(a)
        out = kwargs.get("out")
        if out is not None and not isinstance(out, ndarray):
            raise TypeError("Output arguments type must be cupy.ndarray")
        return args, kwargs, [out] if out is not None else []

    @_ufunc_entry("")
    def __call__(self, *args, **kwargs):
        args, kwargs, outs = self._operands(args, dict(kwargs), "__call__")
        _record(self.name, args, kwargs)
        return _wrap(self._np(*_unwrap(args, self.name), **{k: _unwrap(v, self.name) for k, v in kwargs.items()}),
                     outs)

    @_ufunc_entry(".reduce")
    def reduce(self, a, axis=0, dtype=None, out=None, keepdims=False):
        args, kw, outs = self._operands((a,), {"dtype": dtype, "out": out}, "reduce")
        _record(self.name + ".reduce", args, {})
        return _wrap(self._np.reduce(a._a, axis=axis, dtype=dtype, out=_unwrap(out, "reduce"), keepdims=keepdims),
                     outs)

    @_ufunc_entry(".at")
    def at(self, a, indices, b=None):
        args, _, _ = self._operands((a,) if b is None else (a, b), {}, "at")
        _record(self.name + ".at", args, {})
        self._np.at(a._a, _index(indices), *(() if b is None else (_unwrap(b, "at"),)))

    @_ufunc_entry(".outer")
    def outer(self, a, b, **kwargs):
        args, kwargs, outs = self._operands((a, b), dict(kwargs), "outer")
        _record(self.name + ".outer", args, kwargs)
        return _wrap(self._np.outer(a._a, _unwrap(b, "outer"), **kwargs), outs)


#: Functions that take host data (their job is the transfer, or they compute no array).
_HOST_OK = {"array", "asarray", "asanyarray", "asnumpy", "get_array_module", "result_type", "can_cast", "dtype",
            "promote_types", "min_scalar_type", "common_type", "isscalar", "ndim", "shape", "size", "iinfo",
            "finfo", "issubdtype", "binary_repr", "base_repr", "set_printoptions", "get_printoptions",
            "printoptions", "fromfunction", "fromiter", "frombuffer", "fromstring", "fromfile", "loadtxt",
            "genfromtxt", "load", "show_config", "is_available", "get_default_memory_pool",
            "get_default_pinned_memory_pool", "may_share_memory", "shares_memory"}
#: Functions that only allocate (no data read): counted as launches only when they fill memory.
_NO_LAUNCH = {"empty", "empty_like", "result_type", "can_cast", "shape", "ndim", "size", "isscalar", "iinfo",
              "finfo", "issubdtype", "get_array_module", "broadcast_to", "broadcast_arrays", "expand_dims",
              "squeeze", "swapaxes", "moveaxis", "transpose", "reshape", "ravel", "atleast_1d", "atleast_2d",
              "atleast_3d", "promote_types", "may_share_memory", "shares_memory"}


def _function(name, target, spec):
    sig = _signature(spec)
    host_ok = name in _HOST_OK

    @_entry(name, method=False)
    def function(*args, **kwargs):
        _check_call(name, sig, args, kwargs)
        if name not in _NO_LAUNCH:
            _record(name, args, kwargs)
        outs = [kwargs["out"]] if kwargs.get("out") is not None else []
        if outs and not isinstance(outs[0], ndarray):
            raise TypeError("Output arguments type must be cupy.ndarray")
        if host_ok:
            a, k = _unwrap_any(args), {kk: _unwrap_any(v) for kk, v in kwargs.items()}
        else:
            a, k = _unwrap(args, name), {kk: _unwrap(v, name) for kk, v in kwargs.items()}
        return _wrap(target(*a, **k), outs)

    function.__name__ = name
    function.__qualname__ = name
    function.__module__ = "cupy"
    return function


def _module_functions(table, np_module, namespace):
    for name, spec in table.items():
        if name in namespace:
            continue
        kind = spec["kind"]
        target = getattr(np_module, name, None)
        if kind in ("numpy-constant", "constant") and target is not None:
            namespace[name] = target
        elif isinstance(target, numpy.ufunc):  # CuPy's ufuncs (and matmul) are NumPy's ufuncs
            namespace[name] = _UFUNCS[name] = ufunc(name)
        elif callable(target):
            namespace[name] = _function(name, target, spec)


_UFUNCS: dict = {}


# -- functions written out (transfers, and what NumPy does not have)
@_entry("asnumpy", method=False)
def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out)
    return numpy.asarray(a, order=order)


@_entry("asarray", method=False)
def asarray(a, dtype=None, order=None, *, copy=None, blocking=True):
    _record("asarray", (a,), {"dtype": dtype} if dtype is not None else {})
    if isinstance(a, ndarray):
        if (dtype is None or numpy.dtype(dtype) == a.dtype) and copy is not True and a._device == cuda._current[0]:
            return a
        return _wrap(numpy.array(a._a, dtype=dtype, order=order or "K", copy=True))
    stats.h2d += 1
    return _wrap(numpy.array(a, dtype=dtype, order=order or "K", copy=True))


asanyarray = asarray


@_entry("array", method=False)
def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    _record("array", (obj,), {})
    if isinstance(obj, ndarray):
        if not copy and (dtype is None or numpy.dtype(dtype) == obj.dtype):
            return obj
        return _wrap(numpy.array(obj._a, dtype=dtype, order=order, ndmin=ndmin, copy=True))
    if isinstance(obj, (list, tuple)) and _builtins.any(isinstance(x, ndarray) for x in obj):
        return stack([asarray(x) for x in obj]).astype(dtype) if dtype else stack([asarray(x) for x in obj])
    stats.h2d += 1
    return _wrap(numpy.array(obj, dtype=dtype, order=order, ndmin=ndmin, copy=True))


def get_array_module(*args):
    for a in args:
        if isinstance(a, ndarray):
            return sys.modules[__name__]
    return numpy


def is_available():
    return cuda.is_available()


@_entry("ascontiguousarray", method=False)
def ascontiguousarray(a, dtype=None):
    if not isinstance(a, ndarray):
        raise _unsupported(a)
    if a._a.flags.c_contiguous and (dtype is None or numpy.dtype(dtype) == a.dtype):
        return a
    _record("ascontiguousarray", (a,), {})
    return _wrap(numpy.ascontiguousarray(a._a, dtype=dtype))


def get_default_memory_pool():
    return cuda.get_default_memory_pool()


def get_default_pinned_memory_pool():
    return cuda.PinnedMemoryPool()


from . import cuda  # noqa: E402
from ._kernel import ElementwiseKernel, ReductionKernel, RawKernel, RawModule  # noqa: E402

_module_functions(API["functions"], numpy, globals())



# -- operators: the module's ufuncs, so ``cupy_array + numpy_array`` refuses as ``cupy.add`` does
def _binary(name, reflected=False, inplace=False, dunder=None):
    @_entry(f"ndarray.{dunder}")
    def op(self, other):
        if isinstance(other, (list, tuple)) or isinstance(other, numpy.ndarray):
            raise _unsupported(other)
        if not isinstance(other, (ndarray, int, float, complex, bool, numpy.generic)):
            return NotImplemented
        if inplace:
            return _UFUNCS[name](self, other, out=self)
        return _UFUNCS[name](other, self) if reflected else _UFUNCS[name](self, other)
    return op


for _op, _uf in (("add", "add"), ("sub", "subtract"), ("mul", "multiply"), ("truediv", "divide"),
                 ("floordiv", "floor_divide"), ("mod", "remainder"), ("pow", "power"), ("matmul", "matmul"),
                 ("and", "bitwise_and"), ("or", "bitwise_or"), ("xor", "bitwise_xor"), ("lshift", "left_shift"),
                 ("rshift", "right_shift")):
    setattr(ndarray, f"__{_op}__", _binary(_uf, dunder=f"__{_op}__"))
    setattr(ndarray, f"__r{_op}__", _binary(_uf, reflected=True, dunder=f"__r{_op}__"))
    setattr(ndarray, f"__i{_op}__", _binary(_uf, inplace=True, dunder=f"__i{_op}__"))
for _op, _uf in (("lt", "less"), ("le", "less_equal"), ("gt", "greater"), ("ge", "greater_equal")):
    setattr(ndarray, f"__{_op}__", _binary(_uf, dunder=f"__{_op}__"))


def _eq(name, fill, dunder):
    @_entry(f"ndarray.{dunder}")
    def op(self, other):
        if other is None or type(other).__eq__ is object.__eq__ and not isinstance(other, ndarray):
            return (ones if fill else zeros)(self.shape, dtype=bool)
        return _binary(name, dunder=dunder)(self, other)
    return op


ndarray.__eq__ = _eq("equal", False, "__eq__")
ndarray.__ne__ = _eq("not_equal", True, "__ne__")
ndarray.__neg__ = lambda self: negative(self)
ndarray.__pos__ = lambda self: positive(self)
ndarray.__abs__ = lambda self: absolute(self)
ndarray.__invert__ = lambda self: invert(self)
ndarray.__divmod__ = lambda self, other: divmod(self, other)
ndarray.__hash__ = None

class _Submodule:
    def __init__(self, name, table, np_module):
        self.__name__ = f"cupy.{name}"
        _module_functions(table, np_module, self.__dict__)


class _Generator:
    """``cupy.random.Generator``: NumPy's generator (another stream of numbers than CuPy's XORWOW), on the device."""

    def __init__(self, seed=None):
        self._g = numpy.random.default_rng(_unwrap(seed, "default_rng"))

    def __getattr__(self, name):
        method = getattr(self._g, name)

        def call(*args, **kwargs):
            def run():
                _record(f"random.Generator.{name}", args, kwargs)
                return _wrap(method(*args, **kwargs))
            return _traced(f"random.Generator.{name}", args, kwargs, run)

        return call


random = _Submodule("random", API["random"], numpy.random)
random.default_rng = _Generator
random.Generator = _Generator
linalg = _Submodule("linalg", API["linalg"], numpy.linalg)

_ALLOWED = set(API["functions"]) | {"ndarray", "ufunc", "cuda", "random", "linalg", "ElementwiseKernel",
                                    "ReductionKernel", "RawKernel", "RawModule", "__version__"}


def __getattr__(name):
    raise AttributeError(f"module 'cupy' has no attribute {name!r} (not in CuPy 14.2; the stand-in follows it)")


def __dir__():
    return sorted(_ALLOWED)


# ---------------------------------------------------------------------------------------------
# Installing it as ``cupy``
# ---------------------------------------------------------------------------------------------
SHIM = str(pathlib.Path(_HERE) / "shim")


def install():
    """Make ``import cupy`` (and ``cupy.cuda``, ``cupy.cuda.nccl``...) give the stand-in; returns what it replaced."""
    module = sys.modules[__name__]
    names = {"cupy": module, "cupy.cuda": cuda, "cupy.cuda.runtime": cuda.runtime, "cupy.cuda.nccl": cuda.nccl,
             "cupy.random": random, "cupy.linalg": linalg}
    previous = {k: sys.modules.get(k) for k in names}
    sys.modules.update(names)
    return previous


def uninstall(previous):
    for k, v in previous.items():
        if v is None:
            sys.modules.pop(k, None)
        else:
            sys.modules[k] = v


def standin_env(env=None, devices=None):
    """A copy of ``env`` (default: os.environ) with which a child process imports the stand-in as ``cupy``."""
    env = dict(os.environ if env is None else env)
    env["TINYNET_CUPY_STANDIN"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([SHIM] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if devices is not None:
        env["TINYNET_CUPY_STANDIN_DEVICES"] = str(devices)
    return env


def _report_at_exit(path):
    def write():
        data = {"syncs": stats.syncs, "sync_sites": dict(stats.sync_sites()), "launches": stats.launches,
                "launch_names": dict(stats.launch_names), "peak_bytes": stats.peak_bytes,
                "live_bytes": stats.live_bytes, "h2d": stats.h2d, "entry_points": entry_points()}
        target = pathlib.Path(str(path).replace("{pid}", str(os.getpid())))
        target.write_text(json.dumps(data, indent=1))

    import atexit
    atexit.register(write)


if os.environ.get("TINYNET_CUPY_STANDIN_REPORT"):
    _report_at_exit(os.environ["TINYNET_CUPY_STANDIN_REPORT"])


def _calls_at_exit(folder):
    def write():
        target = pathlib.Path(folder)
        target.mkdir(parents=True, exist_ok=True)
        (target / f"calls-{os.getpid()}.json").write_text(json.dumps(recorded_calls()))

    import atexit
    record_calls()
    atexit.register(write)


if os.environ.get("TINYNET_CUPY_STANDIN_CALLS"):  # for the conformance replay (benchmarks/conformance_replay.py)
    _calls_at_exit(os.environ["TINYNET_CUPY_STANDIN_CALLS"])
