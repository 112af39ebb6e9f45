"""tinynet.data.identity: what identifies a dataset, and what a refused --resume says changed."""
import zipfile

import numpy as np
import pytest

from tinynet.data import ArrayDataset, ImageFolder, ZipImageDataset
from tinynet.data.identity import dataset_identity, identity_changes, identity_summary

from fault_inject import image_folder
from test_pretrain import COLOURS, encode, picture
from test_resume_midstep import PRETRAIN, script  # noqa: F401 (a fixture)


def arrays(n=6, seed=0):
    images = np.random.default_rng(seed).integers(0, 256, (n, 4, 4, 3)).astype(np.uint8)
    return ArrayDataset(images, np.arange(n) % 2, ["a", "b"])


def test_the_same_data_has_the_same_identity_and_any_change_is_named():
    first, again = dataset_identity(arrays()), dataset_identity(arrays())
    assert identity_changes(identity_summary(first) | {"files": first["files"]}, again) is None
    assert first["digest"] == again["digest"] and first["files"].shape == (6, 2)
    changed = arrays()
    pixels = changed.array.copy()
    pixels[2, 0, 0, 0] ^= 1  # one bit of one pixel
    assert identity_changes(first, dataset_identity(ArrayDataset(pixels, changed.labels, ["a", "b"]))) == \
        "1 changed (e.g. '#2')"
    relabelled = ArrayDataset(changed.array, 1 - changed.labels, ["a", "b"])
    assert identity_changes(first, dataset_identity(relabelled)) == "6 changed (e.g. '#0')"
    assert identity_changes(first, dataset_identity(arrays(n=8))) == "2 files added (e.g. '#6')"
    assert identity_changes(first, dataset_identity(arrays(n=4))) == "2 removed"
    other = ArrayDataset(changed.array, changed.labels, ["a", "c"])
    assert identity_changes(first, dataset_identity(other)) == "classes added: 'c'; classes removed: 'b'"
    split = dataset_identity(arrays(), split=(np.arange(4), np.arange(4, 6)))
    resplit = dataset_identity(arrays(), split=(np.arange(2, 6), np.arange(2)))
    assert "split differently" in identity_changes(split, resplit)


def test_a_folder_is_identified_by_relative_names_and_pixels_not_by_its_path_or_file_times(tmp_path):
    data = image_folder(tmp_path / "a", per_class=3)
    first = dataset_identity(ImageFolder(data, size=8))
    copy = tmp_path / "b"
    for path in data.rglob("*.png"):  # another copy, with other modification times
        (copy / path.relative_to(data)).parent.mkdir(parents=True, exist_ok=True)
        (copy / path.relative_to(data)).write_bytes(path.read_bytes())
    assert dataset_identity(ImageFolder(copy, size=8))["digest"] == first["digest"]
    (copy / "dark" / "1.png").write_bytes((data / "bright" / "1.png").read_bytes())
    (copy / "dark" / "1.png").rename(copy / "dark" / "9.png")
    assert identity_changes(first, dataset_identity(ImageFolder(copy, size=8))) == \
        "1 files added (e.g. 'dark/9.png'), 1 removed"


def test_an_archive_and_its_extracted_folder_have_one_identity(tmp_path):
    rng = np.random.default_rng(0)
    archive = tmp_path / "tiny.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for c, colour in enumerate(list(COLOURS.values())[:2]):
            for k in range(3):
                zipped.writestr(f"train/n0{c}/{k}.png", encode(picture(colour, rng, size=8), "PNG"))
    zipfile.ZipFile(archive).extractall(tmp_path / "extracted")
    zipped = dataset_identity(ZipImageDataset(archive, "train", 8))
    assert zipped["names"][0] == "train/n00/0.png"
    assert dataset_identity(ZipImageDataset(tmp_path / "extracted", "train", 8))["digest"] == zipped["digest"]


def test_pretraining_resume_on_a_changed_archive_is_refused_in_one_line(tmp_path, script, capsys):  # noqa: F811
    rng = np.random.default_rng(0)
    members = {f"{split}/n0{c}/{k}.JPEG": encode(picture(colour, rng), "JPEG")
               for c, colour in enumerate(list(COLOURS.values())[:2])
               for split, count in (("train", 8), ("val", 4)) for k in range(count)}

    def write(path, members):
        with zipfile.ZipFile(path, "w") as zipped:
            for name, data in members.items():
                zipped.writestr(name, data)
        return str(path)

    out = tmp_path / "out"
    args = [*PRETRAIN[:1], "1", *PRETRAIN[2:]]
    assert script.main(["--data", write(tmp_path / "a.zip", members), "--out", str(out), *args]) == 0
    members["train/n00/0.JPEG"] = members["train/n01/0.JPEG"]
    members["train/n00/8.JPEG"] = members["train/n01/1.JPEG"]
    capsys.readouterr()
    # Before the fix: accepted, as the recipe (size, limit, seed...) is the same.
    assert script.main(["--data", write(tmp_path / "a.zip", members), "--out", str(out), *args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "the train data has changed since (1 files added (e.g. 'train/n00/8.JPEG'), 1 changed " \
           "(e.g. 'train/n00/0.JPEG'))" in err
