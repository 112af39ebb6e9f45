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
a kill or a full disk while saving leaves the previous checkpoint intact.
A truncated file, a file that is not a checkpoint, or one for another model
is refused with the reason.
"""
from __future__ import annotations

import json
import pathlib
import zipfile

import numpy as np

from .. import backend
from ..io.files import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "FORMAT"]

FORMAT = "tinynet-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, or made for another model."""


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
    with atomic_write(path) as f:
        np.savez(f, **arrays)
    return path


def load_checkpoint(path, model, optimizer=None, scheduler=None) -> dict:
    """Restore ``model`` (and optimizer and scheduler) from ``path``; return the JSON metadata.

    The model must have exactly the checkpoint's keys and shapes; otherwise
    nothing is loaded and :class:`CheckpointError` says what differs.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as error:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(error).__name__}: {error}); "
                              f"it may be truncated or not a tinynet checkpoint") from None
    try:
        meta = json.loads(arrays.pop("__meta__").tobytes().decode())
    except (KeyError, ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is not a tinynet checkpoint (no readable __meta__ entry)") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {meta.get('format')!r}, expected {FORMAT!r}")

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
