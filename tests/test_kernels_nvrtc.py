"""Every fused kernel's CUDA source, compiled by the real NVRTC on the CPU, wrapped as CuPy wraps it.

NVRTC compiles CUDA C++ to PTX without a GPU or a driver, and NVIDIA ships it
on PyPI.  So the header and syntax errors that would otherwise surface only at
the first call on a lent GPU are caught here: each entry of
``tinynet.kernels.SOURCES`` is turned into the translation unit CuPy 14 builds
for an ``ElementwiseKernel`` (``cupy/_core/_kernel.pyx``,
``_get_elementwise_kernel_code``; the headers and options of ``core.pyx``'s
``compile_with_cache`` and ``assemble_cupy_compiler_options``), for float32
and float64 (and each argmax index type), with the arrays contiguous (CuPy
then reduces them to 1-D) and strided (4-D, 64-bit indices), and compiled for
the H200 (``-arch=compute_90``) against CuPy's own headers.

Needs, found without importing CuPy (importing it would change what
``tinynet.backend`` sees for the rest of the test session):

* NVRTC: ``libnvrtc.so`` from the wheel ``nvidia-cuda-nvrtc-cu12`` (or the CUDA 13
  ``nvidia-cuda-nvrtc``), or a CUDA toolkit;
* CuPy's headers: the ``include`` folder of an installed ``cupy-cuda12x``/``cupy-cuda13x``
  (the wheel installs without a GPU; its files are what matters here);
* optionally the CUDA runtime headers (``nvidia-cuda-runtime-cu12``), as CuPy's ``[ctk]`` extra
  or a toolkit provides them.

They are looked for in the folders named by ``TINYNET_CUDA_WHEELS`` (``os.pathsep``-separated,
e.g. a ``pip install --no-deps --target DIR cupy-cuda12x nvidia-cuda-nvrtc-cu12
nvidia-cuda-runtime-cu12`` folder, which keeps CuPy off ``sys.path``), then in
``<repo>/.cuda-wheels``, then on ``sys.path``.  Without NVRTC or CuPy's headers every test here
skips.
"""
import ctypes
import glob
import importlib.util
import itertools
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from tinynet import kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]

# cupy/_core/core.pyx: the headers compile_with_cache prepends to every kernel (CuPy 14, CUDA).
CUPY_HEADERS = ("cupy/complex.cuh", "cupy/carray.cuh", "cupy/atomics.cuh", "cupy/math_constants.h")
ARCH = "compute_90"  # the H200 the GPU checks run on
TYPENAMES = {"float32": "float", "float64": "double", "uint8": "unsigned char", "int16": "short",
             "int32": "int", "int64": "long long", "bool": "bool"}  # cupy/_core/_scalar.pyx, get_typename


# ---------------------------------------------------------------------------
# Finding NVRTC and the headers
# ---------------------------------------------------------------------------
def _roots():
    roots = [pathlib.Path(p) for p in os.environ.get("TINYNET_CUDA_WHEELS", "").split(os.pathsep) if p]
    roots.append(ROOT / ".cuda-wheels")
    spec = importlib.util.find_spec("cupy")  # a top-level find_spec locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        roots.append(pathlib.Path(next(iter(spec.submodule_search_locations))).parent)
    roots += [pathlib.Path(p) for p in sys.path if p and os.path.isdir(p)]
    return list(dict.fromkeys(r for r in roots if r.is_dir()))


def _first(patterns):
    for root in _roots():
        for pattern in patterns:
            found = sorted(glob.glob(str(root / pattern)))
            if found:
                return pathlib.Path(found[-1])
    return None


def find_nvrtc():
    found = _first(["nvidia/cuda_nvrtc/lib/libnvrtc.so.*[0-9]", "nvidia/cu13/lib/libnvrtc.so.*[0-9]",
                    "nvidia/cuda_nvrtc/lib/libnvrtc.so"])
    if found is None:
        toolkit = sorted(glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*"))
        found = pathlib.Path(toolkit[-1]) if toolkit else None
    return found


def find_cupy_include():
    found = _first(["cupy/_core/include/cupy/carray.cuh"])
    return found.parents[1] if found else None


def find_cuda_include():
    found = _first(["nvidia/cuda_runtime/include/cuda_fp16.h", "nvidia/cu13/include/cuda_fp16.h"])
    return found.parent if found else None


NVRTC_PATH, CUPY_INCLUDE, CUDA_INCLUDE = find_nvrtc(), find_cupy_include(), find_cuda_include()
pytestmark = pytest.mark.skipif(
    NVRTC_PATH is None or CUPY_INCLUDE is None,
    reason=f"needs NVRTC ({NVRTC_PATH or 'not found'}) and CuPy's headers ({CUPY_INCLUDE or 'not found'}): "
           f"pip install nvidia-cuda-nvrtc-cu12 and cupy-cuda12x, or point TINYNET_CUDA_WHEELS at a folder of them")


class NVRTCError(RuntimeError):
    pass


class NVRTC:
    """The four calls of NVRTC's C API that compiling to PTX needs, through ctypes."""

    def __init__(self, path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version = (major.value, minor.value)

    def _check(self, status, what, log=""):
        if status != 0:
            raise NVRTCError(f"{what}: {self.lib.nvrtcGetErrorString(status).decode()}\n{log}")

    def compile(self, source: str, name: str, options) -> str:
        """PTX of ``source``; NVRTCError with the compiler's log when it does not compile."""
        prog = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{name}.cu".encode(),
                                                0, None, None), "nvrtcCreateProgram")
        try:
            opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            status = self.lib.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            self.lib.nvrtcGetProgramLog(prog, log)
            self._check(status, f"compiling {name}", log.value.decode(errors="replace"))
            self._check(self.lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
            ptx = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
            return ptx.value.decode()
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.fixture(scope="module")
def nvrtc():
    return NVRTC(NVRTC_PATH)


def compiler_options():
    """assemble_cupy_compiler_options (CuPy 14) plus what _compile_with_cache_cuda adds."""
    inc = CUPY_INCLUDE
    options = [f"-I{inc}/cupy/_cccl/cub", f"-I{inc}/cupy/_cccl/thrust", f"-I{inc}/cupy/_cccl/libcudacxx",
               "--std=c++17", f"-I{inc}"]
    if CUDA_INCLUDE is not None:  # the CUDA headers, from CuPy's [ctk] wheels or a toolkit
        options.append(f"-I{CUDA_INCLUDE}")
    return options + ["-ftz=true", f"-arch={ARCH}"]


# ---------------------------------------------------------------------------
# The translation unit CuPy builds for an ElementwiseKernel
# ---------------------------------------------------------------------------
def parse_params(params: str, is_const: bool):
    """CuPy's ParameterInfo: ``"raw T x, int32 H"`` -> [dict(name, type, raw, const)]."""
    out = []
    for item in params.split(","):
        words = item.split()
        if not words:
            continue
        *keywords, typ, name = words
        assert set(keywords) <= {"raw"}, item
        out.append({"name": name, "type": typ, "raw": "raw" in keywords, "const": is_const})
    return out


def carray_arity() -> int:
    """Template parameters of CArray in this CuPy's carray.cuh (4 in CuPy 14; newer ones add core_ndim)."""
    text = (CUPY_INCLUDE / "cupy" / "carray.cuh").read_text()
    match = re.search(r"template\s*<([^>]*)>\s*class CArray\s*\{", text)
    return len(match.group(1).split(","))


def arg_layout(name: str, type_map: dict, strided: bool) -> list:
    """What CuPy sees at the call: per parameter its kind ("array", "scalar"), dtype, ndim and flags.

    ``type_map`` gives the dtype of each type placeholder (T, S).  Arrays that are not ``raw``
    are 1-D contiguous with 32-bit indices (CuPy's reduced view of C-contiguous arguments) or,
    ``strided``, 4-D non-contiguous with 64-bit indices; ``raw`` arrays are 4-D contiguous.
    The last entry is the indexer CuPy appends (``CIndexer _ind``).
    """
    in_params, out_params, _, _ = kernels.SOURCES[name]
    layout = []
    for p in parse_params(in_params, True) + parse_params(out_params, False):
        dtype = type_map.get(p["type"], p["type"])
        if not _is_array(name, p):
            layout.append(dict(p, kind="scalar", dtype=dtype, ndim=0, contiguous=1, index32=1))
        elif p["raw"]:
            layout.append(dict(p, kind="array", dtype=dtype, ndim=4, contiguous=1, index32=1))
        else:
            layout.append(dict(p, kind="array", dtype=dtype, ndim=4 if strided else 1,
                               contiguous=0 if strided else 1, index32=0 if strided else 1))
    layout.append({"name": "_ind", "kind": "indexer", "ndim": 4 if strided else 1, "index32": 0 if strided else 1})
    return layout


def elementwise_code(name: str, type_map: dict, strided: bool) -> str:
    """CuPy's kernel code for ``ElementwiseKernel(in, out, body, "tinynet_" + name, preamble=...)``
    called with arguments laid out as :func:`arg_layout` says (before the headers are prepended)."""
    _, _, body, preamble = kernels.SOURCES[name]
    extra = ", 0" if carray_arity() == 5 else ""
    args, loads = [], []
    for a in arg_layout(name, type_map, strided):
        const = "const " if a.get("const") else ""
        if a["kind"] == "indexer":
            args.append(f"CIndexer<{a['ndim']}, {a['index32']}> _ind")
        elif a["kind"] == "scalar":
            args.append(f"{const}{TYPENAMES[a['dtype']]} {a['name']}")
        else:
            carray = f"{const}CArray<{TYPENAMES[a['dtype']]}, {a['ndim']}, {a['contiguous']}, {a['index32']}{extra}>"
            if a["raw"]:
                args.append(f"{carray} {a['name']}")
            else:  # CuPy binds a reference to the element of the index being computed
                args.append(f"{carray} _raw_{a['name']}")
                ctype = a["type"] if len(a["type"]) == 1 else TYPENAMES[a["type"]]
                loads.append(f"{const}{ctype} &{a['name']} = _raw_{a['name']}[_ind.get()];")
    typedefs = "".join(f"typedef {TYPENAMES[dtype]} {placeholder};\n" for placeholder, dtype in sorted(type_map.items()))
    operation = "\n".join(loads + [body])
    return f"""
    {typedefs}
    {preamble}
    extern "C" __global__ void tinynet_{name}({', '.join(args)}) {{
      ;
      #pragma unroll 1
      CUPY_FOR(i, _ind.size()) {{
        _ind.set(i);
        {operation};
      }}
      ;
    }}
    """


def elementwise_source(name: str, type_map: dict, strided: bool) -> str:
    """The whole translation unit: CuPy's headers, then :func:`elementwise_code`."""
    return "".join(f"#include <{h}>\n" for h in CUPY_HEADERS) + elementwise_code(name, type_map, strided)


# Whether an argument is an array or a scalar is decided by what the caller passes, not by the
# declaration.  tinynet.kernels passes arrays for every raw parameter, every output and every
# placeholder-typed input except these (Adam's coefficients, passed as NumPy scalars of T), and
# scalars for the explicitly typed inputs (int32 H, int64 m, ...).
SCALARS = {"adam_update": ("b1", "b2", "step_size", "sqrt_bc2", "eps")}


def _is_array(kernel, p) -> bool:
    if p["raw"] or not p["const"]:  # raw, or an output
        return True
    return len(p["type"]) == 1 and p["name"] not in SCALARS.get(kernel, ())


def type_maps(name):
    """Every (placeholder -> dtype) combination a kernel is called with."""
    in_params, out_params, _, _ = kernels.SOURCES[name]
    placeholders = {p["type"] for p in parse_params(in_params, True) + parse_params(out_params, False)
                    if len(p["type"]) == 1}
    choices = {"T": ("float32", "float64"), "S": ("uint8", "int16")}  # S: max-pool argmax, uint8 up to 256 cells
    names = sorted(placeholders)
    for combo in itertools.product(*(choices[p] for p in names)):
        yield dict(zip(names, combo))


CASES = [pytest.param(name, tm, strided, id=f"{name}-{'-'.join(tm.values())}-{'strided' if strided else 'contiguous'}")
         for name in sorted(kernels.SOURCES) for tm in type_maps(name) for strided in (False, True)]


@pytest.mark.parametrize("name,type_map,strided", CASES)
def test_every_fused_kernel_compiles_with_nvrtc(nvrtc, name, type_map, strided):
    ptx = nvrtc.compile(elementwise_source(name, type_map, strided), f"tinynet_{name}", compiler_options())
    assert f".entry tinynet_{name}(" in ptx  # extern "C": the unmangled name CuPy looks up
    assert f".target sm_{ARCH.split('_')[1]}" in ptx


@pytest.mark.parametrize("name,type_map", [pytest.param(name, tm, id=f"{name}-{'-'.join(tm.values())}")
                                            for name in sorted(kernels.SOURCES) for tm in type_maps(name)])
def test_every_fused_kernel_compiles_with_cupys_headers_alone(nvrtc, name, type_map):
    """Without the CUDA toolkit's headers: a kernel may rely only on what CuPy prepends (its own
    cupy/math_constants.h among them), since where CuPy finds the toolkit's headers depends on the
    machine (a toolkit, CuPy's [ctk] wheels, or neither), while its own always come with it."""
    options = [o for o in compiler_options() if CUDA_INCLUDE is None or o != f"-I{CUDA_INCLUDE}"]
    nvrtc.compile(elementwise_source(name, type_map, False), f"tinynet_{name}", options)


def test_a_kernel_that_does_not_compile_fails_with_the_compilers_message(nvrtc, monkeypatch):
    monkeypatch.setitem(kernels.SOURCES, "broken", ("T x", "T y", "y = x + undefined_name;", ""))
    with pytest.raises(NVRTCError, match=r"identifier \"undefined_name\" is undefined"):
        nvrtc.compile(elementwise_source("broken", {"T": "float32"}, False), "broken", compiler_options())


def test_a_missing_header_fails(nvrtc, monkeypatch):
    monkeypatch.setitem(kernels.SOURCES, "missing", ("T x", "T y", "y = x;", "#include <no_such_header.h>"))
    with pytest.raises(NVRTCError, match="no_such_header.h"):
        nvrtc.compile(elementwise_source("missing", {"T": "float32"}, False), "missing", compiler_options())


# Run where CuPy imports (a subprocess, with tinynet): CuPy's own code generation for each case.
_CUPY_CODEGEN = """
import json, sys
import numpy as np
import cupy
from cupy._core import _kernel as K
from tinynet import kernels
KIND = {"array": 1, "indexer": 2, "scalar": 3}  # cupy/_core/_kernel.pxd, _ArgKind
out = {}
for case, name, type_map, layout in json.loads(sys.stdin.read()):
    in_params, out_params, body, preamble = kernels.SOURCES[name]
    ek = cupy.ElementwiseKernel(in_params, out_params, body, "tinynet_" + name, preamble=preamble)
    infos = tuple(K._ArgInfo(KIND[a["kind"]], cupy.ndarray if a["kind"] == "array" else object,
                             np.dtype(a["dtype"]) if "dtype" in a else None, a["ndim"],
                             bool(a.get("contiguous", 1)), bool(a["index32"])) for a in layout)
    type_map = K._TypeMap(tuple(sorted((k, np.dtype(v)) for k, v in type_map.items())))
    out[case] = K._get_elementwise_kernel_code(infos, type_map, ek.params, ek.operation, ek.name, ek.preamble)
print(json.dumps(out))
"""


def _run_with_cupy(script, stdin=""):
    """The JSON that ``script`` prints, run by a Python that imports the CuPy found above (in a
    subprocess: this test session must not import CuPy); None when CuPy does not import there."""
    guard = "try:\n    import cupy\nexcept Exception:\n    print('null')\n    raise SystemExit(0)\n"
    site = str(CUPY_INCLUDE.parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([site, str(ROOT), os.environ.get("PYTHONPATH", "")]),
               LD_LIBRARY_PATH=os.pathsep.join([str(NVRTC_PATH.parent), os.environ.get("LD_LIBRARY_PATH", "")]))
    result = subprocess.run([sys.executable, "-c", guard + script], input=stdin, capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_wrapping_is_cupys_own_code_generation():
    """Every case above, generated by the installed CuPy's _get_elementwise_kernel_code, equals ours
    (up to whitespace): the NVRTC tests compile what CuPy would compile."""
    cases = [(f"{name}/{tm}/{strided}", name, tm, arg_layout(name, tm, strided)) for name in sorted(kernels.SOURCES)
             for tm in type_maps(name) for strided in (False, True)]
    theirs = _run_with_cupy(_CUPY_CODEGEN, json.dumps(cases))
    if theirs is None:
        pytest.skip(f"CuPy at {CUPY_INCLUDE.parents[2]} does not import here")

    def squeeze(code):
        return " ".join(code.split())

    for case, name, tm, _ in cases:
        strided = case.endswith("True")
        assert squeeze(elementwise_code(name, tm, strided)) == squeeze(theirs[case]), case


def test_the_headers_and_options_are_the_installed_cupys():
    """The installed CuPy's own header list and compiler options (its include folders and C++
    standard) are the ones used here."""
    cupy = _run_with_cupy("import json\nfrom cupy._core import core\n"
                          "print(json.dumps({'headers': list(core._cupy_header_list),"
                          " 'options': list(core.assemble_cupy_compiler_options(()))}))\n")
    if cupy is None:
        pytest.skip(f"CuPy at {CUPY_INCLUDE.parents[2]} does not import here")
    assert tuple(cupy["headers"]) == CUPY_HEADERS

    def own(options):  # CuPy's include folders and C++ standard; the CUDA headers' place depends on the machine
        return [o for o in options if o.startswith(f"-I{CUPY_INCLUDE}") or o.startswith("--std")]

    assert own(cupy["options"]) == own(compiler_options())
