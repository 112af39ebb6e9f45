"""``cupy.ElementwiseKernel`` of the stand-in: CuPy's argument binding, then the real body, compiled as C++.

Binding follows CuPy 14's ``_kernel.pyx`` (``ElementwiseKernel.__call__``, ``_decide_params_type_core``,
``_get_out_args_with_params``): ``nin`` or ``nin + nout`` arguments; only ``size``, ``stream`` and
``block_size`` as keywords; ``numpy.ndarray`` arguments refused; a type placeholder (``T``) takes the
dtype of the arrays bound to it (outputs first, then inputs; scalars never decide it) and two arrays
disagreeing raise "Type is mismatched"; a typed parameter (``int32 H``, ``bool mask``) needs an array of
exactly that dtype, while a scalar is cast to it; non-``raw`` arrays broadcast to one shape, which the
outputs must have (or are allocated with); ``raw`` outputs need ``size=`` when not given.

The body then runs once per index ``i`` in a C++ loop (g++ -O1, the same translation as
tests/test_kernels_source.py): a non-raw argument ``x`` is ``x_ptr[i]`` of a C-contiguous broadcast
copy, a raw one a pointer to a C-contiguous copy (CuPy's ``CArray::operator[]`` indexes raw arrays in
C order too), outputs are copied back into the caller's arrays, whatever their strides.  Each
(source, types) pair is compiled once into a cache directory shared by all processes of the user.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import subprocess
import tempfile

import numpy

_CTYPES = {numpy.dtype(numpy.float32): "float", numpy.dtype(numpy.float64): "double",
           numpy.dtype(numpy.int8): "signed char", numpy.dtype(numpy.uint8): "unsigned char",
           numpy.dtype(numpy.int16): "short", numpy.dtype(numpy.uint16): "unsigned short",
           numpy.dtype(numpy.int32): "int", numpy.dtype(numpy.uint32): "unsigned int",
           numpy.dtype(numpy.int64): "long long", numpy.dtype(numpy.uint64): "unsigned long long",
           numpy.dtype(numpy.bool_): "bool"}
_TYPE_NAMES = {"bool": numpy.bool_, "int8": numpy.int8, "uint8": numpy.uint8, "int16": numpy.int16,
               "uint16": numpy.uint16, "int32": numpy.int32, "uint32": numpy.uint32, "int64": numpy.int64,
               "uint64": numpy.uint64, "float16": numpy.float16, "float32": numpy.float32,
               "float64": numpy.float64}
CACHE = pathlib.Path(os.environ.get("TINYNET_CUPY_STANDIN_CACHE",
                                    pathlib.Path(tempfile.gettempdir()) / f"tinynet-cupy-standin-{os.getuid()}"))
_loaded: dict = {}


class _Param:
    def __init__(self, text, is_out):
        words = text.split()
        self.raw = words[0] == "raw"
        self.ctype, self.name, self.is_out = words[-2], words[-1], is_out
        self.dtype = numpy.dtype(_TYPE_NAMES[self.ctype]) if self.ctype in _TYPE_NAMES else None


def _parse(params, is_out):
    return [_Param(p, is_out) for p in params.split(",") if p.strip()]


class ElementwiseKernel:
    def __init__(self, in_params, out_params, operation, name="kernel", reduce_dims=True, preamble="",
                 no_return=False, return_tuple=False, loop_prep="", after_loop="", options=()):
        self.in_params, self.out_params = _parse(in_params, False), _parse(out_params, True)
        self.nin, self.nout = len(self.in_params), len(self.out_params)
        self.nargs = self.nin + self.nout
        self.operation, self.name, self.preamble = operation, name, preamble
        self.no_return, self.return_tuple = no_return, return_tuple
        self._codes = {}  # what this kernel compiled (CuPy's ``cached_codes``: one per argument types)
        if loop_prep or after_loop:
            raise NotImplementedError("cupy stand-in: ElementwiseKernel loop_prep/after_loop")

    @property
    def cached_codes(self):
        return dict(self._codes)

    def __call__(self, *args, **kwargs):
        from . import _traced
        return _traced(f"ElementwiseKernel:{self.name}", args, kwargs, lambda: self._call(*args, **kwargs))

    def _call(self, *args, **kwargs):
        from . import _record, _unsupported, _wrap, ndarray

        size = kwargs.pop("size", -1)
        kwargs.pop("stream", None)
        block_size = kwargs.pop("block_size", 128)
        if kwargs:
            raise TypeError("Wrong arguments %s" % kwargs)
        if block_size <= 0:
            raise ValueError("block_size must be greater than zero")
        if len(args) not in (self.nin, self.nargs):
            raise TypeError(f"Wrong number of arguments for {self.name!r}. It must be either {self.nin} or "
                            f"{self.nargs} (with outputs), but given {len(args)}.")
        for a in args:
            if isinstance(a, numpy.ndarray) or not isinstance(a, (ndarray, int, float, bool, numpy.generic)):
                raise _unsupported(a)
        _record(f"ElementwiseKernel:{self.name}", args, {"size": size} if size != -1 else {})
        ins, outs = list(args[:self.nin]), list(args[self.nin:])
        for o in outs:
            if not isinstance(o, ndarray):
                raise TypeError("Output arguments type must be cupy.ndarray")
        # shape: broadcast of the non-raw arrays
        shapes = [a.shape for a, p in zip(args, self.in_params + self.out_params)
                  if isinstance(a, ndarray) and not p.raw]
        shape = numpy.broadcast_shapes(*shapes) if shapes else ()
        if size != -1:
            if shapes:
                raise ValueError("Specified 'size' can be used only if all of the ndarray are 'raw'.")
            shape = (size,)
        elif not shapes and not any(isinstance(a, ndarray) for a in args):
            raise ValueError("Loop size is Undecided")
        # types
        types = {}
        for p, a in list(zip(self.out_params, outs)) + list(zip(self.in_params, ins)):
            if not isinstance(a, ndarray):
                continue
            if p.dtype is not None:
                if a.dtype != p.dtype:
                    raise TypeError(f"Type is mismatched. {p.name} {a.dtype} {p.dtype}")
            elif p.ctype in types and types[p.ctype] != a.dtype:
                raise TypeError(f"Type is mismatched. {p.name} {a.dtype} {types[p.ctype]} {p.ctype}")
            else:
                types[p.ctype] = a.dtype
        for p in self.in_params + self.out_params:
            if p.dtype is None and p.ctype not in types:
                raise TypeError(f"Cannot determine the type of {p.ctype} in {self.name}")
        if not outs:
            if any(p.raw for p in self.out_params) and size == -1:
                raise ValueError("Output array size is Undecided")
            outs = [ndarray(shape, p.dtype if p.dtype is not None else types[p.ctype]) for p in self.out_params]
        for p, o in zip(self.out_params, outs):
            if not p.raw and o.shape != tuple(shape):
                raise ValueError("Out shape is mismatched")
        total = int(numpy.prod(shape, dtype=numpy.int64))
        if total:
            self._run(total, shape, ins, outs, types)
        if self.no_return:
            return None
        if self.nout == 1 and not self.return_tuple:
            return outs[0]
        return tuple(outs)

    def _run(self, total, shape, ins, outs, types):
        from . import ndarray

        layout, keep, pointers, out_copies = [], [], [], []
        for p, a in list(zip(self.in_params, ins)) + list(zip(self.out_params, outs)):
            dtype = p.dtype if p.dtype is not None else types[p.ctype]
            if isinstance(a, ndarray):
                data = a._a if p.raw else numpy.broadcast_to(a._a, shape)
                buf = numpy.ascontiguousarray(data)
                if buf is a._a and p.is_out:
                    pass  # written in place
                elif p.is_out:
                    buf = buf.copy()
                    out_copies.append((a, buf, p.raw))
                layout.append((p, "array"))
            else:
                buf = numpy.array([a], dtype=dtype)
                layout.append((p, "scalar"))
            keep.append(buf)
            pointers.append(buf.ctypes.data)
        fn = self._library(layout, types)
        argv = (ctypes.c_void_p * len(pointers))(*pointers)
        fn(ctypes.c_ssize_t(total), argv)
        for a, buf, raw in out_copies:
            a._a[...] = buf.reshape(a._a.shape) if raw else buf

    def _library(self, layout, types):
        typedefs = "".join(f"typedef {_CTYPES[numpy.dtype(t)]} {name};\n" for name, t in sorted(types.items())
                           if numpy.dtype(t) in _CTYPES)
        for name, t in types.items():
            if numpy.dtype(t) not in _CTYPES:
                raise NotImplementedError(f"cupy stand-in: {self.name} with {name} = {t} (no C++ type here)")
        prologue, per_i = [], []
        for k, (p, kind) in enumerate(layout):
            c = p.ctype if p.dtype is None else _CTYPES[p.dtype]
            const = "" if p.is_out else "const "
            if kind == "scalar":
                prologue.append(f"const {c} {p.name} = *(const {c}*)argv[{k}];")
            elif p.raw:
                prologue.append(f"{const}{c}* {p.name} = ({const}{c}*)argv[{k}];")
            else:
                prologue.append(f"{const}{c}* _p_{p.name} = ({const}{c}*)argv[{k}];")
                per_i.append(f"{const}{c}& {p.name} = _p_{p.name}[i];")
        source = ("#include <cmath>\n#include <cstddef>\n#include <cstdint>\n#include <algorithm>\n"
                  "#define CUDART_INF_F INFINITY\n#define CUDART_INF INFINITY\n#define CUDART_NAN_F NAN\n"
                  "using std::isnan; using std::isinf; using std::isfinite; using std::sqrt; using std::exp;\n"
                  "using std::log; using std::fabs; using std::max; using std::min; using std::pow;\n"
                  f"{typedefs}{self.preamble}\n"
                  f"extern \"C\" void run(ptrdiff_t _total, void** argv) {{\n  {' '.join(prologue)}\n"
                  f"  for (ptrdiff_t i = 0; i < _total; ++i) {{\n    {' '.join(per_i)}\n{self.operation}\n  }}\n}}\n")
        key = hashlib.sha256(source.encode()).hexdigest()[:24]
        self._codes[key] = source
        if key in _loaded:
            return _loaded[key]
        CACHE.mkdir(parents=True, exist_ok=True)
        lib = CACHE / f"{self.name}-{key}.so"
        if not lib.exists():
            src = CACHE / f"{self.name}-{key}.{os.getpid()}.cpp"
            src.write_text(source)
            tmp = lib.with_suffix(f".{os.getpid()}.tmp")
            result = subprocess.run(["g++", "-O1", "-shared", "-fPIC", "-o", str(tmp), str(src)],
                                    capture_output=True, text=True)
            src.unlink()
            if result.returncode:
                raise RuntimeError(f"cupy stand-in: kernel {self.name} does not compile as C++ "
                                   f"(NVRTC may still accept it):\n{result.stderr[-3000:]}")
            os.replace(tmp, lib)
        fn = ctypes.CDLL(str(lib)).run
        fn.argtypes = [ctypes.c_ssize_t, ctypes.POINTER(ctypes.c_void_p)]
        fn.restype = None
        _loaded[key] = fn
        return fn


class _Unsupported:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError(f"cupy stand-in: {type(self).__name__} is not supported (tinynet does not use it)")


class ReductionKernel(_Unsupported):
    pass


class RawKernel(_Unsupported):
    pass


class RawModule(_Unsupported):
    pass
