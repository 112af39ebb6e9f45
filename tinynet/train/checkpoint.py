"""Training checkpoints: everything needed to continue a run, in one file written atomically.

A checkpoint is an ``.npz`` archive (read back with ``allow_pickle=False``,
so loading one never runs code) holding

* ``model/<key>``: the model's state dict (parameters and BatchNorm buffers);
* ``optimizer/<index>/<name>``: the optimizer's per-parameter arrays (Adam's
  moments, SGD's momentum buffers);
* ``__meta__``: a JSON document (as bytes) with everything else: format
  version, epoch and batch position, optimizer hyper-parameters and step
  counts, scheduler state, history, best epoch, and the caller's ``extra``
  (model name, classes, seed, ...).

It is written to a temporary file in the same folder, flushed to disk and
renamed over the old one (:func:`tinynet.io.files.atomic_write`): a crash,
a kill or a full disk while saving leaves the previous checkpoint intact,
and a failed write raises :class:`CheckpointWriteError` saying so.
It is read back through :func:`tinynet.io.load_weights`, under its limits, so
a checkpoint from elsewhere cannot claim gigabytes it does not hold.  A
truncated file, a file that is not a checkpoint, or one for another model or
another run is refused with the reason.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from .. import backend
from ..io import WeightsFileError, load_weights
from ..io.files import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "CheckpointWriteError", "FORMAT"]

FORMAT = "tinynet-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, or made for another model."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a vanished folder); the file there is unchanged."""


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_checkpoint(path, model, optimizer=None, scheduler=None, *, epoch: int, batch: int = 0,
                    history=None, extra=None) -> pathlib.Path:
    """Write a checkpoint of the state *after* ``batch`` batches of ``epoch`` (batch 0: the epoch is complete).

    ``epoch`` counts completed epochs when ``batch == 0``; otherwise the run
    stopped inside epoch ``epoch`` after ``batch`` of its batches.
    """
    path = pathlib.Path(path)
    arrays = {}
    for key, value in model.state_dict().items():
        arrays[f"model/{key}"] = backend.to_numpy(value)
    opt_meta = None
    if optimizer is not None:
        state = optimizer.state_dict()
        opt_meta = {"param_groups": _jsonable(state["param_groups"]), "scalars": {}}
        for index, entry in state["state"].items():
            for name, value in entry.items():
                if hasattr(value, "shape") and np.ndim(value) > 0:
                    arrays[f"optimizer/{index}/{name}"] = backend.to_numpy(value)
                else:
                    opt_meta["scalars"].setdefault(str(index), {})[name] = _jsonable(value)
    meta = {
        "format": FORMAT,
        "epoch": int(epoch),
        "batch": int(batch),
        "model_keys": list(model.state_dict().keys()),
        "optimizer": opt_meta,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "history": _jsonable(history) if history is not None else None,
        "extra": _jsonable(extra or {}),
    }
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    try:
        with atomic_write(path) as f:
            np.savez(f, **arrays)
    except OSError as error:
        where = f"epoch {epoch}" if batch == 0 else f"epoch {epoch + 1} after {batch} batches"
        raise CheckpointWriteError(
            error.errno, f"could not write the checkpoint of {where} to {path} "
                         f"({error.strerror or error}); the file there, if any, is unchanged") from error
    return path


def load_checkpoint(path, model, optimizer=None, scheduler=None, expect=None) -> dict:
    """Restore ``model`` (and optimizer and scheduler) from ``path``; return the JSON metadata.

    The model must have exactly the checkpoint's keys and shapes; otherwise
    nothing is loaded and :class:`CheckpointError` says what differs.  So
    must every entry of ``expect`` that the checkpoint's ``extra`` also has
    (``{"classes": [...], "seed": 42}``: the run being resumed must be the same).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        arrays = dict(load_weights(path))  # no pickles, and no more memory than the file can fill
    except (WeightsFileError, OSError) as error:
        raise CheckpointError(f"checkpoint {path} cannot be read ({error}); it may be truncated or not a "
                              f"tinynet checkpoint") from None
    try:
        meta = json.loads(arrays.pop("__meta__").tobytes().decode())
    except (KeyError, ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not a tinynet checkpoint (no readable __meta__ entry)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else meta
        raise CheckpointError(f"{path}: unknown checkpoint format {found!r}, expected {FORMAT!r}")
    saved = meta.get("extra") or {}
    for key, value in _jsonable(dict(expect or {})).items():
        if key in saved and saved[key] != value:
            raise CheckpointError(f"checkpoint {path} belongs to another run: its {key} is {saved[key]!r}, this "
                                  f"run's is {value!r}; start a new run in another folder, or without resuming")

    state = {key[len("model/"):]: value for key, value in arrays.items() if key.startswith("model/")}
    try:
        model.load_state_dict(state, strict=True)
    except KeyError as error:  # StateDictError lists every difference
        raise CheckpointError(f"checkpoint {path} was made for a different model:\n{error}") from None

    if optimizer is not None:
        if meta.get("optimizer") is None:
            raise CheckpointError(f"checkpoint {path} holds no optimizer state")
        opt_state = {}
        for key, value in arrays.items():
            if key.startswith("optimizer/"):
                _, index, name = key.split("/", 2)
                opt_state.setdefault(int(index), {})[name] = value
        for index, scalars in meta["optimizer"]["scalars"].items():
            opt_state.setdefault(int(index), {}).update(scalars)
        groups = meta["optimizer"]["param_groups"]
        for group in groups:
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
        try:
            optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        except ValueError as error:
            raise CheckpointError(f"checkpoint {path}: optimizer state does not fit: {error}") from None
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    return meta
