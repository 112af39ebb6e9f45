"""Shipping a trained model and classifying new photos with it.

A training run (``examples/train_cnn.py``, ``examples/train_resnet.py``)
writes two model files beside its resumable checkpoint:

- ``best.safetensors``: the weights of the epoch with the best validation
  accuracy (what a practitioner ships);
- ``last.safetensors``: the weights after the last epoch (the assignment's
  test number is computed with these).

Both hold the weights and buffers only (no optimizer state), and in the
safetensors header's metadata everything needed to use them: the model's name
and shape options, the class names, the image size and the normalisation
mean and std.  Every metadata value is stored as a JSON string (safetensors
metadata maps strings to strings)::

    model        "cnn" or "resnet"
    classes      ["black_bear", "brown_bear", ...]    label k is classes[k]
    image_size   64                                 images are resized to this square
    mean, std    [0.5], [0.5]                       x = (pixel / 255 - mean) / std
    head, width  "mlp", 64                          ResNet18 only
    softmax_before_loss  false                      the CNN only
    epoch        9                                  the epoch the weights are from

:func:`load_model` rebuilds the model from the metadata alone and loads the
weights strictly.  The metadata is someone else's text, so before anything is
built: every value is checked (:func:`check_metadata`, the same check for an
exported ONNX graph's metadata in :func:`load_onnx`); the state dict it implies
is computed by arithmetic (:func:`expected_state`) and its size bounded
(:data:`MAX_MODEL_BYTES`); and the file must hold every one of those tensors
with its shape, and no other.  A file that fails any of these (another number
of classes, another image size, a file from another program, a 200-byte file
asking for ResNet18 at width 1024) is refused with one line naming the file
and the field or the first tensor that does not fit.

Prediction decodes each file with the training pipeline's own decoder
(:func:`tinynet.data.decode.decode_rgb`: the same formats, the same
decompression-bomb limit, the same RGB conversion and resize) and its
normalisation, so a photo gets the same input the model saw in training.
A file that cannot be read is skipped with the same one-line reason the
training datasets record.

The functions that touch the file format are :func:`save_model` and
:func:`read_model_file`; they go through :mod:`tinynet.io` (its safetensors
reader and writer, its limits and its checks of loaded values).
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import re
from dataclasses import dataclass

import numpy as np

from . import backend
from .io import WeightsFileError, check_state_values, load_weights, read_metadata, save_weights
from .cli import MAX_IMAGE_SIZE
from .io.files import short_repr
from .data.decode import decode_rgb, describe_error, image_size, read_file
from .data.transforms import Normalize
from .nn import Sequential, Softmax
from .nn.functional import softmax
from .nn.module import StateDictError, no_grad
from .text import printable

__all__ = ["ModelFileError", "save_model", "read_model_file", "load_model", "build_model", "model_metadata",
           "check_metadata", "expected_state", "check_model_size", "load_onnx", "Prediction", "find_images",
           "predict_files", "model_forward", "IMAGE_SUFFIXES", "BestWeights", "ship_weights"]

FORMAT = "tinynet-model/1"
REQUIRED = ("model", "classes", "image_size", "mean", "std")
# What find_images picks up when it walks a folder (a file named explicitly is always tried).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})


#: Bounds on what a model file's metadata may ask for (torchvision's ResNet18 has width 64, ImageNet 1,000
#: classes; the image size is the command line's bound, tinynet.cli.MAX_IMAGE_SIZE).
MAX_CLASSES = 100_000
MAX_CLASS_NAME = 200
MAX_WIDTH = 1024
#: Each bound above is not enough: their product is not bounded (ResNet18 at width 1024 has 2.9 G parameters,
#: the CNN at 512 px for 100,000 classes 13 G). The weights and buffers a file's metadata implies, computed
#: before anything is built (:func:`check_model_size`), may take at most 1 GiB: ResNet18 up to width 308
#: (for 1,000 classes; 23 times the 46 MB of width 64), the CNN at 512 px up to 2,047 classes, at 64 px 130,962.
MAX_MODEL_BYTES = 1 << 30
#: Normalisation x = (pixel / 255 - mean) / std: within these bounds every normalised pixel is a finite float32
#: (at most about 1e9 in size); torchvision's ImageNet values and tinynet's 0.5 lie well inside.
MAX_MEAN, MIN_STD, MAX_STD = 1000.0, 1e-6, 1000.0


def _is_int_in(value, low: int, high: int) -> bool:
    """An int (not a bool, which JSON's true would give) in ``low..high``."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


class ModelFileError(ValueError):
    """A model file that cannot be used: not a safetensors file, no tinynet metadata, or tensors that do not fit."""


# ---------------------------------------------------------------------------
# The file: weights and buffers, metadata as JSON strings
# ---------------------------------------------------------------------------
def model_metadata(name: str, model, classes, image_size: int, mean=0.5, std=0.5, **extra) -> dict:
    """The metadata that lets :func:`build_model` rebuild ``model`` (a ``"cnn"`` or a ``"resnet"``)."""
    meta = {"format": FORMAT, "model": name, "classes": [str(c) for c in classes], "image_size": int(image_size),
            "mean": np.atleast_1d(mean).astype(float).tolist(), "std": np.atleast_1d(std).astype(float).tolist()}
    if name == "resnet":
        meta["head"] = "mlp" if isinstance(model.fc, Sequential) else "linear"
        meta["width"] = int(model.conv1.out_channels)
    elif name == "cnn":
        meta["softmax_before_loss"] = isinstance(model[len(model) - 1], Softmax)
    meta.update(extra)
    return meta


def save_model(path, model, meta: dict) -> pathlib.Path:
    """Write ``model``'s parameters and buffers (host copies) and ``meta`` to a safetensors file at ``path``.

    Goes through :func:`tinynet.io.save_weights`: written to a temporary file
    first and renamed, so an interrupted write never leaves half a file under
    ``path``; every metadata value is stored as a JSON string.
    """
    return save_weights(model.state_dict(), path, metadata={key: json.dumps(value) for key, value in meta.items()})


def _read_metadata(path) -> dict:
    """The JSON-decoded tinynet metadata of the model file ``path``, checked by :func:`check_metadata`.

    Only the safetensors header is read (:func:`tinynet.io.read_metadata`),
    so everything the metadata would make tinynet build or allocate is judged
    before a tensor is read.
    """
    where = _where(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"model file {where} does not exist")
    try:
        raw = read_metadata(path)
    except WeightsFileError as error:
        raise ModelFileError(printable(error)) from None
    missing = [key for key in REQUIRED if key not in raw]
    if missing:
        raise ModelFileError(f"{where} has no tinynet model metadata (missing {', '.join(missing)}): "
                             f"expected best.safetensors or last.safetensors from examples/train_cnn.py or "
                             f"train_resnet.py")
    meta = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except (ValueError, RecursionError) as error:  # JSONDecodeError; an int of over 4,300 digits; deep nesting
            raise ModelFileError(f"{where}: metadata {short_repr(key)} is not valid JSON "
                                 f"({type(error).__name__})") from None
    check_metadata(meta, where)
    return meta


def read_model_file(path) -> tuple[dict, dict]:
    """``(tensors, meta)`` of a file written by :func:`save_model`; :class:`ModelFileError` otherwise.

    The metadata is read first, from the header alone, and checked by
    :func:`check_metadata`; then the tensors are read by
    :func:`tinynet.io.load_weights`, under the same limits as every weights
    file (header size, offsets checked against the file size, before
    anything is allocated), and their values checked (no NaN or inf, no
    negative variance) by :func:`tinynet.io.check_state_values`.  Whether
    the tensors fit the model the metadata names is :func:`load_model`'s
    business.
    """
    meta = _read_metadata(path)
    try:
        tensors = load_weights(str(path))
        check_state_values(tensors, str(path))
    except WeightsFileError as error:
        raise ModelFileError(printable(error)) from None
    return tensors, meta


def _where(path) -> str:
    """How messages name a file: quoted, with control characters escaped (``repr`` does both)."""
    return repr(str(path))


# ---------------------------------------------------------------------------
# The metadata is someone else's text: one validator for both doors
# ---------------------------------------------------------------------------
def _is_number(value) -> bool:
    """A finite JSON number (not a bool, which JSON's true would give, not NaN or inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_channels(meta: dict, field: str, low: float, high: float, where: str) -> None:
    """``meta[field]`` is one number, or a list of 1 or 3 (one per RGB channel), each in ``low..high``."""
    value = meta[field]
    values = value if isinstance(value, list) else [value]
    if not (len(values) in (1, 3) and all(_is_number(v) and low <= v <= high for v in values)):
        raise ModelFileError(f"{where}: metadata {field!r} must be a number or a list of 1 or 3 numbers in "
                             f"{low:g}..{high:g}, got {short_repr(value)}")


def check_metadata(meta: dict, where: str = "model file", *, model_fields: bool = True) -> None:
    """Refuse, with one :class:`ModelFileError` naming ``where`` and the field, metadata tinynet cannot use.

    The one check for both doors: a ``.safetensors`` model file
    (:func:`read_model_file`, so ``predict.py --weights`` and
    ``export_onnx.py``) and an exported ONNX graph (:func:`load_onnx`,
    ``predict.py --onnx``).  Expected (``meta`` holds the JSON-decoded values):

    ============  ===========================================================
    classes       a list of 1 to :data:`MAX_CLASSES` strings of at most
                  :data:`MAX_CLASS_NAME` characters each
    image_size    an int in 1..:data:`~tinynet.cli.MAX_IMAGE_SIZE`
    mean          a number or 1 or 3 numbers (per RGB channel) in
                  -:data:`MAX_MEAN`..:data:`MAX_MEAN`
    std           likewise, in :data:`MIN_STD`..:data:`MAX_STD` (so that
                  every normalised pixel is a finite float32)
    softmax_before_loss   absent or a bool
    ============  ===========================================================

    and with ``model_fields`` (the safetensors door, which rebuilds the model):

    ============  ===========================================================
    model         ``"cnn"`` or ``"resnet"``
    width, head   (ResNet18) absent (64, ``"mlp"``) or an int in
                  1..:data:`MAX_WIDTH` and ``"mlp"`` or ``"linear"``
    ============  ===========================================================

    What the values imply together (the model's size, the tensors it needs)
    is checked by :func:`expected_state` and :func:`check_model_size`.
    """
    missing = [key for key in REQUIRED if key not in meta and (model_fields or key != "model")]
    if missing:
        raise ModelFileError(f"{where}: metadata has no {', '.join(map(repr, missing))}")
    classes, size = meta["classes"], meta["image_size"]
    if not (isinstance(classes, list) and 0 < len(classes) <= MAX_CLASSES
            and all(isinstance(c, str) and len(c) <= MAX_CLASS_NAME for c in classes)):
        raise ModelFileError(f"{where}: metadata 'classes' must be a list of 1 to {MAX_CLASSES:,} names of at most "
                             f"{MAX_CLASS_NAME} characters, got {short_repr(classes)}")
    if not _is_int_in(size, 1, MAX_IMAGE_SIZE):
        raise ModelFileError(f"{where}: metadata 'image_size' must be an integer in 1..{MAX_IMAGE_SIZE}, "
                             f"got {short_repr(size)}")
    _check_channels(meta, "mean", -MAX_MEAN, MAX_MEAN, where)
    _check_channels(meta, "std", MIN_STD, MAX_STD, where)
    if not isinstance(meta.get("softmax_before_loss", False), bool):
        raise ModelFileError(f"{where}: metadata 'softmax_before_loss' must be true or false, "
                             f"got {short_repr(meta['softmax_before_loss'])}")
    if not model_fields:
        return
    if meta["model"] not in ("cnn", "resnet"):
        raise ModelFileError(f"{where}: metadata 'model' must be 'cnn' or 'resnet', got {short_repr(meta['model'])}")
    if meta["model"] == "resnet":
        width, head = meta.get("width", 64), meta.get("head", "mlp")
        if not _is_int_in(width, 1, MAX_WIDTH):
            raise ModelFileError(f"{where}: metadata 'width' must be an integer in 1..{MAX_WIDTH}, "
                                 f"got {short_repr(width)}")
        if head not in ("mlp", "linear"):
            raise ModelFileError(f"{where}: metadata 'head' must be 'mlp' or 'linear', got {short_repr(head)}")
    elif meta["image_size"] % 16:
        raise ModelFileError(f"{where}: metadata 'image_size' must be a multiple of 16 for the CNN (pools of 4, 2 "
                             f"and 2), got {meta['image_size']}")


# ---------------------------------------------------------------------------
# What a model's metadata implies: every tensor and its shape, computed without building anything
# ---------------------------------------------------------------------------
_FLOAT, _COUNT = np.dtype(np.float32), np.dtype(np.int64)


def _conv(key: str, c_out: int, c_in: int, k: int, bias: bool = True) -> dict:
    out = {f"{key}.weight": ((c_out, c_in, k, k), _FLOAT)}
    if bias:
        out[f"{key}.bias"] = ((c_out,), _FLOAT)
    return out


def _linear(key: str, c_out: int, c_in: int) -> dict:
    return {f"{key}.weight": ((c_out, c_in), _FLOAT), f"{key}.bias": ((c_out,), _FLOAT)}


def _batch_norm(key: str, c: int) -> dict:
    out = {f"{key}.{name}": ((c,), _FLOAT) for name in ("weight", "bias", "running_mean", "running_var")}
    out[f"{key}.num_batches_tracked"] = ((), _COUNT)
    return out


def expected_state(meta: dict) -> dict:
    """``{key: (shape, dtype)}``: the state dict of the model ``meta`` describes, by arithmetic alone.

    ``meta`` must have passed :func:`check_metadata`.  The layouts are those of
    :class:`tinynet.models.SimpleCNN` (conv 3->32->64->128, then a linear
    layer from 128 * (size/16)^2 features) and :func:`tinynet.models.resnet18`
    (torchvision's keys; stages of width, 2, 4 and 8 times width channels);
    ``tests/test_hostile_metadata.py`` holds this function equal to the
    state dicts of the models themselves.  Nothing of the model's size is
    allocated, so the size can be judged before the model is built.
    """
    k = len(meta["classes"])
    if meta["model"] == "cnn":
        side = meta["image_size"] // 16
        return {**_conv("0", 32, 3, 3), **_conv("3", 64, 32, 3), **_conv("6", 128, 64, 3),
                **_linear("10", k, 128 * side * side)}
    width = meta.get("width", 64)
    state = {**_conv("conv1", width, 3, 7, bias=False), **_batch_norm("bn1", width)}
    in_planes = width
    for i, planes in enumerate((width, 2 * width, 4 * width, 8 * width)):
        for b in range(2):  # ResNet18: two BasicBlocks per stage; the first of stages 2-4 halves the size
            key, c_in = f"layer{i + 1}.{b}", in_planes if b == 0 else planes
            state.update({**_conv(f"{key}.conv1", planes, c_in, 3, bias=False), **_batch_norm(f"{key}.bn1", planes),
                          **_conv(f"{key}.conv2", planes, planes, 3, bias=False), **_batch_norm(f"{key}.bn2", planes)})
            if b == 0 and (i > 0 or c_in != planes):  # stride 2 or a change of width: a 1x1 downsample
                state.update({**_conv(f"{key}.downsample.0", planes, c_in, 1, bias=False),
                              **_batch_norm(f"{key}.downsample.1", planes)})
        in_planes = planes
    if meta.get("head", "mlp") == "mlp":  # the assignment's head: 8w -> 8w -> classes
        state.update({**_linear("fc.0", in_planes, in_planes), **_linear("fc.2", k, in_planes)})
    else:
        state.update(_linear("fc", k, in_planes))
    return state


def _describe(meta: dict) -> str:
    """``a resnet (width 1024, mlp head) for 3 classes at 64x64``: the fields that size the model."""
    shape = (f" (width {meta.get('width', 64)}, {meta.get('head', 'mlp')} head)" if meta["model"] == "resnet"
             else "")
    return f"a {meta['model']}{shape} for {len(meta['classes']):,} classes at {meta['image_size']}x{meta['image_size']}"


def check_model_size(expected: dict, meta: dict, where: str, max_bytes: int = None) -> int:
    """The bytes of the ``expected`` state (:func:`expected_state`); :class:`ModelFileError` above ``max_bytes``.

    ``max_bytes`` defaults to :data:`MAX_MODEL_BYTES`.  Building the model
    takes these bytes once more for its initial values, and loading the
    file's tensors the same again.
    """
    max_bytes = MAX_MODEL_BYTES if max_bytes is None else max_bytes
    count = sum(math.prod(shape) for shape, _ in expected.values())
    nbytes = sum(math.prod(shape) * dtype.itemsize for shape, dtype in expected.values())
    if nbytes > max_bytes:
        raise ModelFileError(f"{where}: the metadata describes {_describe(meta)}: {count:,} parameters and buffers, "
                             f"{nbytes / 2 ** 30:.1f} GiB, more than the limit of {max_bytes / 2 ** 30:g} GiB "
                             f"(tinynet.predict.MAX_MODEL_BYTES); refused before building anything")
    return nbytes


def _check_tensors(tensors: dict, expected: dict, meta: dict, where: str) -> None:
    """Every tensor ``expected`` names is in ``tensors`` with its shape, and nothing else is: else one line."""
    problems = [f"{short_repr(key)} has shape {tuple(tensors[key].shape)}, the model expects {shape}"
                for key, (shape, _) in expected.items()
                if key in tensors and tuple(tensors[key].shape) != shape]
    problems += [f"{short_repr(key)} is missing" for key in expected if key not in tensors]
    problems += [f"{short_repr(key)} is not part of the model" for key in tensors if key not in expected]
    if problems:
        raise ModelFileError(f"{where}: the weights do not fit {_describe(meta)} ({problems[0]}"
                             f"{f'; and {len(problems) - 1} more' if len(problems) > 1 else ''})")


def build_model(meta: dict, where: str = "model file", max_bytes: int = None):
    """A freshly initialised model of the kind and shape ``meta`` describes.

    ``meta`` is checked (:func:`check_metadata`), and the size of the model it
    implies is computed and bounded (:func:`expected_state`,
    :func:`check_model_size`, at most ``max_bytes``, default
    :data:`MAX_MODEL_BYTES`) before anything is built.
    """
    from .models import resnet18, simple_cnn

    check_metadata(meta, where)
    check_model_size(expected_state(meta), meta, where, max_bytes)
    if meta["model"] == "cnn":
        return simple_cnn(len(meta["classes"]), image_size=meta["image_size"],
                          softmax_before_loss=meta.get("softmax_before_loss", False))
    return resnet18(len(meta["classes"]), head=meta.get("head", "mlp"), width=meta.get("width", 64))


def load_model(path, device: str = "cpu", max_bytes: int = None):
    """``(model, meta)``: the model rebuilt from ``path``'s metadata, its weights loaded, in eval mode on ``device``.

    In this order, so that the file decides nothing about memory before it is
    judged: the metadata, from the header alone (:func:`check_metadata`);
    the model's size from it (:func:`expected_state`, refused above
    ``max_bytes``, default :data:`MAX_MODEL_BYTES`); the tensors, each of
    which must be in the file with the shape the metadata implies, and no
    other; and only then the model.  Every refusal is a one-line
    :class:`ModelFileError` naming the file, e.g. a final layer with 10
    outputs for 22 class names, or a CNN's linear layer made for another
    image size.
    """
    where = _where(path)
    meta = _read_metadata(path)
    expected = expected_state(meta)
    check_model_size(expected, meta, where, max_bytes)
    tensors, _ = read_model_file(path)  # metadata read again (the header only): the check above holds for it
    _check_tensors(tensors, expected, meta, where)
    model = build_model(meta, where, max_bytes)
    try:
        model.load_state_dict(tensors, strict=True)
    except StateDictError as error:  # shapes were checked; whatever else the loader refuses, in one line
        raise ModelFileError(f"{where}: {printable(error)}") from None
    model.to(device)
    model.eval()
    return model, meta


def load_onnx(path, device: str = "cpu", threads: "int | None" = None):
    """``(forward, meta)`` for an ONNX file from ``examples/export_onnx.py``, its metadata checked.

    The other door to :func:`predict_files`: the graph's metadata
    (``metadata_props``, JSON-decoded by :func:`tinynet.onnx.load`) passes
    the same :func:`check_metadata` as a model file's, without the fields
    that only rebuilding a tinynet model needs; and it must agree with the
    graph: an input of shape ``(N, 3, image_size, image_size)`` and an
    output with one value per class name.  ``forward`` is
    :func:`tinynet.onnx.onnx_forward` of the onnxruntime session (``device``
    and ``threads`` as :func:`tinynet.onnx.load`'s).
    Raises :class:`ModelFileError` (one line, naming the file);
    :class:`tinynet.onnx.OnnxUnavailable` without onnxruntime.
    """
    from .onnx import OnnxUnavailable, ProviderUnavailable, load, onnx_forward

    where = _where(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"ONNX file {where} does not exist")
    try:
        session, meta = load(path, device, threads)
    except (OnnxUnavailable, ProviderUnavailable):  # no onnxruntime, or no CUDA provider: not the file's fault
        raise
    except Exception as error:  # onnxruntime raises its own types for a file it cannot read
        reason = printable(" ".join(str(error).split()))
        raise ModelFileError(f"{where} is not a readable ONNX model ({reason[:300]})") from None
    if "classes" not in meta or "image_size" not in meta:
        raise ModelFileError(f"{where} has no tinynet metadata (classes, image_size): export it with "
                             f"examples/export_onnx.py")
    check_metadata(meta, where, model_fields=False)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    size, k = meta["image_size"], len(meta["classes"])
    # A dimension is an int when the graph fixes it, a name (or None) when it is free.
    graph_input = list(inputs[0].shape) if len(inputs) == 1 else None
    if graph_input is None or len(graph_input) != 4 or any(
            isinstance(d, int) and d != want for d, want in zip(graph_input[1:], (3, size, size))):
        raise ModelFileError(f"{where}: metadata 'image_size' is {size}, but the graph's input is "
                             f"{short_repr([i.shape for i in inputs])}; expected one input (N, 3, {size}, {size})")
    graph_output = list(outputs[0].shape) if outputs else []
    if len(graph_output) != 2 or (isinstance(graph_output[1], int) and graph_output[1] != k):
        raise ModelFileError(f"{where}: metadata 'classes' names {k:,} classes, but the graph's output is "
                             f"{short_repr(graph_output)}; expected (N, {k})")
    return onnx_forward(session), meta


# ---------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Prediction:
    """One input file: its ``top`` classes as ``(name, probability)`` pairs, best first, or why it was ``skipped``."""

    path: str
    top: tuple = ()
    skipped: str | None = None


def natural_key(path: str) -> tuple:
    """Sort key that orders the digit runs in ``path`` by their value: ``img2`` before ``img10``, as people count."""
    return tuple((0, int(part), part) if part.isdecimal() else (1, 0, part) for part in re.split(r"(\d+)", path))


def find_images(inputs) -> tuple[list[str], list[Prediction]]:
    """The files named in ``inputs`` and the image files below the folders among them, in a stable order.

    A folder contributes every non-hidden file with an image suffix below it,
    in natural order (:func:`natural_key`: ``img2`` before ``img10``); a file
    named explicitly is always kept (its contents, not its name, decide
    whether it is an image).  Names that do not exist are
    returned as skipped :class:`Prediction` entries.
    """
    files, missing = [], []
    for item in map(str, inputs):
        if os.path.isdir(item):
            found = []
            for folder, subfolders, names in os.walk(item, followlinks=False):
                subfolders[:] = [name for name in subfolders if not name.startswith(".")]
                found += [os.path.join(folder, name) for name in names
                          if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES]
            files += sorted(found, key=natural_key)
        elif os.path.lexists(item):
            files.append(item)
        else:
            missing.append(Prediction(item, skipped="no such file or folder"))
    return files, missing


def _decode(path, size, max_pixels):
    try:
        return decode_rgb(read_file(path), size, max_pixels), None
    except Exception as error:  # Pillow's plugins raise many types on malformed files (as in decode_all)
        return None, describe_error(error)


def model_forward(model, device: str = "cpu"):
    """``forward(x)``: a tinynet ``model``'s outputs for a float32 NumPy batch, computed on ``device``, on the host."""
    def forward(x):
        with no_grad():
            return backend.to_numpy(model(backend.to_device(x, device)))  # any spelling: "cuda:0", "gpu"...
    return forward


def _are_probabilities(out: np.ndarray) -> bool:
    """Each row of ``out`` (B, K) a probability distribution, to float32's precision."""
    return bool(np.all((out >= 0) & (out <= 1)) and np.allclose(out.sum(axis=1), 1.0, atol=1e-4))


def predict_files(forward, meta: dict, files, *, top_k: int = 5, batch_size: int = 64, progress: bool = True,
                  max_pixels: int | None = None):
    """Classify every file; yields a :class:`Prediction` per file, in order, batch by batch.

    Each batch of ``batch_size`` decodable files is decoded with the training
    decoder, resized to the metadata's image size, normalised with its mean
    and std, and given to ``forward`` at once: a function from a float32
    batch ``(B, 3, H, W)`` to the model's outputs ``(B, K)`` as a NumPy
    array (:func:`model_forward` for a tinynet model; an onnxruntime session
    in :func:`tinynet.onnx.onnx_forward`).  Probabilities are the softmax of
    the logits (the buggy CNN variant with a softmax layer already outputs
    probabilities).  ``meta`` must have passed :func:`check_metadata` (both
    :func:`load_model` and :func:`load_onnx` see to it); outputs that do not
    have one column per class name raise :class:`ModelFileError`.
    """
    from tqdm.auto import tqdm

    size = image_size(meta["image_size"])
    normalize = Normalize(meta["mean"], meta["std"])
    classes = meta["classes"]
    k = max(1, min(int(top_k), len(classes)))
    outputs_probabilities = bool(meta.get("softmax_before_loss"))
    files = list(files)
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not progress, leave=False)
    try:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            decoded = [_decode(path, size, max_pixels) for path in chunk]
            good = [image for image, reason in decoded if reason is None]
            probs = iter(())
            if good:
                out = np.asarray(forward(normalize(np.stack(good))), dtype=np.float64)
                if out.shape != (len(good), len(classes)):  # a graph whose output width is free: known only now
                    raise ModelFileError(f"the model gives outputs of shape {out.shape} for {len(good)} images, "
                                         f"but its metadata 'classes' names {len(classes):,} classes")
                if outputs_probabilities and not _are_probabilities(out):  # an ONNX graph's metadata can say so
                    raise ModelFileError("metadata 'softmax_before_loss' is true, but the model's outputs are not "
                                         "probabilities (rows of numbers in 0..1 that sum to 1)")
                probs = iter(out if outputs_probabilities else softmax(out, axis=1))
            for path, (image, reason) in zip(chunk, decoded):
                if reason is not None:
                    yield Prediction(path, skipped=reason)
                    continue
                row = next(probs)
                order = np.argsort(-row, kind="stable")[:k]
                yield Prediction(path, tuple((classes[i], float(row[i])) for i in order))
            bar.update(len(chunk))
    finally:
        bar.close()


# ---------------------------------------------------------------------------
# During and after training: best.safetensors, last.safetensors, and their test scores
# ---------------------------------------------------------------------------
class BestWeights:
    """A :func:`~tinynet.train.fit` ``on_epoch_end`` callback that writes ``path`` when validation improves.

    Written whenever the epoch just finished is the history's best (highest
    validation accuracy, the first on ties), so the file always holds the
    best epoch's weights; on disk rather than in memory, so that a resumed
    run still has the best weights of the epochs before the interruption.
    ``fit`` calls it before the epoch's checkpoint is written, so no
    checkpoint ever records a best epoch whose file is not on disk (a kill in
    between costs the epoch, which the resumed run trains again and writes).
    One write of the weights (about 45 MB for ResNet18) per improvement.
    """

    def __init__(self, path, meta: dict):
        self.path, self.meta = pathlib.Path(path), dict(meta)

    def __call__(self, stats, model, history) -> None:
        if stats.val_acc is not None and stats.epoch == history.best_epoch:
            save_model(self.path, model, {**self.meta, "weights": "best", "epoch": stats.epoch,
                                          "val_accuracy": stats.val_acc})


def ship_weights(model, out, meta: dict, history, last_metrics: dict, test_loader, loss_fn, classes,
                 device: str = "cpu") -> dict:
    """Write ``last.safetensors``, then score ``best.safetensors`` on the test set; returns both entries.

    ``last_metrics``: the test metrics of the weights ``model`` holds now (the
    last epoch's).  Afterwards ``model`` holds the best epoch's weights.
    Returns ``{"last": {...}, "best": {...}}`` with ``file``, ``epoch``,
    ``accuracy``, ``f1_weighted`` (and ``loss`` for best); ``best`` is None
    when there is no best.safetensors (no validation set, or a run resumed
    after the file was removed).
    """
    from .metrics import classification_metrics
    from .train import evaluate

    out = pathlib.Path(out)
    last_epoch = history.epochs[-1].epoch if history.epochs else None
    save_model(out / "last.safetensors", model, {**meta, "weights": "last", "epoch": last_epoch})
    shipped = {"last": {"file": "last.safetensors", "epoch": last_epoch, "accuracy": last_metrics["accuracy"],
                        "f1_weighted": last_metrics["f1_weighted"]}, "best": None}
    best_path = out / "best.safetensors"
    if history.best_epoch is None or not best_path.is_file():
        return shipped
    tensors, best_meta = read_model_file(best_path)
    if best_meta.get("epoch") != history.best_epoch:  # left over from another run in this folder
        return shipped
    model.load_state_dict(tensors)
    test = evaluate(model, test_loader, loss_fn, device)
    scores = classification_metrics(test["labels"], test["predictions"], classes)
    shipped["best"] = {"file": "best.safetensors", "epoch": history.best_epoch, "accuracy": scores["accuracy"],
                       "f1_weighted": scores["f1_weighted"], "loss": test["loss"]}
    return shipped
