"""What decoding one image may cost: the scans of a JPEG, the memory of a wide mode, the threads together, and files
swapped for a named pipe between a check and an open.

A file under the size and pixel limits can still cost without bound: a progressive JPEG whose last scan is
repeated (each copy a few bytes, each one a pass over every block of the image), or a JPEG made of millions of
empty marker segments (each parsed in Python by Pillow's header reader).  A 16-bit image converted in one piece
widened to int64 on every decoding thread; and a type checked by path, then opened again by path, can be a FIFO
by the time it is opened.  Every hostile file here is small; the limits are lowered where that keeps it so.
"""
import io
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from PIL import Image

from tinynet.data import ImageFolder, decode
from tinynet.data.decode import UnreadableImage, decode_all, decode_rgb, read_file, to_rgb
from tinynet.io import WeightsFileError, load_weights, read_metadata, save_weights

SIZE = 8


def encoded(image: Image.Image, fmt="PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def progressive_jpeg(width, height, repeats=0) -> bytes:
    """A flat progressive JPEG (libjpeg's 10 scans) with its last scan repeated ``repeats`` more times.

    The last scan of a flat image is a few bytes (one run of empty blocks); libjpeg still visits every block
    of the image for each copy, so the decoding time grows with ``repeats`` x pixels while the file barely grows.
    """
    data = encoded(Image.new("RGB", (width, height), (120, 130, 140)), "JPEG", progressive=True)
    last = data[data.rindex(b"\xff\xda"):-2]  # the last SOS segment and its entropy-coded data, up to EOI
    return data[:-2] + last * repeats + b"\xff\xd9"


def with_segments(jpeg: bytes, segment: bytes, count: int) -> bytes:
    """``jpeg`` with ``count`` copies of the marker segment ``segment`` right after SOI."""
    return jpeg[:2] + segment * count + jpeg[2:]


def good_folder(root):
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        for k in range(2):
            (root / name / f"{k}.png").write_bytes(encoded(Image.new("RGB", (12, 10), (k * 40, 9, 200))))
    return root


# ---------------------------------------------------------------------------------------------------------
# JPEG scans and marker segments
# ---------------------------------------------------------------------------------------------------------
def test_scans_are_counted_by_walking_the_marker_segments():
    assert decode.count_jpeg_scans(encoded(Image.new("RGB", (16, 16)), "JPEG")) == 1  # baseline: one interleaved scan
    assert decode.count_jpeg_scans(progressive_jpeg(16, 16)) == 10  # libjpeg's script for colour
    assert decode.count_jpeg_scans(encoded(Image.new("L", (16, 16)), "JPEG", progressive=True)) == 6
    assert decode.count_jpeg_scans(progressive_jpeg(16, 16, repeats=5)) == 15
    # SOS bytes inside a segment's payload (an EXIF thumbnail, an ICC profile) are not scans: skipped by length.
    app1 = b"\xff\xe1" + (2 + 400).to_bytes(2, "big") + b"\xff\xda" * 200
    assert decode.count_jpeg_scans(with_segments(progressive_jpeg(16, 16), app1, 3)) == 10
    # Fill bytes before a marker, and bytes after EOI (another image appended), as libjpeg reads them.
    data = progressive_jpeg(16, 16)
    assert decode.count_jpeg_scans(data[:-2] + b"\xff\xff\xff" + data[-2:] + b"\xff\xda\x00\x02" * 50) == 10


def test_a_jpeg_with_more_scans_than_the_limit_is_skipped_before_it_is_decoded(tmp_path):
    root = good_folder(tmp_path / "data")
    # 1000x1000 with 2,000 extra scans: 75 kB that took 2.3 s to decode (a 4000x4000 one of 156 kB took 44 s).
    (root / "cats" / "scans.jpg").write_bytes(progressive_jpeg(1000, 1000, repeats=2000))
    began = time.perf_counter()
    dataset = ImageFolder(root, SIZE, threads=2)
    seconds = time.perf_counter() - began
    assert len(dataset) == 4
    [entry] = dataset.skipped
    assert entry.path.endswith("scans.jpg")
    assert entry.reason == (f"a JPEG of 2,010 scans, over the limit of {decode.MAX_JPEG_SCANS} "
                            f"(a progressive JPEG has about 10)"), entry.reason
    assert seconds < 1.0


def test_a_progressive_jpeg_of_up_to_the_limit_of_scans_decodes():
    data = progressive_jpeg(64, 48, repeats=decode.MAX_JPEG_SCANS - 10)
    assert decode_rgb(data, (SIZE, SIZE)).shape == (SIZE, SIZE, 3)
    with pytest.raises(UnreadableImage, match=f"a JPEG of {decode.MAX_JPEG_SCANS + 1} scans"):
        decode_rgb(progressive_jpeg(64, 48, repeats=decode.MAX_JPEG_SCANS - 9), (SIZE, SIZE))


def test_scans_times_pixels_is_bounded(monkeypatch):
    # The work of decoding a progressive JPEG is a pass over the pixels per scan: a large image may have fewer.
    monkeypatch.setattr(decode, "MAX_JPEG_SCAN_PIXELS", 64 * 48 * 20)
    assert decode_rgb(progressive_jpeg(64, 48, repeats=10), (SIZE, SIZE)).shape == (SIZE, SIZE, 3)  # 20 scans
    with pytest.raises(UnreadableImage, match=r"^64x48 pixels in 21 scans: 64,512 pixel-scans, over the limit of "
                                              r"61,440 for one JPEG$"):
        decode_rgb(progressive_jpeg(64, 48, repeats=11), (SIZE, SIZE))


def test_a_jpeg_of_a_million_empty_segments_is_refused_before_pillow_parses_them():
    comment = b"\xff\xfe\x00\x02"  # an empty COM segment: 4 bytes that Pillow's header reader spends ~1.3 us on
    small = encoded(Image.new("RGB", (16, 16)), "JPEG")
    assert decode_rgb(with_segments(small, comment, 100), (SIZE, SIZE)).shape == (SIZE, SIZE, 3)
    hostile = with_segments(small, comment, 1_000_000)  # 4 MB: 1.3 s in Pillow; 128 MB (the file limit) 43 s
    began = time.perf_counter()
    with pytest.raises(UnreadableImage, match=f"more than {decode.MAX_JPEG_SEGMENTS:,} marker segments"):
        decode_rgb(hostile, (SIZE, SIZE))
    assert time.perf_counter() - began < 0.3


# ---------------------------------------------------------------------------------------------------------
# Memory: wide modes converted in strips; the decoding threads under one pixel budget
# ---------------------------------------------------------------------------------------------------------
def sixteen_bit(width, height) -> np.ndarray:
    ramp = (np.arange(width, dtype=np.uint32) * 65535 // max(width - 1, 1)).astype(np.uint16)
    return np.broadcast_to(ramp, (height, width)).copy()


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_wide_greyscale_is_converted_in_strips_to_the_same_pixels(monkeypatch, mode):
    samples = np.random.default_rng(0).integers(0, 65536, (13, 7)).astype(np.int32)
    samples[0, :3] = (-5, 70000, 65535)  # mode I holds any int32: clipped to 0..65535 first
    image = Image.fromarray(samples, "I") if mode == "I" else Image.fromarray(samples.astype(np.uint16)).convert(mode)
    expected = (np.clip(np.asarray(image).astype(np.int64), 0, 65535) * 255 + 32767) // 65535
    monkeypatch.setattr(decode, "STRIP_PIXELS", 16)  # 2 rows a strip: 7 strips, the last one short
    rgb = np.asarray(to_rgb(image))
    assert rgb.dtype == np.uint8 and rgb.shape == (13, 7, 3)
    np.testing.assert_array_equal(rgb, np.repeat(expected[..., None], 3, axis=2))


# A child process decodes each file given and reports the peak of its resident memory above what it held before
# (/proc's high-water mark, reset before each decode): Pillow's C allocations included, which tracemalloc misses.
PEAK_CHILD = textwrap.dedent("""
    import json, sys
    from tinynet.data.decode import decode_rgb

    def kib(field):
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field))

    peaks = {}
    for path in sys.argv[1:]:
        with open(path, "rb") as file:
            data = file.read()
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current resident size
        before = kib("VmRSS")
        decode_rgb(data, (8, 8))
        peaks[path] = (kib("VmHWM") - before) / 1024
    print(json.dumps(peaks))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_a_16_bit_image_peaks_within_a_quarter_above_an_8_bit_rgb_image_of_its_size(tmp_path):
    width, height = 2400, 2000  # 4.8 M pixels: an 8-bit RGB image peaks at ~37 MB, 16-bit grey was ~96 MB
    files = {
        "rgb.png": encoded(Image.new("RGB", (width, height), (10, 20, 30)), compress_level=1),
        "grey16.png": encoded(Image.fromarray(sixteen_bit(width, height)), compress_level=1),
        "grey32.tif": encoded(Image.fromarray(sixteen_bit(width, height).astype(np.int32), "I"), "TIFF"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", PEAK_CHILD, *(str(tmp_path / name) for name in files)],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    peaks = {pathlib.Path(path).name: mb for path, mb in json.loads(result.stdout).items()}
    assert peaks["rgb.png"] > 30, peaks  # the measure sees Pillow's own allocations
    assert peaks["grey16.png"] <= 1.25 * peaks["rgb.png"], peaks
    assert peaks["grey32.tif"] <= 1.25 * peaks["rgb.png"], peaks


def test_the_decoding_threads_hold_at_most_the_pixel_budget_at_once(monkeypatch):
    data = [encoded(Image.new("RGB", (40, 30), (k, 2 * k, 3 * k))) for k in range(8)]
    monkeypatch.setattr(decode, "DECODE_BUDGET", decode.PixelBudget(2 * 40 * 30))  # two of these images at once
    monkeypatch.setattr(decode, "CHUNK", 1)  # one image a task, so that all four threads have work
    converting, most, lock = [0], [0], threading.Lock()
    real_to_rgb = decode.to_rgb

    def slow_to_rgb(image):
        with lock:
            converting[0] += 1
            most[0] = max(most[0], converting[0])
        time.sleep(0.03)  # long enough for every thread to arrive here if nothing holds them back
        try:
            return real_to_rgb(image)
        finally:
            with lock:
                converting[0] -= 1

    monkeypatch.setattr(decode, "to_rgb", slow_to_rgb)
    images, kept, skipped, _ = decode_all(list(range(8)), data.__getitem__, (SIZE, SIZE), threads=4)
    assert skipped == [] and len(kept) == 8
    assert most[0] == 2
    # An image larger than the whole budget still decodes, alone.
    monkeypatch.setattr(decode, "DECODE_BUDGET", decode.PixelBudget(100))
    assert decode_rgb(data[0], (SIZE, SIZE)).shape == (SIZE, SIZE, 3)
    assert decode.DECODE_BUDGET.held == 0


def test_a_refused_or_broken_image_gives_its_pixels_back_to_the_budget(monkeypatch):
    monkeypatch.setattr(decode, "DECODE_BUDGET", decode.PixelBudget(10_000))
    broken = encoded(Image.new("RGB", (40, 30)))[:-40]  # truncated inside IDAT: fails while decoding
    with pytest.raises(OSError):
        decode_rgb(broken, (SIZE, SIZE))
    assert decode.DECODE_BUDGET.held == 0


# ---------------------------------------------------------------------------------------------------------
# A file swapped for a named pipe between the type check and the open
# ---------------------------------------------------------------------------------------------------------
def ends_within(seconds, call, fifo):
    """Run ``call()`` in a thread; return what it raised (or None).  If it is still blocked after ``seconds``
    (opening ``fifo`` for reading, which waits for a writer), open the FIFO for writing to release it, then fail."""
    outcome = {}

    def run():
        try:
            call()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a writer arrives and leaves: the reader sees EOF
        thread.join(5)
        pytest.fail(f"still blocked after {seconds} s: the FIFO was opened for reading")
    return outcome.get("error")


@pytest.fixture
def swapped_for_a_fifo(tmp_path, monkeypatch):
    """A path that is a FIFO, while ``os.stat`` and ``Path.stat`` say it is the regular file it was when checked."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes on this system")
    fifo, regular = tmp_path / "swapped", tmp_path / "regular"
    regular.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    os.mkfifo(fifo)
    real_stat = os.stat

    def stale_stat(path, *args, **kwargs):  # the file as it was at the check; renamed away since
        return real_stat(regular if os.fspath(path) == str(fifo) else path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stale_stat)
    return fifo


def test_an_image_file_swapped_for_a_fifo_after_the_check_is_refused_without_blocking(swapped_for_a_fifo):
    error = ends_within(2, lambda: read_file(str(swapped_for_a_fifo)), swapped_for_a_fifo)
    assert isinstance(error, UnreadableImage) and str(error).startswith("not a regular file (mode p"), error


@pytest.mark.parametrize("reader", [load_weights, read_metadata])
def test_a_weights_file_swapped_for_a_fifo_after_the_check_is_refused_without_blocking(swapped_for_a_fifo, reader):
    error = ends_within(2, lambda: reader(swapped_for_a_fifo), swapped_for_a_fifo)
    assert isinstance(error, WeightsFileError) and "not a regular file" in str(error), error
    assert str(swapped_for_a_fifo) in str(error)


def test_weights_are_read_through_the_one_descriptor_opened(tmp_path, monkeypatch):
    # Every zip format is read from the file that was opened and checked; none is opened again by its path.
    import builtins

    path = tmp_path / "w.npz"
    save_weights({"w": np.arange(6, dtype=np.float32)}, path)
    opened = []

    def counting(real):
        def open_counted(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.fspath(file) == str(path):
                opened.append(file)
            return real(file, *args, **kwargs)
        return open_counted

    for module, name in ((os, "open"), (builtins, "open"), (io, "open")):
        monkeypatch.setattr(module, name, counting(getattr(module, name)))
    np.testing.assert_array_equal(load_weights(path)["w"], np.arange(6, dtype=np.float32))
    assert len(opened) == 1


def test_an_image_archive_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    from tinynet.data import ZipImageDataset

    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes on this system")
    fifo = tmp_path / "images.zip"
    os.mkfifo(fifo)  # zipfile.is_zipfile(path) opened it for reading, and waited for a writer
    error = ends_within(2, lambda: ZipImageDataset(fifo, "train", SIZE), fifo)
    assert isinstance(error, ValueError) and "not a regular file" in str(error) and str(fifo) in str(error), error


def test_a_class_table_swapped_for_a_fifo_after_the_check_is_refused_without_blocking(tmp_path, monkeypatch):
    from tinynet.data import ZipImageDataset

    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes on this system")
    good_folder(tmp_path / "extracted" / "train")
    table = tmp_path / "extracted" / "classes.tsv"
    os.mkfifo(table)
    (tmp_path / "regular.tsv").write_text("cats\tcat\ndogs\tdog\n")
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda path, *args, **kwargs: real_stat(
        tmp_path / "regular.tsv" if os.fspath(path) == str(table) else path, *args, **kwargs))
    error = ends_within(2, lambda: ZipImageDataset(tmp_path / "extracted", "train", SIZE), table)
    assert isinstance(error, ValueError) and "classes.tsv cannot be read" in str(error), error
    assert "not a regular file" in str(error)
