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
   A JPEG's marker segments are walked first (:func:`count_jpeg_scans`), and
   one of more than :data:`MAX_JPEG_SEGMENTS` segments, more than
   :data:`MAX_JPEG_SCANS` scans, or more than :data:`MAX_JPEG_SCAN_PIXELS`
   pixels times scans is refused: each scan of a progressive JPEG is a pass
   over the whole image, and a repeated one costs a few bytes of file.
4. The decode itself waits for its pixels in :data:`DECODE_BUDGET`, shared
   by every decoding thread, so that a few large images at a time hold
   memory, not one per thread.
5. The mode is converted to RGB by :func:`to_rgb`: PIL's ``convert("RGB")``,
   which is what a PyTorch pipeline's ``Image.open(p).convert("RGB")`` does,
   except that 16-bit greyscale is scaled to 8 bits instead of clipped.
6. The image is resized to ``size`` with Pillow's BILINEAR filter, which
   antialiases when it shrinks: exactly ``torchvision.transforms.Resize``
   on a PIL image.

Every limit is a module attribute read when an image is decoded, so a
trusted dataset that needs more can raise it (``decode.MAX_JPEG_SCANS = 200``).

The EXIF orientation tag is *not* applied, as PIL and torchvision do not
apply it either: a photo stored sideways stays sideways, in both pipelines.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import io
import math
import os
import re
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..io.files import open_regular_file
from ..text import csv_cell

__all__ = [
    "SkippedFile", "DecodeReport", "UnreadableImage",
    "to_rgb", "decode_rgb", "decode_all", "read_file", "describe_error", "write_skipped", "image_size",
    "check_limit", "error_text", "sniff_format", "read_image_bytes", "check_fits_in_memory", "FORMATS",
    "MAX_FILE_BYTES", "count_jpeg_scans", "PixelBudget", "MAX_JPEG_SCANS", "MAX_JPEG_SCAN_PIXELS",
    "MAX_JPEG_SEGMENTS", "DECODE_BUDGET",
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

#: The most scans a JPEG may have.  libjpeg's progressive script (what Pillow, PIL and most cameras'
#: software write) has 10 for colour and 6 for greyscale; encoders that tune the script (mozjpeg, jpegtran's
#: -scans) stay near that, and 64 is one scan for each of a block's 64 coefficients.  libjpeg-turbo's djpeg
#: has the same guard (-maxscans).  Each scan is a pass over every block of the image: a 4000x4000 JPEG
#: with its last scan repeated 2,000 times (156 kB) took 44 s to decode.
MAX_JPEG_SCANS = 64

#: The most pixels times scans a JPEG may have: 24 scans at Pillow's pixel limit (89,478,485), or 64 scans of
#: 33.5 M pixels.  An extra scan costs about 1.2 ns a pixel, so no allowed JPEG costs much more than an honest
#: progressive one of the largest size (10 scans): at 9400x9400, 24 scans decoded in 6.8 s where 10 took 5.3 s.
MAX_JPEG_SCAN_PIXELS = 24 * 89_478_485

#: The most marker segments walked in a JPEG.  A photo has a few dozen (APPn metadata, tables, SOF, scans;
#: an ICC profile or extended XMP in 64 kB chunks); Pillow's header reader spends ~1.3 us in Python on each,
#: so 128 MB of empty 4-byte segments would take 43 s before a pixel is decoded.
MAX_JPEG_SEGMENTS = 4096

#: Pixels converted at a time by :func:`to_rgb` for wide greyscale: 1 MB of uint32 temporaries.
STRIP_PIXELS = 1 << 18

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
        image = _wide_grey_to_l(image)
    elif image.mode == "P" and "transparency" in image.info:
        # Through RGBA, as Pillow asks for palettes with transparency (it warns
        # otherwise); dropping the alpha afterwards gives the same pixels.
        image = image.convert("RGBA")
    return image.convert("RGB")


def _wide_grey_to_l(image: Image.Image) -> Image.Image:
    """16- or 32-bit greyscale as mode L, ``round(clip(v, 0, 65535) * 255 / 65535)``, in strips of rows.

    Converting the whole image at once widens every sample to 8 bytes, several
    times over: a 9400x9400 16-bit PNG peaked at 1.68 GB, against 0.73 GB for
    an 8-bit RGB image of that size.  Strips of :data:`STRIP_PIXELS` keep the
    temporaries at a megabyte; uint32 holds ``65535 * 255 + 32767`` exactly.
    """
    width, height = image.size
    grey = np.empty((height, width), dtype=np.uint8)
    rows = max(1, STRIP_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        samples = np.asarray(image.crop((0, top, width, bottom)))  # the strip only: 2 or 4 bytes a pixel
        samples = np.clip(samples, 0, 65535).astype(np.uint32)
        grey[top:bottom] = (samples * 255 + 32767) // 65535
    return Image.fromarray(grey)


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


# A JPEG marker, as libjpeg finds one between segments and inside entropy-coded data: 0xFF (after any 0xFF fill
# bytes), then a code that is not 0x00 (0xFF 0x00 is a stuffed 0xFF data byte) and not RST0-7 (0xD0-0xD7:
# restart markers, which have no segment and only separate the entropy-coded intervals of one scan).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")
_SOS, _EOI = 0xDA, 0xD9
_NO_SEGMENT = frozenset({0x01, 0xD8})  # TEM, SOI: markers without a length field (EOI ends the walk)


def count_jpeg_scans(data: bytes, max_segments: int | None = None) -> int:
    """The number of scans (SOS segments) of the JPEG ``data``, found by walking its marker segments.

    The walk is libjpeg's: a segment's payload is skipped by its length
    field, so the bytes ``FF DA`` inside an EXIF thumbnail or an ICC profile
    are not scans; the bytes after a segment (an SOS's entropy-coded data, or
    garbage) are searched for the next marker, by a regular expression, so in
    C; it ends at EOI or at the end of the data.  Raises
    :class:`UnreadableImage` past ``max_segments`` segments (default
    :data:`MAX_JPEG_SEGMENTS`), which bounds the walk's own time.
    """
    max_segments = MAX_JPEG_SEGMENTS if max_segments is None else max_segments
    scans = segments = 0
    at = 2  # after SOI
    while (found := _JPEG_MARKER.search(data, at)) is not None:
        code = data[found.start() + 1]
        if code == _EOI:
            break
        segments += 1
        if segments > max_segments:
            raise UnreadableImage(f"a JPEG of more than {max_segments:,} marker segments (a photo has a few dozen)")
        at = found.end()
        if code in _NO_SEGMENT:
            continue
        scans += code == _SOS
        at += max(int.from_bytes(data[at:at + 2], "big"), 2)  # the length counts its own two bytes
    return scans


def _check_jpeg_work(width: int, height: int, scans: int) -> None:
    """Refuse a JPEG whose scans, or scans times pixels, are over :data:`MAX_JPEG_SCANS` / :data:`MAX_JPEG_SCAN_PIXELS`."""
    if scans > MAX_JPEG_SCANS:
        raise UnreadableImage(f"a JPEG of {scans:,} scans, over the limit of {MAX_JPEG_SCANS} "
                              f"(a progressive JPEG has about 10)")
    if width * height * scans > MAX_JPEG_SCAN_PIXELS:
        raise UnreadableImage(f"{width}x{height} pixels in {scans} scans: {width * height * scans:,} pixel-scans, "
                              f"over the limit of {MAX_JPEG_SCAN_PIXELS:,} for one JPEG")


class PixelBudget:
    """The pixels that images being decoded may hold at once, shared by every thread that decodes.

    Decoding an image takes about 8 bytes a pixel (Pillow's 4-byte RGB
    pixels, made twice by the conversion), so ``total`` pixels bound the
    decoding threads' memory together at about ``8 * total`` bytes, however
    many threads there are.  ``hold(pixels)`` waits until that many are free;
    an image over the whole budget waits for all of it, and decodes alone.
    """

    def __init__(self, total: int):
        self.total = total
        self.held = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int):
        pixels = min(pixels, self.total)
        with self._changed:
            self._changed.wait_for(lambda: self.held + pixels <= self.total)
            self.held += pixels
        try:
            yield
        finally:
            with self._changed:
                self.held -= pixels
                self._changed.notify_all()


#: The budget of every decode in this process: two images at Pillow's pixel limit (about 1.4 GB together), or
#: 15 photos of 12 M pixels, at once.  Small images (a dataset's usual case) never wait.
DECODE_BUDGET = PixelBudget(2 * 89_478_485)


def decode_rgb(data: bytes, size: tuple[int, int], max_pixels: int | None = None) -> np.ndarray:
    """Decode one encoded image (a format of :data:`FORMATS`) into uint8 ``(H, W, 3)``, ``(H, W) = size``.

    Raises :class:`UnreadableImage` for an empty file, a file in any other
    format, one with more than ``max_pixels`` pixels (default: Pillow's
    ``Image.MAX_IMAGE_PIXELS``), a JPEG over the limits on its segments and
    scans (see the module docstring), and whatever Pillow raises for a file
    it cannot decode.  Waits for the image's pixels in :data:`DECODE_BUDGET`.
    """
    fmt = sniff_format(data[:HEADER_BYTES])
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    # Walked before Pillow reads the header: Pillow parses a JPEG's segments up to the first scan in Python.
    scans = count_jpeg_scans(data) if fmt == "JPEG" else None
    # formats=: Pillow tries this one plugin only, never one that its own content sniffing would pick.
    with Image.open(io.BytesIO(data), formats=[fmt]) as image:
        width, height = image.size
        if limit is not None and width * height > limit:
            raise UnreadableImage(f"{width}x{height} = {width * height:,} pixels is over the limit of "
                                  f"{limit:,} (a decompression bomb?)")
        if scans is not None:
            _check_jpeg_work(width, height, scans)
        with DECODE_BUDGET.hold(width * height):
            rgb = to_rgb(image)  # decodes: a truncated file raises here
            return np.asarray(rgb.resize((size[1], size[0]), Image.BILINEAR))


def read_file(path: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the regular file at ``path`` (symbolic links followed), read by :func:`read_image_bytes`.

    Anything else raises: :class:`UnreadableImage` for a FIFO, socket or
    device (reading a FIFO would block forever), a file over ``max_bytes``
    or one that does not start like an image; ``OSError`` for a broken
    link, a link loop or a file without read permission.  The file is
    opened once and its type taken from that descriptor
    (:func:`tinynet.io.files.open_regular_file`), so a file swapped for a
    FIFO after the folder was listed is refused too, never waited on.
    """
    def refuse(status):
        return UnreadableImage(f"not a regular file (mode {stat.filemode(status.st_mode)})")

    file, size = open_regular_file(path, refuse)
    with file:
        return read_image_bytes(file, size, max_bytes)


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
    dialect); names that are not valid UTF-8 are written with backslash escapes;
    a cell that starts like a spreadsheet formula (a file named ``=cmd|...``) gets
    a leading ``'`` (:func:`tinynet.text.csv_cell`, as ``predict --csv``).
    """
    with open(path, "w", encoding="utf-8", errors="backslashreplace", newline="") as file:
        writer = csv.writer(file, dialect="excel-tab")
        writer.writerow(["path", "reason"])
        writer.writerows([csv_cell(entry.path), csv_cell(entry.reason)] for entry in skipped)
