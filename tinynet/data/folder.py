"""A folder of images with one sub-folder per class, as torchvision's ``ImageFolder`` reads it.

Layout::

    root/
        bear/
            bear (1).png
            bear (2).jpg
        cat/
            ...

The class names are the sub-folders' names, sorted; class ``k`` is the k-th.
Within a class, files come in torchvision's order: sub-folders are searched
too, folders sorted by path and files by name (Python's string order, so
``bear (10).png`` comes before ``bear (2).png``).  The same order gives the
same sample indices as a PyTorch ``ImageFolder`` over the same files, so a
split by index (:func:`~tinynet.data.split.stratified_split`) selects the same
images in both.

Where this reader differs from torchvision's:

- every file is tried, whatever its extension (torchvision keeps only known
  image extensions);
- files and folders whose name starts with ``.`` are ignored (torchvision
  takes a ``.ipynb_checkpoints`` folder for a class);
- a file that cannot be read is skipped and recorded, not a crash mid-epoch;
- each real directory is read once, so a symbolic link back to a parent
  folder does not repeat the class's images.
"""
from __future__ import annotations

import functools
import os

import numpy as np

from .datasets import DecodedDataset
from .decode import (MAX_FILE_BYTES, SkippedFile, check_limit, decode_all, describe_error, image_size,
                     read_file)

__all__ = ["ImageFolder", "find_classes", "list_class_files", "NOT_IN_A_CLASS_FOLDER", "RUN_FOLDER_MARKER"]


NOT_IN_A_CLASS_FOLDER = "not inside a class folder (expected <root>/<class>/<image>)"
#: The file every training run keeps (and locks) in its output folder (:func:`tinynet.cli.claim_output_folder`).
#: A folder holding it, or a checkpoint, is a run's output, and its figures are never read as images.
RUN_FOLDER_MARKER = ".tinynet-run"
RUN_FOLDER = "a training run's output folder (its figures are not images to train on)"


def _is_run_folder(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in (RUN_FOLDER_MARKER, "checkpoint.npz"))


def _hidden(name: str) -> bool:
    return name.startswith(".")


def find_classes(root: str) -> tuple[list[str], list[SkippedFile]]:
    """The class folders in ``root`` (sorted names) and the other entries of ``root``, as skipped.

    Raises ``FileNotFoundError`` when ``root`` does not exist,
    ``NotADirectoryError`` when it is a file, and ``ValueError`` when it holds
    no class folder.
    """
    if not os.path.exists(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"image folder {root!r} is not a directory: expected root/<class>/<image>")
    with os.scandir(root) as entries:
        visible = [entry for entry in entries if not _hidden(entry.name)]
    runs = [entry for entry in visible if entry.is_dir() and _is_run_folder(entry.path)]
    classes = sorted(entry.name for entry in visible if entry.is_dir() and entry not in runs)
    stray = [SkippedFile(entry.path, NOT_IN_A_CLASS_FOLDER) for entry in visible if not entry.is_dir()]
    stray += [SkippedFile(entry.path, RUN_FOLDER) for entry in runs]
    if not classes:
        found = f"; it holds {len(stray)} files directly, which belong in class folders" if stray else ""
        raise ValueError(f"image folder {root!r} has no class folders: expected one sub-folder per class, "
                         f"root/<class>/<image>{found}")
    return classes, stray


def list_class_files(class_dir: str) -> tuple[list[str], list[SkippedFile]]:
    """Every non-hidden file below ``class_dir``, in torchvision's order, and the folders that could not be read.

    The order is that of ``sorted(os.walk(class_dir, followlinks=True))``,
    file names sorted within each folder.  Symbolic links to folders are
    followed, but each real directory is read once: a link that leads back to
    a folder already read (a loop) is recorded as skipped instead.
    """
    skipped: list[SkippedFile] = []
    read: set[str] = set()
    folders: list[tuple[str, list[str]]] = []

    def unreadable(error: OSError) -> None:
        skipped.append(SkippedFile(error.filename, f"folder not listed: {describe_error(error)}"))

    for folder, subfolders, names in os.walk(class_dir, onerror=unreadable, followlinks=True):
        real = os.path.realpath(folder)
        if real in read:
            skipped.append(SkippedFile(folder, f"folder already read as {real} (a symbolic link loop?)"))
            subfolders.clear()
            continue
        read.add(real)
        if _is_run_folder(folder):
            skipped.append(SkippedFile(folder, RUN_FOLDER))
            subfolders.clear()
            continue
        # Sorted, so that which of two links to one folder counts as the first does not depend on the OS.
        subfolders[:] = sorted(name for name in subfolders if not _hidden(name))
        folders.append((folder, sorted(name for name in names if not _hidden(name))))
    files = [os.path.join(folder, name) for folder, names in sorted(folders) for name in names]
    return files, skipped


class ImageFolder(DecodedDataset):
    """Every image below ``root/<class>/``, decoded once to uint8 RGB ``(N, size, size, 3)``.

    Parameters
    ----------
    root : folder holding one sub-folder per class.
    size : int or (H, W); every image is resized to it with Pillow's
        BILINEAR filter (torchvision's ``Resize((H, W))`` on a PIL image).
    limit_per_class : keep only the first N files of each class (in the
        order above), for quick runs.  Every class stays, so a stratified
        split of the subset still puts every class in every part.  Files
        among those N that cannot be read are skipped, not replaced, so a
        class may end up with fewer.
    threads : decoding threads (default: one per CPU).
    max_pixels : refuse images larger than this (default: Pillow's
        ``Image.MAX_IMAGE_PIXELS``).
    max_file_bytes : refuse files larger than this without reading them
        (default :data:`~tinynet.data.decode.MAX_FILE_BYTES`, 128 MiB).
    verbose : print the decode report (images, seconds, images/s).

    Attributes besides the dataset interface: ``root``; ``samples``, the
    path of each image (list[str], N); ``skipped``, the files not used, each a
    :class:`~tinynet.data.decode.SkippedFile` with its reason; ``report``,
    the :class:`~tinynet.data.decode.DecodeReport`.

    Raises ``FileNotFoundError`` / ``NotADirectoryError`` for a bad ``root``
    and ``ValueError`` for a root without class folders, or a class folder
    with no file or no readable image.
    """

    def __init__(self, root, size=64, *, limit_per_class: int | None = None, threads: int | None = None,
                 max_pixels: int | None = None, max_file_bytes: int = MAX_FILE_BYTES, verbose: bool = False):
        check_limit(limit_per_class, "ImageFolder")
        self.root = os.fspath(root)
        classes, skipped = find_classes(self.root)
        files: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(classes):
            class_files, unlisted = list_class_files(os.path.join(self.root, name))
            skipped += unlisted
            if not class_files:
                why = f": {unlisted[0].reason}" if unlisted else " (hidden files are ignored)"
                raise ValueError(f"class folder {os.path.join(self.root, name)!r} holds no files{why}; "
                                 f"remove it or add its images")
            class_files = class_files[:limit_per_class]
            files += class_files
            labels += [label] * len(class_files)

        read = functools.partial(read_file, max_bytes=max_file_bytes)
        images, kept, unreadable, report = decode_all(files, read, image_size(size), threads, max_pixels)
        labels = np.asarray(labels, dtype=np.int64)[kept]
        empty = np.flatnonzero(np.bincount(labels, minlength=len(classes)) == 0)
        if len(empty):
            folder = os.path.join(self.root, classes[empty[0]])
            reasons = [entry.reason for entry in unreadable if entry.path.startswith(folder + os.sep)]
            raise ValueError(f"class folder {folder!r}: none of its {len(reasons)} files is a readable image; "
                             f"the first failed with: {reasons[0]}")
        super().__init__(images, labels, classes, skipped + unreadable, report)
        self.samples = [files[i] for i in kept]
        if verbose:
            print(f"ImageFolder {self.root}: {report}")

    def _summary(self) -> str:
        return f"{self.root!r}, {super()._summary()}"
