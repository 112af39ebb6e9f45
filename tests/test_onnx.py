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
    with pytest.raises(OnnxUnavailable, match=r'pip install -e "\.\[onnx\]"'):
        export(simple_cnn(3, image_size=16), tmp_path / "x.onnx", (1, 3, 16, 16))



# ---------------------------------------------------------------------------
# Every layer the exporter accepts, in odd settings, against onnxruntime
# ---------------------------------------------------------------------------
def randomised(model, rng):
    """``model`` with random weights, affine parameters and running statistics (not the initial 1 and 0)."""
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = module.num_features
            if module.affine:
                module.weight.data[...] = rng.uniform(0.5, 1.5, c)
                module.bias.data[...] = rng.normal(0, 0.5, c)
            module.running_mean[...] = rng.normal(0, 0.5, c)
            module.running_var[...] = rng.uniform(0.2, 2.0, c)
    return model


def shared_conv_model():
    conv, relu = nn.Conv2d(3, 3, 3, padding=1), nn.ReLU()
    return nn.Sequential(conv, relu, conv, relu)  # the same layers twice: one set of weights


LAYER_CASES = {
    "grouped conv": (lambda: nn.Sequential(nn.Conv2d(4, 6, 3, groups=2)), (4, 9, 9)),
    "depthwise conv, no bias": (lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)), (4, 8, 8)),
    "depthwise x2, unequal kernel/stride/padding": (
        lambda: nn.Sequential(nn.Conv2d(3, 6, (3, 1), stride=(2, 1), padding=(1, 0), groups=3)), (3, 9, 7)),
    "conv unequal padding and strides, no bias": (
        lambda: nn.Sequential(nn.Conv2d(3, 5, (2, 3), stride=(1, 2), padding=(0, 2), bias=False)), (3, 7, 8)),
    "pointwise conv": (lambda: nn.Sequential(nn.Conv2d(3, 4, 1)), (3, 5, 6)),
    "conv 5x5 stride 3": (lambda: nn.Sequential(nn.Conv2d(3, 2, 5, stride=3, padding=2)), (3, 11, 10)),
    "3x3 conv on a larger image": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)), (3, 32, 32)),
    "max pool 3/2/1": (lambda: nn.Sequential(nn.MaxPool2d(3, 2, 1)), (3, 9, 7)),
    "max pool unequal": (lambda: nn.Sequential(nn.MaxPool2d((3, 2), stride=(2, 1), padding=(1, 0))), (2, 8, 7)),
    "max pool floors odd sizes": (lambda: nn.Sequential(nn.MaxPool2d(2)), (2, 7, 9)),
    "avg pool with padding counted": (lambda: nn.Sequential(nn.AvgPool2d(3, 2, 1)), (2, 9, 8)),
    "avg pool with padding not counted": (
        lambda: nn.Sequential(nn.AvgPool2d((3, 3), stride=(1, 2), padding=1, count_include_pad=False)), (2, 7, 9)),
    "global average pool": (lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), (3, 5, 7)),
    "batch norm 2d, eps and momentum": (
        lambda: nn.Sequential(nn.BatchNorm2d(3, eps=0.1, momentum=0.7), nn.ReLU()), (3, 4, 5)),
    "batch norm 2d, no affine, cumulative": (
        lambda: nn.Sequential(nn.BatchNorm2d(3, affine=False, momentum=None)), (3, 4, 5)),
    "linear without bias, batch norm 1d": (
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(48, 7, bias=False), nn.BatchNorm1d(7, eps=1e-3), nn.ReLU(),
                              nn.Dropout(0.3), nn.Linear(7, 3)), (3, 4, 4)),
    "flatten(2) then batch norm 1d over (N, C, L)": (
        lambda: nn.Sequential(nn.Flatten(2), nn.BatchNorm1d(3, eps=0.2)), (3, 4, 5)),
    "flatten(1, 2)": (lambda: nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten(1, 2)), (3, 4, 5)),
    "flatten(-3) is flatten(1)": (lambda: nn.Sequential(nn.Flatten(-3), nn.Linear(60, 2)), (3, 4, 5)),
    "flatten(2, 2) changes nothing": (lambda: nn.Sequential(nn.Flatten(2, 2), nn.Identity()), (3, 4, 5)),
    "flatten twice": (lambda: nn.Sequential(nn.Flatten(2), nn.Flatten(1)), (3, 4, 5)),
    "softmax over the last axis of 4-d": (lambda: nn.Sequential(nn.Conv2d(3, 3, 1), nn.Softmax(dim=-1)), (3, 4, 5)),
    "softmax over channels": (lambda: nn.Sequential(nn.Softmax(dim=1)), (3, 4, 5)),
    "a layer used twice": (shared_conv_model, (3, 6, 6)),
    "basic block with downsample": (
        lambda: nn.Sequential(nn.BasicBlock(3, 4, stride=2, downsample=nn.Sequential(
            nn.Conv2d(3, 4, 1, stride=2, bias=False), nn.BatchNorm2d(4)))), (3, 9, 9)),
    "basic block, identity shortcut": (lambda: nn.Sequential(nn.BasicBlock(3, 3)), (3, 6, 5)),
    "simple cnn (its pools run before its ReLUs)": (lambda: simple_cnn(4, image_size=16), (3, 16, 16)),
}


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_every_layer_in_odd_settings_matches_onnxruntime(tmp_path, rng, case):
    make, (c, h, w) = LAYER_CASES[case]
    model = randomised(make(), rng)
    path = tmp_path / "m.onnx"
    export(model, path, (2, c, h, w))
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    x = rng.normal(size=(3, c, h, w)).astype(np.float32)  # another batch size than exported with
    model.eval()
    with no_grad():
        expected = model(x)
    session, _ = load(path)
    assert_close_to_scale(onnx_forward(session)(x), expected, 1e-5, case)


def test_grouped_conv_writes_group(tmp_path):
    proto = export(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4)), tmp_path / "g.onnx", (1, 4, 8, 8))
    (conv,) = proto.graph.node[:1]
    assert {a.name: a.i for a in conv.attribute if a.name == "group"} == {"group": 4}


def test_a_layer_used_twice_shares_one_initializer(tmp_path):
    proto = export(shared_conv_model(), tmp_path / "s.onnx", (1, 3, 6, 6))
    assert sorted(init.name for init in proto.graph.initializer) == ["0.bias", "0.weight"]
    assert [node.op_type for node in proto.graph.node].count("Conv") == 2


class _Swish(nn.Module):
    def forward(self, x):
        return x / (1 + np.exp(-x))


@pytest.mark.parametrize("model, input_shape, message", [
    (nn.Sequential(nn.Flatten(0)), (1, 3, 4, 4), r"cannot export 0 \(Flatten\) \(start_dim=0\): it merges the batch"),
    (nn.Sequential(nn.Flatten(-4)), (1, 3, 4, 4), r"cannot export 0 \(Flatten\) \(start_dim=-4\): it merges"),
    (nn.Sequential(nn.Flatten(5)), (1, 3, 4, 4), r"0 \(Flatten\) \(start_dim=5, end_dim=-1\): its input has 4 "
                                                  r"dimensions"),
    (nn.Sequential(nn.Flatten(3, 1)), (1, 3, 4, 4), r"cannot export 0 \(Flatten\): it does not run .*start_dim 3 "
                                                     r"comes after end_dim 1"),
    (nn.Sequential(nn.Conv2d(3, 4, 3)), (1, 4, 8, 8), r"cannot export 0 \(Conv2d\): it does not run on what it "
                                                       r"receives from input_shape \(1, 4, 8, 8\)"),
    (nn.Sequential(nn.Conv2d(3, 4, 5)), (1, 3, 4, 4), r"cannot export 0 \(Conv2d\): it does not run"),
    (nn.Sequential(nn.Flatten(), nn.Linear(10, 2)), (1, 3, 4, 4), r"cannot export 1 \(Linear\): it does not run"),
    (nn.Sequential(nn.Linear(4, 2)), (1, 3, 4, 4), r"cannot export 0 \(Linear\): its input has shape \('N', 3, 4, "
                                                   r"4\), and ONNX's Gemm takes \(N, in_features\) only"),
    (nn.Sequential(nn.Softmax(dim=4)), (1, 3, 4, 4), r"cannot export 0 \(Softmax\): it does not run"),
    (nn.Sequential(nn.MaxPool2d(5)), (1, 3, 4, 4), r"cannot export 0 \(MaxPool2d\): it does not run"),
    (nn.Sequential(nn.LayerNorm(4)), (1, 3, 4, 4), r"cannot export 0 \(LayerNorm\): no ONNX translation"),
    (nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)), (1, 3, 4, 4),
     r"cannot export 0 \(BatchNorm2d\) .*without running statistics"),
    (nn.Sequential(nn.Conv2d(3, 3, 1), _Swish()), (1, 3, 4, 4), r"cannot export 1 \(_Swish\): no ONNX translation"),
    (_Swish(), (1, 3, 4, 4), r"cannot export the model \(_Swish\): no ONNX translation"),
    (nn.Module(), (1, 3, 4, 4), r"cannot export the model \(Module\): no ONNX translation"),
    (object(), (1, 3, 4, 4), "model must be a tinynet Module, got a object"),
    (nn.Sequential(nn.ReLU()), (1, 3, 8), r"input_shape must be \(N, C, H, W\), four positive integers, got "
                                          r"\(1, 3, 8\)"),
    (nn.Sequential(nn.ReLU()), None, "four positive integers, got None"),
    (nn.Sequential(nn.ReLU()), 7, "four positive integers, got 7"),
    (nn.Sequential(nn.ReLU()), ("a", 3, 8, 8), r"four positive integers, got \('a', 3, 8, 8\)"),
    (nn.Sequential(nn.ReLU()), (1, 3, 8.5, 8), r"four positive integers, got \(1, 3, 8.5, 8\)"),
    (nn.Sequential(nn.ReLU()), (1, 3, 8.0, 8), r"four positive integers, got \(1, 3, 8.0, 8\)"),
    (nn.Sequential(nn.ReLU()), (True, 3, 8, 8), "four positive integers"),
    (nn.Sequential(nn.ReLU()), (1, 3, 0, 8), "four positive integers"),
    (nn.Sequential(nn.ReLU()), (1, 3, -8, 8), "four positive integers"),
    (nn.Sequential(nn.ReLU()), (1, 3, 10**6, 10**6), r"3,000,000,000,000 values per image, more than the 16,777,216"),
])
def test_every_unsupported_construct_is_an_export_error_naming_it(tmp_path, model, input_shape, message):
    with pytest.raises(ExportError, match=message) as info:
        export(model, tmp_path / "x.onnx", input_shape)
    assert len(str(info.value).splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("options, message", [
    ({"metadata": {"classes": object()}}, "metadata 'classes' cannot be stored as JSON"),
    ({"metadata": {"mean": [float("nan")]}}, "metadata 'mean' cannot be stored as JSON"),
    ({"opset": 5}, r"opset must be an int in 15\.\.\d+ .*got 5"),
    ({"opset": 10**6}, r"opset must be an int in 15\.\.\d+ .*got 1000000"),
    ({"opset": "17"}, r"opset must be an int in 15\.\.\d+ .*got '17'"),
])
def test_bad_metadata_and_opset_are_export_errors(tmp_path, options, message):
    with pytest.raises(ExportError, match=message):
        export(nn.Sequential(nn.ReLU()), tmp_path / "x.onnx", (1, 3, 4, 4), **options)
    assert not (tmp_path / "x.onnx").exists()


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
