"""``.safetensors``: a JSON header, then the raw tensor bytes.  No code, no pickle.

Layout (https://github.com/huggingface/safetensors, implemented here from the
format description; the ``safetensors`` package is not used)::

    bytes 0 .. 8          N: the header's length, unsigned 64-bit little-endian
    bytes 8 .. 8+N        the header: a UTF-8 JSON object, padded with spaces
                            {"conv1.weight": {"dtype": "F32", "shape": [64, 3, 7, 7],
                                              "data_offsets": [0, 37632]},
                             ...,
                             "__metadata__": {"format": "pt"}}      (optional, str -> str)
    bytes 8+N .. end      the data section: each tensor's bytes, C order, little-endian, at
                          [begin, end) relative to the start of the section

Checks, as the reference implementation makes them: ``N`` is at most
``Limits.max_header_bytes`` (100 MB) and fits in the file; every entry has a
known dtype, a shape of non-negative ints and ``end - begin == prod(shape) *
itemsize``; sorted by offset, the entries tile the data section exactly (no
overlap, no hole, the last one ending at the end of the file), so no byte is
read twice and none is left unexplained.

Dtypes: ``BOOL U8 I8 U16 I16 U32 I32 U64 I64 F16 F32 F64``, and ``BF16``,
which has no NumPy dtype and loads as float32 (exactly: a bfloat16 is the top
half of a float32).  Entries are returned in header order, which for files
written by :func:`write_safetensors` is the state dict's order.
"""
from __future__ import annotations

import collections
import json
import math

import numpy as np

from .errors import WeightsFileError, WeightsLimitError
from .files import Limits, bfloat16_to_float32, is_index

__all__ = ["read_safetensors", "write_safetensors", "looks_like_safetensors"]

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
            raise WeightsFileError(f"key {key!r} appears twice in the JSON header")
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
        raise WeightsFileError(f"{path}: safetensors header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise WeightsFileError(f"{path}: safetensors header is a JSON {type(header).__name__}, expected an object")
    return header, 8 + n


def _parse_entry(key, info, path) -> tuple[str, np.dtype, tuple, int, int]:
    """``(dtype code, file dtype, shape, begin, end)`` of one header entry, every field checked."""
    if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= info.keys()):
        raise WeightsFileError(
            f"{path}: header entry {key!r} is {str(info)[:100]}; expected an object with dtype, shape and "
            f"data_offsets")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if code not in _DTYPES:
        raise WeightsFileError(f"{path}: {key!r} has dtype {code!r}; expected one of {', '.join(_DTYPES)}")
    if not (isinstance(shape, list) and len(shape) <= _MAX_NDIM and all(is_index(d) for d in shape)):
        raise WeightsFileError(f"{path}: {key!r} has shape {str(shape)[:100]}; expected a list of non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_index(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise WeightsFileError(
            f"{path}: {key!r} has data_offsets {str(offsets)[:100]}; expected [begin, end] with 0 <= begin <= end")
    dtype = np.dtype(_DTYPES[code])
    begin, end = offsets
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise WeightsFileError(
            f"{path}: {key!r} is {code} of shape {tuple(shape)}, {math.prod(shape) * dtype.itemsize} bytes, but "
            f"its data_offsets [{begin}, {end}] span {end - begin}")
    return code, dtype, tuple(shape), begin, end


def read_safetensors(path, size: int, limits: Limits) -> "collections.OrderedDict[str, np.ndarray]":
    """The tensors of the ``.safetensors`` file ``path`` (``size`` bytes long) as NumPy arrays."""
    with open(path, "rb") as f:
        header, data_start = _read_header(f, path, size, limits)
        metadata = header.pop(_METADATA, {})
        if not isinstance(metadata, dict):
            raise WeightsFileError(f"{path}: {_METADATA} is a {type(metadata).__name__}, expected an object")
        entries = [(key, *_parse_entry(key, info, path)) for key, info in header.items()]

        data_size = size - data_start
        if data_size > limits.max_bytes:
            raise WeightsLimitError(
                f"{path}: data section of {data_size} bytes exceeds the limit of {limits.max_bytes} "
                f"(Limits.max_bytes; pass a larger max_bytes if the file is trusted)")
        position, previous = 0, None
        for key, _, _, _, begin, end in sorted(entries, key=lambda e: (e[4], e[5])):
            if begin < position:
                raise WeightsFileError(
                    f"{path}: {key!r} starts at byte {begin} of the data section, inside {previous!r}, which "
                    f"ends at {position}: tensors must not overlap")
            if begin > position:
                raise WeightsFileError(
                    f"{path}: bytes {position}..{begin} of the data section belong to no tensor (before {key!r}); "
                    f"the format allows no holes")
            position, previous = end, key
        if position != data_size:
            raise WeightsFileError(
                f"{path}: the tensors end at byte {position} of the data section, which has {data_size} bytes; "
                + ("the file is truncated" if position > data_size else "trailing bytes belong to no tensor"))

        out = collections.OrderedDict()
        for key, code, dtype, shape, begin, end in entries:
            array = np.empty(shape, dtype=dtype)
            if end > begin:
                f.seek(data_start + begin)
                # Read straight into the array's memory: one copy from the file, none in Python.
                got = f.readinto(array.reshape(-1).view(np.uint8))
                if got != end - begin:
                    raise WeightsFileError(
                        f"{path}: {key!r} needs {end - begin} bytes at offset {data_start + begin}, the file gave "
                        f"{got}; it is truncated")
            if code == "BF16":
                array = bfloat16_to_float32(array)
            out[key] = array.astype(array.dtype.newbyteorder("="), copy=False)
    return out



def write_safetensors(f, arrays) -> None:
    """Write ``(key, array)`` pairs (C-contiguous, little-endian) to the binary file ``f``.

    Tensors are laid out back to back in the given order; the header lists
    them in the same order and is padded with spaces to a multiple of 8 bytes,
    so that the data section starts aligned, as the reference writer does.
    """
    header, offset = {}, 0
    for key, array in arrays:
        if key == _METADATA:
            raise ValueError(f"state-dict key {_METADATA!r} is reserved by the safetensors format")
        header[key] = {"dtype": _CODES[array.dtype], "shape": list(array.shape),
                       "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for _, array in arrays:
        if array.nbytes:
            f.write(array.reshape(-1).view(np.uint8))
