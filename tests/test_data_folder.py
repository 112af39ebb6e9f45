"""ImageFolder and the decoding behind it: every readable image used, every other file skipped with a reason."""
import csv
import io
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from tinynet.data import ImageFolder
from tinynet.data.decode import decode_rgb, to_rgb

from conftest import popular_animals_or_skip

SIZE = 16


def colourful(width, height, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_header_claiming(width, height) -> bytes:
    """A PNG whose header announces width x height pixels, with no pixel data: a decompression bomb's signature."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def rgba() -> Image.Image:
    alpha = np.tile(np.array([0, 255], np.uint8), (20, 10))  # every other pixel fully transparent
    return Image.fromarray(np.dstack([colourful(20, 20), alpha]))


# The readable files of the messy class folder: name -> (image, format, save options).
READABLE = {
    "photo.jpg": (lambda: Image.fromarray(colourful(40, 30)), "JPEG", {}),
    "dot.png": (lambda: Image.fromarray(colourful(1, 1, seed=1)), "PNG", {}),
    "strip.png": (lambda: Image.fromarray(colourful(4000, 10, seed=2)), "PNG", {}),
    "grey.png": (lambda: Image.fromarray(colourful(20, 20)[..., 0]), "PNG", {}),
    "cmyk.jpg": (lambda: Image.fromarray(colourful(20, 20)).convert("CMYK"), "JPEG", {}),
    "palette.png": (lambda: Image.fromarray(colourful(20, 20, seed=3)).convert("P"), "PNG", {"transparency": 5}),
    "rgba.png": (rgba, "PNG", {}),
    "ünï cödé (1).png": (lambda: Image.fromarray(colourful(12, 12, seed=4)), "PNG", {}),
    "webp named.jpg": (lambda: Image.fromarray(colourful(20, 20, seed=5)), "WEBP", {"lossless": True}),
}


@pytest.fixture
def messy_root(tmp_path):
    """Two classes; "mixed" holds every kind of trouble, "plain" two ordinary images."""
    root = tmp_path / "root"
    mixed = root / "mixed"
    mixed.mkdir(parents=True)
    for name, (make, fmt, options) in READABLE.items():
        (mixed / name).write_bytes(encoded(make(), fmt, **options))
    (mixed / "deep.png").write_bytes(encoded(Image.fromarray(np.full((8, 8), 128 * 257, np.uint16)), "PNG"))
    (mixed / "sub").mkdir()
    (mixed / "sub" / "inner.png").write_bytes(encoded(Image.fromarray(colourful(8, 8, seed=6)), "PNG"))
    os.symlink("..", mixed / "sub" / "up")  # a folder link back to the class folder: a loop

    jpeg = encoded(Image.fromarray(colourful(64, 64)), "JPEG")
    (mixed / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (mixed / "empty.jpg").write_bytes(b"")
    (mixed / "notes.png").write_text("not a picture\n")
    (mixed / "bomb.png").write_bytes(png_header_claiming(30000, 30000))
    os.symlink("loop.png", mixed / "loop.png")
    os.symlink("missing.png", mixed / "broken.png")
    (mixed / "locked.png").write_bytes(encoded(Image.fromarray(colourful(8, 8)), "PNG"))
    os.chmod(mixed / "locked.png", 0)
    (mixed / ".hidden.png").write_bytes(encoded(Image.fromarray(colourful(8, 8)), "PNG"))
    (mixed / ".cache").mkdir()
    (mixed / ".cache" / "x.png").write_bytes(encoded(Image.fromarray(colourful(8, 8)), "PNG"))

    plain = root / "plain"
    plain.mkdir()
    for k in range(2):
        (plain / f"p{k}.png").write_bytes(encoded(Image.fromarray(colourful(8, 8, seed=10 + k)), "PNG"))
    (root / "README.txt").write_text("files live in class folders\n")
    (root / ".ipynb_checkpoints").mkdir()
    yield root
    os.chmod(mixed / "locked.png", 0o644)


def running_as_root():
    return hasattr(os, "geteuid") and os.geteuid() == 0


def test_every_readable_image_is_used_and_every_other_file_skipped_with_a_reason(messy_root):
    dataset = ImageFolder(messy_root, SIZE, threads=3)
    assert dataset.classes == ["mixed", "plain"]  # hidden .ipynb_checkpoints is no class
    names = [os.path.relpath(path, messy_root) for path in dataset.samples]
    # root can read a file without read permission
    readable = [*READABLE, "deep.png", *(["locked.png"] if running_as_root() else [])]
    expected = [os.path.join("mixed", name) for name in sorted(readable)]
    expected += [os.path.join("mixed", "sub", "inner.png"), os.path.join("plain", "p0.png"),
                 os.path.join("plain", "p1.png")]
    assert names == expected
    assert dataset.labels.tolist() == [0] * (len(expected) - 2) + [1, 1]
    assert dataset.array.shape == (len(expected), SIZE, SIZE, 3) and dataset.array.dtype == np.uint8

    reasons = {os.path.relpath(entry.path, messy_root): entry.reason for entry in dataset.skipped}
    assert "truncated" in reasons[os.path.join("mixed", "truncated.jpg")]
    assert "empty file" in reasons[os.path.join("mixed", "empty.jpg")]
    assert "not an image" in reasons[os.path.join("mixed", "notes.png")]
    assert "decompression bomb" in reasons[os.path.join("mixed", "bomb.png")]
    assert "loop" in reasons[os.path.join("mixed", "loop.png")]
    assert "broken symbolic link" in reasons[os.path.join("mixed", "broken.png")]
    assert "already read" in reasons[os.path.join("mixed", "sub", "up")]
    assert "not inside a class folder" in reasons["README.txt"]
    if not running_as_root():
        assert reasons[os.path.join("mixed", "locked.png")] == "permission denied"
    assert len(reasons) == 9 - running_as_root()
    assert not any(".hidden" in path or ".cache" in path for path in [*dataset.samples, *reasons])
    assert all("\n" not in reason for reason in reasons.values())


def test_images_match_pil_convert_rgb_then_bilinear_resize(messy_root):
    modes = {"grey.png": ("PNG", "L"), "cmyk.jpg": ("JPEG", "CMYK"), "rgba.png": ("PNG", "RGBA"),
             "palette.png": ("PNG", "P"), "webp named.jpg": ("WEBP", "RGB")}
    for name, format_and_mode in modes.items():  # the files are the cases they are named after
        with Image.open(messy_root / "mixed" / name) as image:
            assert (image.format, image.mode) == format_and_mode
            assert name != "palette.png" or "transparency" in image.info
    dataset = ImageFolder(messy_root, SIZE)
    for name in READABLE:
        path = str(messy_root / "mixed" / name)
        with Image.open(path) as image:
            expected = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
        np.testing.assert_array_equal(dataset.image(dataset.samples.index(path)), expected, err_msg=name)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(messy_root):
    dataset = ImageFolder(messy_root, SIZE)
    deep = dataset.image(dataset.samples.index(str(messy_root / "mixed" / "deep.png")))
    assert np.all(deep == 128)  # 128 * 257 of 65535; PIL's convert would give 255


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "1", "CMYK", "F", "RGB"])
def test_to_rgb_is_pil_convert_for_8_bit_modes(mode):
    image = Image.fromarray(colourful(6, 5)).convert(mode)
    np.testing.assert_array_equal(np.asarray(to_rgb(image)), np.asarray(image.convert("RGB")))


def test_to_rgb_of_a_palette_with_per_entry_transparency_is_pil_convert_without_its_warning():
    image = Image.fromarray(colourful(6, 5)).convert("P")
    image.info["transparency"] = bytes(range(0, 256))  # an alpha value per palette entry
    with pytest.warns(UserWarning, match="Transparency expressed in bytes"):
        expected = np.asarray(image.convert("RGB"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(np.asarray(to_rgb(image)), expected)


SIXTEEN_BIT = np.array([[0, 257, 32896, 65535]])


@pytest.mark.parametrize("image", [
    Image.fromarray(SIXTEEN_BIT.astype(np.uint16)),                               # I;16, little-endian
    Image.frombytes("I;16B", (4, 1), SIXTEEN_BIT.astype(">u2").tobytes()),       # big-endian
    Image.fromarray(SIXTEEN_BIT.astype(np.int32)),                                # I: Pillow < 10's 16-bit PNG
], ids=["I;16", "I;16B", "I"])
def test_to_rgb_scales_16_bit_samples(image):
    rgb = np.asarray(to_rgb(image))
    np.testing.assert_array_equal(rgb, np.repeat(np.array([[0, 1, 128, 255]])[..., None], 3, axis=2))


def test_max_pixels_refuses_large_images_before_decoding():
    data = encoded(Image.fromarray(colourful(4000, 10)), "PNG")
    assert decode_rgb(data, (4, 4)).shape == (4, 4, 3)
    with pytest.raises(Exception, match="over the limit of 1,000"):
        decode_rgb(data, (4, 4), max_pixels=1000)


def test_torchvision_file_order_and_limit_per_class(tmp_path):
    folder = tmp_path / "c"
    (folder / "sub").mkdir(parents=True)
    for name in ["b.png", "a (2).png", "a (10).png", "z.png", "sub/c.png"]:
        (folder / name).write_bytes(encoded(Image.fromarray(colourful(4, 4)), "PNG"))
    dataset = ImageFolder(tmp_path, 4)
    order = [os.path.relpath(path, folder) for path in dataset.samples]
    assert order == ["a (10).png", "a (2).png", "b.png", "z.png", os.path.join("sub", "c.png")]
    assert [os.path.relpath(p, folder) for p in ImageFolder(tmp_path, 4, limit_per_class=2).samples] == order[:2]


def test_decoding_threads_do_not_change_the_result(messy_root):
    one = ImageFolder(messy_root, SIZE, threads=1)
    many = ImageFolder(messy_root, SIZE, threads=4)
    np.testing.assert_array_equal(one.array, many.array)
    assert one.samples == many.samples and one.skipped == many.skipped
    assert one.report.images == len(one) and one.report.images_per_second > 0


def test_write_skipped_writes_a_tsv_with_header(messy_root, tmp_path):
    dataset = ImageFolder(messy_root, SIZE)
    out = tmp_path / "skipped.tsv"
    dataset.write_skipped(out)
    with open(out, encoding="utf-8", newline="") as file:
        rows = list(csv.reader(file, dialect="excel-tab"))
    assert rows[0] == ["path", "reason"]
    assert rows[1:] == [[entry.path, entry.reason] for entry in dataset.skipped]


def test_skipped_tsv_cells_never_start_like_a_formula(tmp_path, monkeypatch):
    """A data folder given as a relative path that starts like a spreadsheet formula (``--data -2+3``): its
    skipped files' cells in skipped.tsv get a leading ', as predict --csv's do (before: "-2+3/a/x.png", a
    formula to a spreadsheet)."""
    monkeypatch.chdir(tmp_path)
    for cls in ("a", "b"):
        (tmp_path / "-2+3" / cls).mkdir(parents=True)
        (tmp_path / "-2+3" / cls / "fine.png").write_bytes(encoded(Image.fromarray(colourful(8, 8)), "PNG"))
    (tmp_path / "-2+3" / "a" / "broken.png").write_text("not a picture\n")
    dataset = ImageFolder("-2+3", SIZE)
    dataset.write_skipped(tmp_path / "skipped.tsv")
    with open(tmp_path / "skipped.tsv", encoding="utf-8", newline="") as file:
        rows = list(csv.reader(file, dialect="excel-tab"))[1:]
    assert [row[0] for row in rows] == ["'" + os.path.join("-2+3", "a", "broken.png")], rows


def test_bad_roots_and_class_folders_raise_naming_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolder(tmp_path / "nowhere")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="file.png"):
        ImageFolder(tmp_path / "file.png")
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(ValueError, match="empty_root.*no class folders"):
        ImageFolder(tmp_path / "empty_root")
    (tmp_path / "loose").mkdir()
    (tmp_path / "loose" / "a.png").write_bytes(encoded(Image.fromarray(colourful(4, 4)), "PNG"))
    with pytest.raises(ValueError, match="loose.*1 files directly, which belong in class folders"):
        ImageFolder(tmp_path / "loose")

    root = tmp_path / "root"
    (root / "cats").mkdir(parents=True)
    (root / "cats" / "c.png").write_bytes(encoded(Image.fromarray(colourful(4, 4)), "PNG"))
    (root / "dogs").mkdir()
    (root / "dogs" / ".hidden.png").write_bytes(b"")
    with pytest.raises(ValueError, match="dogs.*holds no files"):
        ImageFolder(root)
    (root / "dogs" / "d.png").write_text("text, not an image")
    with pytest.raises(ValueError, match="dogs.*none of its 1 files is a readable image.*not an image"):
        ImageFolder(root)
    with pytest.raises(ValueError, match="limit_per_class"):
        ImageFolder(root, limit_per_class=0)


def test_popular_animals_reads_every_file():
    root = popular_animals_or_skip()
    dataset = ImageFolder(root, 64)
    assert len(dataset) == 1997 and dataset.skipped == []
    assert len(dataset.classes) == 22 and dataset.class_counts().min() >= 73
    for name in ["snake/snake (1).jpg", "snake/snake (4).jpg", "fish/fish (5).png"]:  # WEBPs named .jpg; palette
        path = str(root / name)
        with Image.open(path) as image:
            expected = np.asarray(image.convert("RGB").resize((64, 64), Image.BILINEAR))
        np.testing.assert_array_equal(dataset.image(dataset.samples.index(path)), expected, err_msg=name)
