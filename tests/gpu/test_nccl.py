"""Data parallelism on GPUs: NCCL collectives on CuPy arrays, through the same tinynet.distributed API.

Skipped without CuPy, a GPU and mpi4py (CI has no GPU).  The world-of-one
tests need one GPU; the ``mpiexec -n 2`` tests need two (NCCL refuses two
ranks on one device).  The two-rank case is the CPU equivalence test of
tests/test_distributed.py in float32 on the GPU: 2 ranks with per-rank batch
32 against one process with batch 64, the CNN and ResNet18 with
SyncBatchNorm, within float32 tolerance (sums in another order).
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

TESTS = pathlib.Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # the worker, started by mpiexec, imports the CPU test's helpers
    sys.path.insert(0, str(TESTS))
    sys.path.insert(0, str(TESTS.parent))

from tinynet import backend, distributed, optim  # noqa: E402
from tinynet.data import DataLoader  # noqa: E402

import test_distributed as cpu  # noqa: E402

pytestmark = [pytest.mark.gpu]  # on a real GPU, else on the CuPy stand-in (tests/gpu/conftest.py)


def gpu_count():
    try:
        return backend.cuda_collectives().device_count()
    except RuntimeError:
        return 0


def states_on_gpu(kind, comm=None, sync=False):
    net = cpu.make_model(kind)
    net.float().to("cuda")
    optimizer = optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(cpu.synthetic_dataset(), batch_size=64, shuffle=True, seed=7, prefetch=0)
    if comm is not None:
        net, optimizer = distributed.prepare(net, optimizer, comm, sync_batchnorm=sync)
        loader = distributed.DistributedLoader.wrap(loader, comm)

    def batches():
        for x, y in loader:
            yield backend.to_device(x, "cuda"), backend.to_device(y, "cuda")

    state = cpu.train_steps(net, optimizer, batches())
    return {k: backend.to_numpy(v).astype(np.float64) for k, v in state.items()}


def worker(out):
    comm = distributed.init(device="cuda")
    results = {}
    for name, kind, sync in (("cnn", "cnn", False), ("resnet_sync", "resnet", True)):
        results.update({f"{name}/{k}": v for k, v in states_on_gpu(kind, comm, sync).items()})
    if comm.is_main:
        np.savez(out / "nccl.npz", **results)


@pytest.fixture(scope="module")
def nccl_world():
    pytest.importorskip("mpi4py")
    import sys

    excepthook = sys.excepthook
    try:
        world = distributed.init(device="cuda")
    except (distributed.DistributedError, RuntimeError) as error:
        pytest.skip(f"NCCL unavailable: {error}")
    yield world
    # init() made this process's world (and its abort-on-error hook): later tests run as a plain process
    distributed._world = distributed.LocalCommunicator()
    sys.excepthook = excepthook


def test_nccl_collectives_in_a_world_of_one(nccl_world):
    import cupy

    a = cupy.arange(10, dtype=cupy.float32)
    assert nccl_world._nccl is not None
    np.testing.assert_array_equal(backend.to_numpy(nccl_world.allreduce_(a.copy())), np.arange(10))
    gathered = nccl_world.allgather(a)
    assert gathered.shape == (1, 10) and backend.is_cupy_array(gathered)
    np.testing.assert_array_equal(backend.to_numpy(nccl_world.broadcast_(a.copy())), np.arange(10))
    assert nccl_world.sum_numbers([1.5, 2]) == [1.5, 2.0]  # host numbers go over MPI


def test_sync_batchnorm_on_the_gpu_is_batchnorm_in_a_world_of_one(nccl_world):
    from tinynet import nn

    rng = np.random.default_rng(0)
    x, dy = (backend.to_device(a.astype(np.float32), "cuda") for a in rng.normal(size=(2, 8, 4, 3, 3)))
    bn = nn.BatchNorm2d(4).to("cuda")
    sync = distributed.SyncBatchNorm(4, comm=nccl_world).to("cuda")
    cpu_side = [backend.to_numpy(v) for v in (bn(x), bn.backward(dy), bn.weight.grad)]
    gpu_side = [backend.to_numpy(v) for v in (sync(x), sync.backward(dy), sync.weight.grad)]
    for a, b in zip(gpu_side, cpu_side):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(gpu_count() < 2, reason="needs two GPUs: NCCL runs one rank per GPU")
def test_two_gpus_train_as_one(tmp_path):
    pytest.importorskip("mpi4py")
    mpiexec = pathlib.Path(sys.executable).with_name("mpiexec")
    if not mpiexec.exists():
        pytest.skip(f"no mpiexec next to {sys.executable}")
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent))
    done = subprocess.run([str(mpiexec), "-n", "2", sys.executable, __file__, str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    with np.load(tmp_path / "nccl.npz") as data:
        results = {k: data[k] for k in data.files}
    for name, kind in (("cnn", "cnn"), ("resnet_sync", "resnet")):
        reference = states_on_gpu(kind)
        for key, value in cpu.part(results, name).items():
            scale = max(float(np.abs(reference[key]).max()), 1e-6)
            assert float(np.abs(value - reference[key]).max()) <= 1e-4 * scale + 1e-6, (name, key)


if __name__ == "__main__":
    worker(pathlib.Path(sys.argv[1]))
