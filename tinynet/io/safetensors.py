"""``.safetensors``: a JSON header, then the raw tensor bytes.  No code, no pickle.

Layout (https://github.com/huggingface/safetensors)::

    bytes 0 .. 8          N: the header's length, unsigned 64-bit little-endian
    bytes 8 .. 8+N        the header: a UTF-8 JSON object, padded with spaces
                            {"conv1.weight": {"dtype": "F32", "shape": [64, 3, 7, 7],
                                              "data_offsets": [0, 37632]},
                             ...,
                             "__metadata__": {"classes": "[...]"}}      (optional, str -> str)
    bytes 8+N .. end      the data section: each tensor's bytes, C order, little-endian, at
                          [begin, end) relative to the start of the section

Reading and writing go through the ``safetensors`` package (its NumPy API,
which needs no torch), the reference implementation of the format: it checks
that the entries tile the data section exactly (no overlap, no hole, nothing
after the last one).  Around it, tinynet

* reads the header itself first and applies its own :class:`~tinynet.io.files.Limits`
  before the package does any work: ``N`` at most ``max_header_bytes``
  (100 MB, the package's own limit too, so a larger limit cannot admit a
  larger header) and within the file, the data section at most
  ``max_bytes``; every entry a known dtype, a shape of at most 64
  non-negative ints whose non-zero dimensions fit ``max_bytes`` (the package
  and NumPy accept ``[0, 2**62]``, then fail making the array) and
  ``end - begin == prod(shape) * itemsize``; ``__metadata__`` a str -> str
  object;
* turns every failure, the package's included, into a
  :class:`~tinynet.io.WeightsFileError` naming the file.

Dtypes: ``BOOL U8 I8 U16 I16 U32 I32 U64 I64 F16 F32 F64``, and ``BF16``,
which has no NumPy dtype (the package's NumPy API refuses it) and loads as
float32, exactly (a bfloat16 is the top half of a float32), from the bytes the
package has validated.  Every byte is read from the file object opened once and
checked (:func:`tinynet.io.files.open_weights_file`), never by reopening its path.  Complex (``C64``) and 8-bit float
(``F8_*``) tensors are refused as unsupported.  Entries come back in header
order.  The package's writer sorts tensors by dtype size, then name (for
alignment), so a state dict saved as ``.safetensors`` comes back in that
order, not the order it was saved in; ``load_state_dict`` matches by key.
"""
from __future__ import annotations

import collections
import json
import math

import numpy as np
import safetensors
import safetensors.numpy

from .errors import WeightsFileError, WeightsLimitError
from .files import Limits, bfloat16_to_float32, check_shape, is_index, short_repr

__all__ = ["read_safetensors", "read_safetensors_metadata", "write_safetensors", "looks_like_safetensors"]

_DTYPES = {
    "BOOL": "|b1", "U8": "|u1", "I8": "|i1", "U16": "<u2", "I16": "<i2", "U32": "<u4", "I32": "<i4",
    "U64": "<u8", "I64": "<i8", "F16": "<f2", "F32": "<f4", "F64": "<f8", "BF16": "<u2",
}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items() if k != "BF16"}
_MAX_NDIM = 64  # NumPy's limit
_METADATA = "__metadata__"


def looks_like_safetensors(head: bytes) -> bool:
    """An 8-byte length and then the ``{`` opening the JSON header."""
    return len(head) >= 9 and head[8:9] == b"{"


def _unique_keys(pairs):
    """``object_pairs_hook`` for json: a key given twice would make the file mean two things."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise WeightsFileError(f"key {short_repr(key)} appears twice in the JSON header")
        out[key] = value
    return out


def _read_header(f, path, size: int, limits: Limits) -> tuple[dict, int]:
    """The parsed header and the file offset where the data section starts."""
    head = f.read(8)
    if len(head) < 8:
        raise WeightsFileError(f"{path}: {len(head)} bytes; a safetensors file starts with an 8-byte header length")
    n = int.from_bytes(head, "little")
    if n > limits.max_header_bytes:
        signed = n - (1 << 64) if n >= 1 << 63 else n
        raise WeightsLimitError(
            f"{path}: safetensors header length {n} bytes (as a signed int {signed}) exceeds the limit of "
            f"{limits.max_header_bytes} bytes (Limits.max_header_bytes)")
    if 8 + n > size:
        raise WeightsFileError(
            f"{path}: safetensors header length {n} bytes, but only {size - 8} bytes follow it; the file is "
            f"truncated")
    try:
        header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_unique_keys)
    except WeightsFileError as exc:
        raise WeightsFileError(f"{path}: {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WeightsFileError(f"{path}: safetensors header is not valid UTF-8 JSON ({str(exc)[:200]})") from None
    if not isinstance(header, dict):
        raise WeightsFileError(f"{path}: safetensors header is a JSON {type(header).__name__}, expected an object")
    return header, 8 + n


def _parse_entry(key, info, path, limits: Limits) -> tuple[str, np.dtype, tuple, int, int]:
    """``(dtype code, file dtype, shape, begin, end)`` of one header entry, every field checked."""
    name = short_repr(key)
    if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= info.keys()):
        raise WeightsFileError(
            f"{path}: header entry {name} is {short_repr(info)}; expected an object with dtype, shape and "
            f"data_offsets")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not (isinstance(code, str) and code in _DTYPES):
        raise WeightsFileError(f"{path}: {name} has unsupported dtype {short_repr(code)}; tinynet reads "
                               f"{', '.join(_DTYPES)}")
    if not (isinstance(shape, list) and len(shape) <= _MAX_NDIM and all(is_index(d) for d in shape)):
        raise WeightsFileError(f"{path}: {name} has shape {short_repr(shape)}; expected a list of at most "
                               f"{_MAX_NDIM} non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_index(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise WeightsFileError(
            f"{path}: {name} has data_offsets {short_repr(offsets)}; expected [begin, end] with 0 <= begin <= end")
    dtype = np.dtype(_DTYPES[code])
    check_shape(shape, dtype.itemsize, f"{path}: {name}", limits)
    begin, end = offsets
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise WeightsFileError(
            f"{path}: {name} is {code} of shape {tuple(shape)}, {math.prod(shape) * dtype.itemsize} bytes, but "
            f"its data_offsets [{begin}, {end}] span {end - begin}")
    return code, dtype, tuple(shape), begin, end


def _checked_header(f, path, size: int, limits: Limits) -> tuple[list, dict, int]:
    """``(entries, metadata, data start)`` of an open file, every limit applied; no tensor is read."""
    header, data_start = _read_header(f, path, size, limits)
    metadata = header.pop(_METADATA, {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise WeightsFileError(f"{path}: {_METADATA} is {short_repr(metadata)}, expected an object of str -> str")
    if size - data_start > limits.max_bytes:
        raise WeightsLimitError(
            f"{path}: data section of {size - data_start} bytes exceeds the limit of {limits.max_bytes} "
            f"(Limits.max_bytes; pass a larger max_bytes if the file is trusted)")
    entries = [(key, *_parse_entry(key, info, path, limits)) for key, info in header.items()]
    return entries, metadata, data_start


def read_safetensors_metadata(f, path, size: int, limits: Limits) -> dict:
    """The ``__metadata__`` (str -> str) of the open ``.safetensors`` file ``f`` (named ``path``), ``{}`` if it
    has none; tensors unread."""
    f.seek(0)
    return _checked_header(f, path, size, limits)[1]


def read_safetensors(f, path, size: int, limits: Limits) -> "tuple[collections.OrderedDict[str, np.ndarray], dict]":
    """``(tensors, metadata)`` of the open ``.safetensors`` file ``f`` (named ``path``, ``size`` bytes long):
    the tensors as NumPy arrays, the ``__metadata__`` as :func:`read_safetensors_metadata` gives it.

    Every byte comes from ``f``, the file whose type and size were checked when it was opened
    (:func:`tinynet.io.files.open_weights_file`); nothing is reopened by its path, which may name
    another file by now (a FIFO put in its place would block the reader forever).
    """
    f.seek(0)
    entries, metadata, _ = _checked_header(f, path, size, limits)
    f.seek(0)
    data = f.read(size + 1)
    if len(data) != size:
        raise WeightsFileError(f"{path}: the file changed while it was read ({size} bytes when opened, "
                               f"{len(data)} read)")
    try:
        tensors = dict(safetensors.deserialize(data))  # the package checks that the entries tile the data
    except Exception as exc:  # SafetensorError, and whatever else the package raises
        raise WeightsFileError(
            f"{path}: not a valid .safetensors file ({type(exc).__name__}: {str(exc)[:200]})") from None
    out = collections.OrderedDict()
    for key, code, dtype, shape, begin, end in entries:
        array = np.frombuffer(tensors[key]["data"], dtype).reshape(shape)
        if code == "BF16":  # no NumPy dtype: exactly float32 (a bfloat16 is a float32's top half)
            array = bfloat16_to_float32(array)
        elif code == "BOOL":  # a byte other than 0 or 1 would be a bool that is neither
            array = array.view(np.uint8) != 0
        out[key] = array.astype(array.dtype.newbyteorder("="), copy=False)
    return out, metadata


def write_safetensors(f, arrays, metadata=None) -> None:
    """Write ``(key, array)`` pairs (C-contiguous, little-endian) and ``metadata`` to the binary file ``f``.

    ``metadata`` (str -> str, or None) goes to the header's ``__metadata__``.
    The ``safetensors`` package lays the file out (sorted by dtype size, then
    name, and 8-byte aligned).
    """
    tensors = {}
    for key, array in arrays:
        if key == _METADATA:
            raise ValueError(f"state-dict key {_METADATA!r} is reserved by the safetensors format")
        tensors[key] = array
    f.write(safetensors.numpy.save(tensors, metadata=metadata))
