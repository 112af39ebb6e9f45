"""Turning image files into uint8 RGB arrays: once, in parallel, skipping what cannot be read.

Every file-backed dataset in this package decodes all its images when it is
built, into one contiguous array ``(N, H, W, 3)`` of ``uint8``; training then
only indexes that array.  A file that cannot be used never stops the build:
it is recorded as a :class:`SkippedFile` with a one-line reason.

How one file becomes an ``(H, W, 3)`` array, in order:

1. A file larger than ``max_bytes`` (:data:`MAX_FILE_BYTES`, 128 MiB) is
   refused from its size alone, and one whose first bytes are not the
   signature of a format in :data:`FORMATS` from those bytes alone: neither
   is read whole (a multi-GB video in a class folder costs a ``stat`` and a
   16-byte read, not gigabytes of memory on every decoding thread).
2. Pillow opens the bytes as the format their signature names, whatever the
   file's extension says (a WEBP named ``.jpg`` is read as WEBP, a text file
   named ``.png`` is skipped).  Only the formats of :data:`FORMATS` are ever
   tried: Pillow recognises formats by content, and some of its plugins hand
   the file to another program (EPS and PostScript go to Ghostscript), so a
   file that merely *claims* to be a photo must never reach them.
3. Images with more than ``max_pixels`` pixels are refused before decoding
   (a decompression bomb: a small file that would expand to gigabytes).
4. The mode is converted to RGB by :func:`to_rgb`: PIL's ``convert("RGB")``,
   which is what a PyTorch pipeline's ``Image.open(p).convert("RGB")`` does,
   except that 16-bit greyscale is scaled to 8 bits instead of clipped.
5. The image is resized to ``size`` with Pillow's BILINEAR filter, which
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
    "check_limit", "error_text", "sniff_format", "read_image_bytes", "check_fits_in_memory", "FORMATS",
    "MAX_FILE_BYTES",
]

# Pillow's modes for one channel of 16-bit samples.  "I" (32-bit integer) is
# among them because Pillow before 10.0 opened 16-bit PNG and TIFF files as "I".
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})

#: The formats decoded, by Pillow's names: the raster formats photos and datasets come in.  Pillow decodes
#: each of them in this process (libjpeg, zlib, libwebp, libtiff and its own C code); no plugin among them
#: starts a program.  Everything else is skipped, even what Pillow could read: EPS/PostScript (handed to
#: Ghostscript, a full interpreter), and the rarely used formats whose plugins see little scrutiny.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

# The first bytes of each format (its "magic number"), as the format's specification fixes them.
# WEBP is a RIFF container: "RIFF", 4 bytes of length, then "WEBP".
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),  # little- and big-endian TIFF
    (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"),  # BigTIFF
)
HEADER_BYTES = 16  # enough for every signature above

#: The largest image file read (bytes).  A 100-megapixel camera JPEG is about 50 MB and a 24-megapixel
#: PNG about 70 MB; a larger file is refused from its size before it is read, since every decoding
#: thread would otherwise hold one whole in memory.
MAX_FILE_BYTES = 128 << 20

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


def sniff_format(head: bytes) -> str:
    """The format in :data:`FORMATS` whose signature ``head`` (a file's first bytes) starts with.

    Raises :class:`UnreadableImage` when there is none: the file is not an
    image, or is one in a format this package does not decode.
    """
    if not head:
        raise UnreadableImage("empty file (0 bytes)")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    for signature, fmt in _SIGNATURES:
        if head.startswith(signature):
            return fmt
    raise UnreadableImage(f"not an image in a decoded format ({', '.join(FORMATS)}): it starts with "
                          f"{bytes(head[:8])!r}")


def read_image_bytes(stream, size: int, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of one image file of ``size`` bytes from the binary ``stream``, refused early when hopeless.

    The size (a ``stat``, or a zip entry's declared size) is checked against
    ``max_bytes`` before anything is read, and the first bytes against
    :func:`sniff_format` before the rest is; at most ``max_bytes`` are ever
    read, whatever ``size`` claimed.  Raises :class:`UnreadableImage`.
    """
    if size > max_bytes:
        raise UnreadableImage(f"{size:,} bytes, over the limit of {max_bytes:,} for one image file")
    head = stream.read(HEADER_BYTES)
    sniff_format(head)
    data = head + stream.read(max_bytes + 1 - len(head))
    if len(data) > max_bytes:  # the file grew, or its zip entry understated its size
        raise UnreadableImage(f"more than {max_bytes:,} bytes, the limit for one image file")
    return data


def decode_rgb(data: bytes, size: tuple[int, int], max_pixels: int | None = None) -> np.ndarray:
    """Decode one encoded image (a format of :data:`FORMATS`) into uint8 ``(H, W, 3)``, ``(H, W) = size``.

    Raises :class:`UnreadableImage` for an empty file, a file in any other
    format, or one with more than ``max_pixels`` pixels (default: Pillow's
    ``Image.MAX_IMAGE_PIXELS``), and whatever Pillow raises for a file it
    cannot decode.
    """
    fmt = sniff_format(data[:HEADER_BYTES])
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    # formats=: Pillow tries this one plugin only, never one that its own content sniffing would pick.
    with Image.open(io.BytesIO(data), formats=[fmt]) as image:
        width, height = image.size
        if limit is not None and width * height > limit:
            raise UnreadableImage(f"{width}x{height} = {width * height:,} pixels is over the limit of "
                                  f"{limit:,} (a decompression bomb?)")
        rgb = to_rgb(image)  # decodes: a truncated file raises here
    return np.asarray(rgb.resize((size[1], size[0]), Image.BILINEAR))


def read_file(path: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the regular file at ``path`` (symbolic links followed), read by :func:`read_image_bytes`.

    Anything else raises: :class:`UnreadableImage` for a FIFO, socket or
    device (reading a FIFO would block forever), a file over ``max_bytes``
    or one that does not start like an image; ``OSError`` for a broken
    link, a link loop or a file without read permission.
    """
    status = os.stat(path)
    if not stat.S_ISREG(status.st_mode):
        raise UnreadableImage(f"not a regular file (mode {stat.filemode(status.st_mode)})")
    with open(path, "rb") as file:
        return read_image_bytes(file, status.st_size, max_bytes)


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
        return f"not a readable {', '.join(FORMATS)} image (Pillow cannot identify it)"
    return f"cannot decode: {error_text(error)}"


#: The most characters of a library's error message that a reason quotes: zipfile, for one, puts the raw
#: bytes of a damaged header into its message, as long as the header claims.
MAX_QUOTED = 200


def error_text(error: BaseException) -> str:
    """``"<type>: <message>"`` on one line, the message cut at :data:`MAX_QUOTED` characters."""
    message = " ".join(str(error).split())
    if len(message) > MAX_QUOTED:
        message = message[:MAX_QUOTED] + f"... ({len(message):,} characters)"
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _physical_memory() -> int | None:
    """This machine's memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits_in_memory(count: int, size: tuple[int, int], owner: str) -> None:
    """Raise ``ValueError`` unless ``count`` uint8 RGB images of ``size`` fit in half of this machine's memory.

    The decoded array is allocated whole before decoding starts; NumPy's
    allocation succeeds lazily on Linux, so without this check an image
    size or a file count that cannot fit would be found out by the kernel's
    out-of-memory killer midway, not by an error.  Half: training needs the rest.
    """
    need = count * size[0] * size[1] * 3
    memory = _physical_memory()
    if memory is not None and need > memory // 2:
        raise ValueError(f"{owner}: {count:,} images of {size[0]}x{size[1]} pixels need {_in_units(need)} "
                         f"decoded, more than half of this machine's {_in_units(memory)} of memory; use a "
                         f"smaller image size or fewer images per class")


def _in_units(size: int) -> str:
    return f"{size / 2**30:,.1f} GiB" if size >= 2**30 else f"{size / 2**20:,.1f} MiB"


def decode_all(sources: Sequence[str], read: Callable[[str], bytes], size: tuple[int, int],
               threads: int | None = None, max_pixels: int | None = None):
    """Decode every source into one uint8 array, on a pool of threads.

    ``read(source)`` returns a source's bytes (a file path, a zip member
    name, ...), refusing hopeless ones early (see :func:`read_image_bytes`).
    Pillow releases the GIL while it decodes and resizes, so the threads
    decode in parallel; each writes its images straight into the shared
    output array.

    Returns ``(images, kept, skipped, report)``:

    - ``images``: uint8 ``(K, H, W, 3)``, the K sources that decoded, in the
      order of ``sources``;
    - ``kept``: int64 ``(K,)``, their positions in ``sources``;
    - ``skipped``: a :class:`SkippedFile` (path = the source) for each other one;
    - ``report``: a :class:`DecodeReport`.
    """
    threads = threads or os.cpu_count() or 1
    check_fits_in_memory(len(sources), size, "decoding images")
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
