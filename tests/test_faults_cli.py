"""Fault injection, command line: every mistake is one line on stderr and a known exit status, never a traceback.

tests/test_examples.py runs the scripts for an unknown option, a missing data
folder, --epochs 0, --lr nan, --device cuda without a GPU, an output path
under a file, and a class folder with no files.  This file calls the same
``main`` in-process (quicker; what it returns is the exit status the scripts
pass to sys.exit) for the other values a user can get wrong, an output folder
without write permission, and Ctrl-C outside the training loop.  Signals sent
to real processes are in test_faults_checkpoints.py.
"""
import errno
import os
import pathlib

import pytest

from tinynet import experiment

from fault_inject import call_main, image_folder


@pytest.mark.parametrize("model, args, message", [
    ("cnn", ["--image-size", "24"], "--image-size must be a multiple of 16 for the CNN"),
    ("cnn", ["--image-size", "0"], "--image-size must be a positive integer, got 0"),
    ("cnn", ["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    ("cnn", ["--limit", "0"], "--limit must be a positive number of images per class, got 0"),
    ("cnn", ["--lr", "-0.1"], "--lr must be a positive number, got -0.1"),
    ("cnn", ["--lr", "inf"], "--lr must be a positive number, got inf"),
    ("cnn", ["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    ("cnn", ["--on-nan", "ignore"], "argument --on-nan: invalid choice: 'ignore'"),
    ("cnn", ["--device", "tpu"], "unknown device 'tpu': expected 'cpu' or 'cuda'"),
    ("resnet", ["--pretrained", "/nonexistent/resnet18.pth"], "pretrained weights file '/nonexistent/resnet18.pth' "
                                                              "does not exist"),
], ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_bad_option_values_are_one_line_exit_2(tmp_path, capsys, model, args, message):
    status, _, err = call_main(capsys, model, *args, "--out", tmp_path / "out")
    assert status == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_data_path_that_is_a_file_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "photos.zip").write_bytes(b"PK\x05\x06" + bytes(18))
    status, _, err = call_main(capsys, "cnn", "--data", tmp_path / "photos.zip", "--out", tmp_path / "out")
    assert status == 2 and "does not exist or is not a folder" in err and len(err.strip().splitlines()) == 1


def test_output_path_that_is_a_file_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "out").write_text("a file where the run folder should go")
    status, _, err = call_main(capsys, "cnn", "--out", tmp_path / "out")
    assert status == 2 and f"output folder {str(tmp_path / 'out')!r} cannot be written" in err


def test_output_folder_refusing_writes_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    # As root, chmod does not stop writes: the folder's first write is made to fail as it would.
    write_bytes = pathlib.Path.write_bytes

    def refusing(path, data):
        if path.parent == tmp_path / "out":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return write_bytes(path, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", refusing)
    status, _, err = call_main(capsys, "cnn", "--out", tmp_path / "out")
    assert status == 2 and "cannot be written: Permission denied" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes whatever the permissions")
def test_output_folder_without_write_permission_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out").chmod(0o500)
    try:
        status, _, err = call_main(capsys, "cnn", "--out", tmp_path / "out")
    finally:
        (tmp_path / "out").chmod(0o700)
    assert status == 2 and "cannot be written: Permission denied" in err


def test_ctrl_c_before_training_is_one_line_exit_130(tmp_path, capsys, monkeypatch):
    def interrupted(args, log):
        raise KeyboardInterrupt  # Ctrl-C while the images are being decoded

    monkeypatch.setattr(experiment, "load_dataset", interrupted)
    status, _, err = call_main(capsys, "cnn", "--data", image_folder(tmp_path / "data"), "--out", tmp_path / "out")
    assert status == 130  # before the fix: the KeyboardInterrupt's traceback
    assert err.strip() == "train_cnn.py: interrupted outside training; every checkpoint written so far is intact"
