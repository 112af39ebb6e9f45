"""A strict CuPy stand-in for running tinynet's GPU code path on a machine without a GPU.

tinynet's GPU path is its NumPy code run on ``cupy`` arrays, plus a few fused
``ElementwiseKernel``s.  CI has no GPU, so this package plays ``cupy``: it is
installed as the ``cupy`` module by ``tests/gpu/conftest.py`` (for the tests in
``tests/gpu``) or, in a subprocess or under ``mpiexec``, by putting
``tests/cupy_standin/shim`` on ``PYTHONPATH`` with ``TINYNET_CUPY_STANDIN=1``
(see :func:`standin_env`).  "Device memory" is host memory held by NumPy arrays.

Strict where CuPy 14 is strict, so code that passes here does not fail on a GPU for these reasons:

* :class:`ndarray` is not a NumPy subclass; ``numpy.asarray(a)`` / ``__array__`` raise TypeError
  ("Implicit conversion to a NumPy array is not allowed...") as CuPy does;
* the module has only the names ``cupy`` 14.2 exports, ndarray only CuPy's methods, each with
  CuPy's keyword signature (both from ``cupy14_api.json``, generated from CuPy's source by
  ``generate_api.py``): a keyword NumPy accepts and CuPy does not raises TypeError;
* ufuncs and functions refuse ``numpy.ndarray`` operands (and ufuncs refuse lists), so do the
  operators (``cupy_array + numpy_array``); assigning a NumPy array into a slice raises;
* reductions and integer indexing return 0-d arrays, never host scalars;
* ``ElementwiseKernel`` binds its arguments by CuPy's rules (argument count, type placeholders
  resolved from arrays only, exact dtypes for typed parameters, broadcasting of non-``raw``
  arrays, outputs given or allocated, ``size=``) and runs the real kernel body, compiled by g++
  as C++ (:mod:`._kernel`) and cached on disk;
* ``cuda``: N fake devices (``TINYNET_CUPY_STANDIN_DEVICES``, default 1), ``Device``,
  ``runtime``, ``Stream``, ``Event``, ``MemoryPool``; ``cuda.nccl`` runs collectives over MPI.

Counters (:data:`stats`): host-device synchronisations (``float()``, ``int()``, ``bool()``,
``.item()``, ``.get()``, ``.tolist()``, ``asnumpy``, ``repr``, stream/event/device
``synchronize``) each with the tinynet ``file:line`` that caused it; live and peak "device"
bytes (buffers held by stand-in arrays, freed when the last view dies); "kernel launches"
(every ufunc, reduction, copy, BLAS call and ElementwiseKernel: an estimate of CuPy's count,
which may launch 0 or 2 kernels where this counts 1); and every entry point called, with its
dtypes, ndims and keywords (:func:`entry_points`, replayed on real CuPy by
``benchmarks/gpu_check_conformance.py``).

What it cannot see (a real GPU must): compile errors of the kernels (NVRTC does: tests/test_kernels_nvrtc.py);
CUDA numerics (cuBLAS, TF32, FMA contraction, ``sqrtf``/``expf`` ulps, summation order of CuPy's
reductions: results here are NumPy's); streams and asynchrony (every operation is done when it
returns, so a missing synchronisation is invisible, and so are hangs: a NCCL call here is an
MPI call that waits); the memory pool and fragmentation (bytes counted are exact array bytes);
speed; peer access between devices; float16 kernels; CuPy behaviours where its list of names
is right but its semantics differ from NumPy's in ways not written here (e.g. out-of-range
integer indices wrap in CuPy and raise here).
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


def _record(name, args, kwargs):
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


class _MemoryPointer:
    def __init__(self, a, device):
        self.ptr = a.ctypes.data
        self.device_id = device

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
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        func = _UFUNCS.get(ufunc.__name__)
        if func is None:
            return NotImplemented
        if "out" in kwargs:
            kwargs["out"] = kwargs["out"][0]
        if method == "__call__":
            return func(*inputs, **kwargs)
        return getattr(func, method)(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        module = sys.modules[__name__]
        for part in func.__module__.split(".")[1:]:
            module = getattr(module, part, None)
            if module is None:
                return NotImplemented
        mine = getattr(module, func.__name__, None)
        if mine is None or mine is func:
            return NotImplemented
        return mine(*args, **kwargs)

    # -- synchronising conversions
    def get(self, stream=None, order="C", out=None, blocking=True):
        _record("ndarray.get", (self,), {})
        _sync("get")
        if out is not None:
            out[...] = self._a
            return out
        return numpy.array(self._a, order=order, copy=True)

    def set(self, arr, stream=None):
        _record("ndarray.set", (self,), {})
        stats.h2d += 1
        if not isinstance(arr, numpy.ndarray) or arr.shape != self.shape:
            raise ValueError("Shape mismatch. Old shape: {}, new shape: {}".format(self.shape, numpy.shape(arr)))
        self._a[...] = arr

    def item(self):
        _sync("item")
        return self._a.item()

    def tolist(self):
        _sync("tolist")
        return self._a.tolist()

    def _scalar(self, kind):
        _sync(kind)
        if self.size != 1:
            raise TypeError("only length-1 arrays can be converted to Python scalars")
        return self._a.reshape(()).item()

    def __float__(self):
        return float(self._scalar("float"))

    def __int__(self):
        return int(self._scalar("int"))

    def __complex__(self):
        return complex(self._scalar("complex"))

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
    def copy(self, order="C"):
        _record("ndarray.copy", (self,), {})
        return _wrap(self._a.copy(order=order))

    __copy__ = copy

    def __deepcopy__(self, memo):
        return self.copy()

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        _record("ndarray.astype", (self,), {})
        return _wrap(self._a.astype(dtype, order=order, casting=casting or "unsafe", copy=copy))

    def fill(self, value):
        _record("ndarray.fill", (self,), {})
        self._a.fill(_unwrap(value, "fill"))

    def view(self, dtype=None, array_class=None):
        return _wrap(self._a.view() if dtype is None else self._a.view(dtype))

    def reshape(self, *shape, order="C", copy=None):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return _wrap(self._a.reshape(shape, order=order, copy=copy))

    def transpose(self, *axes):
        return _wrap(self._a.transpose(*axes))

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

    def __getitem__(self, index):
        r = self._a[_index(index)]
        if not isinstance(r, numpy.ndarray) or not numpy.shares_memory(r, self._a):
            _record("ndarray.__getitem__", (self,), {})
        return _wrap(r)

    def __setitem__(self, index, value):
        if isinstance(value, numpy.ndarray):
            raise TypeError("Unsupported type <class 'numpy.ndarray'>: assigning a NumPy array into a CuPy array "
                            "is an implicit host-to-device copy, which CuPy refuses (use cupy.asarray)")
        _record("ndarray.__setitem__", (self, value), {})
        self._a[_index(index)] = _unwrap(value, "__setitem__")


def _index(index):
    if isinstance(index, tuple):
        return tuple(x._a if isinstance(x, ndarray) else x for x in index)
    return index._a if isinstance(index, ndarray) else index


def _method(name, spec):
    sig = _signature(spec)

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

    def __call__(self, *args, **kwargs):
        args, kwargs, outs = self._operands(args, dict(kwargs), "__call__")
        _record(self.name, args, kwargs)
        return _wrap(self._np(*_unwrap(args, self.name), **{k: _unwrap(v, self.name) for k, v in kwargs.items()}),
                     outs)

    def reduce(self, a, axis=0, dtype=None, out=None, keepdims=False):
        args, kw, outs = self._operands((a,), {"dtype": dtype, "out": out}, "reduce")
        _record(self.name + ".reduce", args, {})
        return _wrap(self._np.reduce(a._a, axis=axis, dtype=dtype, out=_unwrap(out, "reduce"), keepdims=keepdims),
                     outs)

    def at(self, a, indices, b=None):
        args, _, _ = self._operands((a,) if b is None else (a, b), {}, "at")
        _record(self.name + ".at", args, {})
        self._np.at(a._a, _index(indices), *(() if b is None else (_unwrap(b, "at"),)))

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
def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out)
    return numpy.asarray(a, order=order)


def asarray(a, dtype=None, order=None, *, copy=None, blocking=True):
    _record("asarray", (a,), {"dtype": dtype} if dtype is not None else {})
    if isinstance(a, ndarray):
        if (dtype is None or numpy.dtype(dtype) == a.dtype) and copy is not True and a._device == cuda._current[0]:
            return a
        return _wrap(numpy.array(a._a, dtype=dtype, order=order or "K", copy=True))
    stats.h2d += 1
    return _wrap(numpy.array(a, dtype=dtype, order=order or "K", copy=True))


asanyarray = asarray


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
def _binary(name, reflected=False, inplace=False):
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
    setattr(ndarray, f"__{_op}__", _binary(_uf))
    setattr(ndarray, f"__r{_op}__", _binary(_uf, reflected=True))
    setattr(ndarray, f"__i{_op}__", _binary(_uf, inplace=True))
for _op, _uf in (("lt", "less"), ("le", "less_equal"), ("gt", "greater"), ("ge", "greater_equal")):
    setattr(ndarray, f"__{_op}__", _binary(_uf))


def _eq(name, fill):
    def op(self, other):
        if other is None or type(other).__eq__ is object.__eq__ and not isinstance(other, ndarray):
            return (ones if fill else zeros)(self.shape, dtype=bool)
        return _binary(name)(self, other)
    return op


ndarray.__eq__ = _eq("equal", False)
ndarray.__ne__ = _eq("not_equal", True)
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
            _record(f"random.Generator.{name}", args, kwargs)
            return _wrap(method(*args, **kwargs))

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
