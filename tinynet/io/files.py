"""What the three formats share: limits, path and zip checks, atomic writes, dtypes.

Limits
------
A weights file comes from the internet as often as from one's own disk, so
every reader works under :class:`Limits`, each checked before the work it
bounds is done:

* memory: a file that would unpack to more than ``max_bytes`` (default
  4 GiB) is refused before anything is allocated.  Zip archives (``.pth``
  and ``.npz``) are checked from their central directory, which declares
  every member's uncompressed size; :mod:`zipfile` never inflates a member
  past its declared size, so the declared total bounds the memory a zip bomb
  can claim.  Past ``ratio_free_bytes`` (64 MiB) the members together may
  also inflate to at most ``max_compression_ratio`` (100) times the size of
  the file: a bomb of a few MB declaring gigabytes is refused, while a
  re-zipped checkpoint whose all-zero biases deflate 1000:1 is not (what is
  at risk is the total, so the ratio is taken over the whole archive, never
  per member);
* the pickle of a ``.pth``: at most ``max_pickle_bytes``, ``max_pickle_items``
  opcodes, nesting at most ``max_pickle_depth`` deep, and no object that
  would expand (its shared parts copied out) to more than
  ``max_pickle_items`` objects (:func:`tinynet.io.pth.scan_pickle`);
* a safetensors header: at most ``max_header_bytes``.

Atomic writes
-------------
:func:`atomic_write` writes to a temporary file in the target's directory,
flushes and fsyncs it, then renames it over the target with ``os.replace``
(atomic on POSIX and Windows when both are on one file system).  A crash
leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import pathlib
import reprlib
import secrets
import stat
import zipfile
import zlib

import numpy as np

from .. import backend
from ..nn.module import Parameter
from ..signals import deferred_signals
from .errors import WeightsFileError, WeightsLimitError

__all__ = ["Limits", "MiB", "GiB", "open_regular_file", "open_weights_file", "open_zip", "check_zip_members", "ZIP_READ_ERRORS", "read_member",
           "atomic_write", "is_index", "short_repr", "check_shape", "bfloat16_to_float32", "host_array", "SAVE_DTYPES"]

MiB = 1 << 20
GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Limits:
    """How much a weights file may claim before it is refused.

    max_bytes
        Bytes: total uncompressed size of a zip's members, size of a
        safetensors data section, and total size of the arrays a ``.pth``
        rebuilds (a tensor with stride 0 can expand a small storage).  4 GiB
        covers every ImageNet ResNet and ViT-L in float32.
    max_pickle_bytes
        Bytes: size of a ``.pth``'s ``data.pkl`` (a ResNet50's is 40 kB).
    max_header_bytes
        Bytes: size of a safetensors JSON header (the ``safetensors``
        package's own limit is the same 100 MB).
    max_compression_ratio
        Uncompressed size of all of a zip's members / size of the file, once
        the members exceed ``ratio_free_bytes``.  PyTorch and ``np.savez``
        store members uncompressed (ratio 1); random weights do not compress,
        so 100 leaves room for any re-zipped file and refuses the ~1000:1 of
        deflated zeros a bomb is made of.
    max_pickle_depth
        How deep containers (tuples, lists, dicts, calls) may nest in a
        ``.pth`` pickle; a torch.save state dict nests 6 deep, a
        training checkpoint with optimizer state 9.
    max_pickle_items
        Opcodes in a ``.pth`` pickle, and objects any one value in it would
        expand to if every shared (memoised) part were copied; a state dict
        takes about 40 per tensor, so 200,000 allows 5,000 tensors (a
        ViT-L checkpoint with AdamW moments has about 1,200); scanning that
        many takes about a second, and 15 MB.
    ratio_free_bytes
        Bytes a zip may inflate to whatever its compression ratio.
    """

    max_bytes: int = 4 * GiB
    max_pickle_bytes: int = 64 * MiB
    max_header_bytes: int = 100_000_000
    max_compression_ratio: int = 100
    max_pickle_depth: int = 100
    max_pickle_items: int = 200_000
    ratio_free_bytes: int = 64 * MiB

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{field.name} must be a positive int, got {short_repr(value)}")


class _ShortRepr(reprlib.Repr):
    """``reprlib`` with every part bounded, ints and bytes included (plain ``repr`` of either is unbounded)."""

    def __init__(self, limit: int):
        super().__init__()
        self.maxlevel, self.maxstring, self.maxother = 3, limit, limit
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = 6

    def repr_int(self, value, level):
        # str(int) is quadratic in the digits (and refused past 4300 of them): describe a big one instead.
        return repr(value) if value.bit_length() <= 128 else f"<int of {value.bit_length()} bits>"

    def repr_bytes(self, value, level):
        return repr(value[:self.maxstring]) + ("..." if len(value) > self.maxstring else "")

    def repr_instance(self, value, level):
        if value is None or isinstance(value, (bool, float)):
            return repr(value)
        return f"<{type(value).__name__}>"  # our own stand-ins, numpy arrays: nothing the file spells out


def short_repr(value, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters, in time and memory bounded by ``limit``.

    For anything a file can make (a key, a shape, a pickled tuple): plain
    ``repr`` of a tuple shared through a pickle's memo 40 levels deep would
    print 2**40 items, and one nested a million deep overflows the C stack.
    """
    return _ShortRepr(limit).repr(value)


# O_NONBLOCK: opening a FIFO that has no writer returns at once instead of waiting for one; O_NOCTTY: a
# terminal device opened here never becomes this process's controlling terminal.  Windows has neither (nor FIFOs).
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)


def open_regular_file(path, refuse) -> tuple:
    """``(binary file, size in bytes)`` of the regular file at ``path``, opened once; ``refuse(status)`` otherwise.

    The type is taken from the descriptor opened (``fstat``), never from the
    path before opening it: checked by path and opened again by path, a
    file swapped for a FIFO in between blocked the reader forever.  The
    open cannot block (O_NONBLOCK, cleared once the file is known to be
    regular, where it changes nothing).  For anything but a regular file
    the descriptor is closed and ``refuse(os.stat_result)``, an exception,
    is raised.  ``OSError`` for a missing file or one that cannot be read.
    """
    fd = os.open(path, _OPEN_FLAGS)
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise refuse(status)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        file = os.fdopen(fd, "rb")
        file.raw.name = os.fspath(path)  # as open(path) names it (zipfile takes an archive's name from it)
        return file, status.st_size
    except BaseException:
        os.close(fd)
        raise


def _not_a_weights_file(p: pathlib.Path, mode: int) -> WeightsFileError:
    if stat.S_ISDIR(mode):
        return WeightsFileError(f"{p}: is a directory; expected a weights file (.pth, .npz or .safetensors)")
    return WeightsFileError(f"{p}: is not a regular file (a device, pipe or socket); expected a weights file")


def open_weights_file(path) -> tuple:
    """``(Path, binary file, size in bytes)`` of a regular file, opened once; a clear error for anything else.

    A FIFO or a device (``/dev/zero``) would block or never end if read; the
    readers take every byte from the file returned (see
    :func:`open_regular_file`), so what was checked is what is read.  The
    caller closes the file.
    """
    try:
        p = pathlib.Path(os.fspath(path))
    except TypeError:
        raise TypeError(f"weights path must be a str or os.PathLike, got {type(path).__name__}") from None
    try:
        file, size = open_regular_file(p, lambda status: _not_a_weights_file(p, status.st_mode))
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "No such weights file", str(p)) from None
    except PermissionError:
        if p.is_dir():  # Windows refuses to open a directory as a file
            raise _not_a_weights_file(p, stat.S_IFDIR) from None
        raise
    return p, file, size


def open_zip(file, path: pathlib.Path) -> zipfile.ZipFile:
    """Open the zip archive in the binary ``file`` (``path`` names it) whose directory accounts for every byte.

    Closing the ZipFile leaves ``file`` open: its opener owns it.

    The central directory sits at the end of a zip, so a truncated download is
    the usual reason it cannot be found.  :mod:`zipfile` trusts that
    directory and skips whatever it does not list: bytes before the first
    member (a zip appended to another file), or a member whose directory
    entry a damaged comment length swallowed.  Zeroed counts in the end
    record make any archive read as empty, and a swallowed entry drops one
    array; either would load as a smaller state dict without a word.  So
    the members' local records must tile the file from byte 0 up to the
    directory (:func:`_check_layout`), as PyTorch and numpy write them.
    """
    try:
        zf = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, OSError) as exc:
        raise WeightsFileError(
            f"{path}: starts like a zip archive but cannot be opened as one ({str(exc)[:200]}); "
            f"the file is probably truncated (an interrupted download?) or corrupt") from None
    try:
        _check_layout(zf, path)
    except BaseException:
        zf.close()
        raise
    return zf


#: Sizes of the data descriptor that may follow a member written with flag bit 3 (no sizes known
#: in advance): crc + sizes (12, or 20 with zip64's 8-byte sizes), optionally after a 4-byte signature.
_DESCRIPTOR_SIZES = (12, 16, 20, 24)


def _check_layout(zf: zipfile.ZipFile, path) -> None:
    """Refuse an archive whose members, in order, do not fill the bytes before its central directory."""
    position, descriptor = 0, False  # where the next record must start; may a data descriptor come first?
    for info in sorted(zf.infolist(), key=lambda i: i.header_offset):
        _check_next_record(info.header_offset, position, descriptor, zf, path)
        zf.fp.seek(info.header_offset)
        local = zf.fp.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise WeightsFileError(f"{path}: member {short_repr(info.filename)} has no local header at byte "
                                   f"{info.header_offset}; the file is truncated or corrupt")
        name_length, extra_length = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        position = info.header_offset + 30 + name_length + extra_length + info.compress_size
        descriptor = bool(info.flag_bits & 0x08)
    _check_next_record(zf.start_dir, position, descriptor, zf, path)


def _check_next_record(start: int, expected: int, descriptor: bool, zf: zipfile.ZipFile, path) -> None:
    gap = start - expected
    if gap == 0 or (descriptor and gap in _DESCRIPTOR_SIZES):
        return
    raise WeightsFileError(
        f"{path}: the zip's central directory lists {len(zf.infolist())} member(s), but "
        + (f"{gap} bytes before byte {start} belong to none of them" if gap > 0 else f"two records overlap at byte {start}")
        + " (a hidden member, or a damaged directory); the file is corrupt")


def check_zip_members(zf: zipfile.ZipFile, path, limits: Limits) -> None:
    """Refuse a zip whose members could inflate past what ``limits`` allow (a zip bomb).

    Checks, from the central directory alone (nothing is inflated yet): only
    STORED and DEFLATED members (what numpy and PyTorch write; bzip2 and lzma
    reach ratios of a million to one), no duplicate names (two members under
    one name make "which one is read" ambiguous), member names of at most
    1000 characters, the declared sizes sum to at most ``limits.max_bytes``,
    and, once that sum passes ``limits.ratio_free_bytes``, to at most
    ``limits.max_compression_ratio`` times the size of the file.

    The ratio is taken over the whole archive because the whole archive is
    what a reader holds in memory: a freshly initialised network saved by
    ``torch.save`` and re-zipped with deflate has small all-zero members
    (biases, running means) that deflate 1000:1, next to weights that do not
    compress at all, so per-member ratios refuse honest files, while a bomb
    is large in total whatever its member count.
    """
    total = 0
    seen = set()
    for info in zf.infolist():
        name = short_repr(info.filename)
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise WeightsFileError(
                f"{path}: member {name} uses zip compression method {info.compress_type}; "
                f"expected STORED (0) or DEFLATED (8), which is what PyTorch and numpy write")
        if len(info.filename) > 1000:
            raise WeightsFileError(f"{path}: member name of {len(info.filename)} characters ({name}); a weights "
                                   f"file names its members after state-dict keys")
        if info.filename in seen:
            raise WeightsFileError(f"{path}: member {name} appears twice in the zip archive")
        seen.add(info.filename)
        total += info.file_size
        if total > limits.max_bytes:
            raise WeightsLimitError(
                f"{path}: zip members declare at least {total} uncompressed bytes (at {name}), "
                f"more than the limit of {limits.max_bytes} bytes (Limits.max_bytes; pass a larger max_bytes "
                f"if the file is trusted)")
    zf.fp.seek(0, os.SEEK_END)  # the file the archive was read from (opened once, never again by its path)
    file_size = zf.fp.tell()
    if total > limits.ratio_free_bytes and total > limits.max_compression_ratio * file_size:
        raise WeightsLimitError(
            f"{path}: zip members declare {total} uncompressed bytes in a file of {file_size} (ratio "
            f"{total / max(file_size, 1):.0f}:1), more than the limit of {limits.max_compression_ratio}:1 "
            f"(Limits.max_compression_ratio) for archives that inflate past {limits.ratio_free_bytes} bytes "
            f"(Limits.ratio_free_bytes); weights hardly compress, so this looks like a zip bomb")


#: What zipfile raises on a corrupt member: a bad CRC or header (BadZipFile), data that ends early
#: (EOFError), broken deflate (zlib.error), a name that is not UTF-8 (UnicodeDecodeError, a ValueError),
#: an encrypted member (RuntimeError), an unknown compression method (NotImplementedError).
ZIP_READ_ERRORS = (zipfile.BadZipFile, EOFError, zlib.error, OSError, ValueError, RuntimeError, NotImplementedError)


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path) -> bytes:
    """The bytes of one member (at most its declared size), with corruption reported as such."""
    try:
        data = zf.read(info)
    except ZIP_READ_ERRORS as exc:
        raise WeightsFileError(
            f"{path}: member {short_repr(info.filename)} cannot be read ({str(exc)[:200]}); "
            f"the file is truncated or corrupt") from None
    if len(data) != info.file_size:
        raise WeightsFileError(
            f"{path}: member {short_repr(info.filename)} holds {len(data)} bytes, its zip entry declares "
            f"{info.file_size}; the file is truncated or corrupt")
    return data


@contextlib.contextmanager
def atomic_write(path: pathlib.Path):
    """Yield a binary file object; on success it replaces ``path`` whole, on failure nothing changes.

    The temporary file is created next to the target (``os.replace`` is atomic
    only within one file system) with ``O_EXCL`` and mode 0o666, so the umask
    gives it the permissions any new file would get.  A Ctrl-C or SIGTERM that
    arrives during the write is acted on after it (:mod:`tinynet.signals`).
    """
    directory = path.parent
    if not directory.is_dir():
        raise FileNotFoundError(errno.ENOENT, "Directory to save weights into does not exist", str(directory))
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "Cannot save weights over a directory", str(path))
    tmp = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
    with deferred_signals():  # Ctrl-C or SIGTERM is acted on once the file is whole, never half-way through it
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_directory(directory)


def _fsync_directory(directory: pathlib.Path) -> None:
    """Make the rename itself durable (POSIX); Windows and some file systems cannot, and need not."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def is_index(value) -> bool:
    """A non-negative Python int (not a bool): what a size, stride, offset or byte position must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_shape(shape, itemsize: int, where: str, limits: Limits) -> None:
    """Refuse a shape whose non-zero dimensions alone would need more than ``limits.max_bytes``.

    An empty array's bytes are 0 whatever its other dimensions, so a size
    check on the bytes lets ``(0, 2**62)`` through; NumPy then refuses to make
    it ("array is too big").  Checking the product of the non-zero dimensions
    catches it first, with the file's name.
    """
    if len(shape) > 64:
        raise WeightsFileError(f"{where}: {len(shape)} dimensions; NumPy arrays have at most 64")
    if math.prod(d for d in shape if d) * itemsize > limits.max_bytes:
        raise WeightsFileError(
            f"{where}: shape {short_repr(tuple(shape))} is not a real array: its non-zero dimensions alone "
            f"would need more than {limits.max_bytes} bytes (Limits.max_bytes)")


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values, given as their uint16 bit patterns, as float32 (exact).

    bfloat16 is the upper half of a float32 (1 sign, 8 exponent, 7 mantissa
    bits), so shifting the pattern 16 bits left gives the same number.
    """
    return (bits.astype(np.uint32) << 16).view(np.float32)


#: The dtypes :func:`tinynet.io.save_weights` writes (both formats can hold each one).
SAVE_DTYPES = frozenset(np.dtype(t) for t in (
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64))


def host_array(key, value, path) -> np.ndarray:
    """``value`` as a C-contiguous little-endian NumPy array, ready to be written under ``key``.

    CuPy arrays come to the host through :func:`tinynet.backend.to_numpy`;
    a tinynet ``Parameter`` gives its ``data``.
    """
    if not isinstance(key, str):
        raise TypeError(f"saving {path}: state-dict keys must be str, got {type(key).__name__} {key!r}")
    if isinstance(value, Parameter):
        value = value.data
    array = backend.to_numpy(value)
    native = array.dtype.newbyteorder("=")
    if native not in SAVE_DTYPES:
        raise TypeError(
            f"saving {path}: {key!r} has dtype {array.dtype} ({type(value).__name__}); expected one of "
            f"bool, int8/16/32/64, uint8/16/32/64, float16/32/64")
    # asarray, not ascontiguousarray: the latter turns a 0-d num_batches_tracked into shape (1,).
    return np.asarray(array, dtype=native.newbyteorder("<"), order="C")
