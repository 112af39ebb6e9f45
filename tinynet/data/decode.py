"""Turning image files into uint8 RGB arrays: once, in parallel, skipping what cannot be read.

Every file-backed dataset in this package decodes all its images when it is
built, into one contiguous array ``(N, H, W, 3)`` of ``uint8``; training then
only indexes that array.  A file that cannot be used never stops the build:
it is recorded as a :class:`SkippedFile` with a one-line reason.

How one file becomes an ``(H, W, 3)`` array, in order:

1. Pillow opens the bytes, whatever the file's extension says (a WEBP named
   ``.jpg`` is read as WEBP, a text file named ``.png`` is skipped).
2. Images with more than ``max_pixels`` pixels are refused before decoding
   (a decompression bomb: a small file that would expand to gigabytes).
3. The mode is converted to RGB by :func:`to_rgb`: PIL's ``convert("RGB")``,
   which is what a PyTorch pipeline's ``Image.open(p).convert("RGB")`` does,
   except that 16-bit greyscale is scaled to 8 bits instead of clipped.
4. The image is resized to ``size`` with Pillow's BILINEAR filter, which
   antialiases when it shrinks: exactly ``torchvision.transforms.Resize``
   on a PIL image.

The EXIF orientation tag is *not* applied, as PIL and torchvision do not
apply it either: a photo stored sideways stays sideways, in both pipelines.
"""
from __future__ import annotations

import csv
import errno
import io
import math
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = [
    "SkippedFile", "DecodeReport", "UnreadableImage",
    "to_rgb", "decode_rgb", "decode_all", "read_file", "describe_error", "write_skipped", "image_size",
    "check_limit",
]

# Pillow's modes for one channel of 16-bit samples.  "I" (32-bit integer) is
# among them because Pillow before 10.0 opened 16-bit PNG and TIFF files as "I".
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})

# Images decoded by one thread pool task: large enough that the pool's
# bookkeeping is negligible, small enough to keep every thread busy to the end.
CHUNK = 64


@dataclass(frozen=True)
class SkippedFile:
    """A file a dataset did not use, and why (one line)."""

    path: str
    reason: str


@dataclass(frozen=True)
class DecodeReport:
    """How long building a dataset's image array took.

    ``images`` were decoded (or loaded from a cache, ``from_cache=True``) in
    ``seconds`` by ``threads`` threads; ``skipped`` files could not be used.
    """

    images: int
    skipped: int
    seconds: float
    threads: int
    from_cache: bool = False

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else math.inf

    def __str__(self) -> str:
        how = "loaded from cache" if self.from_cache else f"decoded on {self.threads} threads"
        return (f"{self.images:,} images {how} in {self.seconds:.2f} s "
                f"({self.images_per_second:,.0f} images/s), {self.skipped:,} files skipped")


class UnreadableImage(Exception):
    """A file this package refuses to decode; the message is the reason recorded."""


def image_size(size) -> tuple[int, int]:
    """``size`` as ``(height, width)``: an int means a square, a pair is taken as (H, W)."""
    height, width = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if min(height, width) < 1:
        raise ValueError(f"image size must be positive, got {size!r}")
    return int(height), int(width)


def check_limit(limit_per_class: int | None, owner: str) -> None:
    """Raise unless ``limit_per_class`` is None (no limit) or a positive int."""
    if limit_per_class is not None and limit_per_class < 1:
        raise ValueError(f"{owner}: limit_per_class must be None or a positive number of images, "
                         f"got {limit_per_class}")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` in mode RGB, as PIL's ``image.convert("RGB")`` makes it, 16-bit greyscale aside.

    - RGBA, LA, PA: the alpha channel is dropped, not composited over a
      background; the colours under transparent pixels are kept as stored.
    - P (palette), with or without transparency: each index becomes its
      palette colour; transparency is dropped like alpha.
    - L, 1: the grey value is copied to the three channels (1 gives 0 or 255).
    - CMYK, YCbCr, HSV, LAB: Pillow's conversions.
    - 16-bit greyscale (I;16, I;16B, ...; and I, see ``SIXTEEN_BIT_MODES``):
      ``round(v * 255 / 65535)``.  PIL's own conversion clips at 255, which
      turns almost every 16-bit photo white.
    - F (32-bit float): Pillow's conversion, which reads the values on the
      0..255 scale and clips.
    """
    if image.mode in SIXTEEN_BIT_MODES:
        samples = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        image = Image.fromarray(((samples * 255 + 32767) // 65535).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        # Through RGBA, as Pillow asks for palettes with transparency (it warns
        # otherwise); dropping the alpha afterwards gives the same pixels.
        image = image.convert("RGBA")
    return image.convert("RGB")


def decode_rgb(data: bytes, size: tuple[int, int], max_pixels: int | None = None) -> np.ndarray:
    """Decode one encoded image (any format Pillow reads) into uint8 ``(H, W, 3)``, ``(H, W) = size``.

    Raises :class:`UnreadableImage` for an empty file or one with more than
    ``max_pixels`` pixels (default: Pillow's ``Image.MAX_IMAGE_PIXELS``),
    and whatever Pillow raises for a file it cannot decode.
    """
    if not data:
        raise UnreadableImage("empty file (0 bytes)")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if limit is not None and width * height > limit:
            raise UnreadableImage(f"{width}x{height} = {width * height:,} pixels is over the limit of "
                                  f"{limit:,} (a decompression bomb?)")
        rgb = to_rgb(image)  # decodes: a truncated file raises here
    return np.asarray(rgb.resize((size[1], size[0]), Image.BILINEAR))


def read_file(path: str) -> bytes:
    """The bytes of the regular file at ``path`` (symbolic links followed).

    Anything else raises: :class:`UnreadableImage` for a FIFO, socket or
    device (reading a FIFO would block forever), ``OSError`` for a broken
    link, a link loop or a file without read permission.
    """
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise UnreadableImage(f"not a regular file (mode {stat.filemode(mode)})")
    with open(path, "rb") as file:
        return file.read()


def describe_error(error: BaseException) -> str:
    """One line saying why a file could not be used, for a :class:`SkippedFile`."""
    if isinstance(error, UnreadableImage):
        return str(error)
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, FileNotFoundError):
        return "no such file: a broken symbolic link, or removed while being read"
    if isinstance(error, OSError) and error.errno == errno.ELOOP:
        return "symbolic link loop"
    if isinstance(error, UnidentifiedImageError):
        return "not an image (no format Pillow knows matches its contents)"
    message = " ".join(str(error).split())
    return f"cannot decode: {type(error).__name__}: {message}" if message else type(error).__name__


def decode_all(sources: Sequence[str], read: Callable[[str], bytes], size: tuple[int, int],
               threads: int | None = None, max_pixels: int | None = None):
    """Decode every source into one uint8 array, on a pool of threads.

    ``read(source)`` returns a source's bytes (a file path, a zip member
    name, ...).  Pillow releases the GIL while it decodes and resizes, so the
    threads decode in parallel; each writes its images straight into the
    shared output array.

    Returns ``(images, kept, skipped, report)``:

    - ``images``: uint8 ``(K, H, W, 3)``, the K sources that decoded, in the
      order of ``sources``;
    - ``kept``: int64 ``(K,)``, their positions in ``sources``;
    - ``skipped``: a :class:`SkippedFile` (path = the source) for each other one;
    - ``report``: a :class:`DecodeReport`.
    """
    threads = threads or os.cpu_count() or 1
    images = np.empty((len(sources), *size, 3), dtype=np.uint8)
    reasons: list[str | None] = [None] * len(sources)

    def decode_chunk(start: int) -> None:
        for i in range(start, min(start + CHUNK, len(sources))):
            try:
                images[i] = decode_rgb(read(sources[i]), size, max_pixels)
            except Exception as error:  # Pillow's plugins raise many types on malformed files
                reasons[i] = describe_error(error)

    began = time.perf_counter()
    with ThreadPoolExecutor(threads, thread_name_prefix="tinynet-decode") as pool:
        list(pool.map(decode_chunk, range(0, len(sources), CHUNK)))
    seconds = time.perf_counter() - began

    kept = np.array([i for i, reason in enumerate(reasons) if reason is None], dtype=np.int64)
    skipped = [SkippedFile(sources[i], reason) for i, reason in enumerate(reasons) if reason is not None]
    if skipped:
        images = images[kept]
    return images, kept, skipped, DecodeReport(len(kept), len(skipped), seconds, threads)


def write_skipped(skipped: Sequence[SkippedFile], path) -> None:
    """Write ``skipped`` to ``path`` as tab-separated ``path<TAB>reason`` lines under a header.

    Fields holding a tab or a newline are quoted (the csv module's excel-tab
    dialect); names that are not valid UTF-8 are written with backslash escapes.
    """
    with open(path, "w", encoding="utf-8", errors="backslashreplace", newline="") as file:
        writer = csv.writer(file, dialect="excel-tab")
        writer.writerow(["path", "reason"])
        writer.writerows([entry.path, entry.reason] for entry in skipped)
