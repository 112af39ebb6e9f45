"""Model metadata is someone else's text: its values, and the model they size, are judged before anything is built.

Both doors: a ``.safetensors`` model file (``load_model``, so ``predict.py
--weights`` and ``export_onnx.py``) and an exported ONNX graph's metadata
(``load_onnx``, ``predict.py --onnx``).  The scripts run in subprocesses under
an address-space limit (``LIMIT``), so a file that makes tinynet allocate
gigabytes fails the test instead of the machine.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from tinynet.models import resnet18, simple_cnn
from tinynet.predict import (MAX_MODEL_BYTES, ModelFileError, check_metadata, expected_state, load_model,
                             model_metadata)

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 3 << 30  # address space of each script run: the interpreter, NumPy and onnxruntime need about 1.5 GiB


def write_model_file(path, state: dict, meta: dict) -> Path:
    save_file({k: np.array(v) for k, v in state.items()}, str(path),  # np.array keeps 0-d tensors 0-d
              metadata={k: json.dumps(v) for k, v in meta.items()})
    return path


def run_limited(script, *args, timeout=120):
    """``examples/<script>`` with ``args``, its address space limited to ``LIMIT`` bytes."""
    code = (f"import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, ({LIMIT}, {LIMIT})); "
            f"sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, str(ROOT / "examples" / script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def assert_one_line_usage_error(result, *words):
    assert result.returncode == 2, (result.returncode, result.stdout[-500:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def cnn_file(tmp_path_factory):
    """A valid CNN model file: 3 classes at 16x16 (about 400 kB)."""
    net = simple_cnn(3, image_size=16)
    path = tmp_path_factory.mktemp("cnn") / "cnn.safetensors"
    return write_model_file(path, net.state_dict(), model_metadata("cnn", net, list("abc"), 16)), net


# ---------------------------------------------------------------------------
# The state dict the metadata implies, by arithmetic
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("meta", [
    {"model": "cnn", "image_size": 16, "classes": 1}, {"model": "cnn", "image_size": 48, "classes": 7},
    {"model": "cnn", "image_size": 64, "classes": 3, "softmax_before_loss": True},
    {"model": "resnet", "width": 1, "classes": 1}, {"model": "resnet", "width": 3, "classes": 5, "head": "linear"},
    {"model": "resnet", "width": 8, "classes": 2, "head": "mlp"}, {"model": "resnet", "classes": 4}])
def test_expected_state_is_the_state_dict_of_the_built_model(meta):
    """The arithmetic that sizes a model before it is built agrees with the models, key, shape and dtype."""
    meta = {"image_size": 32, "mean": [0.5], "std": [0.5], **meta, "classes": [str(i) for i in range(meta["classes"])]}
    check_metadata(meta)
    if meta["model"] == "cnn":
        net = simple_cnn(len(meta["classes"]), image_size=meta["image_size"],
                         softmax_before_loss=meta.get("softmax_before_loss", False))
    else:
        net = resnet18(len(meta["classes"]), head=meta.get("head", "mlp"), width=meta.get("width", 64))
    built = {key: (tuple(value.shape), np.dtype(value.dtype)) for key, value in net.state_dict().items()}
    assert expected_state(meta) == built


# ---------------------------------------------------------------------------
# A model too large for its metadata's bounds, and tensors the file does not hold
# ---------------------------------------------------------------------------
HUGE = {
    # 200 bytes that ask for ResNet18 at width 1024: 2.9 G parameters, 10.9 GiB
    "resnet_width_1024": ({"model": "resnet", "width": 1024, "head": "mlp", "classes": list("abc"), "image_size": 64},
                          "width 1024"),
    # a 1 MB file that asks for the CNN at 512 px for 100,000 classes: 13 G parameters, 48.8 GiB
    "cnn_512px_100000_classes": ({"model": "cnn", "image_size": 512, "classes": [str(i) for i in range(100_000)]},
                                 "100,000 classes at 512x512"),
}


@pytest.mark.parametrize("case", sorted(HUGE))
@pytest.mark.parametrize("script", ["predict.py", "export_onnx.py"])
def test_metadata_of_a_model_too_large_is_refused_before_building(tmp_path, photo, case, script):
    meta, described = HUGE[case]
    path = write_model_file(tmp_path / "huge.safetensors", {}, {"mean": [0.5], "std": [0.5], **meta})
    args = ("--weights", path, photo) if script == "predict.py" else ("--weights", path, "--out", tmp_path / "m.onnx")
    result = run_limited(script, *args)
    assert_one_line_usage_error(result, str(path), described, "MAX_MODEL_BYTES")
    assert not (tmp_path / "m.onnx").exists()


def test_the_size_is_computed_from_the_metadata_alone(tmp_path):
    meta = {"model": "resnet", "width": 1024, "classes": list("abc"), "image_size": 64, "mean": [0.5], "std": [0.5]}
    nbytes = sum(math.prod(shape) * dtype.itemsize for shape, dtype in expected_state(meta).values())
    assert nbytes > 10 * 2 ** 30 > MAX_MODEL_BYTES  # ResNet18 at width 1024: 10.9 GiB
    path = write_model_file(tmp_path / "huge.safetensors", {}, meta)
    with pytest.raises(ModelFileError, match=r"2,923,920,407 parameters and buffers, 10\.9 GiB"):
        load_model(path)


@pytest.mark.parametrize("edit", ["drop_one", "only_the_head", "extra", "reshaped"])
def test_a_file_must_hold_every_tensor_its_metadata_implies_before_anything_is_built(tmp_path, monkeypatch, edit):
    """Checked against the shapes computed from the metadata, before a model is built (and initialised)."""
    import tinynet.models

    net = resnet18(3, width=4)
    state = dict(net.state_dict())
    if edit == "drop_one":
        del state["layer3.1.conv2.weight"]
        expected = "'layer3.1.conv2.weight' is missing"
    elif edit == "only_the_head":
        state = {key: value for key, value in state.items() if key.startswith("fc.")}
        expected = "'conv1.weight' is missing; and"
    elif edit == "extra":
        state["evil.weight"] = np.zeros(3, np.float32)
        expected = "'evil.weight' is not part of the model"
    else:
        state["fc.2.weight"] = np.zeros((4, 32), np.float32)
        expected = "'fc.2.weight' has shape (4, 32), the model expects (3, 32)"
    path = write_model_file(tmp_path / "w.safetensors", state, model_metadata("resnet", net, list("abc"), 32))
    built = []
    monkeypatch.setattr(tinynet.models, "resnet18", lambda *a, **k: built.append(a) or resnet18(*a, **k))
    with pytest.raises(ModelFileError, match="do not fit") as error:
        load_model(path)
    assert expected in str(error.value) and repr(str(path)) in str(error.value)
    assert not built, "the model was built before the file's tensors were compared with the metadata"


# ---------------------------------------------------------------------------
# Values: one validator, both doors
# ---------------------------------------------------------------------------
HOSTILE_VALUES = [
    ("std", "x"), ("std", [0]), ("std", [0.5, 0.5]), ("std", -0.5), ("mean", [[0.5]]), ("mean", "NaN"),
    ("mean", float("nan")), ("mean", 1e308), ("std", True), ("image_size", 60000), ("image_size", "64"),
    ("classes", "abc"), ("classes", [1, 2, 3]), ("classes", list("ab")), ("classes", list("abcd")),
    ("softmax_before_loss", "false"),
]


@pytest.mark.parametrize("field, value", HOSTILE_VALUES, ids=[f"{f}={v!r}" for f, v in HOSTILE_VALUES])
def test_hostile_metadata_values_of_a_model_file_are_refused_naming_the_file_and_field(cnn_file, tmp_path, field,
                                                                                       value):
    _, net = cnn_file
    meta = {**model_metadata("cnn", net, list("abc"), 16), field: value}
    path = write_model_file(tmp_path / "m.safetensors", net.state_dict(), meta)
    with pytest.raises(ModelFileError) as error:
        load_model(path)
    message = str(error.value)
    assert repr(str(path)) in message and len(message.splitlines()) == 1
    assert repr(field) in message or (field == "classes" and "classes" in message), message


@pytest.mark.parametrize("field, value", [("width", "8"), ("width", 0), ("head", "conv"), ("model", "vit"),
                                          ("model", ["resnet"])])
def test_hostile_model_fields_are_refused(tmp_path, field, value):
    net = resnet18(3, width=4)
    meta = {**model_metadata("resnet", net, list("abc"), 32), field: value}
    path = write_model_file(tmp_path / "m.safetensors", net.state_dict(), meta)
    with pytest.raises(ModelFileError, match=f"metadata '{field}' must be"):
        load_model(path)


@pytest.mark.parametrize("field, value, script", [("std", "x", "predict.py"), ("mean", "NaN", "predict.py"),
                                                  ("mean", [[0.5]], "export_onnx.py"), ("std", [0], "export_onnx.py")])
def test_the_scripts_refuse_hostile_model_file_metadata_in_one_line(cnn_file, tmp_path, photo, field, value, script):
    """Before: tracebacks from Normalize, or exit 0 printing "nan %" for every class."""
    _, net = cnn_file
    path = write_model_file(tmp_path / "m.safetensors", net.state_dict(),
                            {**model_metadata("cnn", net, list("abc"), 16), field: value})
    args = ("--weights", path, photo) if script == "predict.py" else ("--weights", path, "--out", tmp_path / "m.onnx")
    assert_one_line_usage_error(run_limited(script, *args), repr(str(path)), f"metadata {field!r}")


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory, cnn_file):
    """``write(path, meta)``: the CNN's ONNX graph (3 outputs, 16x16 input) with ``meta`` as its metadata."""
    pytest.importorskip("onnxruntime")
    import onnx

    from tinynet.onnx import export

    _, net = cnn_file
    proto = export(net, tmp_path_factory.mktemp("onnx") / "base.onnx", (1, 3, 16, 16))

    def write(path, meta):
        edited = onnx.ModelProto()
        edited.CopyFrom(proto)
        for key, value in meta.items():
            entry = edited.metadata_props.add()
            entry.key, entry.value = key, value if isinstance(value, str) and key == "raw" else json.dumps(value)
        onnx.save(edited, str(path))
        return path
    return write


ONNX_META = {"classes": list("abc"), "image_size": 16, "mean": [0.5], "std": [0.5]}


@pytest.mark.parametrize("field, value", HOSTILE_VALUES, ids=[f"{f}={v!r}" for f, v in HOSTILE_VALUES])
def test_hostile_onnx_metadata_is_refused_by_the_same_validator(onnx_export, tmp_path, field, value):
    from tinynet.predict import load_onnx

    path = onnx_export(tmp_path / "m.onnx", {**ONNX_META, field: value})
    with pytest.raises(ModelFileError) as error:
        load_onnx(path)
    message = str(error.value)
    assert repr(str(path)) in message and len(message.splitlines()) == 1
    assert f"metadata {field!r}" in message, message


@pytest.mark.parametrize("field, value, words", [
    ("image_size", 60000, ["metadata 'image_size'", "1..512"]),      # before: Pillow asked for ~11 GB
    ("classes", "abc", ["metadata 'classes'"]),                      # before: printed letters as class names
    ("classes", list("ab"), ["metadata 'classes' names 2 classes", "expected (N, 2)"]),  # before: IndexError
    ("classes", list("abcde"), ["metadata 'classes' names 5 classes"]),  # before: named the wrong class
    ("image_size", 32, ["metadata 'image_size' is 32", "(N, 3, 32, 32)"]),
])
def test_predict_onnx_refuses_metadata_that_does_not_fit_the_graph(onnx_export, tmp_path, photo, field, value,
                                                                   words):
    path = onnx_export(tmp_path / "m.onnx", {**ONNX_META, field: value})
    result = run_limited("predict.py", "--onnx", path, photo, "--no-progress")
    assert_one_line_usage_error(result, repr(str(path)), *words)


def test_predict_onnx_refuses_softmax_before_loss_on_a_graph_that_outputs_logits(onnx_export, tmp_path, photo):
    """The flag says the outputs are probabilities; before, logits were printed as percentages ("-4.6 %")."""
    path = onnx_export(tmp_path / "m.onnx", {**ONNX_META, "softmax_before_loss": True})
    result = run_limited("predict.py", "--onnx", path, photo, "--no-progress")
    assert_one_line_usage_error(result, "metadata 'softmax_before_loss' is true", "not probabilities")
    assert "%" not in result.stdout


def test_a_valid_onnx_file_still_predicts(onnx_export, tmp_path, photo):
    path = onnx_export(tmp_path / "m.onnx", ONNX_META)
    result = run_limited("predict.py", "--onnx", path, photo, "--no-progress", "--top-k", 3)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith(f"{photo}: ") and all(f"{c} " in line for c in "abc") and "nan" not in line
