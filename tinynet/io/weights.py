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
import os
import pathlib
from collections.abc import Mapping

import numpy as np

from ..nn.module import LoadResult, Module
from . import npz, pth, safetensors
from .errors import WeightsFileError
from .files import Limits, atomic_write, check_weights_path, host_array, open_zip

__all__ = ["load_weights", "save_weights", "load_into", "SAVE_FORMATS"]

#: Extension -> writer of ``(key, array)`` pairs to a binary file.
SAVE_FORMATS = {".npz": npz.write_npz, ".safetensors": safetensors.write_safetensors}

_DEFAULT = Limits()


def load_weights(path, *, max_bytes: int = _DEFAULT.max_bytes, max_pickle_bytes: int = _DEFAULT.max_pickle_bytes,
                 max_header_bytes: int = _DEFAULT.max_header_bytes,
                 max_compression_ratio: int = _DEFAULT.max_compression_ratio
                 ) -> "collections.OrderedDict[str, np.ndarray]":
    """Read a state dict from a PyTorch zip checkpoint, an ``.npz`` or a ``.safetensors`` file.

    Parameters
    ----------
    path : str or os.PathLike
        The file.  Its format is detected from its content (see the module
        docstring), whatever its extension.
    max_bytes, max_pickle_bytes, max_header_bytes, max_compression_ratio : int
        Limits on what the file may claim (:class:`tinynet.io.files.Limits`);
        a file beyond one is refused with :class:`~tinynet.io.WeightsLimitError`
        before the memory is allocated.

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
        the rest of the checkpoint is dropped.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    UnsafeFileError
        A ``.pth`` pickle names a global a state dict never needs (code).
    WeightsLimitError
        The file exceeds a limit (a zip bomb, a giant header).
    WeightsFileError
        Anything else wrong with the file: a directory, unknown format,
        truncated, corrupt, inconsistent.  All three are ``ValueError``.
    """
    limits = Limits(max_bytes, max_pickle_bytes, max_header_bytes, max_compression_ratio)
    p, size = check_weights_path(path)
    with open(p, "rb") as f:
        head = f.read(16)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # a local file header, or the end record of an empty zip
        with open_zip(p) as zf:
            prefix = pth.find_archive_prefix(zf, p)
            if prefix is not None:
                return pth.read_pth(zf, prefix, p, limits)
            if npz.looks_like_npz(zf):
                return npz.read_npz(zf, p, limits)
            names = ", ".join(repr(n) for n in zf.namelist()[:5])
            raise WeightsFileError(
                f"{p}: a zip archive that is neither a PyTorch checkpoint (no <folder>/data.pkl member) nor an "
                f".npz (not every member is a .npy); it holds {names}")
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # the PROTO opcode of a pickle, protocol 2..5
        pth.refuse_plain_pickle(head, p)
    if head.startswith(b"\x93NUMPY"):
        raise WeightsFileError(f"{p}: a single .npy array, not a state dict; save weights with np.savez or "
                               f"tinynet.io.save_weights(state_dict, 'weights.npz')")
    if safetensors.looks_like_safetensors(head):
        return safetensors.read_safetensors(p, size, limits)
    if size < 9:
        raise WeightsFileError(f"{p}: only {size} bytes, too short for any weights format; the file is truncated")
    raise WeightsFileError(
        f"{p}: unknown format (first bytes {head[:12]!r}); expected a PyTorch zip checkpoint (starting b'PK'), "
        f"an .npz (b'PK') or a .safetensors file (8-byte header length, then b'{{')")


def save_weights(state_dict, path) -> pathlib.Path:
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
    # Convert everything before the file is opened, so that a bad entry leaves no trace on disk.
    arrays = [(key, host_array(key, value, p)) for key, value in state_dict.items()]
    with atomic_write(p) as f:
        writer(f, arrays)
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
    """
    if isinstance(skip_prefixes, str):  # "fc." would otherwise skip every key starting with "f", "c" or "."
        skip_prefixes = (skip_prefixes,)
    skip_prefixes = tuple(skip_prefixes)
    state_dict = load_weights(path, **limits)
    if skip_prefixes:
        state_dict = collections.OrderedDict(
            (k, v) for k, v in state_dict.items() if not k.startswith(skip_prefixes))
        # load_state_dict checks every key the model has.  Handing the skipped ones their own current
        # arrays keeps that check (and its all-or-nothing strictness) for the rest, without a copy of it here.
        for key, value in model.state_dict().items():
            if key.startswith(skip_prefixes):
                state_dict[key] = value
    return model.load_state_dict(state_dict, strict=strict)
