"""Property-based fuzzing of model metadata, through both doors: a ``.safetensors`` model file and an ONNX graph.

Each input starts from a valid model file (the CNN, or ResNet18 at width 1,
for 3 classes) or its exported ONNX graph, and replaces, deletes or adds a few
metadata fields with values drawn by Hypothesis: any JSON (nested lists,
huge ints, NaN, strings), raw text that is not JSON, and values known to
have broken a reader before (``std: "x"``, ``mean: [[0.5]]``,
``image_size: 60000``, ``width: 1024``, class lists too short or too long).
Then :func:`tinynet.predict.load_model` (or :func:`~tinynet.predict.load_onnx`)
and, when it accepts, :func:`~tinynet.predict.predict_files` on one photo.
The property:

* it is refused with one :class:`~tinynet.predict.ModelFileError` whose
  message is one line of bounded length without a control character;
* or it predicts: every top class is one of the metadata's names (strings),
  every probability finite and in 0..1;
* never anything else, within ``SECONDS`` per input and under an address-space
  limit (what the process maps plus ``EXTRA_ADDRESS_SPACE``), so that a
  metadata value which sizes an allocation fails the test, not the machine.

Budget: ``EXAMPLES`` (150) inputs per door, about 15 s on two cores;
``TINYNET_FUZZ=N`` multiplies it (and drops the fixed seed).
"""
from __future__ import annotations

import collections
import json
import math
import time

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings, strategies as st  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from test_fuzz_weights import FUZZ, address_space_limit  # noqa: E402

from tinynet.models import resnet18, simple_cnn  # noqa: E402
from tinynet.predict import ModelFileError, load_model, load_onnx, model_metadata, predict_files  # noqa: E402
from tinynet.text import printable  # noqa: E402

EXAMPLES = 150 * FUZZ
SECONDS = 3.0
EXTRA_ADDRESS_SPACE = 2 << 30
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=FUZZ == 1,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large])
FIELDS = ["model", "classes", "image_size", "mean", "std", "width", "head", "softmax_before_loss", "format", "epoch"]
OUTCOMES: dict = collections.defaultdict(collections.Counter)

# Values that broke a reader before, or sit on a bound.
KNOWN = [0, 1, -1, 16, 17, 32, 512, 513, 1024, 1025, 60000, 10 ** 9, 2 ** 63, True, False, None, 0.5, -0.5, 1e308,
         float("nan"), float("inf"), "x", "NaN", "64", "", "cnn", "resnet", "mlp", "linear", [], [0], [0.5], [[0.5]],
         [0.5, 0.5], [0.5, 0.5, 0.5], [0.5, "x", 0.5], list("a"), list("ab"), list("abc"), list("abcd"), [1, 2, 3],
         ["a" * 201], {"a": 1}]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=12)
# Stored text that json.loads turns into something odd or refuses in its own way: NaN and infinities (JSON
# extensions Python reads), an int of 5,000 digits (a ValueError, not a JSONDecodeError), nesting 10,000 deep.
RAW = ["NaN", "Infinity", "-Infinity", "{", "1" * 5000, "[" * 10_000 + "]" * 10_000, '"\\u001b]0;x\\u0007"']
# A metadata value as stored: JSON text, or raw text that may not be JSON at all.
stored = st.one_of(st.sampled_from(KNOWN).map(json.dumps), st.sampled_from(RAW), json_values.map(json.dumps),
                   st.text(max_size=20))
edits = st.lists(st.tuples(st.sampled_from(FIELDS + ["extra"]), st.none() | stored), min_size=1, max_size=4)


def _apply(raw: dict, changes) -> dict:
    out = dict(raw)
    for field, value in changes:
        if value is None:
            out.pop(field, None)
        else:
            out[field] = value
    return out


def _stored(meta: dict) -> dict:
    return {key: json.dumps(value) for key, value in meta.items()}


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    cnn, resnet = simple_cnn(3, image_size=16), resnet18(3, width=1)
    photo = root / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(photo)
    return {"photo": str(photo),
            "cnn": ({k: np.array(v) for k, v in cnn.state_dict().items()},
                    _stored(model_metadata("cnn", cnn, list("abc"), 16))),
            "resnet": ({k: np.array(v) for k, v in resnet.state_dict().items()},
                       _stored(model_metadata("resnet", resnet, list("abc"), 16))),
            "net": cnn}


def _check(door: str, load, photo: str) -> None:
    """Load (under the limits) and predict one photo, or be refused in one line; nothing else."""
    start = time.perf_counter()
    try:
        with address_space_limit(EXTRA_ADDRESS_SPACE):
            forward, meta = load()
            predictions = list(predict_files(forward, meta, [photo], top_k=3, progress=False))
    except ModelFileError as error:
        message = str(error)
        OUTCOMES[door][message.split(": ", 1)[-1][:40]] += 1
        assert len(message) < 2000 and "\n" not in message and printable(message) == message, message
    else:
        OUTCOMES[door]["predicted"] += 1
        (prediction,) = predictions
        assert prediction.skipped is None and prediction.top
        for name, p in prediction.top:
            assert isinstance(name, str) and name in meta["classes"]
            assert math.isfinite(p) and 0.0 <= p <= 1.0
    assert time.perf_counter() - start < SECONDS


@SETTINGS
@given(base=st.sampled_from(["cnn", "resnet"]), changes=edits)
def test_fuzz_model_file_metadata(seeds, tmp_path, base, changes):
    from tinynet.predict import model_forward

    tensors, raw = seeds[base]
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata=_apply(raw, changes))

    def load():
        model, meta = load_model(path)
        return model_forward(model), meta
    _check("safetensors", load, seeds["photo"])


@pytest.fixture(scope="module")
def onnx_proto(seeds, tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from tinynet.onnx import export

    return export(seeds["net"], tmp_path_factory.mktemp("onnx") / "base.onnx", (1, 3, 16, 16))


@SETTINGS
@given(changes=edits)
@example(changes=[("softmax_before_loss", "true")])  # a graph that outputs logits, said to output probabilities
def test_fuzz_onnx_metadata(seeds, onnx_proto, tmp_path, changes):
    import onnx

    proto = onnx.ModelProto()
    proto.CopyFrom(onnx_proto)
    for key, value in _apply(seeds["cnn"][1], changes).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    _check("onnx", lambda: load_onnx(path), seeds["photo"])


def teardown_module():
    if FUZZ > 1:
        for door, counts in OUTCOMES.items():
            print(f"\n{door}: {sum(counts.values())} inputs: {dict(counts.most_common(12))}")
