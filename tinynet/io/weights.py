"""``load_weights``, ``save_weights`` and ``load_into``: the three calls most code needs.

The format of a file is read from its first bytes, never from its name::

    PK\\x03\\x04 ...                      a zip archive:
        with <folder>/data.pkl           -> PyTorch checkpoint      (tinynet.io.pth)
        with only <key>.npy members      -> .npz                    (tinynet.io.npz)
    <8-byte length> {                   -> .safetensors            (tinynet.io.safetensors)
    \\x80\\x02 ...  (a pickle)             -> refused: PyTorch's legacy format, or a bare pickle
    \\x93NUMPY                           -> refused: one .npy array is not a state dict

so a ``.pth`` renamed ``.bin`` still loads, and a pickle renamed ``.npz`` is
still refused.  Saving picks the format from the extension instead, since
there is no content yet.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
from collections.abc import Mapping

import numpy as np

from ..nn.module import LoadResult, Module, StateDictError
from . import npz, pth, safetensors
from .errors import WeightsFileError, WeightsValueError
from .files import Limits, atomic_write, host_array, open_weights_file, open_zip, short_repr

__all__ = ["load_weights", "save_weights", "load_into", "read_metadata", "check_state_values", "SAVE_FORMATS",
           "DATA_PARALLEL_PREFIXES"]

#: Extension -> writer of ``(key, array)`` pairs to a binary file.
SAVE_FORMATS = {".npz": npz.write_npz, ".safetensors": safetensors.write_safetensors}

#: What ``torch.nn.DataParallel`` / ``DistributedDataParallel`` (``module.``) and ``torch.compile``
#: (``_orig_mod.``) put before every key of the model they wrap.
DATA_PARALLEL_PREFIXES = ("module.", "_orig_mod.")


def _limits(given: dict) -> Limits:
    try:
        return Limits(**given)
    except TypeError:
        names = ", ".join(f.name for f in dataclasses.fields(Limits))
        raise TypeError(f"unknown limit(s) {', '.join(sorted(given))}; expected some of {names}") from None


def load_weights(path, *, with_metadata: bool = False, **limits):
    """Read a state dict from a PyTorch zip checkpoint, an ``.npz`` or a ``.safetensors`` file.

    Parameters
    ----------
    path : str or os.PathLike
        The file.  Its format is detected from its content (see the module
        docstring), whatever its extension.
    with_metadata : bool
        Return ``(state_dict, metadata)`` instead of the state dict alone;
        ``metadata`` is the safetensors ``__metadata__`` (str -> str), ``{}``
        for files without (and for ``.pth`` and ``.npz``, which have none).
    **limits : int
        Any field of :class:`tinynet.io.files.Limits` by name (``max_bytes``,
        ``max_pickle_bytes``, ``max_pickle_depth``, ``max_pickle_items``,
        ``max_header_bytes``, ``max_compression_ratio``, ``ratio_free_bytes``);
        a file beyond one is refused with :class:`~tinynet.io.WeightsLimitError`
        before the work or memory is spent.

    Returns
    -------
    OrderedDict[str, numpy.ndarray]
        Keys in the file's order; every array C-contiguous, writable, in native
        byte order, with the file's dtype, except bfloat16, which becomes
        float32 (NumPy has no bfloat16).  A 0-d tensor (``num_batches_tracked``)
        stays 0-d.  A ``.pth`` that holds a training checkpoint gives its
        state dict when that is unambiguous: a dict of tensors is the state
        dict; otherwise exactly one of the keys ``state_dict``,
        ``model_state_dict``, ``model`` must hold a dict of tensors
        (``{"state_dict": {...}, "epoch": 3, "optimizer": {...}}``), and
        the rest of the checkpoint is dropped.  Values are not judged here
        (NaN is a value a file may hold); :func:`load_into` and
        :func:`check_state_values` do that.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    UnsafeFileError
        A ``.pth`` pickle names a global a state dict never needs (code).
    WeightsLimitError
        The file exceeds a limit (a zip bomb, a giant header, a pickle nested
        or shared too deep).
    WeightsFileError
        Anything else wrong with the file: a directory, unknown format,
        truncated, corrupt, inconsistent, an unsupported dtype.  All three are
        ``ValueError``.
    """
    limits = _limits(limits)
    p, file, size = open_weights_file(path)
    with file:
        state, metadata = _read(file, p, size, limits)
    return (state, metadata) if with_metadata else state


def read_metadata(path, **limits) -> dict:
    """The str -> str metadata saved with ``save_weights(..., metadata=...)``; ``{}`` if there is none.

    Only ``.safetensors`` files hold metadata; for those only the header is
    read.  Other formats are read whole (so a broken file is still reported)
    and give ``{}``.  Raises what :func:`load_weights` raises.
    """
    limits = _limits(limits)
    p, file, size = open_weights_file(path)
    with file:
        head = file.read(16)
        if safetensors.looks_like_safetensors(head):
            return safetensors.read_safetensors_metadata(file, p, size, limits)
        file.seek(0)
        return _read(file, p, size, limits)[1]


def _read(file, p: pathlib.Path, size: int, limits: Limits):
    """``(state dict, metadata)`` of the open binary ``file`` (named ``p``), its format detected from its first bytes."""
    head = file.read(16)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # a local file header, or the end record of an empty zip
        with open_zip(file, p) as zf:
            prefix = pth.find_archive_prefix(zf, p)
            if prefix is not None:
                return pth.read_pth(zf, prefix, p, limits), {}
            if npz.looks_like_npz(zf):
                return npz.read_npz(zf, p, limits), {}
            names = ", ".join(short_repr(n) for n in zf.namelist()[:5])
            raise WeightsFileError(
                f"{p}: a zip archive that is neither a PyTorch checkpoint (no <folder>/data.pkl member) nor an "
                f".npz (not every member is a .npy); it holds {names}")
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # the PROTO opcode of a pickle, protocol 2..5
        pth.refuse_plain_pickle(head, p)
    if head.startswith(b"\x93NUMPY"):
        raise WeightsFileError(f"{p}: a single .npy array, not a state dict; save weights with np.savez or "
                               f"tinynet.io.save_weights(state_dict, 'weights.npz')")
    if safetensors.looks_like_safetensors(head):
        return safetensors.read_safetensors(file, p, size, limits)
    if size < 9:
        raise WeightsFileError(f"{p}: only {size} bytes, too short for any weights format; the file is truncated")
    raise WeightsFileError(
        f"{p}: unknown format (first bytes {head[:12]!r}); expected a PyTorch zip checkpoint (starting b'PK'), "
        f"an .npz (b'PK') or a .safetensors file (8-byte header length, then b'{{')")


def check_state_values(state_dict, path) -> None:
    """Refuse values that no model can use, naming the tensor and the file: raise :class:`WeightsValueError`.

    * a floating-point tensor with NaN or infinity (one NaN weight makes
      every output NaN, and training from it "succeeds" with NaN losses);
    * a BatchNorm ``running_var`` below zero (a variance never is; eval
      divides by its square root);
    * a ``num_batches_tracked`` that is negative or not an integer.

    Parameters
    ----------
    state_dict : Mapping[str, array]
        As :func:`load_weights` returns it (NumPy arrays).
    path : str or os.PathLike
        The file the values came from, for the message.
    """
    for key, value in state_dict.items():
        array = np.asarray(value)
        name = f"{path}: tensor {short_repr(key)}"
        leaf = key.rsplit(".", 1)[-1] if isinstance(key, str) else ""
        if array.dtype.kind == "f":
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            if bad:
                raise WeightsValueError(
                    f"{name} (shape {array.shape}) holds {bad} NaN or infinite value(s) of {array.size}; "
                    f"a model loaded from it would output NaN.  The file was saved from a run that diverged "
                    f"or is corrupt: use an earlier one")
        if leaf == "running_var" and array.size and array.dtype.kind in "fiu" and array.min() < 0:
            raise WeightsValueError(
                f"{name} holds negative variances (smallest {float(array.min()):g}); a BatchNorm running_var is "
                f"never negative, so the file is corrupt or was edited")
        if leaf == "num_batches_tracked":
            if array.dtype.kind not in "iu" or array.size != 1:
                raise WeightsValueError(f"{name} is {array.dtype} of shape {array.shape}; expected one integer")
            if array.min() < 0:
                raise WeightsValueError(f"{name} is {int(array.min())}; a count of batches is never negative")


def _strip_wrapper_prefix(state_dict, model_keys: list):
    """The file's keys without ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile), when every key has it.

    Stripped only when no key of the model itself starts with that prefix,
    so a model with a sub-module named ``module`` keeps its keys.
    """
    for prefix in DATA_PARALLEL_PREFIXES:
        if (state_dict and all(k.startswith(prefix) for k in state_dict)
                and not any(k.startswith(prefix) for k in model_keys)):
            return collections.OrderedDict((k[len(prefix):], v) for k, v in state_dict.items()), prefix
    return state_dict, None


def save_weights(state_dict, path, metadata=None) -> pathlib.Path:
    """Write ``state_dict`` to ``path`` as ``.npz`` or ``.safetensors``, chosen by the extension.

    Parameters
    ----------
    state_dict : Mapping[str, array] or Module
        NumPy or CuPy arrays (or tinynet Parameters, or anything ``np.asarray``
        takes) of dtype bool, int8..int64, uint8..uint64 or float16..float64;
        a Module is saved through its ``state_dict()``.  CuPy arrays are copied
        to the host first (:func:`tinynet.backend.to_numpy`).
    path : str or os.PathLike
        Must end in ``.npz`` or ``.safetensors``.
    metadata : Mapping[str, str], optional
        Stored in a ``.safetensors`` header's ``__metadata__`` (class names,
        image size, normalisation, as JSON strings if need be) and read back
        by :func:`read_metadata` or ``load_weights(path, with_metadata=True)``.
        ``.npz`` has no place for it: a ``ValueError``.

    The file is written atomically (a temporary file beside it, fsynced, then
    ``os.replace``): an interrupted save leaves the previous file intact.
    Key order, dtypes, shapes (0-d included) and values round-trip exactly
    through :func:`load_weights`; arrays are stored little-endian.

    Returns
    -------
    pathlib.Path
        ``path``, so that ``load_weights(save_weights(sd, p))`` reads it back.
    """
    p = pathlib.Path(os.fspath(path))
    writer = SAVE_FORMATS.get(p.suffix.lower())
    if writer is None:
        raise ValueError(
            f"save_weights({str(p)!r}): extension {p.suffix or '(none)'!r} is not a format tinynet writes; "
            f"expected one of {', '.join(SAVE_FORMATS)}")
    if isinstance(state_dict, Module):
        state_dict = state_dict.state_dict()
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"save_weights({str(p)!r}): expected a mapping of str -> array or a Module, "
                        f"got {type(state_dict).__name__}")
    if metadata is not None:
        if p.suffix.lower() != ".safetensors":
            raise ValueError(f"save_weights({str(p)!r}): only .safetensors files hold metadata; save as "
                             f".safetensors or pass metadata=None")
        if not (isinstance(metadata, Mapping) and all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in metadata.items())):
            raise TypeError(f"save_weights({str(p)!r}): metadata must map str to str (json.dumps other values), "
                            f"got {short_repr(metadata)}")
        metadata = dict(metadata)
    # Convert everything before the file is opened, so that a bad entry leaves no trace on disk.
    arrays = [(key, host_array(key, value, p)) for key, value in state_dict.items()]
    with atomic_write(p) as f:
        if metadata is None:
            writer(f, arrays)
        else:
            writer(f, arrays, metadata)
    return p


def load_into(model: Module, path, strict: bool = True, skip_prefixes=(), **limits) -> LoadResult:
    """Load the weights file ``path`` into ``model`` and return the :class:`~tinynet.nn.LoadResult`.

    ``skip_prefixes`` (a str or a sequence of str) drops every key that starts
    with one of them, on both sides: the file's values are not loaded, and the
    model's own keys under the prefix are neither reported missing nor changed.
    ``load_into(model, "resnet18-f37072fd.pth", skip_prefixes="fc.")`` takes
    torchvision's ImageNet backbone and keeps the model's new head, even with
    ``strict=True``, which still reports every other missing, unexpected or
    mis-shaped key (:class:`~tinynet.nn.StateDictError`, nothing loaded).
    ``limits`` go to :func:`load_weights` (``max_bytes=...``).

    Before anything is loaded, two things the file itself may hold are dealt with:

    * a file saved from a model wrapped in ``torch.nn.DataParallel``
      (``module.`` before every key) or ``torch.compile`` (``_orig_mod.``)
      loads with that prefix removed; when no key of the file matches a key
      of the model at all, a :class:`~tinynet.nn.StateDictError` says so,
      with examples of both, instead of listing every key as missing;
    * the values loaded are checked by :func:`check_state_values` (NaN or
      infinite weights, negative ``running_var``, a negative
      ``num_batches_tracked``): :class:`~tinynet.io.WeightsValueError` names
      the tensor and the file, and nothing is loaded.
    """
    if isinstance(skip_prefixes, str):  # "fc." would otherwise skip every key starting with "f", "c" or "."
        skip_prefixes = (skip_prefixes,)
    skip_prefixes = tuple(skip_prefixes)
    state_dict = load_weights(path, **limits)
    model_keys = list(model.state_dict())
    state_dict, _ = _strip_wrapper_prefix(state_dict, model_keys)
    if skip_prefixes:
        state_dict = collections.OrderedDict(
            (k, v) for k, v in state_dict.items() if not k.startswith(skip_prefixes))
    wanted = [k for k in model_keys if not (skip_prefixes and k.startswith(skip_prefixes))]
    if state_dict and not any(k in state_dict for k in wanted):
        file_keys = list(state_dict)
        raise StateDictError(
            f"{path}: none of the file's {len(file_keys)} keys matches a key of the {type(model).__name__} "
            f"({', '.join(short_repr(k) for k in file_keys[:3])}, ... in the file; "
            f"{', '.join(short_repr(k) for k in model_keys[:3])}, ... in the model); is it the weights of "
            f"another architecture, or saved with a prefix (a wrapper module) to remove?")
    check_state_values(state_dict, path)
    if skip_prefixes:
        # load_state_dict checks every key the model has.  Handing the skipped ones their own current
        # arrays keeps that check (and its all-or-nothing strictness) for the rest, without a copy of it here.
        for key, value in model.state_dict().items():
            if key.startswith(skip_prefixes):
                state_dict[key] = value
    return model.load_state_dict(state_dict, strict=strict)
