"""Property-based fuzzing of the image readers: a mutated image file or image archive decodes or is skipped.

Each fuzzer starts from small valid files and applies a few mutations drawn
by Hypothesis.  The property, for an image file (PNG, JPEG, WEBP, GIF, BMP,
TIFF), read as :class:`~tinynet.data.ImageFolder` reads one (the bounded read,
then the decode, inside :func:`~tinynet.data.decode.decode_all`):

* it decodes to a uint8 ``(8, 8, 3)`` array;
* or it is skipped with a one-line reason of bounded length, never one that
  hides a crash (a ``MemoryError``, a ``RecursionError``, a ``SystemError``);

and for an image archive (:class:`~tinynet.data.ZipImageDataset` over a
mutated zip): it builds a dataset whose images decoded and whose other
members are skipped with such reasons, or it raises ``ValueError`` or
``FileNotFoundError`` (what the command lines report in one line), with a
bounded one-line message.

Pillow's decoders are C code, so the inputs run in a worker process under an
address-space limit (``RLIMIT_AS``, :data:`ADDRESS_SPACE`): an input that
crashes the interpreter, allocates past the limit or takes longer than
:data:`SECONDS` fails the test, and the worker is started afresh.

The mutations: raw byte edits (bit flips, byte sets, 16- and 32-bit integers
written big- or little-endian over the bytes, which is where image headers
keep their sizes, insertions, deletions, truncation); for PNG, the same edits
with every chunk's CRC repaired afterwards, so that they reach the decoder
behind the checksum; for archives, the edits applied to the zip's bytes, or
to one member's content with the archive rebuilt (stored or deflated, valid
CRCs).  The seeds include 16-bit greyscale PNG and TIFF (converted in strips:
the address-space limit is the memory property).

The decode-cost fuzzer edits a progressive JPEG where its cost lies: one of
its scans repeated up to 5,000 times, its frame enlarged up to 2048x2048
(libjpeg then passes over every block of the larger frame in each scan),
empty marker segments inserted, then byte edits.  Before the scan limits, such
an input took up to 20 s; every one must now answer within :data:`COST_SECONDS`.

Budget: :data:`EXAMPLES` inputs per fuzzer, about 30 s for all of them on two
cores; ``TINYNET_FUZZ=N`` multiplies the counts (and drops the fixed seed) for a
longer campaign, e.g. ``TINYNET_FUZZ=20 pytest tests/test_fuzz_images.py -s``,
which prints how many inputs each fuzzer tried and what came of them.
"""
from __future__ import annotations

import collections
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from byte_edits import apply_edits  # noqa: E402

FUZZ = max(1, int(os.environ.get("TINYNET_FUZZ", "1") or 1))
EXAMPLES = {"files": 2000 * FUZZ, "png": 900 * FUZZ, "zip": 900 * FUZZ, "cost": 40 * FUZZ}
SECONDS = 10.0  # per input; a decode of these files takes milliseconds
COST_SECONDS = 3.0  # per decode-cost input: the costliest allowed (64 scans of 2048x1536) takes ~0.4 s
ADDRESS_SPACE = 1536 << 20  # the worker's whole address space: the interpreter, NumPy, Pillow, and the input
MAX_REASON = 600  # characters in a skip reason or an error message

SETTINGS = dict(deadline=None, database=None, derandomize=FUZZ == 1,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
#: fuzzer -> Counter of outcomes, printed by test_fuzz_report.
OUTCOMES: dict = collections.defaultdict(collections.Counter)
# Exceptions that a reason must never name: they are crashes caught by the skip-everything net.
CRASHES = ("MemoryError", "RecursionError", "SystemError", "AssertionError", "TypeError", "AttributeError",
           "IndexError", "KeyError", "NameError", "ZeroDivisionError", "OverflowError")


# ---------------------------------------------------------------------------
# The worker: reads an input, answers with one JSON line
# ---------------------------------------------------------------------------
WORKER = textwrap.dedent("""
    import io, json, os, resource, struct, sys, tempfile, time
    resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), resource.getrlimit(resource.RLIMIT_AS)[1]))
    from tinynet.data import ZipImageDataset
    from tinynet.data.decode import decode_all, read_image_bytes
    folder = tempfile.mkdtemp(prefix="tinynet-fuzz-")
    stdin, stdout = sys.stdin.buffer, sys.stdout
    while True:
        header = stdin.read(5)
        if len(header) < 5:
            break
        kind, size = header[:1], struct.unpack("<I", header[1:])[0]
        data = stdin.read(size)
        began = time.perf_counter()
        if kind == b"f":  # an image file, read and decoded as ImageFolder does
            read = lambda name: read_image_bytes(io.BytesIO(data), len(data))
            images, kept, skipped, _ = decode_all(["input"], read, (8, 8), threads=1)
            answer = ({"shape": list(images.shape[1:]), "dtype": str(images.dtype)} if len(kept)
                      else {"reason": skipped[0].reason})
        else:  # an image archive
            path = os.path.join(folder, "input.zip")
            with open(path, "wb") as file:
                file.write(data)
            try:
                dataset = ZipImageDataset(path, "train", 8, threads=1)
                answer = {"images": len(dataset), "shape": list(dataset.array.shape[1:]),
                          "reasons": [entry.reason for entry in dataset.skipped]}
            except Exception as error:
                answer = {"error": type(error).__name__, "mro": [c.__name__ for c in type(error).__mro__],
                          "message": str(error)[:10000]}
        answer["seconds"] = time.perf_counter() - began
        stdout.write(json.dumps(answer) + "\\n")
        stdout.flush()
""")


class Worker:
    """A long-lived worker process; :meth:`ask` sends one input and returns its answer (a dict)."""

    def __init__(self):
        self.process = None

    def start(self):
        env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen([sys.executable, "-c", WORKER, str(ADDRESS_SPACE)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)

    def ask(self, kind: bytes, data: bytes) -> dict:
        if self.process is None or self.process.poll() is not None:
            self.start()
        self.process.stdin.write(kind + struct.pack("<I", len(data)) + data)
        self.process.stdin.flush()
        reply = _readline(self.process.stdout, SECONDS)
        if reply is None:
            self.process.kill()
            _, err = self.process.communicate()
            self.process = None
            raise AssertionError(f"the reader crashed, or took more than {SECONDS} s, on an input of "
                                 f"{len(data)} bytes: {err.decode(errors='replace')[-2000:]}")
        return json.loads(reply)

    def close(self):
        if self.process is not None and self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=30)


def _readline(stream, seconds):
    """One line from the pipe ``stream`` within ``seconds``, or None (the process died or hangs)."""
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(seconds):
            return None
    line = stream.readline()
    return line or None


@pytest.fixture(scope="module")
def worker():
    process = Worker()
    yield process
    process.close()


# ---------------------------------------------------------------------------
# Seeds and mutations
# ---------------------------------------------------------------------------
def _encoded(fmt, mode="RGB", size=(12, 10), **options) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, fmt, **options)
    return buffer.getvalue()


def _grey16(fmt) -> bytes:
    samples = np.random.default_rng(0).integers(0, 65536, (10, 12)).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(samples).save(buffer, fmt)  # mode I;16
    return buffer.getvalue()


SEEDS = {
    "png": _encoded("PNG"), "png-palette": _encoded("PNG", "P", transparency=3), "png-rgba": _encoded("PNG", "RGBA"),
    "png-grey16": _grey16("PNG"), "tiff-grey16": _grey16("TIFF"),
    "jpeg": _encoded("JPEG"), "jpeg-progressive": _encoded("JPEG", progressive=True),
    "jpeg-cmyk": _encoded("JPEG", "CMYK"),
    "webp-lossy": _encoded("WEBP"), "webp-lossless": _encoded("WEBP", lossless=True),
    "gif": _encoded("GIF", "P"), "bmp": _encoded("BMP"), "tiff": _encoded("TIFF", compression="tiff_lzw"),
}
PNG_SEEDS = [name for name in SEEDS if name.startswith("png")]


def _edit(size: int):
    position = st.integers(0, max(size - 1, 0))
    return st.one_of(
        st.tuples(st.just("flip"), position, st.integers(0, 7)),
        st.tuples(st.just("set"), position, st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF])),
        st.tuples(st.just("int"), position, st.sampled_from(["<H", ">H", "<I", ">I"]),
                  st.sampled_from([0, 1, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 30000, 1 << 20])),
        st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=32)),
        st.tuples(st.just("delete"), position, st.integers(1, 48)),
        st.tuples(st.just("cut"), position),
    )


def _edits(size: int):
    return st.lists(_edit(size), min_size=1, max_size=5)


def repair_png_crcs(data: bytes) -> bytes:
    """Recompute the CRC of every PNG chunk that the bytes still delimit, so an edit reaches the decoder."""
    out, at = bytearray(data[:8]), 8
    while at + 8 <= len(data):
        length = struct.unpack(">I", data[at:at + 4])[0]
        end = at + 8 + length
        if end + 4 > len(data):
            out += data[at:]
            break
        body = data[at + 4:end]
        out += data[at:end] + struct.pack(">I", zlib.crc32(body))
        at = end + 4
    else:
        out += data[at:]
    return bytes(out)


def check_file_answer(fuzzer: str, answer: dict) -> None:
    """The property for one image file."""
    assert answer["seconds"] < SECONDS
    if "reason" not in answer:
        assert answer == {**answer, "shape": [8, 8, 3], "dtype": "uint8"}
        OUTCOMES[fuzzer]["decoded"] += 1
        return
    reason = answer["reason"]
    assert reason and "\n" not in reason and len(reason) <= MAX_REASON, reason
    assert not any(crash in reason for crash in CRASHES), reason
    OUTCOMES[fuzzer][f"skipped: {reason[:60]}"] += 1


@pytest.mark.parametrize("seed", list(SEEDS))
def test_fuzz_image_file_byte_edits(worker, seed):
    original = SEEDS[seed]
    assert worker.ask(b"f", original)["shape"] == [8, 8, 3]  # the seed itself decodes

    @settings(max_examples=max(1, EXAMPLES["files"] // len(SEEDS)), **SETTINGS)
    @given(edits=_edits(len(original)))
    def run(edits):
        check_file_answer(f"file {seed}", worker.ask(b"f", apply_edits(original, edits)))

    run()


@pytest.mark.parametrize("seed", PNG_SEEDS)
def test_fuzz_png_edits_behind_valid_crcs(worker, seed):
    original = SEEDS[seed]

    @settings(max_examples=max(1, EXAMPLES["png"] // len(PNG_SEEDS)), **SETTINGS)
    @given(edits=_edits(len(original)))
    def run(edits):
        check_file_answer(f"png+crc {seed}", worker.ask(b"f", repair_png_crcs(apply_edits(original, edits))))

    run()


# ---------------------------------------------------------------------------
# Decode cost: a progressive JPEG's scans, frame and marker segments
# ---------------------------------------------------------------------------
def _flat_progressive_jpeg() -> bytes:
    """2048x1536, libjpeg's 10 scans; flat, so that each scan after the first is a few bytes (runs of empty blocks)
    while libjpeg still passes over the image's 3 M pixels for each (5 ms)."""
    buffer = io.BytesIO()
    Image.new("RGB", (2048, 1536), (120, 130, 140)).save(buffer, "JPEG", progressive=True)
    return buffer.getvalue()


PROGRESSIVE = _flat_progressive_jpeg()
SCAN_STARTS = [at for at in range(len(PROGRESSIVE) - 1) if PROGRESSIVE[at:at + 2] == b"\xff\xda"]
SOF2 = PROGRESSIVE.index(b"\xff\xc2")  # the progressive frame header: FF C2, length, precision, height, width


def _costly_jpeg(scan: int, repeats: int, frame, segment: bytes, segments: int) -> bytes:
    """PROGRESSIVE with scan ``scan`` (and what follows it up to the next scan) repeated ``repeats`` more times,
    its frame declared ``frame = (width, height)`` (or left), and ``segments`` copies of ``segment`` after SOI."""
    ends = SCAN_STARTS[1:] + [len(PROGRESSIVE) - 2]
    start, end = SCAN_STARTS[scan], ends[scan]
    data = bytearray(PROGRESSIVE[:end] + PROGRESSIVE[start:end] * repeats + PROGRESSIVE[end:])
    if frame is not None:
        data[SOF2 + 5:SOF2 + 9] = struct.pack(">HH", frame[1], frame[0])
    return bytes(data[:2] + segment * segments + data[2:])


def test_fuzz_jpeg_decode_cost(worker):
    assert len(SCAN_STARTS) == 10 and worker.ask(b"f", PROGRESSIVE)["shape"] == [8, 8, 3]
    segment_kinds = [b"\xff\xfe\x00\x02", b"\xff\xe1\x00\x02", b"\xff\xfe\x00\x06\xff\xda\xff\xda"]

    @settings(max_examples=EXAMPLES["cost"], **SETTINGS)
    # Repeats near the limit, or thousands (each a pass over 3 M pixels, 4 ms: 8 s and more before the limits);
    # the frame as encoded, or declared larger or smaller than the scans' data.
    @given(scan=st.integers(0, len(SCAN_STARTS) - 1),
           repeats=st.one_of(st.integers(0, 80), st.integers(2000, 5000)),
           frame=st.sampled_from([None, (4096, 3072), (16, 16), (1, 2048)]),
           segment=st.sampled_from(segment_kinds), segments=st.one_of(st.just(0), st.integers(0, 6000)),
           data=st.data())
    def run(scan, repeats, frame, segment, segments, data):
        jpeg = _costly_jpeg(scan, repeats, frame, segment, segments)
        edits = data.draw(st.lists(_edit(len(jpeg)), max_size=3))
        answer = worker.ask(b"f", apply_edits(jpeg, edits))
        check_file_answer("jpeg decode cost", answer)
        assert answer["seconds"] < COST_SECONDS, (scan, repeats, frame, segments, answer)

    run()


# ---------------------------------------------------------------------------
# Archives
# ---------------------------------------------------------------------------
MEMBERS = {"classes.tsv": b"a\tfirst class\nb\tsecond class\n",
           "train/a/0.png": SEEDS["png"], "train/a/1.jpg": SEEDS["jpeg"],
           "train/b/0.webp": SEEDS["webp-lossless"], "train/b/1.gif": SEEDS["gif"]}


def build_zip(members: dict, deflate: bool) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


ZIPS = {"stored": build_zip(MEMBERS, False), "deflated": build_zip(MEMBERS, True)}
DOCUMENTED_ERRORS = ("ValueError", "FileNotFoundError")


def check_zip_answer(fuzzer: str, answer: dict) -> None:
    """The property for one archive."""
    assert answer["seconds"] < SECONDS
    if "error" in answer:
        assert any(name in answer["mro"] for name in DOCUMENTED_ERRORS), answer
        message = answer["message"]
        assert message and "\n" not in message and len(message) <= MAX_REASON + 200, message
        OUTCOMES[fuzzer][f"refused: {answer['error']}: {message.split(': ', 1)[-1][:50]}"] += 1
        return
    assert answer["shape"] == [8, 8, 3] and answer["images"] >= 2  # a class without an image is refused
    for reason in answer["reasons"]:
        assert reason and "\n" not in reason and len(reason) <= MAX_REASON + 200, reason
        assert not any(crash in reason for crash in CRASHES), reason
    OUTCOMES[fuzzer][f"read: {answer['images']} images, {len(answer['reasons'])} skipped"] += 1


@pytest.mark.parametrize("layout", list(ZIPS))
def test_fuzz_image_archive_byte_edits(worker, layout):
    original = ZIPS[layout]
    assert worker.ask(b"z", original)["images"] == 4

    @settings(max_examples=max(1, EXAMPLES["zip"] // 3), **SETTINGS)
    @given(edits=_edits(len(original)))
    def run(edits):
        check_zip_answer(f"zip bytes {layout}", worker.ask(b"z", apply_edits(original, edits)))

    run()


def test_fuzz_image_archive_member_edits_with_valid_crcs(worker):
    names = list(MEMBERS)

    @settings(max_examples=max(1, EXAMPLES["zip"] // 3), **SETTINGS)
    @given(member=st.sampled_from(names), deflate=st.booleans(), data=st.data())
    def run(member, deflate, data):
        edits = data.draw(_edits(len(MEMBERS[member])))
        members = {**MEMBERS, member: apply_edits(MEMBERS[member], edits)}
        check_zip_answer("zip members", worker.ask(b"z", build_zip(members, deflate)))

    run()


def test_fuzz_report():
    """Print what each fuzzer tried (seen with ``pytest -s``); the counts are the campaign's record."""
    for fuzzer, outcomes in sorted(OUTCOMES.items()):
        print(f"\n{fuzzer}: {sum(outcomes.values())} inputs")
        for outcome, count in outcomes.most_common(8):
            print(f"  {count:6d}  {outcome}")
