"""Fault injection, data: every readable image is used, every other file skipped with a one-line reason.

tests/test_data_folder.py already covers the messy class folder (truncated
JPEG, zero-byte file, text named .png, 1x1 and 4000x10 images, greyscale,
CMYK, 16-bit, palette and RGBA images, a non-ASCII name with spaces, a file
and a folder symlink loop, a broken link, a PNG bomb) and the errors for an
empty root or class.  This file adds what it cannot reach (an unreadable file
when the tests run as root, an unlistable folder, FIFOs, directories named like
images, bombs and damage in other formats) and the command line's side: the
skipped files listed in the run's folder, counted, and a bad dataset stopping
the run before training.
"""
import errno
import io
import json
import os
import struct

import numpy as np
import pytest
from PIL import Image

from tinynet.data import ImageFolder, folder

from fault_inject import QUICK, call_main, image_folder, run_cli

SIZE = 8


def encoded(fmt="PNG", width=8, height=8, seed=0, mode="RGB") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, fmt)
    return buffer.getvalue()


def running_as_root():
    return hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture
def root(tmp_path):
    """cats/0..2.png and dogs/0..2.png: six good images."""
    for name in ("cats", "dogs"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for k in range(3):
            (tmp_path / "data" / name / f"{k}.png").write_bytes(encoded(seed=k))
    return tmp_path / "data"


def skipped_reasons(dataset, root):
    return {os.path.relpath(entry.path, root): entry.reason for entry in dataset.skipped}


def test_permission_denied_file_is_skipped_and_every_other_image_used(root, monkeypatch):
    # The tests run as root, whom chmod 000 does not stop: the reader itself is made to refuse.
    locked = str(root / "cats" / "1.png")
    read_file = folder.read_file

    def refusing_read(path, **bounds):
        if path == locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return read_file(path, **bounds)

    monkeypatch.setattr(folder, "read_file", refusing_read)
    dataset = ImageFolder(root, SIZE)
    assert len(dataset) == 5 and locked not in dataset.samples
    assert skipped_reasons(dataset, root) == {os.path.join("cats", "1.png"): "permission denied"}


@pytest.mark.skipif(not hasattr(os, "geteuid") or running_as_root(),
                    reason="root reads files and folders whatever their permissions")
def test_file_and_folder_without_read_permission_are_skipped(root):
    (root / "cats" / "1.png").chmod(0)
    (root / "dogs" / "sub").mkdir()
    (root / "dogs" / "sub" / "x.png").write_bytes(encoded())
    (root / "dogs" / "sub").chmod(0)
    try:
        dataset = ImageFolder(root, SIZE)
    finally:
        (root / "cats" / "1.png").chmod(0o644)
        (root / "dogs" / "sub").chmod(0o755)
    reasons = skipped_reasons(dataset, root)
    assert reasons[os.path.join("cats", "1.png")] == "permission denied"
    assert reasons[os.path.join("dogs", "sub")] == "folder not listed: permission denied"
    assert len(dataset) == 5


def test_unlistable_sub_folder_is_recorded_and_every_other_image_used(root, monkeypatch):
    sub = root / "dogs" / "more"
    sub.mkdir()
    (sub / "3.png").write_bytes(encoded(seed=3))
    scandir = os.scandir

    def refusing_scandir(path="."):
        if os.fspath(path) == str(sub):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(sub))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing_scandir)
    dataset = ImageFolder(root, SIZE)
    assert len(dataset) == 6
    assert skipped_reasons(dataset, root) == {os.path.join("dogs", "more"): "folder not listed: permission denied"}


def test_directory_named_like_an_image_is_searched_not_decoded(root):
    album = root / "cats" / "album.jpg"
    album.mkdir()
    (album / "inside.png").write_bytes(encoded(seed=9))
    (root / "cats" / "empty.png").mkdir()
    dataset = ImageFolder(root, SIZE)
    assert str(album / "inside.png") in dataset.samples and len(dataset) == 7
    assert dataset.skipped == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this system")
def test_named_pipe_called_like_an_image_is_skipped_without_blocking(root):
    os.mkfifo(root / "cats" / "pipe.png")  # opening it for reading would wait for a writer forever
    dataset = ImageFolder(root, SIZE)
    reason = skipped_reasons(dataset, root)[os.path.join("cats", "pipe.png")]
    assert reason.startswith("not a regular file") and len(dataset) == 6


def test_symbolic_link_cycle_across_classes_ends_and_is_recorded(root):
    os.symlink(os.path.join("..", "dogs"), root / "cats" / "to-dogs")
    os.symlink(os.path.join("..", "cats"), root / "dogs" / "to-cats")
    dataset = ImageFolder(root, SIZE)  # terminates: each real folder is read once per class
    reasons = skipped_reasons(dataset, root)
    assert "already read" in reasons[os.path.join("cats", "to-dogs", "to-cats")]
    assert "already read" in reasons[os.path.join("dogs", "to-cats", "to-dogs")]


def _claiming(fmt, width, height) -> bytes:
    """A 1x1 image whose header is patched to announce ``width`` x ``height`` pixels."""
    data = bytearray(encoded(fmt, 1, 1))
    if fmt == "GIF":
        data[6:10] = struct.pack("<HH", width, height)  # logical screen size
    elif fmt == "BMP":
        data[18:26] = struct.pack("<ii", width, height)  # BITMAPINFOHEADER
    else:  # JPEG: the frame header after the SOF0 marker
        at = data.find(b"\xff\xc0")
        data[at + 5:at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("fmt, width, height", [("GIF", 65535, 65535), ("BMP", 100_000, 100_000),
                                                ("JPEG", 65000, 65000)])
def test_decompression_bomb_headers_are_refused_before_decoding(root, fmt, width, height):
    (root / "cats" / f"bomb.{fmt.lower()}").write_bytes(_claiming(fmt, width, height))
    dataset = ImageFolder(root, SIZE)
    reason = skipped_reasons(dataset, root)[os.path.join("cats", f"bomb.{fmt.lower()}")]
    assert "decompression bomb" in reason and f"{width * height}" in reason
    assert len(dataset) == 6


def _damaged(kind) -> bytes:
    png = encoded("PNG", 64, 64)
    if kind == "truncated PNG":
        return png[: len(png) // 2]
    if kind == "PNG with a flipped header byte":
        flipped = bytearray(png)
        flipped[20] ^= 0xFF  # inside IHDR: its CRC no longer matches
        return bytes(flipped)
    if kind == "JPEG of one marker":
        return b"\xff\xd8"
    if kind == "HTML page named .jpg":
        return b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>\n"
    if kind == "truncated GIF":
        gif = encoded("GIF", 64, 64, mode="P")
        return gif[: len(gif) // 2]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated PNG", "PNG with a flipped header byte", "JPEG of one marker",
                                  "HTML page named .jpg", "truncated GIF"])
def test_damaged_or_disguised_file_is_skipped_with_a_one_line_reason(root, kind):
    (root / "dogs" / "bad.jpg").write_bytes(_damaged(kind))
    dataset = ImageFolder(root, SIZE)
    assert len(dataset) == 6
    reason = skipped_reasons(dataset, root)[os.path.join("dogs", "bad.jpg")]
    assert reason and "\n" not in reason and "BytesIO" not in reason


# ---------------------------------------------------------------------------
# Through the command line: listed in the run's folder, counted, or a stop before training
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def messy_run(tmp_path_factory):
    """One run on a folder with 12 text files named .png and two names that are not UTF-8 (one a good image),
    printing to a terminal that refuses what it cannot encode, as one under LANG=en_US.UTF-8 does."""
    base = tmp_path_factory.mktemp("messy")
    data = image_folder(base / "data")
    for k in range(12):
        (data / "dark" / f"broken {k}.png").write_text("not a picture")
    dark = os.fsencode(data / "dark")
    try:
        with open(dark + b"/caf\xe9 ok.png", "wb") as file:  # Latin-1 bytes: not valid UTF-8
            file.write(encoded("PNG", 16, 16))
        with open(dark + b"/a caf\xe9 broken.png", "wb") as file:
            file.write(b"not a picture")
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    result = run_cli("cnn", "--data", data, "--out", base / "out", *QUICK, env={"PYTHONIOENCODING": "utf-8:strict"})
    return result, base / "out"


def test_cli_lists_every_skipped_file_in_the_run_folder_and_counts_them(messy_run):
    result, out = messy_run
    assert result.returncode == 0, result.stderr
    assert "21 images in 2 classes" in result.stdout and "13 files skipped" in result.stdout
    assert "... and 3 more (all listed in skipped.tsv)" in result.stdout
    rows = (out / "skipped.tsv").read_text(encoding="utf-8").splitlines()
    assert rows[0] == "path\treason" and len(rows) == 14
    assert all("\tnot an image in a decoded format (JPEG, PNG, WEBP, BMP, GIF, TIFF): it starts with b'" in row
               for row in rows[1:])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 21 and metrics["skipped_files"] == 13


def test_cli_survives_file_names_that_are_not_utf8_with_a_strict_terminal(messy_run):
    result, out = messy_run
    assert result.returncode == 0, result.stderr  # before the fix: exit 2, "'utf-8' codec can't encode"
    assert "caf\\xe9 broken.png: not an image" in result.stdout  # the undecodable byte, escaped (tinynet.text.printable)
    assert "caf\\udce9 broken.png\tnot an image" in (out / "skipped.tsv").read_text(encoding="utf-8")


def test_cli_class_without_a_usable_image_stops_before_training(tmp_path, capsys):
    data = image_folder(tmp_path / "data")
    for path in (data / "bright").iterdir():
        path.write_text("<html>an error page saved as an image</html>")
    out = tmp_path / "out"
    status, _, err = call_main(capsys, "cnn", "--data", data, "--out", out, *QUICK)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "bright" in err and "none of its 10 files is a readable image" in err
    assert not (out / "checkpoint.npz").exists()


def test_cli_root_without_class_folders_stops_before_training(tmp_path, capsys):
    data = tmp_path / "flat"
    data.mkdir()
    for k in range(3):
        (data / f"{k}.png").write_bytes(encoded())
    status, _, err = call_main(capsys, "cnn", "--data", data, "--out", tmp_path / "out", *QUICK)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "no class folders" in err and "3 files directly" in err
