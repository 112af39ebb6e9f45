"""The one seam between the NumPy code and the fused CUDA kernels of the GPU backend.

Every layer's code is written once against an array module and runs on CuPy
as it is.  On the GPU, though, a chain of small element-wise operations is
slow for two reasons: every operation is a kernel launch (a few microseconds
of host time each), and every operation reads and writes whole arrays in
GPU memory.  A handful of fast-path functions therefore have a *fused twin*
(or "CUDA twin"; the word "fused" means this and nothing else in tinynet): the
same formula as one CUDA kernel, run once per output element.  Each twin
stands in the fast path's module for its family, just above the NumPy function
it replaces (the ``@kernels.fused(twin)`` decorator on that function names it),
so a reader sees both side by side:

==========================  ==========================================  ================================
kernel                      replaces                                    defined in
==========================  ==========================================  ================================
``im2col``                  KH*KW strided copies and border zeroing     :mod:`tinynet.nn.fast.conv`
``col2im``                  KH*KW strided additions; a *gather*: each   :mod:`tinynet.nn.fast.conv`
                            pixel sums its own contributions, in a
                            fixed order (deterministic, no atomics)
``max_pool_forward``        KH*KW compare/select passes                 :mod:`tinynet.nn.fast.pool`
``max_pool_backward``       KH*KW routing passes (a gather again)       :mod:`tinynet.nn.fast.pool`
``relu_backward``           compare + multiply                          :mod:`tinynet.nn.fast.activation`
``batch_norm_normalize``    3 passes (scale, gamma, beta)               :mod:`tinynet.nn.fast.norm`
``batch_norm_backward_dx``  4 passes                                    :mod:`tinynet.nn.fast.norm`
``adam_update``             12 passes per parameter                     :mod:`tinynet.optim.adam`
==========================  ==========================================  ================================

The mechanism is two functions:

* :func:`define` registers a kernel's source (CuPy ``ElementwiseKernel``
  syntax) in :data:`SOURCES` and returns a launcher that compiles it on first
  use (through :func:`tinynet.backend.elementwise_kernel`: only ``backend``
  imports CuPy);
* :func:`fused` decorates a NumPy function with its GPU twin: the twin runs
  when the first argument is a CuPy array and fused kernels are enabled, the
  NumPy function otherwise.  No layer tests ``if gpu`` itself.

Each twin computes exactly the formula of the NumPy code it replaces, NaN and
infinities included (see that code's docstring); ``tests/test_kernels_source.py``
compiles every body as C++ and compares it with the NumPy result on the CPU,
and ``tests/gpu`` compares the real kernels on a GPU.  The fused kernels are
part of the fast path: ``TINYNET_FAST=0`` (or ``tinynet.fast_path(False)``,
see :mod:`tinynet.nn.fast`) runs the plain CuPy code instead.  For benchmarks
and bug hunts ``TINYNET_FUSED_KERNELS=0`` turns off only the kernels, keeping
the rest of the fast path.

Layout conventions are the layers': activations are channels-first and
batch-last, (C, H, W, N), contiguous (see :mod:`tinynet.nn.layout`).  Inside
an element-wise kernel ``i`` is the index of the output element and names
``i``, ``n`` and ``_*`` are reserved by CuPy, so batch indices are called
``b``.  CuPy prepends its own ``cupy/math_constants.h`` (``CUDART_INF_F``...)
to every kernel, so no body includes a toolkit header.  A twin writes into
outputs allocated like its input (``empty_like`` keeps strides), because
CuPy's own element-wise kernels return C-contiguous arrays and would turn a
CHWN activation into an NCHW one that the next layer has to copy back.
"""
from __future__ import annotations

import functools
import os

from . import backend
from .nn import fast as _fast

__all__ = ["SOURCES", "define", "fused", "enabled", "GEOMETRY_PARAMS", "geometry_args", "PIXEL_INDEX",
           "FOR_EACH_READER"]

#: name -> (input parameters, output parameters, loop body, preamble), in CuPy's ElementwiseKernel
#: syntax.  Kept as plain data so that tests can compile the same bodies as C++ on the CPU (and with
#: NVRTC where it is installed).  Filled by :func:`define` when the layer modules are imported, which
#: ``import tinynet`` does, so it is complete as soon as this module can be imported.
SOURCES: dict = {}


def enabled(x) -> bool:
    """Whether to use a fused kernel for array ``x``: a CuPy array, on the fast path, kernels not switched off."""
    return (backend.is_cupy_array(x) and _fast.enabled()
            and os.environ.get("TINYNET_FUSED_KERNELS", "1") != "0")


def define(name: str, in_params: str, out_params: str, body: str, preamble: str = ""):
    """Register kernel ``name`` and return ``launch(*args)``, which compiles it once and runs it."""
    if name in SOURCES and SOURCES[name] != (in_params, out_params, body, preamble):
        raise ValueError(f"kernel {name!r} is defined twice with different sources")
    SOURCES[name] = (in_params, out_params, body, preamble)

    def launch(*args, **kwargs):
        return _compiled(name)(*args, **kwargs)

    launch.__name__ = launch.__qualname__ = f"kernel_{name}"
    return launch


@functools.lru_cache(maxsize=None)
def _compiled(name: str):
    in_params, out_params, body, preamble = SOURCES[name]
    return backend.elementwise_kernel(in_params, out_params, body, f"tinynet_{name}", preamble)


def fused(gpu_twin):
    """Decorator: run ``gpu_twin`` instead of the decorated NumPy function for CuPy input (when enabled).

    Both take the same arguments; the decision is made on the first one.  The
    NumPy version stays reachable as ``function.numpy`` and the twin as
    ``function.fused`` (the tests call both).
    """
    def decorate(numpy_version):
        @functools.wraps(numpy_version)
        def run(first, *args, **kwargs):
            if enabled(first):
                return gpu_twin(first, *args, **kwargs)
            return numpy_version(first, *args, **kwargs)

        run.numpy, run.fused = numpy_version, gpu_twin
        return run

    return decorate


# ---------------------------------------------------------------------------
# Building blocks of the window kernels (convolution and pooling)
# ---------------------------------------------------------------------------
GEOMETRY_PARAMS = ("int32 H, int32 W, int32 N, int32 KH, int32 KW, int32 OH, int32 OW, int32 SH, int32 SW, "
                   "int32 PH, int32 PW")


def geometry_args(h, w, n, kernel, stride, padding, oh, ow) -> tuple:
    """The values of :data:`GEOMETRY_PARAMS`, in order."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    return (h, w, n, kh, kw, oh, ow, sh, sw, ph, pw)


# The gather kernels (col2im, max-pool backward) run once per input pixel: element i is pixel (c, y, z, b)
# of a (C, H, W, N) array, and it visits every (kernel cell, output position) that read it, i.e. every
# (ki, kj, oy, ox) with oy*SH + ki - PH == y and ox*SW + kj - PW == z, in a fixed order.
PIXEL_INDEX = """
        ptrdiff_t t = i;
        const int b = t % N; t /= N;
        const int z = t % W; t /= W;
        const int y = t % H;
        const ptrdiff_t c = t / H;
"""
FOR_EACH_READER = """
        for (int ki = 0; ki < KH; ++ki) {{
            const int ry = y + PH - ki;
            if (ry < 0 || ry % SH) continue;
            const int oy = ry / SH;
            if (oy >= OH) continue;
            for (int kj = 0; kj < KW; ++kj) {{
                const int rz = z + PW - kj;
                if (rz < 0 || rz % SW) continue;
                const int ox = rz / SW;
                if (ox >= OW) continue;{body}
            }}
        }}
"""
