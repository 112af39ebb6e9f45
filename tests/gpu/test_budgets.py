"""Budgets of the GPU path, counted by the CuPy stand-in: host-device synchronisations, device memory,
kernel launches.  (On real CuPy these tests skip: the stand-in is what counts.)

* No layer synchronises: a whole training step (forward, loss, backward, optimizer step) of ResNet18,
  with BatchNorm or SyncBatchNorm, makes exactly one host-device synchronisation: the loss's check
  that the labels are in range (``tinynet/nn/loss.py``, ``bool(... .any())``), which must stop a
  step with a wrong label before it trains on it.
* ``fit`` adds one read-back per ``log_every`` batches (the running loss and accuracy for the progress
  bar, and the NaN check): with ``log_every`` larger than the epoch, one synchronisation per step.
* Device memory is flat across steps: after the first step (which creates the optimizer state) the live
  and the peak bytes of every later step are the same.
* Kernel launches per ResNet18 step are recorded here (an estimate: one per CuPy operation); the test
  fails when a change makes a step launch 25 % more than recorded.
"""
import numpy as np
import pytest

import tinynet
from tinynet import backend, distributed, nn, optim
from tinynet.models import resnet18, simple_cnn
from fastpath import fast_path_on  # noqa: F401  (a fixture: pins the fast path)

pytestmark = [pytest.mark.gpu]

#: Kernel launches of one ResNet18 training step (batch 4, 32x32, SGD with momentum), fused kernels on,
#: as counted by the stand-in when this was written.
RESNET18_STEP_LAUNCHES = 1100


def _step(model, optimizer, x, y):
    loss = nn.CrossEntropyLoss()
    optimizer.zero_grad()
    loss(model(x), y)
    model.backward(loss.backward())
    optimizer.step()


def _resnet_on_device(sync_batchnorm=False):
    tinynet.manual_seed(0)
    model = resnet18(5, width=16).to("cuda")
    optimizer = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if sync_batchnorm:
        model, optimizer = distributed.prepare(model, optimizer, distributed.init(device="cuda"),
                                               sync_batchnorm=True)
    rng = np.random.default_rng(0)
    x = backend.to_device(rng.standard_normal((4, 3, 32, 32)).astype(np.float32), "cuda")
    y = backend.to_device(rng.integers(0, 5, 4), "cuda")
    return model, optimizer, x, y


@pytest.mark.parametrize("sync_batchnorm", [False, True], ids=["batchnorm", "syncbatchnorm"])
def test_a_training_step_makes_no_host_device_synchronisation(standin, sync_batchnorm):
    if sync_batchnorm:
        pytest.importorskip("mpi4py")
    model, optimizer, x, y = _resnet_on_device(sync_batchnorm)
    _step(model, optimizer, x, y)  # the first step creates the optimizer state
    standin.stats.reset()
    _step(model, optimizer, x, y)
    sites = dict(standin.stats.sync_sites())
    assert len(standin.stats.syncs) == 1 and all(s.startswith("tinynet/nn/loss.py:") for s in sites), \
        f"synchronisations in one step, by site: {sites}"


def test_device_memory_is_flat_across_steps_and_launches_are_recorded(standin, fast_path_on):
    # The launch budget is the fast path's (fused kernels); TINYNET_FAST=0 runs the plain CuPy code.
    model, optimizer, x, y = _resnet_on_device()
    _step(model, optimizer, x, y)
    live, peaks, launches = [], [], []
    for _ in range(3):
        standin.stats.reset()
        _step(model, optimizer, x, y)
        live.append(standin.stats.live_bytes)
        peaks.append(standin.stats.peak_bytes)
        launches.append(standin.stats.launches)
    print(f"\nResNet18 (width 16, batch 4, 32x32) step on the stand-in: {launches[0]} launches, live "
          f"{live[0] / 2**20:.2f} MiB, peak {peaks[0] / 2**20:.2f} MiB; top: "
          f"{standin.stats.launch_names.most_common(8)}")
    assert live[0] == live[1] == live[2], live
    assert peaks[0] == peaks[1] == peaks[2], peaks
    assert launches[0] == launches[1] == launches[2]
    assert launches[0] <= 1.25 * RESNET18_STEP_LAUNCHES, (launches[0], standin.stats.launch_names.most_common(20))
    assert any(name.startswith("ElementwiseKernel:") for name in standin.stats.launch_names)  # the fused kernels ran


def _fit_syncs(standin, batches, tmp_path, log_every):
    from tinynet.data import ArrayDataset, DataLoader
    from tinynet.train import fit

    rng = np.random.default_rng(0)
    data = ArrayDataset(rng.integers(0, 255, (8 * batches, 16, 16, 3)).astype(np.uint8), np.arange(8 * batches) % 2,
                        ["a", "b"])
    tinynet.manual_seed(0)
    model = simple_cnn(2, image_size=16).to("cuda")
    standin.stats.reset()
    fit(model, optim.SGD(model.parameters(), lr=0.01), nn.CrossEntropyLoss(), DataLoader(data, None, 8), None,
        epochs=1, device="cuda", progress=False, log=None, checkpoint_path=tmp_path / f"{batches}.npz",
        log_every=log_every)
    return standin.stats.syncs


def test_fit_synchronises_once_per_step(standin, tmp_path):
    six, three = _fit_syncs(standin, 9, tmp_path, log_every=100), _fit_syncs(standin, 6, tmp_path, log_every=100)
    extra = [s for s in six if s not in three or six.count(s) > three.count(s)]
    assert len(six) - len(three) == 3, (len(six), len(three), sorted(set(extra)))  # one per step: the label check
    assert all(where.startswith("tinynet/nn/loss.py:") for _, where in extra), set(extra)
