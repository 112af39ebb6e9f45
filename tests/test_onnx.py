"""ONNX export (tinynet.onnx): a standard graph that onnxruntime runs to tinynet's logits."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinynet import nn
from tinynet.models import resnet18, simple_cnn
from tinynet.nn import no_grad
from tinynet.predict import model_metadata, save_model

from conftest import assert_close_to_scale
from test_examples import run_script

onnx = pytest.importorskip("onnx", reason="onnx not installed (optional extra 'onnx')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (optional extra 'onnx')")

from tinynet.onnx import OPSET, ExportError, OnnxUnavailable, export, load, onnx_forward  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STANDARD_OPS = {"Conv", "BatchNormalization", "Relu", "MaxPool", "GlobalAveragePool", "Gemm", "Add", "Flatten",
                "Identity"}


def trained_batch_norm_statistics(model, rng, steps=3):
    """Running means and variances that are not the initial 0 and 1 (a few forward passes in train mode)."""
    model.train()
    for _ in range(steps):
        model(rng.normal(0.3, 1.5, size=(8, 3, 32, 32)).astype(np.float32))
    model.eval()


def parity(model, path, rng, batch=5):
    """Export, check, run both on the same inputs; returns the max error relative to max |logit|."""
    proto = export(model, path, (1, 3, 32, 32), metadata={"classes": ["a"]})
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert {node.op_type for node in proto.graph.node} <= STANDARD_OPS
    assert [op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")] == [OPSET]
    x = rng.normal(size=(batch, 3, 32, 32)).astype(np.float32)  # another batch size than exported with
    model.eval()
    with no_grad():
        expected = model(x)
    session, meta = load(path)
    got = onnx_forward(session)(x)
    assert got.dtype == np.float32 and meta == {"classes": ["a"]}
    assert_close_to_scale(got, expected, 1e-4, type(model).__name__)
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def test_cnn_logits_match_onnxruntime(tmp_path, rng):
    error = parity(simple_cnn(7, image_size=32), tmp_path / "cnn.onnx", rng)
    print(f"CNN: onnxruntime vs tinynet, max error / max |logit| = {error:.2e}")


def test_resnet18_logits_match_onnxruntime(tmp_path, rng):
    model = resnet18(5)  # full width, 11 M parameters, at 32x32
    trained_batch_norm_statistics(model, rng)
    error = parity(model, tmp_path / "resnet.onnx", rng)
    proto = onnx.load(str(tmp_path / "resnet.onnx"))
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count("Add") == 8 and ops.count("BatchNormalization") == 20 and ops.count("Conv") == 20
    assert "layer2.0.downsample.0.weight" in {init.name for init in proto.graph.initializer}
    print(f"ResNet18: onnxruntime vs tinynet, max error / max |logit| = {error:.2e}")


def test_dropout_and_linear_head_export_as_eval_mode(tmp_path, rng):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4),
                          nn.Softmax(dim=1))
    x = rng.normal(size=(3, 3, 32, 32)).astype(np.float32)
    export(model, tmp_path / "mlp.onnx", (1, 3, 32, 32))
    session, _ = load(tmp_path / "mlp.onnx")
    model.eval()
    with no_grad():
        assert_close_to_scale(onnx_forward(session)(x), model(x), 1e-5)


def test_a_layer_without_translation_is_named(tmp_path):
    class Swish(nn.Module):
        def forward(self, x):
            return x / (1 + np.exp(-x))

    model = nn.Sequential(nn.Conv2d(3, 4, 3), Swish())
    with pytest.raises(ExportError, match=r"cannot export 1 \(Swish\): no ONNX translation"):
        export(model, tmp_path / "x.onnx", (1, 3, 8, 8))
    assert not (tmp_path / "x.onnx").exists()
    with pytest.raises(ExportError, match="only global average pooling"):
        export(nn.Sequential(nn.AdaptiveAvgPool2d(2)), tmp_path / "x.onnx", (1, 3, 8, 8))


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(OnnxUnavailable, match=r'pip install "tinynet\[onnx\]"'):
        export(simple_cnn(3, image_size=16), tmp_path / "x.onnx", (1, 3, 16, 16))




@pytest.fixture
def shipped(tmp_path, rng):
    """A best.safetensors as a run writes it (a ResNet18 of width 8 at 32x32), and two photos."""
    model = resnet18(3, width=8)
    trained_batch_norm_statistics(model, rng)
    save_model(tmp_path / "best.safetensors", model, model_metadata("resnet", model, ["cat", "dog", "owl"], 32))
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, size=(50, 40, 3), dtype=np.uint8)).save(tmp_path / f"photo{i}.png")
    return tmp_path


def test_export_script_then_predict_with_onnxruntime_matches_the_weights(shipped):
    result = run_script("export_onnx.py", "--weights", shipped / "best.safetensors", "--out", shipped / "model.onnx")
    assert result.returncode == 0, result.stderr
    assert "opset 17" in result.stdout
    by_weights = run_script("predict.py", "--weights", shipped / "best.safetensors", shipped, "--top-k", 3)
    by_onnx = run_script("predict.py", "--onnx", shipped / "model.onnx", shipped, "--top-k", 3)
    assert by_weights.returncode == 0 and by_onnx.returncode == 0, by_onnx.stderr
    # the same ranking and probabilities (printed to 0.1 %) for every photo
    assert by_onnx.stdout == by_weights.stdout and by_onnx.stdout.count("\n") == 2


def test_readme_onnxruntime_snippet_runs(shipped):
    """The README's onnxruntime snippet, verbatim, on an exported model and a photo."""
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"```python\n(# onnxruntime alone.*?)```", readme, re.S)
    assert snippet, "README.md lost its onnxruntime snippet"
    assert run_script("export_onnx.py", "--weights", shipped / "best.safetensors",
                       "--out", shipped / "model.onnx").returncode == 0
    (shipped / "photo.jpg").write_bytes((shipped / "photo0.png").read_bytes())
    result = subprocess.run([sys.executable, "-c", snippet.group(1)], capture_output=True, text=True, timeout=120,
                            cwd=shipped)
    assert result.returncode == 0, result.stderr
    expected = run_script("predict.py", "--onnx", shipped / "model.onnx", shipped / "photo.jpg", "--top-k", 1)
    top1 = expected.stdout.split(": ", 1)[1].split()[0]
    assert result.stdout.split()[0] == top1
