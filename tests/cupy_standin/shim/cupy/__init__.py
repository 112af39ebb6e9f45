"""``import cupy`` -> tinynet's CuPy stand-in (tests/cupy_standin), for subprocesses and ``mpiexec``.

Only active with ``TINYNET_CUPY_STANDIN=1``; otherwise this shim refuses, so a stray PYTHONPATH never
hides a real CuPy installation's absence behind a fake one.
"""
import os
import pathlib
import sys

if os.environ.get("TINYNET_CUPY_STANDIN") != "1":
    raise ImportError("tests/cupy_standin/shim is on PYTHONPATH but TINYNET_CUPY_STANDIN is not 1")
_tests = str(pathlib.Path(__file__).resolve().parents[3])
if _tests not in sys.path:
    sys.path.insert(0, _tests)
import cupy_standin  # noqa: E402

cupy_standin.install()
