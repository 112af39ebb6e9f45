"""Data parallelism on GPUs: NCCL collectives on CuPy arrays, through the same tinynet.distributed API.

On a real GPU, or on the CuPy stand-in (tests/cupy_standin), whose ``cuda.nccl`` runs the collectives
over MPI between fake GPUs.  The world-of-one tests need one GPU; the ``mpiexec -n 2`` tests need two
(NCCL refuses two ranks on one device): on the stand-in, each rank gets one of 2 fake GPUs.

* Two ranks train as one: the CPU equivalence test of tests/test_distributed.py on GPUs, 2 ranks with
  per-rank batch 32 against one process with batch 64, the CNN and ResNet18 with SyncBatchNorm, in
  float64, where the two agree to rounding (1e-9; in float32 the sums in another order differ by ~1e-3
  after 3 steps of ResNet18, which would hide a real error).
* A rank that skips a collective: NCCL only queues a collective and returns, so the wait happens on
  the device; the watchdog keeps watching the collective (its CUDA event) until the GPU has run it,
  and every rank stops within the timeout with one line naming the collective.  The host itself waits
  for none of the collectives (the budget test).
"""
from __future__ import annotations

import json
import pathlib
import sys
import time

import numpy as np
import pytest

TESTS = pathlib.Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # the worker, started by mpiexec, imports the CPU test's helpers
    sys.path.insert(0, str(TESTS))
    sys.path.insert(0, str(TESTS.parent))

from tinynet import backend, distributed, nn, optim  # noqa: E402
from tinynet.data import DataLoader  # noqa: E402

import test_distributed as cpu  # noqa: E402
from cupy_standin.pytest_plugin import ON_STANDIN  # noqa: E402
from two_gpus import run_two_ranks  # noqa: E402

pytestmark = [pytest.mark.gpu]  # on a real GPU, else on the CuPy stand-in (tests/gpu/conftest.py)


WIDTH = 16  # ResNet18's width: the float64 steps of the full width take minutes on the stand-in's CPU


def states_on_gpu(kind, comm=None, sync=False):
    """The state after ``cpu.STEPS`` SGD steps on the GPU, in float64 (the model's dtype), on the host."""
    net = cpu.make_model(kind, width=WIDTH)
    net.to("cuda")
    optimizer = optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(cpu.synthetic_dataset(), batch_size=64, shuffle=True, seed=7, prefetch=0)
    if comm is not None:
        net, optimizer = distributed.prepare(net, optimizer, comm, sync_batchnorm=sync)
        loader = distributed.DistributedLoader.wrap(loader, comm)

    def batches():
        for x, y in loader:
            yield backend.to_device(x, "cuda"), backend.to_device(y, "cuda")

    return cpu.train_steps(net, optimizer, batches())


def worker(out):
    comm = distributed.init(device="cuda")
    results = {}
    for name, kind, sync in (("cnn", "cnn", False), ("resnet_sync", "resnet", True)):
        results.update({f"{name}/{k}": v for k, v in states_on_gpu(kind, comm, sync).items()})
    if comm.is_main:
        np.savez(out / "nccl.npz", **results)


def worker_skip(out):
    """Rank 1 skips the second allreduce and stays away; rank 0 reads the result back."""
    comm = distributed.init(device="cuda", timeout=2.0)
    buf = backend.to_device(np.ones(4, np.float32), "cuda")
    comm.allreduce_(buf)  # together
    if comm.rank == 1:
        time.sleep(60)
        return
    comm.allreduce_(buf)  # alone: NCCL queues it and returns
    backend.to_numpy(buf)  # the host's next read-back; before the fix, rank 0 waited here forever


def worker_budget(out):
    """One ResNet18 step with SyncBatchNorm on 2 ranks, after a first one: the stand-in's counters (rank 0)."""
    import cupy_standin

    from tinynet.models import resnet18

    comm = distributed.init(device="cuda")
    model = resnet18(5, width=WIDTH).to("cuda")
    optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model, optimizer = distributed.prepare(model, optimizer, comm, sync_batchnorm=True)
    rng = np.random.default_rng(comm.rank)
    x = backend.to_device(rng.standard_normal((4, 3, 32, 32)).astype(np.float32), "cuda")
    y = backend.to_device(rng.integers(0, 5, 4), "cuda")
    loss = nn.CrossEntropyLoss()
    for step in range(2):
        cupy_standin.stats.reset()
        optimizer.zero_grad()
        loss(model(x), y)
        model.backward(loss.backward())
        optimizer.step()
    if comm.is_main:
        (out / "budget.json").write_text(json.dumps({"syncs": cupy_standin.stats.syncs,
                                                     "collectives": cupy_standin.stats.launch_names["nccl.allGather"]
                                                     + cupy_standin.stats.launch_names["nccl.allReduce"]
                                                     + cupy_standin.stats.launch_names["nccl.bcast"]}))


def two_ranks(mode, out, timeout):
    """``mpiexec -n 2`` this file's worker on 2 GPUs (fake ones on the stand-in); (returncode, output, seconds)."""
    returncode, stdout, stderr, seconds = run_two_ranks((__file__, mode, out), timeout, f"({mode})")
    return returncode, stdout + stderr, seconds


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


def test_two_gpus_train_as_one(tmp_path):
    returncode, output, _ = two_ranks("train", tmp_path, timeout=240)
    assert returncode == 0, output[-4000:]
    with np.load(tmp_path / "nccl.npz") as data:
        results = {k: data[k] for k in data.files}
    for name, kind in (("cnn", "cnn"), ("resnet_sync", "resnet")):
        reference = states_on_gpu(kind)
        two = cpu.part(results, name)
        assert two.keys() == reference.keys()
        for key, value in two.items():
            assert value.dtype == reference[key].dtype and value.dtype.kind in "fi", (name, key, value.dtype)
            assert value.dtype.kind == "i" or value.dtype == np.float64, (name, key, value.dtype)
            scale = max(float(np.abs(reference[key]).max()), 1.0)
            assert float(np.abs(value - reference[key]).max()) <= 1e-9 * scale, \
                (name, key, float(np.abs(value - reference[key]).max()))


def test_a_rank_that_skips_a_collective_stops_every_rank_within_the_timeout(tmp_path):
    """Defect 1 of issue 22: rank 0's allreduce returned at once (NCCL only queues it), the watchdog left,
    and rank 0 then waited forever in its next read-back, outside any watched window."""
    returncode, output, seconds = two_ranks("skip", tmp_path, timeout=40)
    assert returncode != 0, output[-3000:]
    assert seconds < 25, f"took {seconds:.0f} s to stop"
    assert "rank 0 of 2: allreduce of 4 values waited" in output and "(timeout 2 s)" in output, output[-3000:]


def test_collectives_on_two_gpus_make_the_host_wait_for_none_of_them(tmp_path):
    """The watchdog polls each NCCL call's event on its own thread: a step of ResNet18 with SyncBatchNorm
    (41 collectives) synchronises twice, as on one GPU plus the gradient buckets' read-back."""
    if not ON_STANDIN:
        pytest.skip("counts what the CuPy stand-in sees")
    returncode, output, _ = two_ranks("budget", tmp_path, timeout=120)
    assert returncode == 0, output[-4000:]
    budget = json.loads((tmp_path / "budget.json").read_text())
    sites = sorted(where.split(":")[0] for _, where in budget["syncs"])
    assert budget["collectives"] >= 40  # 20 SyncBatchNorm layers, twice each, and the gradients
    assert sites == ["tinynet/backend.py", "tinynet/nn/loss.py"], budget["syncs"]  # read-back of the flags; labels


if __name__ == "__main__":  # a rank, under mpiexec
    {"train": worker, "skip": worker_skip, "budget": worker_budget}[sys.argv[1]](pathlib.Path(sys.argv[2]))
