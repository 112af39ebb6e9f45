"""Image files made to attack the reader: other programs' formats, huge files, compression bombs in archives.

Every case must end as a skipped file with a one-line reason (or, for an
archive as a whole, a ValueError), in bounded time and memory, and without
any program other than this Python process ever running.
"""
import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from tinynet.data import ImageFolder, ZipImageDataset, decode, folder
from tinynet.data.decode import FORMATS, MAX_FILE_BYTES, UnreadableImage, decode_rgb

SIZE = 8


def encoded(fmt="PNG", seed=0, width=8, height=8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def eps_bytes() -> bytes:
    """A real EPS file (Pillow writes PostScript itself; reading it back would need Ghostscript)."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, "EPS")
    return buffer.getvalue()


def good_folder(root, per_class=2):
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            (root / name / f"{k}.png").write_bytes(encoded(seed=k))
    return root


@pytest.fixture
def no_external_programs(monkeypatch):
    """Record (and refuse) every attempt to start a program or to hand a file to Ghostscript."""
    started = []

    def refuse(*args, **kwargs):
        started.append(args[0] if args else kwargs)
        raise AssertionError(f"an external program was started: {args[:1]}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", refuse)
    monkeypatch.setattr(os, "system", refuse)
    return started


def test_postscript_named_jpg_is_skipped_and_ghostscript_never_runs(tmp_path, no_external_programs):
    root = good_folder(tmp_path / "data")
    for name in ("cats/photo.jpg", "cats/eps.png", "dogs/plain.eps"):
        (root / name).write_bytes(eps_bytes())
    dataset = ImageFolder(root, SIZE, threads=2)
    assert no_external_programs == []
    assert len(dataset) == 4
    reasons = {os.path.relpath(entry.path, root): entry.reason for entry in dataset.skipped}
    assert set(reasons) == {"cats/photo.jpg", "cats/eps.png", "dogs/plain.eps"}
    for reason in reasons.values():
        assert reason.startswith("not an image in a decoded format") and "JPEG, PNG" in reason, reason


@pytest.mark.parametrize("fmt", ["EPS", "PPM", "TGA", "ICO", "PCX", "SGI"])
def test_only_the_allow_listed_formats_are_decoded(fmt, no_external_programs):
    data = eps_bytes() if fmt == "EPS" else encoded(fmt)
    with pytest.raises(UnreadableImage, match="not an image in a decoded format"):
        decode_rgb(data, (SIZE, SIZE))
    assert no_external_programs == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_allow_listed_format_decodes(fmt):
    data = encoded(fmt, width=12, height=10)
    with Image.open(io.BytesIO(data)) as image:
        expected = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
    np.testing.assert_array_equal(decode_rgb(data, (SIZE, SIZE)), expected)


def test_a_large_non_image_file_is_refused_from_its_first_bytes(tmp_path, monkeypatch):
    root = good_folder(tmp_path / "data")
    (root / "cats" / "movie.jpg").write_bytes(b"\x00" * (20 << 20))  # 20 MB, under the size limit
    read = []
    real_open = open

    class Counting(io.BufferedReader):
        def read(self, n=-1):
            data = super().read(n)
            read.append(len(data))
            return data

    def counting_open(path, mode="r", *args, **kwargs):
        return Counting(real_open(path, "rb", buffering=0)) if mode == "rb" else real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(decode, "open", counting_open, raising=False)
    dataset = ImageFolder(root, SIZE, threads=1)
    assert len(dataset) == 4
    [entry] = dataset.skipped
    assert entry.reason.startswith("not an image in a decoded format")
    assert sum(read) < 4 * 4096 + 4 * 2000  # the four PNGs and a header, never the 20 MB


PEAK_MB = textwrap.dedent("""
    def peak_mb():
        # VmHWM: this process image's peak; ru_maxrss would keep the pytest parent's across fork and exec.
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024
""")


# A child process builds an ImageFolder over a class folder holding a sparse 3 GiB file under an
# address-space limit, and reports what it skipped and its peak memory.
CHILD = PEAK_MB + textwrap.dedent("""
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))
    from tinynet.data import ImageFolder
    dataset = ImageFolder(sys.argv[1], 8, threads=4)
    print(json.dumps({"images": len(dataset), "skipped": {e.path: e.reason for e in dataset.skipped},
                      "peak_mb": peak_mb()}))
""")


def test_a_multi_gigabyte_file_is_refused_by_its_size_without_being_read(tmp_path):
    root = good_folder(tmp_path / "data")
    for name, head in (("cats/huge.bin", b""), ("dogs/huge.jpg", b"\xff\xd8\xff\xe0")):  # zeros; a JPEG header
        with open(root / name, "wb") as file:
            file.write(head)
        os.truncate(root / name, 3 << 30)  # sparse: 3 GiB that take no disk space
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", CHILD, str(root)], capture_output=True, text=True, timeout=60,
                            env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == 4
    reasons = {os.path.relpath(path, root): reason for path, reason in report["skipped"].items()}
    assert set(reasons) == {"cats/huge.bin", "dogs/huge.jpg"}
    for reason in reasons.values():
        assert f"3,221,225,472 bytes, over the limit of {MAX_FILE_BYTES:,}" in reason, reason
    assert report["peak_mb"] < 400


# ---------------------------------------------------------------------------------------------------------
# Archives: compression bombs and members that claim more than they hold
# ---------------------------------------------------------------------------------------------------------
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
# 3,035 bytes of bzip2 that inflate to a JPEG signature and then zeros, 4,278,190,084 bytes in all.  Made once
# (it takes 25 s) by feeding a bz2.BZ2Compressor(9) b"\xff\xd8\xff\xe0" and then 255 times bytes(16 << 20).
BZ2_BOMB = os.path.join(FIXTURES, "jpeg-header-then-4gib-zeros.bz2")
BZ2_BOMB_SIZE, BZ2_BOMB_CRC = 4_278_190_084, 0x13F77BB4


def raw_zip(path, members):
    """Write a zip by hand: ``members`` is a list of (name, method, compressed bytes, crc, declared size).

    zipfile cannot store data that is already compressed, nor declare a size the data does not have.
    """
    import struct

    local, central = bytearray(), bytearray()
    for name, method, data, crc, size in members:
        name = name.encode()
        offset = len(local)
        version = 46 if method == zipfile.ZIP_BZIP2 else 20
        local += struct.pack("<IHHHHHIIIHH", 0x04034B50, version, 0, method, 0, 0x21, crc, len(data), size,
                             len(name), 0) + name + data
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, version, version, 0, method, 0, 0x21, crc,
                               len(data), size, len(name), 0, 0, 0, 0, 0, offset) + name
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(local), 0)
    with open(path, "wb") as file:
        file.write(bytes(local + central + end))
    return path


def stored(name, data):
    import zlib

    return name, zipfile.ZIP_STORED, data, zlib.crc32(data), len(data)


def with_good_images(*extra):
    return [stored(f"train/{c}/{k}.png", encoded(seed=k)) for c in ("a", "b") for k in range(2)] + list(extra)


# A child process reads the split under an address-space limit and reports what it skipped and its peak memory.
ZIP_CHILD = PEAK_MB + textwrap.dedent("""
    import json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))
    from tinynet.data import ZipImageDataset
    dataset = ZipImageDataset(sys.argv[1], "train", 8, threads=2)
    print(json.dumps({"images": len(dataset), "skipped": {e.path: e.reason for e in dataset.skipped},
                      "peak_mb": peak_mb()}))
""")


def read_in_child(path):
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", ZIP_CHILD, str(path)], capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    return report, {path.rsplit("/", 1)[-1]: reason for path, reason in report["skipped"].items()}


def test_bzip2_bombs_are_never_inflated_whatever_size_they_declare(tmp_path):
    with open(BZ2_BOMB, "rb") as file:
        bomb = file.read()
    path = raw_zip(tmp_path / "bombs.zip", with_good_images(
        ("train/a/honest.jpg", zipfile.ZIP_BZIP2, bomb, BZ2_BOMB_CRC, BZ2_BOMB_SIZE),
        ("train/b/lying.jpg", zipfile.ZIP_BZIP2, bomb, BZ2_BOMB_CRC, 5000)))  # claims 5 kB
    report, reasons = read_in_child(path)
    assert report["images"] == 4
    assert reasons == {name: "zip compression method 12: only stored (0) and deflated (8) members are read"
                       for name in ("honest.jpg", "lying.jpg")}
    assert report["peak_mb"] < 400


def test_deflate_members_are_bounded_by_the_per_member_limit_and_their_declared_size(tmp_path):
    import zlib

    compressor = zlib.compressobj(1, zlib.DEFLATED, -15)  # raw deflate, as in a zip
    head, zeros = b"\xff\xd8\xff\xe0", bytes(MAX_FILE_BYTES + (16 << 20))
    bomb = compressor.compress(head) + compressor.compress(zeros) + compressor.flush()
    crc = zlib.crc32(zeros, zlib.crc32(head))
    del zeros
    path = raw_zip(tmp_path / "bombs.zip", with_good_images(
        ("train/a/big.jpg", zipfile.ZIP_DEFLATED, bomb, crc, MAX_FILE_BYTES + (16 << 20) + 4),
        ("train/b/lying.jpg", zipfile.ZIP_DEFLATED, bomb, crc, 5000)))
    report, reasons = read_in_child(path)
    assert report["images"] == 4 and set(reasons) == {"big.jpg", "lying.jpg"}
    assert reasons["big.jpg"] == f"{MAX_FILE_BYTES + (16 << 20) + 4:,} bytes, over the limit of {MAX_FILE_BYTES:,} " \
                                 f"for one image file"
    assert "BadZipFile" in reasons["lying.jpg"] or "cannot decode" in reasons["lying.jpg"]  # 5 kB read, then stop
    assert report["peak_mb"] < 400


def test_an_archive_declaring_more_than_the_total_limit_is_refused_before_inflating(tmp_path):
    from tinynet.data.archive import MAX_ARCHIVE_BYTES

    with open(BZ2_BOMB, "rb") as file:
        bomb = file.read()
    # Two members each claiming 3 GiB: over the per-member limit too, but the total is checked before any is read.
    members = [(f"train/{c}/x.jpg", zipfile.ZIP_DEFLATED, bomb, 0, 3 << 30) for c in ("a", "b")]
    path = raw_zip(tmp_path / "big.zip", with_good_images(*members))
    with pytest.raises(ValueError, match=f"declare 6,442,4[0-9][0-9],[0-9]+ bytes inflated, more than the limit of "
                                         f"{MAX_ARCHIVE_BYTES:,}"):
        ZipImageDataset(path, "train", SIZE)
    dataset = ZipImageDataset(path, "train", SIZE, limit_per_class=2)  # the members that would be read count
    assert len(dataset) == 4


def test_a_pixel_bomb_member_is_skipped_before_decoding(tmp_path):
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)) \
        + chunk(b"IEND", b"")
    path = raw_zip(tmp_path / "pixels.zip", with_good_images(stored("train/a/bomb.png", png)))
    dataset = ZipImageDataset(path, "train", SIZE)
    assert len(dataset) == 4
    [entry] = dataset.skipped
    assert entry.path.endswith("train/a/bomb.png") and ("decompression bomb" in entry.reason), entry.reason


def test_a_damaged_zip_is_a_one_line_value_error_naming_the_archive(tmp_path):
    # Found by tests/test_fuzz_images.py: zipfile's BadZipFile escaped, which the command lines do not report
    # in one line (a traceback).
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as archive:
        archive.writestr("classes.tsv", "a\tfirst\nb\tsecond\n")
        for c in ("a", "b"):
            archive.writestr(f"train/{c}/0.png", encoded(seed=1))
    data = good.read_bytes()
    header = tmp_path / "header.zip"
    header.write_bytes(b"PK\x03\x05" + data[4:])  # the first member's local header magic, damaged
    with pytest.raises(ValueError, match=r"header.zip'.*classes.tsv cannot be read \(BadZipFile: Bad magic number"):
        ZipImageDataset(header, "train", SIZE)
    central = tmp_path / "central.zip"
    at = data.rindex(b"PK\x01\x02")  # the last central directory entry, its signature damaged
    central.write_bytes(data[:at] + b"PK\x01\x03" + data[at + 4:])
    with pytest.raises(ValueError, match=r"central.zip' cannot be opened as a zip file .*truncated or corrupt"):
        ZipImageDataset(central, "train", SIZE)


def test_odd_member_names_and_long_library_messages_stay_one_bounded_line(tmp_path):
    # Found by long campaigns of tests/test_fuzz_images.py: a member named just "train", or with no name, raised
    # IndexError, and zipfile's message for a damaged header quoted the header's bytes, as many as it claimed.
    odd = [stored("train", encoded()), stored("train//x.png", encoded()), stored("", encoded())]  # "": no name
    path = raw_zip(tmp_path / "odd.zip", with_good_images(*odd))
    dataset = ZipImageDataset(path, "train", SIZE)
    assert len(dataset) == 4
    assert sorted(entry.path.rsplit("odd.zip/", 1)[1] for entry in dataset.skipped) == ["train", "train//x.png"]
    assert {entry.reason for entry in dataset.skipped} == {folder.NOT_IN_A_CLASS_FOLDER}

    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as archive:
        archive.writestr("classes.tsv", "a\tfirst\nb\tsecond\n")
        for c in ("a", "b"):
            archive.writestr(f"train/{c}/0.png", encoded(seed=1))
    data = bytearray(good.read_bytes())
    data[26:28] = (2000).to_bytes(2, "little")  # classes.tsv's local header claims a 2000-character name
    (tmp_path / "long.zip").write_bytes(bytes(data))
    with pytest.raises(ValueError) as refused:
        ZipImageDataset(tmp_path / "long.zip", "train", SIZE)
    message = str(refused.value)
    assert "classes.tsv cannot be read (BadZipFile: File name in directory" in message
    assert len(message) < 400 and "\n" not in message and "characters)" in message


def test_a_decoded_array_that_cannot_fit_in_memory_is_refused_before_it_is_allocated(tmp_path, monkeypatch):
    root = good_folder(tmp_path / "data")
    monkeypatch.setattr(decode, "_physical_memory", lambda: 4 << 20, raising=False)  # a machine of 4 MiB
    with pytest.raises(ValueError, match=r"4 images of 1024x1024 pixels need 12.0 MiB decoded, more than half of "
                                         r"this machine's 4.0 MiB of memory; use a smaller image size"):
        ImageFolder(root, 1024)
    assert len(ImageFolder(root, 16)) == 4  # 3 kB fit
