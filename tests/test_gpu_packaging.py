"""The GPU extras install CuPy with NVIDIA's CUDA wheels, so that a machine needs only the driver.

CuPy compiles its kernels (and tinynet's fused ones) at run time with NVRTC,
against the CUDA runtime headers; without a CUDA toolkit on the machine both
must come from PyPI, which CuPy's ``[ctk]`` extra arranges.  That extra exists
from CuPy 14.0 on: the metadata of cupy-cuda12x 13.4.0 and 13.6.0 and of
cupy-cuda13x 13.6.0 lists only the extras ``all`` and ``test`` (read with
``pip install --dry-run --report``), so with a 13.x floor pip may pick a
CuPy that quietly installs without the toolkit (on Python 3.9, say, where
CuPy 14 is not available).
"""
import configparser
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_cuda_extras_are_cupy_14_with_its_toolkit_wheels():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extras = {k: [r for r in v.strip().splitlines() if r] for k, v in cfg["options.extras_require"].items()}
    assert extras["cuda12"] == ["cupy-cuda12x[ctk]>=14.0"]
    assert extras["cuda13"] == ["cupy-cuda13x[ctk]>=14.0"]
