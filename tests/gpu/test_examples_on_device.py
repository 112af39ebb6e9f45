"""The example scripts end to end with ``--device cuda``: on a real GPU, or on the CuPy stand-in in a
subprocess (``tests/cupy_standin/shim`` on PYTHONPATH, ``TINYNET_CUPY_STANDIN=1``).  Small runs: a few
images per class, 1 epoch, 32x32 (ResNet18) or 16x16 (CNN) images; the pretraining also on 2 GPUs
(``mpiexec -n 2 ... --distributed --sync-batchnorm``; 2 fake GPUs on the stand-in)."""
import io
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from cupy_standin.pytest_plugin import ON_STANDIN
from two_gpus import run_two_ranks

pytestmark = [pytest.mark.gpu]
ROOT = pathlib.Path(__file__).resolve().parents[2]


def environment(report=None):
    import cupy_standin

    env = cupy_standin.standin_env() if ON_STANDIN else dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    if report is not None:
        env["TINYNET_CUPY_STANDIN_REPORT"] = str(report)
    return env


def run(script, *args, timeout=120, report=None):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), *map(str, args)], cwd=ROOT,
                          env=environment(report), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return done


def run_on_two_gpus(script, *args, timeout=120):
    """``mpiexec -n 2`` the script, one rank per GPU."""
    returncode, stdout, stderr, _ = run_two_ranks((ROOT / "examples" / script, *args), timeout, script)
    assert returncode == 0, (stdout[-3000:], stderr[-3000:])
    return stdout


@pytest.fixture(scope="module")
def tiny_imagenet(tmp_path_factory):
    """A Tiny-ImageNet-like zip: 4 classes of 32x32 JPEGs told apart by colour, 16 + 4 per class."""
    from PIL import Image

    archive = tmp_path_factory.mktemp("tiny") / "tiny.zip"
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(archive, "w") as zipped:
        for c in range(4):
            for split, count in (("train", 16), ("val", 4)):
                for k in range(count):
                    image = np.clip(rng.normal(60 * c + 30, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                    buffer = io.BytesIO()
                    Image.fromarray(image).save(buffer, "JPEG")
                    zipped.writestr(f"{split}/n0{c}/{k}.JPEG", buffer.getvalue())
    return archive


def test_train_cnn_then_predict_on_the_device(tmp_path):
    report = tmp_path / "standin.json"
    run("train_cnn.py", "--device", "cuda", "--epochs", "1", "--limit", "12", "--image-size", "16",
        "--batch-size", "16", "--no-progress", "--out", tmp_path / "cnn", report=report)
    if ON_STANDIN:
        seen = json.loads(report.read_text())
        if os.environ.get("TINYNET_FAST", "1") != "0":  # the fused kernels are the fast path's
            assert any(e["name"].startswith("ElementwiseKernel:") for e in seen["entry_points"])  # they ran
    hardware = json.loads((tmp_path / "cnn" / "metrics.json").read_text())["hardware"]
    # Defect 7 of issue 22: the GPU, its driver, the CUDA runtime and CuPy were missing
    assert {"gpu", "gpu_memory_gib", "compute_capability", "cuda_driver", "cuda_runtime", "cupy"} <= hardware.keys()
    assert not any(str(hardware[k]).startswith("unknown") for k in ("gpu", "cuda_driver", "cuda_runtime", "cupy"))
    if ON_STANDIN:
        assert hardware["gpu"] == "CuPy stand-in (no GPU)" and hardware["cupy"] == "14.2.0+standin"
        assert hardware["cuda_driver"] == hardware["cuda_runtime"] == "13.0"
    done = run("predict.py", "--weights", tmp_path / "cnn" / "best.safetensors", "--device", "cuda",
               "--no-progress", tmp_path / "cnn" / "batch_grid.png")
    assert "batch_grid.png" in done.stdout


@pytest.mark.slow  # 8-20 s on 2 cores on the stand-in (full-width ResNet18, the report's plots)
def test_train_resnet_on_the_device(tmp_path):
    run("train_resnet.py", "--device", "cuda", "--epochs", "1", "--limit", "10", "--image-size", "32",
        "--batch-size", "16", "--no-progress", "--out", tmp_path / "resnet")


PRETRAIN = ("--device", "cuda", "--epochs", "1", "--limit", "8", "--batch-size", "8", "--lr", "0.01", "--no-progress")


def test_pretrain_resnet_on_the_device(tiny_imagenet, tmp_path):
    run("pretrain_resnet.py", "--data", tiny_imagenet, "--out", tmp_path, *PRETRAIN)
    summary = json.loads((tmp_path / "resnet18-tinyimagenet-32px.json").read_text())
    assert summary["epochs"] == 1 and summary["data"]["train_images"] == 32
    assert {"gpu", "cuda_driver", "cuda_runtime", "cupy"} <= summary["hardware"].keys()  # pretraining's too


def test_pretrain_resnet_on_two_gpus_with_sync_batchnorm(tiny_imagenet, tmp_path):
    run_on_two_gpus("pretrain_resnet.py", "--data", tiny_imagenet, "--out", tmp_path, *PRETRAIN,
                             "--distributed", "--sync-batchnorm")
    summary = json.loads((tmp_path / "resnet18-tinyimagenet-32px.json").read_text())
    assert summary["epochs"] == 1 and summary["data"]["train_images"] == 32 and summary["world_size"] == 2
    assert summary["speed"]["ranks"] == 2 and (tmp_path / "resnet18-tinyimagenet-32px.npz").is_file()
