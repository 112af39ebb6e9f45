"""The one place that knows NumPy from CuPy.

Every array function in tinynet is written once, against an *array module*
``xp`` that is either :mod:`numpy` or :mod:`cupy`::

    xp = get_array_module(x)      # numpy for a numpy.ndarray, cupy for a cupy.ndarray
    y = xp.maximum(x, 0)

Nothing else in the package imports CuPy.  The import is guarded: tinynet
works without CuPy installed, and asking for ``"cuda"`` then raises an error
that says what is missing and how to install it.

Transfers between host and device are always explicit (:func:`to_device`,
:func:`to_numpy`).  CuPy refuses to mix ``numpy`` and ``cupy`` arrays in one
operation by design; tinynet's layers check the device of their input against
their parameters first, so the error names the layer (:func:`check_same_device`).
"""
from __future__ import annotations


import numpy

try:  # CuPy is optional: the GPU backend.
    import cupy as _cupy
except Exception as _error:  # ImportError, or a broken CUDA install raising at import.
    _cupy = None
    _cupy_import_error: Exception | None = _error
else:
    _cupy_import_error = None

__all__ = [
    "cupy_available",
    "gpu_available",
    "get_array_module",
    "is_cupy_array",
    "device_of",
    "to_device",
    "to_numpy",
    "check_device",
    "check_same_device",
    "synchronize",
    "normalize_device",
    "scratch",
    "copy_to_device_of",
    "elementwise_kernel",
    "keep_freed_host_memory",
    "num_threads",
    "set_num_threads",
    "parallel_for",
    "cuda_collectives",
    "gpu_info",
]

_INSTALL_HINT = (
    "install CuPy for your CUDA version, from the tinynet checkout: `pip install -e \".[cuda12]\"` "
    "(cupy-cuda12x) or `pip install -e \".[cuda13]\"` (cupy-cuda13x)"
)


def cupy_available() -> bool:
    """True when CuPy imported."""
    return _cupy is not None


def gpu_available() -> bool:
    """True when CuPy imported *and* at least one CUDA device answers."""
    if _cupy is None:
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def is_cupy_array(x) -> bool:
    return _cupy is not None and isinstance(x, _cupy.ndarray)


def get_array_module(*arrays):
    """``cupy`` if any argument is a CuPy array, else ``numpy``."""
    if _cupy is not None:
        for a in arrays:
            if isinstance(a, _cupy.ndarray):
                return _cupy
    return numpy


def device_of(x) -> str:
    """``"cuda"`` for a CuPy array, ``"cpu"`` for anything else."""
    return "cuda" if is_cupy_array(x) else "cpu"


def _parse_device(device) -> tuple:
    """``device`` as ``(kind, index)``: ``"cpu"`` -> ("cpu", None), ``"cuda"``/``"gpu"`` -> ("cuda", None),
    ``"cuda:N"`` -> ("cuda", N).  Accepts anything whose ``str`` is such a name (e.g. a ``torch.device``)."""
    name = str(device).strip().lower()
    kind, sep, index = name.partition(":")
    if kind == "gpu" and not sep:
        kind = "cuda"
    if kind in ("cpu", "cuda") and not sep:
        return kind, None
    if kind == "cuda" and index.isdigit():  # digits only: "cuda:-1", "cuda:x" and "cuda:" are errors
        return kind, int(index)
    raise ValueError(f"unknown device {device!r}: expected 'cpu' or 'cuda' (also 'cuda:0')")


def normalize_device(device) -> str:
    """Map user spellings (``"cpu"``, ``"cuda"``, ``"cuda:0"``, ``"gpu"``) to ``"cpu"``/``"cuda"``.

    tinynet runs on one GPU: CuPy's current device, which is the first visible
    GPU unless the program changed it.  ``"cuda:0"`` names that GPU too; any
    other index is refused rather than silently run on GPU 0.  To use another
    GPU, choose it when the process starts, e.g. ``CUDA_VISIBLE_DEVICES=1``
    (that GPU is then ``"cuda"``).

    Raises
    ------
    ValueError
        for an unknown name, or ``"cuda:N"`` with N other than 0.
    """
    kind, index = _parse_device(device)
    if kind == "cuda" and index not in (None, 0):
        raise ValueError(
            f"device {device!r}: tinynet runs on one GPU, 'cuda' (also 'cuda:0', the first visible GPU); "
            f"to run on GPU {index}, start the program with CUDA_VISIBLE_DEVICES={index} and pass 'cuda'"
        )
    return kind


def check_device(device) -> str:
    """Normalise ``device`` and make sure it can be used; raise a clear error if not.

    Returns ``"cpu"`` or ``"cuda"``.  Raises ValueError for a name
    :func:`normalize_device` refuses, and RuntimeError when ``"cuda"`` is asked
    for without CuPy, without a GPU, or as ``"cuda:0"`` while the program made
    another GPU CuPy's current device.
    """
    name = normalize_device(device)
    if name == "cuda":
        if _cupy is None:
            raise RuntimeError(
                f"device {str(device)!r} needs CuPy, which could not be imported "
                f"({type(_cupy_import_error).__name__}: {_cupy_import_error}); {_INSTALL_HINT}"
            )
        if not gpu_available():
            raise RuntimeError(
                f"device {str(device)!r} was requested and CuPy is installed, but no CUDA GPU was found "
                "(check `nvidia-smi` and that the CuPy package matches the installed CUDA driver)"
            )
        if _parse_device(device)[1] == 0 and _cupy.cuda.runtime.getDevice() != 0:
            raise RuntimeError(
                f"device {str(device)!r}: CuPy's current device is GPU {_cupy.cuda.runtime.getDevice()}, "
                f"not 0; pass 'cuda' to use the current device"
            )
    return name


def to_device(x, device):
    """Return ``x`` as an array on ``device`` (a copy only when it has to move).

    On ``"cuda"`` that is CuPy's current device: an array already there is
    returned as it is; one on another GPU is copied (``cupy.asarray`` does both).
    """
    name = check_device(device)
    if name == "cpu":
        return to_numpy(x)
    return _cupy.asarray(x)


def to_numpy(x):
    """Return ``x`` as a NumPy array (copies a CuPy array to the host)."""
    if is_cupy_array(x):
        return _cupy.asnumpy(x)
    return numpy.asarray(x)


def synchronize(x=None) -> None:
    """Wait for the GPU to finish queued work (no-op on the CPU)."""
    if _cupy is not None and (x is None or is_cupy_array(x)):
        if gpu_available():
            _cupy.cuda.get_current_stream().synchronize()


def gpu_info() -> dict:
    """The current GPU and the CUDA software around it, for a run's metrics (empty without a GPU).

    ``gpu`` (the model's name), ``gpu_memory_gib``, ``compute_capability``,
    ``cuda_driver`` and ``cuda_runtime`` (the versions CUDA reports, as
    "13.0"), ``cupy``.  An item that cannot be read holds the error instead:
    a run's metrics are never lost to it.
    """
    if not gpu_available():
        return {}
    runtime = _cupy.cuda.runtime

    def version(code: int) -> str:  # CUDA encodes versions as 1000 * major + 10 * minor
        return f"{code // 1000}.{code % 1000 // 10}"

    def properties():
        return runtime.getDeviceProperties(runtime.getDevice())

    items = {
        "gpu": lambda: _text(properties()["name"]),
        "gpu_memory_gib": lambda: round(properties()["totalGlobalMem"] / 2 ** 30, 1),
        "compute_capability": lambda: f"{properties()['major']}.{properties()['minor']}",
        "cuda_driver": lambda: version(runtime.driverGetVersion()),
        "cuda_runtime": lambda: version(runtime.runtimeGetVersion()),
        "cupy": lambda: _cupy.__version__,
    }
    info = {}
    for key, read in items.items():
        try:
            info[key] = read()
        except Exception as error:  # recorded, not raised
            info[key] = f"unknown ({type(error).__name__}: {error})"
    return info


def _text(name) -> str:
    return name.decode(errors="replace") if isinstance(name, bytes) else str(name)


def check_same_device(x, reference, where: str) -> None:
    """Raise a clear error when ``x`` and ``reference`` live on different devices."""
    if is_cupy_array(x) != is_cupy_array(reference):
        raise RuntimeError(
            f"{where}: input is on {device_of(x)} but the layer's parameters are on "
            f"{device_of(reference)}; move one of them with model.to(...) or "
            f"tinynet.backend.to_device(...)"
        )


def copy_to_device_of(value, like, dtype=None):
    """A new array with ``value``'s contents on ``like``'s device: always a copy, on both backends.

    (``cupy.asarray`` returns its argument itself when dtype and device already
    match, so it cannot be used where the result must not alias the source.)
    """
    if is_cupy_array(like):
        return _cupy.array(value, dtype=dtype, copy=True)
    return numpy.array(to_numpy(value), dtype=dtype, copy=True)


def elementwise_kernel(in_params: str, out_params: str, body: str, name: str, preamble: str = ""):
    """A compiled ``cupy.ElementwiseKernel`` (CuPy compiles it on first launch and caches it)."""
    if _cupy is None:
        raise RuntimeError(f"kernel {name} needs CuPy, which could not be imported; {_INSTALL_HINT}")
    return _cupy.ElementwiseKernel(in_params, out_params, body, name, preamble=preamble)


# The fast path's host machinery lives in tinynet.nn.fast: the thread pool (parallel_for and its
# settings) in tinynet.nn.fast.threads, the reusable buffers (scratch) in tinynet.nn.fast.workspace.
# They stay reachable from here, where the optimizers and older code look for them (imported on
# first use, so importing backend imports nothing else of tinynet).
_FAST_NAMES = {"parallel_for": "threads", "num_threads": "threads", "set_num_threads": "threads",
               "PARALLEL_MIN_ELEMENTS": "threads", "scratch": "workspace"}


def __getattr__(name):
    if name in _FAST_NAMES:
        import importlib

        return getattr(importlib.import_module(f"tinynet.nn.fast.{_FAST_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def keep_freed_host_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel.

    A training step allocates and frees the same large arrays (activations,
    gradients, temporaries of 1-30 MB) every time.  By default glibc returns
    much of that memory to the kernel when it is freed and takes it back on the
    next allocation, and every first touch of a page taken back is a page fault:
    measured here, about 10,000 faults and 40 ms of kernel time per ResNet18
    step (10 % of the step).  With arrays up to ``mmap_threshold`` served from
    the heap and up to ``trim_threshold`` of free heap kept, the faults vanish.
    Peak memory does not grow; the process just keeps its peak until it exits,
    as PyTorch's users get by preloading jemalloc or tcmalloc.

    It changes the whole process's allocator, so tinynet never calls it on
    import (a Jupyter kernel or a server importing tinynet keeps its own
    settings): a training script calls it once, at its start.  Returns whether
    the settings were applied (Linux with glibc only).
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's <malloc.h>
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(m_mmap_threshold, mmap_threshold)) and bool(mallopt(m_trim_threshold, trim_threshold))


def cuda_collectives():
    """CuPy's NCCL bindings and the CUDA calls around them, for :mod:`tinynet.distributed` on GPUs.

    Returns a namespace with ``nccl`` (``cupy.cuda.nccl``), ``stream_pointer()``
    (the current stream's handle, on which the collectives are queued),
    ``record_event()`` (a CUDA event recorded on that stream now: its ``done``
    says, without blocking, whether the GPU has run all queued before it),
    ``use_device(i)`` and ``device_count()``.  Raises RuntimeError without
    CuPy, a GPU or NCCL.
    """
    import types

    check_device("cuda")
    try:
        from cupy.cuda import nccl
    except ImportError as error:
        raise RuntimeError(f"NCCL is not available to CuPy ({error}); install the NCCL library for your CUDA "
                           f"version (e.g. `pip install nvidia-nccl-cu12`)") from None
    if not getattr(nccl, "available", True):
        raise RuntimeError("CuPy was built without NCCL support; multi-GPU training needs it")
    return types.SimpleNamespace(nccl=nccl, stream_pointer=lambda: _cupy.cuda.get_current_stream().ptr,
                                 record_event=lambda: _cupy.cuda.get_current_stream().record(
                                     _cupy.cuda.Event(disable_timing=True)),
                                 use_device=lambda i: _cupy.cuda.Device(i).use(),
                                 device_count=_cupy.cuda.runtime.getDeviceCount)
