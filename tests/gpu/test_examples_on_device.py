"""The example scripts end to end with ``--device cuda``: on a real GPU, or on the CuPy stand-in in a
subprocess (``tests/cupy_standin/shim`` on PYTHONPATH, ``TINYNET_CUPY_STANDIN=1``).  Small runs: a few
images per class, 1 epoch, 32x32 (ResNet18) or 16x16 (CNN) images."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from cupy_standin.pytest_plugin import ON_STANDIN

pytestmark = [pytest.mark.gpu]
ROOT = pathlib.Path(__file__).resolve().parents[2]


def run(script, *args, timeout=120, report=None):
    import cupy_standin

    env = cupy_standin.standin_env() if ON_STANDIN else dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + env.get("PYTHONPATH", "").split(os.pathsep))
    if report is not None:
        env["TINYNET_CUPY_STANDIN_REPORT"] = str(report)
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    return done


def test_train_cnn_then_predict_on_the_device(tmp_path):
    report = tmp_path / "standin.json"
    run("train_cnn.py", "--device", "cuda", "--epochs", "1", "--limit", "12", "--image-size", "16",
        "--batch-size", "16", "--no-progress", "--out", tmp_path / "cnn", report=report)
    if ON_STANDIN:
        seen = json.loads(report.read_text())
        if os.environ.get("TINYNET_FAST", "1") != "0":  # the fused kernels are the fast path's
            assert any(e["name"].startswith("ElementwiseKernel:") for e in seen["entry_points"])  # they ran
    done = run("predict.py", "--weights", tmp_path / "cnn" / "best.safetensors", "--device", "cuda",
               "--no-progress", tmp_path / "cnn" / "batch_grid.png")
    assert "batch_grid.png" in done.stdout


@pytest.mark.slow  # ~50 s on 2 cores on the stand-in (full-width ResNet18, the report's plots)
def test_train_resnet_on_the_device(tmp_path):
    run("train_resnet.py", "--device", "cuda", "--epochs", "1", "--limit", "10", "--image-size", "32",
        "--batch-size", "16", "--no-progress", "--out", tmp_path / "resnet")
