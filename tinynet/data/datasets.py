"""In-memory image datasets: the interface every dataset offers, and the array that backs them.

A dataset here is a labelled set of images that are already decoded and
resized.  It offers:

- ``classes``: list[str], the class names; label ``k`` means ``classes[k]``;
- ``labels``: int64 ``(N,)``;
- ``len(dataset)``: N;
- ``image(i)``: uint8 ``(H, W, 3)``, RGB;
- ``images(indices)``: uint8 ``(B, H, W, 3)``, a new array the caller may modify.

:class:`ArrayDataset` implements it over one contiguous uint8 array;
:class:`~tinynet.data.folder.ImageFolder` and
:class:`~tinynet.data.archive.ZipImageDataset` are array datasets filled by
decoding files.  :func:`digits_dataset` is the default when no data folder is
given: scikit-learn's bundled handwritten digits, no download needed.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
from PIL import Image

from .decode import DecodeReport, SkippedFile, write_skipped

__all__ = ["Dataset", "ArrayDataset", "DecodedDataset", "digits_dataset"]


class Dataset(Protocol):
    """What :class:`~tinynet.data.loader.DataLoader` and :func:`~tinynet.data.split.stratified_split` need."""

    classes: list[str]
    labels: np.ndarray

    def __len__(self) -> int: ...

    def image(self, i: int) -> np.ndarray: ...

    def images(self, indices) -> np.ndarray: ...


class ArrayDataset:
    """Images held in one uint8 array ``(N, H, W, 3)``, with int labels ``(N,)`` into ``classes``.

    The array is kept as a read-only view, so a transform that edits an
    image in place cannot corrupt the dataset: ``image(i)`` returns a
    read-only view, ``images(indices)`` a writable copy.
    """

    def __init__(self, images: np.ndarray, labels, classes: Sequence[str]):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"{type(self).__name__}: expected uint8 images of shape (N, H, W, 3), "
                             f"received {images.dtype} {images.shape}")
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"{type(self).__name__}: expected {len(images)} integer labels, one per image, "
                             f"received {labels.dtype} {labels.shape}")
        classes = [str(name) for name in classes]
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise ValueError(f"{type(self).__name__}: labels must lie in [0, {len(classes)}) for "
                             f"{len(classes)} classes, received labels from {labels.min()} to {labels.max()}")
        self.array = images.view()
        self.array.flags.writeable = False
        self.labels = labels.astype(np.int64)
        self.classes = classes

    def __len__(self) -> int:
        return len(self.array)

    def image(self, i: int) -> np.ndarray:
        """Image ``i``: uint8 ``(H, W, 3)``, read-only."""
        return self.array[i]

    def images(self, indices) -> np.ndarray:
        """Images at ``indices`` (int array ``(B,)``): a new uint8 array ``(B, H, W, 3)``."""
        return self.array[np.asarray(indices, dtype=np.intp)]

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of every image."""
        return self.array.shape[1], self.array.shape[2]

    def class_counts(self) -> np.ndarray:
        """int64 ``(len(classes),)``: how many images each class has."""
        return np.bincount(self.labels, minlength=len(self.classes))

    def _summary(self) -> str:
        height, width = self.image_size
        return f"{len(self)} images, {len(self.classes)} classes, {height}x{width}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._summary()})"


class DecodedDataset(ArrayDataset):
    """An :class:`ArrayDataset` decoded from files, which remembers the files it could not use.

    ``skipped``: list of :class:`~tinynet.data.decode.SkippedFile`;
    ``report``: the :class:`~tinynet.data.decode.DecodeReport` of the build.
    """

    def __init__(self, images, labels, classes, skipped: Sequence[SkippedFile], report: DecodeReport):
        super().__init__(images, labels, classes)
        self.skipped = sorted(skipped, key=lambda entry: entry.path)
        self.report = report

    def write_skipped(self, path) -> None:
        """Write the skipped files to ``path``: a TSV of ``path<TAB>reason`` lines (see ``decode.write_skipped``)."""
        write_skipped(self.skipped, path)

    def _summary(self) -> str:
        return f"{super()._summary()}, {len(self.skipped)} files skipped"


def digits_dataset(size: int = 64) -> ArrayDataset:
    """scikit-learn's 1,797 handwritten digits (8x8, bundled: no download) as RGB images ``size`` x ``size``.

    The 17 grey levels (0..16, ink bright on a black ground) are scaled to
    0..255, upscaled with Pillow's BILINEAR filter, as the photo datasets are
    resized, and copied to the three channels.  Classes ``"0"`` .. ``"9"``.
    """
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import

    digits = load_digits()
    grey = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    upscaled = np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
                         for image in grey])
    rgb = np.repeat(upscaled[..., None], 3, axis=3)
    return ArrayDataset(rgb, digits.target, [str(digit) for digit in range(10)])
