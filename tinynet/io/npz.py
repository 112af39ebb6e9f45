"""``.npz`` weights: NumPy's zip archive of ``.npy`` members, one per state-dict key.

Layout (what ``np.savez`` writes, and :func:`write_npz` too)::

    conv1.weight.npy        member "<key>.npy", STORED: a .npy file
    bn1.running_mean.npy      b"\\x93NUMPY", version (1, 0), header length, then a Python-literal
    ...                       header {'descr': '<f4', 'fortran_order': False, 'shape': (64, 3, 7, 7)}
                              padded to 64 bytes, then the raw array bytes

Members keep the order they were written in, so the state dict keeps its key
order.  Each member is read by its own name with
``numpy.lib.format.read_array(..., allow_pickle=False)``: an ``object`` array
would need a pickle, and is refused.  Before any array is
read, every member's ``.npy`` header is read to refuse object dtypes with a
clear message and to check that the shape fits the member's declared size
(reading would allocate the array its header claims before reading it).
"""
from __future__ import annotations

import collections
import math
import tokenize
import zipfile

import numpy as np

from .errors import WeightsFileError
from .files import SAVE_DTYPES, ZIP_READ_ERRORS, Limits, check_shape, check_zip_members, short_repr

__all__ = ["read_npz", "write_npz", "looks_like_npz"]

_NPY = ".npy"


def looks_like_npz(zf: zipfile.ZipFile) -> bool:
    """Every member is a ``.npy`` (an empty archive is an empty state dict)."""
    return all(name.endswith(_NPY) for name in zf.namelist())


def _npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path):
    """``(shape, dtype)`` from the header of one ``.npy`` member, without reading the array."""
    try:
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:  # 3.0 only adds UTF-8 field names of structured dtypes, which no weight has
                raise ValueError(f".npy format version {version}, expected (1, 0) or (2, 0)")
    except (*ZIP_READ_ERRORS, SyntaxError, TypeError, tokenize.TokenError, RecursionError) as exc:
        # numpy parses the header as a Python literal (tokenize, then ast.literal_eval): a damaged one
        # raises SyntaxError or TokenError; a literal of the wrong types (a shape of strings) TypeError.
        raise WeightsFileError(
            f"{path}: member {short_repr(info.filename)} is not a readable .npy array ({str(exc)[:200]}); the "
            f"file is truncated or corrupt") from None
    return shape, dtype


def read_npz(zf: zipfile.ZipFile, path, limits: Limits) -> "collections.OrderedDict[str, np.ndarray]":
    """The arrays of an ``.npz``, in member order, checked first against ``limits``.

    Each array is read from its own member, ``<key>.npy``, and never looked up
    by key through ``np.load``: its ``NpzFile["x.npy"]`` gives the member
    ``x.npy`` (the array saved as ``x``) when both ``x`` and ``x.npy`` were
    saved, so two keys would load each other's array.
    """
    # The declared-size total, which zipfile never inflates past, bounds the memory; np.savez_compressed
    # deflates all-zero biases ~1000:1 honestly, so the ratio applies to the archive as a whole.
    check_zip_members(zf, path, limits)
    headers = []
    for info in zf.infolist():
        key = info.filename[:-len(_NPY)]
        shape, dtype = _npy_header(zf, info, path)
        if dtype.hasobject:
            raise WeightsFileError(
                f"{path}: array {short_repr(key)} has dtype {dtype} (Python objects), which only a "
                f"pickle can load; tinynet loads .npz with allow_pickle=False (save numeric arrays only)")
        if dtype.newbyteorder("=") not in SAVE_DTYPES:
            raise WeightsFileError(
                f"{path}: array {short_repr(key)} has unsupported dtype {dtype}; expected bool, int8/16/32/64, "
                f"uint8/16/32/64 or float16/32/64")
        if math.prod(shape) * dtype.itemsize > info.file_size:
            raise WeightsFileError(
                f"{path}: array {short_repr(key)} claims shape {shape} of {dtype} "
                f"({math.prod(shape) * dtype.itemsize} bytes) in a member of {info.file_size} bytes; "
                f"the file is corrupt")
        check_shape(shape, dtype.itemsize, f"{path}: array {short_repr(key)}", limits)
        headers.append((key, info))
    out = collections.OrderedDict()
    for key, info in headers:
        try:
            with zf.open(info) as f:
                array = np.lib.format.read_array(f, allow_pickle=False)
                trailing = f.read(1)  # reading to the end also makes zipfile check the member's CRC-32
        except ZIP_READ_ERRORS as exc:  # object arrays (allow_pickle=False) raise ValueError too
            raise WeightsFileError(
                f"{path}: array {short_repr(key)} cannot be read ({str(exc)[:200]}); the file is truncated or "
                f"corrupt") from None
        if trailing:
            raise WeightsFileError(f"{path}: member {short_repr(info.filename)} has bytes after its array; "
                                   f"the file is corrupt")
        out[key] = array.astype(array.dtype.newbyteorder("="), copy=False)
    return out


def write_npz(f, arrays) -> None:
    """Write ``(key, array)`` pairs to the binary file ``f`` as an uncompressed ``.npz``.

    Written member by member with :func:`numpy.lib.format.write_array`, as
    ``np.savez`` does, rather than through ``np.savez(f, **arrays)``: its
    keyword arguments would clash with a key named ``file`` or ``allow_pickle``.
    """
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, array in arrays:
            with zf.open(key + _NPY, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
