"""ZipImageDataset on small archives built here, in both layouts, with and without a cache."""
import io
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from tinynet.data import ZipImageDataset

from conftest import SHARED_DATA

# Not in sorted order, to show that classes.tsv decides the label numbering.
TABLE = "n02\tbison, wisent\nn01\tgoldfish\nn03\tlobster\n"


def jpeg(seed, size=8, mode="RGB"):
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, "JPEG")
    return buffer.getvalue()


def members():
    """The archive's contents, member name -> bytes."""
    files = {"classes.tsv": TABLE.encode()}
    for c, wnid in enumerate(["n01", "n02", "n03"]):
        for k in range(4):
            files[f"train/{wnid}/{wnid}_{k}.JPEG"] = jpeg(10 * c + k)
        files[f"val/{wnid}/val_{c}.JPEG"] = jpeg(100 + c)
    files["train/n01/n01_grey.JPEG"] = jpeg(7, mode="L")
    files["train/n02/corrupt.JPEG"] = b"\xff\xd8\xff\xe0 this is no JPEG"
    files["train/n03/.DS_Store"] = b"hidden"
    files["train/stray.txt"] = b"not in a class folder"
    return files


@pytest.fixture
def archive(tmp_path):
    path = tmp_path / "tiny.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zipped:
        zipped.writestr("train/", b"")  # a directory entry
        for name, data in members().items():
            zipped.writestr(name, data)
    return path


@pytest.fixture
def extracted(archive, tmp_path):
    folder = tmp_path / "extracted"
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(folder)
    return folder


def test_reads_a_split_with_the_class_table_order(archive):
    dataset = ZipImageDataset(archive, "train", size=8)
    assert dataset.classes == ["n02", "n01", "n03"]
    assert dataset.class_names == ["bison, wisent", "goldfish", "lobster"]
    assert dataset.samples[:5] == ["train/n02/n02_0.JPEG", "train/n02/n02_1.JPEG", "train/n02/n02_2.JPEG",
                                   "train/n02/n02_3.JPEG", "train/n01/n01_0.JPEG"]
    assert dataset.labels.tolist() == [0] * 4 + [1] * 5 + [2] * 4
    for i, name in enumerate(dataset.samples):
        expected = np.asarray(Image.open(io.BytesIO(members()[name])).convert("RGB"))
        np.testing.assert_array_equal(dataset.image(i), expected, err_msg=name)
    assert ZipImageDataset(archive, "val", size=8).labels.tolist() == [0, 1, 2]


def test_corrupt_and_stray_members_are_skipped_and_reported(archive):
    dataset = ZipImageDataset(archive, "train", size=8)
    reasons = {entry.path: entry.reason for entry in dataset.skipped}
    assert set(reasons) == {f"{archive}/train/n02/corrupt.JPEG", f"{archive}/train/stray.txt"}
    assert "cannot decode" in reasons[f"{archive}/train/n02/corrupt.JPEG"]
    assert "not inside a class folder" in reasons[f"{archive}/train/stray.txt"]
    assert dataset.report.images == 13 and dataset.report.skipped == 1


def test_the_extracted_folder_gives_the_same_arrays(archive, extracted):
    zipped = ZipImageDataset(archive, "train", size=8)
    folder = ZipImageDataset(extracted, "train", size=8)
    np.testing.assert_array_equal(folder.array, zipped.array)
    np.testing.assert_array_equal(folder.labels, zipped.labels)
    assert (folder.classes, folder.class_names) == (zipped.classes, zipped.class_names)
    assert folder.samples == [os.path.join(extracted, name) for name in zipped.samples]
    assert [entry.reason for entry in folder.skipped] == [entry.reason for entry in zipped.skipped]


def test_without_a_class_table_classes_are_the_sorted_folder_names(extracted):
    os.remove(extracted / "classes.tsv")
    dataset = ZipImageDataset(extracted, "val", size=8)
    assert dataset.classes == dataset.class_names == ["n01", "n02", "n03"]


def test_limit_per_class_keeps_the_first_files_of_every_class(archive):
    dataset = ZipImageDataset(archive, "train", size=4, limit_per_class=2)
    # n02's first two files are corrupt.JPEG and n02_0.JPEG: the corrupt one is skipped, not replaced.
    assert dataset.samples == ["train/n02/n02_0.JPEG", "train/n01/n01_0.JPEG", "train/n01/n01_1.JPEG",
                               "train/n03/n03_0.JPEG", "train/n03/n03_1.JPEG"]
    assert dataset.array.shape == (5, 4, 4, 3) and len(dataset.skipped) == 2


def test_cache_is_written_then_loaded_and_rebuilt_when_the_options_change(archive, tmp_path):
    cache = tmp_path / "train.npz"
    first = ZipImageDataset(archive, "train", size=8, cache_path=cache)
    assert cache.exists() and not first.report.from_cache
    second = ZipImageDataset(archive, "train", size=8, cache_path=cache)
    assert second.report.from_cache
    np.testing.assert_array_equal(second.array, first.array)
    np.testing.assert_array_equal(second.labels, first.labels)
    assert (second.classes, second.class_names, second.samples, second.skipped) == \
        (first.classes, first.class_names, first.samples, first.skipped)
    resized = ZipImageDataset(archive, "train", size=4, cache_path=cache)
    assert not resized.report.from_cache and resized.image_size == (4, 4)


def test_an_unreadable_cache_is_decoded_again_with_a_warning(archive, tmp_path):
    cache = tmp_path / "broken.npz"
    cache.write_bytes(b"half a file")
    with pytest.warns(UserWarning, match="could not be read"):
        dataset = ZipImageDataset(archive, "train", size=8, cache_path=cache)
    assert not dataset.report.from_cache
    assert ZipImageDataset(archive, "train", size=8, cache_path=cache).report.from_cache


def test_bad_sources_raise_saying_what_is_missing(archive, extracted, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.zip"):
        ZipImageDataset(tmp_path / "nothing.zip")
    with pytest.raises(FileNotFoundError, match="no images under test/<class>/"):
        ZipImageDataset(archive, "test")
    (extracted / "train" / "n09").mkdir()
    (extracted / "train" / "n09" / "x.JPEG").write_bytes(jpeg(0))
    with pytest.raises(ValueError, match="\\['n09'\\].*not listed in classes.tsv"):
        ZipImageDataset(extracted, "train")


def test_tiny_imagenet_archive_when_present():
    path = SHARED_DATA / "tiny-imagenet-188-32px.zip"
    if not path.is_file():
        pytest.skip(f"shared archive {path} not present")
    dataset = ZipImageDataset(path, "val", limit_per_class=2)
    assert len(dataset.classes) == 188 and dataset.array.shape == (376, 32, 32, 3)
    assert dataset.skipped == [] and dataset.class_names[0] == "goldfish, Carassius auratus"
