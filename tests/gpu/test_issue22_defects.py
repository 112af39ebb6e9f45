"""Defects of the GPU path found by the CuPy stand-in and a desk-check (issue 22), each pinned by a test
that failed before its fix.  Those pinned elsewhere:

1. the collective watchdog did not cover NCCL: tests/gpu/test_nccl.py::
   test_a_rank_that_skips_a_collective_stops_every_rank_within_the_timeout;
2. the two-GPU test could not pass: tests/gpu/test_nccl.py::test_two_gpus_train_as_one;
3. a synchronisation in every SyncBatchNorm forward: tests/gpu/test_budgets.py::
   test_a_training_step_makes_no_host_device_synchronisation[syncbatchnorm];
7. metrics.json named no GPU, driver, CUDA or CuPy: tests/gpu/test_examples_on_device.py::
   test_train_cnn_then_predict_on_the_device;
10. the GPU check plan: tests/test_gpu_check_plan.py.
"""
import sys

import numpy as np
import pytest

import tinynet
from tinynet import backend, distributed, nn, optim

from fastpath import fast_path_on  # noqa: F401  (a fixture: the fused kernels are the fast path's)

pytestmark = [pytest.mark.gpu]


def test_convert_sync_batchnorm_keeps_the_constants_of_a_gpu_batchnorm_without_affine():
    """Defect 4: the new layer's constant gamma/beta stayed on the host ("parameters are on cpu")."""
    pytest.importorskip("mpi4py")
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, affine=False), nn.ReLU()).to("cuda")
    model = distributed.convert_sync_batchnorm(model, distributed.init(device="cuda"))
    x = backend.to_device(np.random.default_rng(0).standard_normal((2, 3, 5, 5)).astype(np.float32), "cuda")
    y = model(x)
    model.backward(backend.to_device(np.ones(y.shape, np.float32), "cuda"))
    model.eval()
    assert backend.is_cupy_array(model(x))


@pytest.mark.parametrize("spelling", ["cuda:0", "gpu", "CUDA"])
def test_every_device_spelling_the_backend_accepts_means_the_gpu(spelling):
    """Defect 5: "cuda:0" and "gpu" were the CPU to predict's model_forward (and distributed.init, onnx.load)."""
    from tinynet.models import simple_cnn
    from tinynet.predict import model_forward

    model = simple_cnn(3, image_size=16).to("cuda")
    out = model_forward(model, spelling)(np.zeros((2, 3, 16, 16), np.float32))  # refused host input before
    assert isinstance(out, np.ndarray) and out.shape == (2, 3)


def test_distributed_init_takes_any_gpu_spelling(monkeypatch):
    """Defect 5: ``distributed.init(device="cuda:0")`` built no NCCL communicator."""
    pytest.importorskip("mpi4py")
    monkeypatch.setattr(distributed, "_world", None)
    comm = distributed.init(device="cuda:0")
    assert comm._nccl is not None


def test_forcing_winograd_leaves_cupy_convolutions_on_im2col():
    """Defect 8: ``conv.algorithm("winograd_f2")`` ran Winograd on CuPy arrays, against its docstring."""
    from tinynet.nn.fast import conv

    x = backend.to_device(np.zeros((2, 32, 8, 8), np.float32), "cuda")
    with conv.algorithm("winograd_f2"):
        assert conv.choose_algorithm(x, (32, 32, 3, 3), (1, 1), (1, 1)) == "im2col"
        assert conv.choose_algorithm(np.zeros((2, 32, 8, 8), np.float32), (32, 32, 3, 3), (1, 1), (1, 1)) \
            == "winograd_f2"


def test_kn2row_leaves_cupy_convolutions_on_im2col():
    """kn2row (tinynet.nn.fast.kn2row) is measured on the CPU only: neither the rule nor forcing picks it on CuPy."""
    from tinynet.nn.fast import conv

    x = backend.to_device(np.zeros((64, 512, 2, 2), np.float32), "cuda")
    assert conv.choose_algorithm(x, (512, 512, 3, 3), (1, 1), (1, 1)) == "im2col"
    assert conv.choose_algorithm(np.zeros((64, 512, 2, 2), np.float32), (512, 512, 3, 3), (1, 1), (1, 1)) == "kn2row"
    with conv.algorithm("kn2row"):
        assert conv.choose_algorithm(x, (512, 512, 3, 3), (1, 1), (1, 1)) == "im2col"


def test_gpu_check_warmup_reports_the_fused_kernels_it_compiled(monkeypatch, fast_path_on):
    """Defect 9: the warm-up probe looked for ``kernels._kernel`` and never reported the compiled kernels."""
    import pathlib

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
    from benchmarks import gpu_check
    from tinynet import models

    small = models.resnet18
    monkeypatch.setattr(models, "resnet18", lambda n: small(n, width=4))
    timings = gpu_check.probe_warmup("cuda")
    assert {"im2col", "col2im", "adam_update"} <= set(timings["fused_kernels_compiled"]), timings
