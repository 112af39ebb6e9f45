"""``mpiexec -n 2`` with one rank per GPU (one of 2 fake GPUs each on the CuPy stand-in), for the GPU tests.

The job runs in its own session, so that a timeout ends every rank (``subprocess.run`` would end
mpiexec alone and leave the ranks running).
"""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from cupy_standin.pytest_plugin import ON_STANDIN

ROOT = pathlib.Path(__file__).resolve().parents[2]


def gpu_count() -> int:
    """The GPUs NCCL can use here (0 without CuPy, a GPU or NCCL)."""
    from tinynet import backend

    try:
        return backend.cuda_collectives().device_count()
    except RuntimeError:
        return 0


def run_two_ranks(command, timeout: float, what: str):
    """``mpiexec -n 2 python *command`` from the project's root: ``(returncode, stdout, stderr, seconds)``.

    Skips without mpi4py, an ``mpiexec`` beside the interpreter, or two GPUs (NCCL runs one rank
    per GPU); fails, naming ``what``, when the job has not ended after ``timeout`` seconds.
    """
    pytest.importorskip("mpi4py")
    mpiexec = pathlib.Path(sys.executable).with_name("mpiexec")
    if not mpiexec.exists():
        pytest.skip(f"no mpiexec next to {sys.executable}")
    if ON_STANDIN:
        import cupy_standin

        env = cupy_standin.standin_env(devices=2)
    else:
        if gpu_count() < 2:
            pytest.skip("needs two GPUs: NCCL runs one rank per GPU")
        env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
    started = time.monotonic()
    job = subprocess.Popen([str(mpiexec), "-n", "2", sys.executable, *map(str, command)], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        stdout, stderr = job.communicate()
        pytest.fail(f"mpiexec -n 2 {what} did not end within {timeout} s:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    return job.returncode, stdout, stderr, time.monotonic() - started
