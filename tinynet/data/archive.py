"""Images in a zip archive laid out ``<split>/<class>/<file>``, like ``tiny-imagenet-188-32px.zip``.

Layout (in the archive, or in the folder it was extracted to)::

    classes.tsv                      optional: <class id> TAB <readable names>, one class a line
    train/n01443537/n01443537_0.JPEG
    ...
    val/n01443537/val_1230.JPEG

The members are read straight from the archive (no extraction needed;
Tiny-ImageNet's is stored uncompressed, so reading costs no inflating) and
decoded once into a uint8 array ``(N, size, size, 3)``: 103,400 images of
32x32 take about 300 MB.  With ``cache_path`` that array is saved as an
``.npz`` file after the first decode, and later runs load it instead.

An archive is read under the bounds a weights file is (:mod:`tinynet.io`),
so a few kilobytes cannot inflate to gigabytes: only STORED and DEFLATED
members are read (bzip2 and LZMA, which images never need, reach ratios of a
million to one and inflate in chunks Python cannot bound); a member that
declares more than ``max_file_bytes`` is skipped before it is inflated, and
none is read past that bound whatever it declares; and the members of a split
may declare at most ``max_total_bytes`` in all, or the archive is refused.
Each image then passes the checks of :mod:`~tinynet.data.decode` (its
signature, the allowed formats, the pixel limit).
"""
from __future__ import annotations

import functools
import os
import posixpath
import stat
import time
import warnings
import zipfile
from collections import defaultdict

import numpy as np

from ..io.files import ZIP_READ_ERRORS, open_regular_file
from .datasets import DecodedDataset
from .decode import (MAX_FILE_BYTES, DecodeReport, SkippedFile, UnreadableImage, check_limit, decode_all,
                     error_text, image_size, read_file, read_image_bytes)
from .folder import NOT_IN_A_CLASS_FOLDER, find_classes, list_class_files

__all__ = ["ZipImageDataset", "read_class_table"]

CLASS_TABLE = "classes.tsv"

#: The most the members of one split may declare, inflated, in all (bytes): as much as a weights file's
#: members (``tinynet.io.Limits.max_bytes``), 40 times Tiny-ImageNet-188's 96 MB.  It bounds the time spent
#: inflating; memory is bounded per member, by ``max_file_bytes``.
MAX_ARCHIVE_BYTES = 4 << 30

# Written into every cache; a cache whose signature differs was made from
# other data or other options, or by an older layout of this file, and is rebuilt.
CACHE_FORMAT = "tinynet-image-cache-1"


def read_class_table(text: str) -> dict[str, str]:
    """``classes.tsv`` as ``{class id: readable names}``, in the file's order (blank lines ignored)."""
    table = {}
    for line in text.splitlines():
        if line.strip():
            class_id, _, names = line.partition("\t")
            table[class_id.strip()] = names.strip()
    return table


# A classes.tsv larger than this is refused: ImageNet-21k's table of 21,841 classes is about 700 kB.
MAX_CLASS_TABLE_BYTES = 1 << 20


def _unreadable_table(source, error: Exception) -> ValueError:
    return ValueError(f"image archive {source!r}: {CLASS_TABLE} cannot be read ({error_text(error)})")


def _class_table_text(stream, source) -> str:
    """The text of ``classes.tsv`` read from the binary ``stream``, at most :data:`MAX_CLASS_TABLE_BYTES`."""
    try:
        raw = stream.read(MAX_CLASS_TABLE_BYTES + 1)
        if len(raw) > MAX_CLASS_TABLE_BYTES:
            raise ValueError(f"more than {MAX_CLASS_TABLE_BYTES:,} bytes")
        return raw.decode("utf-8")
    except ZIP_READ_ERRORS as error:  # UnicodeDecodeError and our own ValueError too
        raise _unreadable_table(source, error) from None


def _read_class_table_member(archive: zipfile.ZipFile, source) -> str:
    """The text of the archive's ``classes.tsv``, "" without one."""
    if CLASS_TABLE not in archive.namelist():
        return ""
    info = archive.getinfo(CLASS_TABLE)
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise ValueError(f"image archive {source!r}: {CLASS_TABLE} uses zip compression method "
                         f"{info.compress_type}; expected stored (0) or deflated (8)")
    try:
        member = archive.open(info)
    except ZIP_READ_ERRORS as error:
        raise _unreadable_table(source, error) from None
    with member:
        return _class_table_text(member, source)


def _list_zip(archive: zipfile.ZipFile, split: str):
    """``({class: [member, ...]}, skipped)`` for the members under ``split/``, in torchvision's order.

    Members are sorted by (folder, file name), the order
    :func:`~tinynet.data.folder.list_class_files` gives for the extracted
    folder, so both layouts yield the same arrays.  Hidden members (a path
    part starting with ``.``) are ignored.
    """
    by_class = defaultdict(list)
    skipped = []
    for info in archive.infolist():
        parts = info.filename.split("/")
        # endswith, not info.is_dir(): that raises IndexError for a member whose name is empty
        if info.filename.endswith("/") or parts[0] != split or any(part.startswith(".") for part in parts):
            continue
        if len(parts) < 3 or not parts[1]:  # "train/x.png", a file named "train", "train//x.png"
            skipped.append(SkippedFile(f"{archive.filename}/{info.filename}", NOT_IN_A_CLASS_FOLDER))
        else:
            by_class[parts[1]].append(info.filename)
    return {name: sorted(members, key=posixpath.split) for name, members in by_class.items()}, skipped


def _member_reader(archive: zipfile.ZipFile, max_bytes: int):
    """``read(name)``: the bytes of the image member ``name``, under the bounds of the module docstring."""
    def read(name: str) -> bytes:
        info = archive.getinfo(name)
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise UnreadableImage(f"zip compression method {info.compress_type}: only stored (0) and deflated (8) "
                                  f"members are read")
        with archive.open(info) as member:  # inflates as it is read: never more than asked for
            return read_image_bytes(member, info.file_size, max_bytes)
    return read


def _check_total(archive: zipfile.ZipFile, by_class: dict, limit_per_class, max_total_bytes: int, source) -> None:
    """Refuse the split when the members it would read declare more than ``max_total_bytes``."""
    total = sum(archive.getinfo(name).file_size for members in by_class.values() for name in members[:limit_per_class])
    if total > max_total_bytes:
        raise ValueError(f"image archive {source!r}: the members to read declare {total:,} bytes inflated, more "
                         f"than the limit of {max_total_bytes:,} (max_total_bytes; raise it if the archive is trusted)")


class ZipImageDataset(DecodedDataset):
    """One split of a ``<split>/<class>/<file>`` image archive (a .zip or its extracted folder), decoded once.

    Parameters
    ----------
    source : the .zip file, or the folder it was extracted to.
    split : the top-level folder to read, ``"train"`` or ``"val"``.
    size : int or (H, W); images of another size are resized with Pillow's
        BILINEAR filter (Tiny-ImageNet's are 32x32 already).
    limit_per_class : keep the first N images of each class, for small runs.
    cache_path : an ``.npz`` file.  If it holds the array for the same
        source, split, size and limit, it is loaded (with
        ``allow_pickle=False``) instead of decoding; otherwise the images are
        decoded and saved there.  The source is recognised by its path, size
        in bytes and modification time; for an extracted folder only the
        folder's own time is seen, so delete the cache after editing files in it.
    threads : decoding threads (default: one per CPU).
    max_pixels : refuse images larger than this (default: Pillow's ``Image.MAX_IMAGE_PIXELS``).
    max_file_bytes : refuse members (or files) larger than this, inflated
        (default :data:`~tinynet.data.decode.MAX_FILE_BYTES`, 128 MiB).
    max_total_bytes : refuse a zip whose members to read declare more than
        this in all (default :data:`MAX_ARCHIVE_BYTES`, 4 GiB).
    verbose : print the report (images, seconds, images/s, or the cache load).

    Classes: the order of ``classes.tsv`` when the source has one (its first
    column), otherwise the class folders' names sorted.  ``class_names``
    holds the table's readable names (the id itself when not listed).
    ``samples`` holds each image's member name in the zip (or its file path,
    for a folder); ``skipped`` and ``report`` are as for
    :class:`~tinynet.data.folder.ImageFolder`.
    """

    def __init__(self, source, split: str = "train", size=32, *, limit_per_class: int | None = None,
                 cache_path=None, threads: int | None = None, max_pixels: int | None = None,
                 max_file_bytes: int = MAX_FILE_BYTES, max_total_bytes: int = MAX_ARCHIVE_BYTES,
                 verbose: bool = False):
        self.source = os.fspath(source)
        self.split = split
        check_limit(limit_per_class, "ZipImageDataset")
        if not os.path.exists(self.source):
            raise FileNotFoundError(f"image archive {self.source!r} does not exist")
        size = image_size(size)
        status = os.stat(self.source)
        signature = "|".join(map(str, (CACHE_FORMAT, os.path.abspath(self.source), split, size, limit_per_class,
                                       status.st_size, status.st_mtime_ns)))
        arrays = self._load_cache(cache_path, signature) if cache_path is not None else None
        if arrays is None:
            self._bounds = {"max_pixels": max_pixels, "max_file_bytes": max_file_bytes,
                            "max_total_bytes": max_total_bytes}
            arrays = self._decode(size, limit_per_class, threads)
            if cache_path is not None:
                self._save_cache(cache_path, signature, arrays)
        skipped = [SkippedFile(str(path), str(reason))
                   for path, reason in zip(arrays["skipped_paths"], arrays["skipped_reasons"])]
        super().__init__(arrays["images"], arrays["labels"], arrays["classes"], skipped, arrays["report"])
        self.class_names = [str(name) for name in arrays["class_names"]]
        self.samples = [str(path) for path in arrays["samples"]]
        if verbose:
            print(f"ZipImageDataset {self.source} [{split}]: {self.report}")

    def _decode(self, size, limit_per_class, threads) -> dict:
        """List, then decode the split; the arrays a cache stores, plus the report."""
        if os.path.isdir(self.source):
            return self._decode_folder(size, limit_per_class, threads)
        # Opened once, and read from that descriptor only: a FIFO swapped in is refused, never waited on.
        file, _ = open_regular_file(self.source, lambda status: ValueError(
            f"image archive {self.source!r} is not a regular file (mode {stat.filemode(status.st_mode)}); "
            f"expected a zip file or a folder"))
        with file:
            if not zipfile.is_zipfile(file):
                raise ValueError(f"image archive {self.source!r} is neither a zip file nor a folder")
            try:
                archive = zipfile.ZipFile(file)
            except ZIP_READ_ERRORS as error:  # a damaged central directory, names that are not text, ...
                raise ValueError(f"image archive {self.source!r} cannot be opened as a zip file "
                                 f"({error_text(error)}); it is truncated or corrupt") from None
            with archive:
                by_class, skipped = _list_zip(archive, self.split)
                if not by_class:
                    raise FileNotFoundError(f"image archive {self.source!r} has no images under {self.split}/<class>/")
                _check_total(archive, by_class, limit_per_class, self._bounds["max_total_bytes"], self.source)
                table_text = _read_class_table_member(archive, self.source)
                return self._decode_listed(by_class, skipped, table_text,
                                           _member_reader(archive, self._bounds["max_file_bytes"]),
                                           f"{self.source}/", size, limit_per_class, threads)

    def _decode_folder(self, size, limit_per_class, threads) -> dict:
        """:meth:`_decode` for an archive extracted to a folder."""
        split_dir = os.path.join(self.source, self.split)
        if not os.path.isdir(split_dir):
            raise FileNotFoundError(f"image archive {self.source!r} has no {self.split!r} folder")
        classes, skipped = find_classes(split_dir)
        by_class = {}
        for name in classes:
            by_class[name], unlisted = list_class_files(os.path.join(split_dir, name))
            skipped += unlisted
        try:
            table, _ = open_regular_file(os.path.join(self.source, CLASS_TABLE), lambda status: _unreadable_table(
                self.source, ValueError(f"not a regular file, mode {stat.filemode(status.st_mode)}")))
        except FileNotFoundError:
            table_text = ""
        else:
            with table:
                table_text = _class_table_text(table, self.source)
        read = functools.partial(read_file, max_bytes=self._bounds["max_file_bytes"])
        return self._decode_listed(by_class, skipped, table_text, read, "", size, limit_per_class, threads)

    def _decode_listed(self, by_class, skipped, table_text, read, path_prefix, size, limit_per_class,
                       threads) -> dict:
        """Decode the listed images; ``path_prefix`` + source is the path a skipped one is reported under."""
        table = read_class_table(table_text)
        classes = list(table) if table else sorted(by_class)
        unlisted = sorted(set(by_class) - set(classes))
        if unlisted:
            raise ValueError(f"image archive {self.source!r}: class folders {unlisted[:5]} of split {self.split!r} "
                             f"are not listed in {CLASS_TABLE} ({len(unlisted)} in all)")
        sources, labels = [], []
        for label, name in enumerate(classes):
            members = by_class.get(name, [])[:limit_per_class]
            sources += members
            labels += [label] * len(members)
        images, kept, unreadable, report = decode_all(sources, read, size, threads, self._bounds["max_pixels"])
        labels = np.asarray(labels, dtype=np.int64)[kept]
        empty = [classes[k] for k in np.flatnonzero(np.bincount(labels, minlength=len(classes)) == 0)]
        if empty:
            raise ValueError(f"image archive {self.source!r}: classes {empty[:5]} have no readable image in "
                             f"split {self.split!r} ({len(empty)} in all)")
        skipped += [SkippedFile(path_prefix + entry.path, entry.reason) for entry in unreadable]
        return {
            "images": images, "labels": labels, "classes": np.array(classes, dtype=str),
            "class_names": np.array([table.get(name, name) for name in classes], dtype=str),
            "samples": np.array([sources[i] for i in kept], dtype=str),
            "skipped_paths": np.array([entry.path for entry in skipped], dtype=str),
            "skipped_reasons": np.array([entry.reason for entry in skipped], dtype=str),
            "report": report,
        }

    @staticmethod
    def _load_cache(path, signature: str) -> dict | None:
        """The cached arrays, or None when ``path`` is missing, unreadable or made from other data."""
        if not os.path.exists(path):
            return None
        began = time.perf_counter()
        try:
            with np.load(path, allow_pickle=False) as cache:
                if str(cache["signature"]) != signature:
                    return None
                arrays = {key: cache[key] for key in cache.files if key != "signature"}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            warnings.warn(f"image cache {os.fspath(path)!r} could not be read ({error}); decoding again",
                          stacklevel=3)
            return None
        arrays["report"] = DecodeReport(len(arrays["images"]), len(arrays["skipped_paths"]),
                                        time.perf_counter() - began, threads=0, from_cache=True)
        return arrays

    @staticmethod
    def _save_cache(path, signature: str, arrays: dict) -> None:
        """Write the arrays to ``path`` (.npz, uncompressed), atomically: a run killed midway leaves no half file."""
        partial = f"{os.fspath(path)}.partial-{os.getpid()}"
        with open(partial, "wb") as file:  # a file object, so np.savez does not append ".npz" to the name
            np.savez(file, signature=np.array(signature),
                     **{key: value for key, value in arrays.items() if key != "report"})
        os.replace(partial, path)

    def _summary(self) -> str:
        return f"{self.source!r}, split {self.split!r}, {super()._summary()}"
