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
weights strictly: a file whose tensors do not fit the model it names (another
number of classes, another image size, a file from another program) is
refused with one line naming the file and the first tensor that does not fit.

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
import os
import pathlib
from dataclasses import dataclass

import numpy as np

from . import backend
from .io import WeightsFileError, check_state_values, load_weights, save_weights
from .cli import MAX_IMAGE_SIZE
from .io.files import short_repr
from .data.decode import decode_rgb, describe_error, image_size, read_file
from .data.transforms import Normalize
from .nn import Sequential, Softmax
from .nn.functional import softmax
from .nn.module import StateDictError, no_grad

__all__ = ["ModelFileError", "save_model", "read_model_file", "load_model", "build_model", "model_metadata",
           "Prediction", "find_images", "predict_files", "model_forward", "IMAGE_SUFFIXES", "BestWeights",
           "ship_weights"]

FORMAT = "tinynet-model/1"
REQUIRED = ("model", "classes", "image_size", "mean", "std")
# What find_images picks up when it walks a folder (a file named explicitly is always tried).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})


#: Bounds on what a model file's metadata may ask for (torchvision's ResNet18 has width 64, ImageNet 1,000
#: classes; the image size is the command line's bound, tinynet.cli.MAX_IMAGE_SIZE).
MAX_CLASSES = 100_000
MAX_CLASS_NAME = 200
MAX_WIDTH = 1024


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


def read_model_file(path) -> tuple[dict, dict]:
    """``(tensors, meta)`` of a file written by :func:`save_model`; :class:`ModelFileError` otherwise.

    Read by :func:`tinynet.io.load_weights`, under the same limits as every
    weights file (header size, offsets checked against the file size, before
    anything is allocated), and its values checked (no NaN or inf, no negative
    variance) by :func:`tinynet.io.check_state_values`.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"model file {short_repr(path)} does not exist")
    try:
        tensors, raw = load_weights(path, with_metadata=True)
        check_state_values(tensors, path)
    except WeightsFileError as error:
        raise ModelFileError(str(error)) from None
    missing = [key for key in REQUIRED if key not in raw]
    if missing:
        raise ModelFileError(f"{short_repr(path)} has no tinynet model metadata (missing {', '.join(missing)}): "
                             f"expected best.safetensors or last.safetensors from examples/train_cnn.py or "
                             f"train_resnet.py")
    try:
        meta = {key: json.loads(value) for key, value in raw.items()}
    except json.JSONDecodeError as error:
        raise ModelFileError(f"{short_repr(path)}: metadata is not valid JSON ({error})") from None
    return tensors, meta


def build_model(meta: dict, where: str = "model file"):
    """A freshly initialised model of the kind and shape ``meta`` describes."""
    from .models import resnet18, simple_cnn

    # The metadata is someone else's text: every number that sizes the model (or the images) is bounded
    # before anything is built, so a file cannot ask for a terabyte of weights.
    classes, size = meta["classes"], meta["image_size"]
    if not (isinstance(classes, list) and 0 < len(classes) <= MAX_CLASSES
            and all(isinstance(c, str) and len(c) <= MAX_CLASS_NAME for c in classes)):
        raise ModelFileError(f"{where}: metadata 'classes' must be a list of 1 to {MAX_CLASSES:,} names of at most "
                             f"{MAX_CLASS_NAME} characters, got {short_repr(classes)}")
    if not _is_int_in(size, 1, MAX_IMAGE_SIZE):
        raise ModelFileError(f"{where}: metadata 'image_size' must be an integer in 1..{MAX_IMAGE_SIZE}, "
                             f"got {short_repr(size)}")
    width = meta.get("width", 64)
    if meta["model"] == "resnet" and not _is_int_in(width, 1, MAX_WIDTH):
        raise ModelFileError(f"{where}: metadata 'width' must be an integer in 1..{MAX_WIDTH}, got {short_repr(width)}")
    try:
        if meta["model"] == "cnn":
            return simple_cnn(len(classes), image_size=size, softmax_before_loss=bool(meta.get("softmax_before_loss")))
        if meta["model"] == "resnet":
            return resnet18(len(classes), head=meta.get("head", "mlp"), width=width)
    except ValueError as error:
        raise ModelFileError(f"{where}: {error}") from None
    raise ModelFileError(f"{where}: unknown model {short_repr(meta['model'])} (expected 'cnn' or 'resnet')")


def load_model(path, device: str = "cpu"):
    """``(model, meta)``: the model rebuilt from ``path``'s metadata, its weights loaded, in eval mode on ``device``.

    Raises :class:`ModelFileError` (one line) when the tensors do not fit the
    model the metadata names, e.g. a final layer with 10 outputs for 22 class
    names, or a CNN's linear layer made for another image size.
    """
    tensors, meta = read_model_file(path)
    model = build_model(meta, where=repr(str(path)))
    try:
        model.load_state_dict(tensors, strict=True)
    except StateDictError:
        expected = model.state_dict()
        problems = [f"{key} has shape {tuple(tensors[key].shape)}, the model expects {tuple(expected[key].shape)}"
                    for key in expected if key in tensors and tuple(tensors[key].shape) != tuple(expected[key].shape)]
        problems += [f"{key} is missing" for key in expected if key not in tensors]
        problems += [f"{key} is not part of the model" for key in tensors if key not in expected]
        raise ModelFileError(
            f"{str(path)!r}: the weights do not fit a {meta['model']} for {len(meta['classes'])} classes at "
            f"{meta['image_size']}x{meta['image_size']} ({problems[0]}"
            f"{f'; and {len(problems) - 1} more' if len(problems) > 1 else ''})") from None
    model.to(device)
    model.eval()
    return model, meta


# ---------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Prediction:
    """One input file: its ``top`` classes as ``(name, probability)`` pairs, best first, or why it was ``skipped``."""

    path: str
    top: tuple = ()
    skipped: str | None = None


def find_images(inputs) -> tuple[list[str], list[Prediction]]:
    """The files named in ``inputs`` and the image files below the folders among them, in a stable order.

    A folder contributes every non-hidden file with an image suffix below it,
    sorted by path; a file named explicitly is always kept (its contents, not
    its name, decide whether it is an image).  Names that do not exist are
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
            files += sorted(found)
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
            return backend.to_numpy(model(backend.to_device(x, device) if device == "cuda" else x))
    return forward


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
    probabilities).
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
