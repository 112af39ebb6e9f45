"""Training checkpoints: everything needed to continue a run, in one file written atomically.

A checkpoint is an ``.npz`` archive (read back with ``allow_pickle=False``,
so loading one never runs code) holding

* ``model/<key>``: the model's state dict (parameters and BatchNorm buffers);
* ``optimizer/<index>/<name>``: the optimizer's per-parameter arrays (Adam's
  moments, SGD's momentum buffers);
* ``data/<part>/files``: with ``data=``, each part's per-image records
  (:func:`tinynet.data.identity.dataset_identity`), to say what changed in
  the data a resumed run is given;
* ``__meta__``: a JSON document (as bytes) with everything else: format
  version, epoch and batch position, optimizer hyper-parameters and step
  counts, scheduler state, history, best epoch, the data's identity (classes,
  image count, digests), and the caller's ``extra`` (model name, seed, ...).

It is written to a temporary file in the same folder, flushed to disk and
renamed over the old one (:func:`tinynet.io.files.atomic_write`): a crash,
a kill or a full disk while saving leaves the previous checkpoint intact,
and a failed write raises :class:`CheckpointWriteError` saying so.
It is read back through :func:`tinynet.io.load_weights`, under its limits, so
a checkpoint from elsewhere cannot claim gigabytes it does not hold.  A
truncated file, a file that is not a checkpoint, or one for another model or
another run is refused with the reason, and so is a checkpoint whose
position (epoch, batch) the data cannot hold, or one made on other data.
"""
from __future__ import annotations

import json
import math
import pathlib

import numpy as np

from .. import backend
from ..io import WeightsFileError, WeightsValueError, check_state_values, load_weights
from ..data.identity import identity_changes, identity_summary
from ..io.files import atomic_write, short_repr
from .history import History

__all__ = ["save_checkpoint", "load_checkpoint", "check_checkpoint", "CheckpointError", "CheckpointWriteError",
           "FORMAT"]

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
                    history=None, extra=None, data=None) -> pathlib.Path:
    """Write a checkpoint of the state *after* ``batch`` batches of ``epoch`` (batch 0: the epoch is complete).

    ``epoch`` counts completed epochs when ``batch == 0``; otherwise the run
    stopped inside epoch ``epoch`` after ``batch`` of its batches.  ``data``:
    ``{part: identity}`` (:func:`tinynet.data.identity.dataset_identity`) of
    the data trained on, which :func:`load_checkpoint` compares.
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
    for part, identity in (data or {}).items():
        arrays[f"data/{part}/files"] = np.asarray(identity["files"], dtype=np.uint64)
    meta = {
        "format": FORMAT,
        "epoch": int(epoch),
        "batch": int(batch),
        "model_keys": list(model.state_dict().keys()),
        "optimizer": opt_meta,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "history": _jsonable(history) if history is not None else None,
        "extra": _jsonable(extra or {}),
        "data": {part: _jsonable(identity_summary(identity)) for part, identity in (data or {}).items()},
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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite int or float (JSON has no NaN, but Python's json module reads ``NaN`` and ``Infinity``)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _number_or_numbers(value) -> bool:
    return _is_number(value) or value is None or isinstance(value, bool) or (
        isinstance(value, list) and all(_is_number(v) for v in value))


def _meta_problem(meta: dict) -> str | None:
    """What is wrong with a checkpoint's JSON metadata (hand-edited, or from another program), or None.

    Checked before anything is loaded, so that a bad field is one line naming
    it, never a traceback from deep inside the optimizer or the training loop.
    """
    for key in ("epoch", "batch"):
        if not (_is_int(meta.get(key)) and meta[key] >= 0):
            return f"{key} is {short_repr(meta.get(key))}, expected an int >= 0"
    if not (isinstance(meta.get("model_keys"), list) and all(isinstance(k, str) for k in meta["model_keys"])):
        return "model_keys is not a list of str"
    if not isinstance(meta.get("extra", {}), dict):
        return f"extra is a {type(meta['extra']).__name__}, expected an object"
    partial = (meta.get("extra") or {}).get("_partial_epoch")
    if partial is not None and not (isinstance(partial, dict)
                                    and all(_is_number(partial.get(k, 0)) and partial.get(k, 0) >= 0
                                            for k in ("loss_sum", "correct", "seen", "skipped"))
                                    and all(_is_int(partial.get(k, 0)) for k in ("correct", "seen", "skipped"))):
        return f"extra._partial_epoch is {short_repr(partial)}, expected running sums loss_sum, correct, seen, skipped"
    data = meta.get("data", {})
    if not (isinstance(data, dict) and all(
            isinstance(entry, dict) and isinstance(entry.get("classes"), list) and _is_int(entry.get("images"))
            and isinstance(entry.get("digest"), str) for entry in data.values())):
        return f"data is {short_repr(data)}, expected objects with classes, images and digest"
    history = meta.get("history")
    if history is not None:  # the epochs completed are the epochs in the history
        completed = history.get("epochs", []) if isinstance(history, dict) else None
        if not (isinstance(completed, list) and len(completed) == meta["epoch"]):
            return (f"epoch is {meta['epoch']}, but its history holds "
                    f"{len(completed) if isinstance(completed, list) else 'no'} completed epochs")
    opt = meta.get("optimizer")
    if opt is not None:
        if not (isinstance(opt, dict) and isinstance(opt.get("param_groups"), list)
                and isinstance(opt.get("scalars"), dict)):
            return "optimizer is not an object with param_groups (a list) and scalars (an object)"
        for i, group in enumerate(opt["param_groups"]):
            if not (isinstance(group, dict) and isinstance(group.get("params"), list)
                    and all(_is_int(v) for v in group["params"])):
                return f"optimizer.param_groups[{i}] is not an object with params (a list of ints)"
            for name, value in group.items():
                if name != "params" and not _number_or_numbers(value):
                    return f"optimizer.param_groups[{i}].{name} is {short_repr(value)}, expected a finite number"
        for index, scalars in opt["scalars"].items():
            if not (index.isdigit() and isinstance(scalars, dict)
                    and all(_is_number(v) and v >= 0 for v in scalars.values())):
                return (f"optimizer.scalars[{short_repr(index)}] is {short_repr(scalars)}, expected finite numbers "
                        f">= 0 (step counts)")
    sched = meta.get("scheduler")
    if sched is not None and not (isinstance(sched, dict) and _is_int(sched.get("last_epoch"))
                                  and isinstance(sched.get("base_lrs"), list)
                                  and all(_is_number(v) for v in sched["base_lrs"])):
        return "scheduler is not an object with last_epoch (an int) and base_lrs (numbers)"
    history = meta.get("history")
    if history is not None:
        try:
            History.from_dict(history)
        except (TypeError, AttributeError, ValueError) as error:
            return f"history cannot be read ({str(error)[:100]})"
        if not all(_number_or_numbers(v) for e in history.get("epochs", []) for v in e.values()):
            return "history holds a value that is not a number"
    return None


def _read_and_check(path, expect=None, data=None, batches_per_epoch=None) -> tuple[dict, dict]:
    """``(meta, arrays)`` of the checkpoint at ``path``; :class:`CheckpointError` when it cannot be resumed here.

    See :func:`load_checkpoint`; nothing is loaded into a model.
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
    except (KeyError, ValueError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{path} is not a tinynet checkpoint (no readable __meta__ entry)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else meta
        raise CheckpointError(f"{path}: unknown checkpoint format {short_repr(found)}, expected {FORMAT!r}")
    problem = _meta_problem(meta)
    if problem:
        raise CheckpointError(f"checkpoint {path}: its metadata is damaged or was edited: {problem}; "
                              f"start a new run, or resume from an untouched checkpoint")
    # Every difference is named in the one refusal, so that a user fixes them all at once, not one per try.
    saved = meta.get("extra") or {}
    settings = [f"its {key} is {short_repr(saved[key])}, this run's is {short_repr(value)}"
                for key, value in _jsonable(dict(expect or {})).items() if key in saved and saved[key] != value]
    changes = []
    for part, identity in (data or {}).items():
        if part not in meta.get("data", {}):
            continue  # a checkpoint written before data identities were recorded: nothing to compare
        recorded = dict(meta["data"][part], files=arrays.get(f"data/{part}/files"))
        change = identity_changes(recorded, identity)
        if change:
            changes.append(f"the {part} data has changed since ({change})")
    if settings:
        other_data = f"; and it was trained on other data: {'; '.join(changes)}" if changes else ""
        raise CheckpointError(f"checkpoint {path} belongs to another run: {'; '.join(settings)}{other_data}; start "
                              f"a new run in another folder, or without resuming")
    if changes:
        raise CheckpointError(f"checkpoint {path} was trained on other data: {'; '.join(changes)}; resume with the "
                              f"data it was trained on, or start a new run in another folder")
    if batches_per_epoch is not None and meta["batch"] > batches_per_epoch:
        raise CheckpointError(f"checkpoint {path} stopped after batch {meta['batch']} of epoch {meta['epoch'] + 1}, "
                              f"but an epoch here has {batches_per_epoch} batches (the file was edited, or the data or "
                              f"the batch size changed); start a new run, or resume from an untouched checkpoint")
    return meta, arrays


def check_checkpoint(path, expect=None, data=None, batches_per_epoch=None) -> dict:
    """The metadata of the checkpoint at ``path`` if :func:`load_checkpoint` would accept it; no model needed.

    For a command line that must refuse a ``--resume`` before it writes anything.
    """
    return _read_and_check(path, expect, data, batches_per_epoch)[0]


def load_checkpoint(path, model, optimizer=None, scheduler=None, expect=None, data=None,
                    batches_per_epoch=None) -> dict:
    """Restore ``model`` (and optimizer and scheduler) from ``path``; return the JSON metadata.

    The model must have exactly the checkpoint's keys and shapes; otherwise
    nothing is loaded and :class:`CheckpointError` says what differs.  So
    must every entry of ``expect`` that the checkpoint's ``extra`` also has
    (``{"classes": [...], "seed": 42}``: the run being resumed must be the same),
    and every part of ``data`` (``{part: identity}``, see
    :func:`~tinynet.data.identity.dataset_identity`) that the checkpoint
    recorded: the error says what changed ("12 files added, 3 changed").
    With ``batches_per_epoch``, a checkpoint that stopped past the end of an
    epoch of that many batches is refused.

    Refused with a :class:`CheckpointError` naming the file, before anything
    is loaded: a file :func:`tinynet.io.load_weights` refuses, metadata of the
    wrong types or values (a hand-edited ``__meta__``: a string epoch, a
    negative step count, a non-numeric learning rate), and values no model
    can continue from (NaN or infinite weights or optimizer moments, a
    negative ``running_var``: :func:`tinynet.io.check_state_values`).
    """
    path = pathlib.Path(path)
    meta, arrays = _read_and_check(path, expect, data, batches_per_epoch)
    state = {key[len("model/"):]: value for key, value in arrays.items() if key.startswith("model/")}
    opt_arrays = {key: value for key, value in arrays.items() if key.startswith("optimizer/")}
    try:
        check_state_values(state, path)
        check_state_values(opt_arrays, path)  # Adam's moments, momentum buffers: NaN there is NaN in the weights
    except WeightsValueError as error:
        raise CheckpointError(f"checkpoint {path} cannot be resumed: {str(error)[len(str(path)) + 2:]}") from None
    try:
        model.load_state_dict(state, strict=True)
    except KeyError as error:  # StateDictError lists every difference
        raise CheckpointError(f"checkpoint {path} was made for a different model:\n{error}") from None

    if optimizer is not None:
        if meta.get("optimizer") is None:
            raise CheckpointError(f"checkpoint {path} holds no optimizer state")
        opt_state = {}
        for key, value in opt_arrays.items():
            parts = key.split("/", 2)
            if len(parts) != 3 or not parts[1].isdigit():
                raise CheckpointError(f"checkpoint {path}: array {short_repr(key)} is not optimizer/<index>/<name>")
            opt_state.setdefault(int(parts[1]), {})[parts[2]] = value
        for index, scalars in meta["optimizer"]["scalars"].items():
            opt_state.setdefault(int(index), {}).update(scalars)
        groups = meta["optimizer"]["param_groups"]
        for group in groups:
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
        try:
            optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        except (ValueError, TypeError, KeyError) as error:
            raise CheckpointError(f"checkpoint {path}: optimizer state does not fit: {error}") from None
    if scheduler is not None and meta.get("scheduler") is not None:
        try:
            scheduler.load_state_dict(meta["scheduler"])
        except (ValueError, TypeError, KeyError, IndexError) as error:
            raise CheckpointError(f"checkpoint {path}: scheduler state does not fit: {error}") from None
    return meta
