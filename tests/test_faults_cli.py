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
import json
import os
import pathlib
import shutil

import numpy as np
import pytest

from tinynet import experiment

from fault_inject import QUICK, call_main, image_folder


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
    ("cnn", ["--seed", "-1"], "--seed must lie in 0..4294967295, got -1"),
    ("cnn", ["--seed", str(2**32)], "--seed must lie in 0..4294967295, got 4294967296"),
    ("cnn", ["--image-size", "100000"], "--image-size must lie in 1..512 pixels, got 100000"),
    ("resnet", ["--image-size", "4096"], "--image-size must lie in 1..512 pixels, got 4096"),
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
    assert err.strip() == ("train_cnn.py: interrupted outside training; every checkpoint written so far is intact; "
                           "run again with --resume to continue")


# ---------------------------------------------------------------------------
# --resume: a setting that differs from the run's is refused, never silently replaced
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("finished")
    data = image_folder(base / "data")
    status = experiment.main("cnn", [str(a) for a in ("--data", data, "--out", base / "out", *QUICK)])
    assert status == 0
    return data, base / "out"


@pytest.mark.parametrize("option, value, setting, before, after", [
    ("--lr", "0.0005", "lr", "0.001", "0.0005"),  # before the fix: the checkpoint's 0.001 ran, 0.0005 was reported
    ("--batch-size", "5", "batch_size", "7", "5"),
    ("--augment", None, "augment", "False", "True"),
    ("--limit", "8", "limit", "None", "8"),
])
def test_resume_refuses_a_changed_setting_naming_it_and_both_values(tmp_path, capsys, finished_run, option, value,
                                                                     setting, before, after):
    data, finished = finished_run
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    checkpoint = (out / "checkpoint.npz").read_bytes()
    quick = [a for a in QUICK]
    if option in quick:
        quick[quick.index(option) + 1] = value
    else:
        quick += [option] + ([value] if value is not None else [])
    status, _, err = call_main(capsys, "cnn", "--data", data, "--out", out, *quick, "--epochs", "3", "--resume")
    assert status == 2, err
    assert f"its {setting} is {before}, this run's is {after}" in err and len(err.strip().splitlines()) == 1
    assert (out / "checkpoint.npz").read_bytes() == checkpoint


def test_resume_honours_more_epochs_and_metrics_record_what_ran(tmp_path, capsys, finished_run):
    data, finished = finished_run
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    status, stdout, err = call_main(capsys, "cnn", "--data", data, "--out", out, *QUICK, "--epochs", "3", "--resume",
                                    "--device", "cpu")
    assert status == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["history"]["epochs"]] == [1, 2, 3]
    assert {e["lr"] for e in metrics["history"]["epochs"]} == {metrics["config"]["lr"]} == {0.001}


# ---------------------------------------------------------------------------
# BatchNorm and a training batch of one image
# ---------------------------------------------------------------------------
RESNET_QUICK = ("--limit", "12", "--image-size", "32", "--epochs", "1", "--no-tsne", "--no-progress")


def test_resnet_last_training_batch_of_one_is_dropped_and_said(tmp_path, capsys):
    # The digits, 12 per class: 84 training images, so batches of 83 leave one image for the last batch.
    status, out, err = call_main(capsys, "resnet", *RESNET_QUICK, "--batch-size", "83", "--out", tmp_path / "out")
    assert status == 0, err  # before the fix: BatchNorm's ValueError, a traceback
    assert "the last training batch would hold one image, which BatchNorm cannot train on: it is left out" in out
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["last_training_batch_dropped"] is True and np.isfinite(metrics["test"]["accuracy"])


def test_resnet_batch_size_one_is_one_line_exit_2(tmp_path, capsys):
    status, _, err = call_main(capsys, "resnet", *RESNET_QUICK, "--batch-size", "1", "--out", tmp_path / "out")
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "--batch-size 1: ResNet's BatchNorm layers cannot train on one image at a time" in err


# ---------------------------------------------------------------------------
# A loss that is not a number is a failure, never a result
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["validation", "test"])
def test_non_finite_validation_or_test_loss_is_a_failure_not_a_result(tmp_path, capsys, monkeypatch, where):
    from tinynet import train

    evaluate = train.evaluate
    calls = []

    def poisoned(model, loader, loss_fn=None, device="cpu", **kwargs):
        result = evaluate(model, loader, loss_fn, device, **kwargs)
        calls.append(1)
        # fit evaluates the validation set once per epoch (2 epochs), then run() the test set
        if (where == "validation" and len(calls) == 2) or (where == "test" and len(calls) == 3):
            result["loss"] = float("nan")
        return result

    monkeypatch.setattr(train.loop, "evaluate", poisoned)
    monkeypatch.setattr(experiment, "evaluate", poisoned)
    status, out, err = call_main(capsys, "cnn", "--data", image_folder(tmp_path / "data"), "--out", tmp_path / "out",
                                 *QUICK)
    assert status == 1, (out, err)  # before the fix: exit 0 and "Test accuracy: ..."
    assert "Test accuracy" not in out and not (tmp_path / "out" / "metrics.json").exists()
    name = "validation (epoch 2)" if where == "validation" else "test"
    assert f"the {name} loss is nan" in err and len(err.strip().splitlines()) == 1


def test_pretrained_file_of_another_architecture_is_one_line_exit_2(tmp_path, capsys):
    from tinynet.io import save_weights
    from tinynet.models import simple_cnn

    weights = save_weights(simple_cnn(2, image_size=16).state_dict(), tmp_path / "cnn.npz")
    status, _, err = call_main(capsys, "resnet", *RESNET_QUICK, "--out", tmp_path / "out", "--pretrained", weights)
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{str(weights)!r}" in err and ("no key matched" in err or "none of the file's" in err), err


# ---------------------------------------------------------------------------
# export_onnx.py --out: checked before any work, one line naming the path
# ---------------------------------------------------------------------------
def _export_onnx_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_onnx_script", pathlib.Path(experiment.__file__).parents[1]
                                                  / "examples" / "export_onnx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def model_file(tmp_path):
    from tinynet.models import simple_cnn
    from tinynet.predict import model_metadata, save_model

    model = simple_cnn(3, image_size=16)
    return save_model(tmp_path / "best.safetensors", model, model_metadata("cnn", model, ["a", "b", "c"], 16))


def _out_is_missing_folder(tmp_path):
    return tmp_path / "no" / "such" / "folder" / "model.onnx", "its folder {parent!r} does not exist"


def _out_is_a_folder(tmp_path):
    (tmp_path / "model.onnx").mkdir()
    return tmp_path / "model.onnx", "is a folder"


def _out_under_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    return tmp_path / "notes.txt" / "model.onnx", "its folder {parent!r} is not a folder"


def _out_is_a_device(tmp_path):
    return pathlib.Path(os.devnull), "is not a regular file"


@pytest.mark.parametrize("make", [_out_is_missing_folder, _out_is_a_folder, _out_under_a_file, _out_is_a_device])
def test_export_onnx_out_that_cannot_be_written_is_one_line_exit_2(tmp_path, capsys, model_file, make):
    pytest.importorskip("onnx")
    script = _export_onnx_script()
    out, message = make(tmp_path)

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    script.load_model = no_work
    before = sorted(p.name for p in tmp_path.iterdir())
    status = script.main(["--weights", str(model_file), "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2, err  # before the fix: FileNotFoundError, IsADirectoryError or NotADirectoryError tracebacks
    assert err.startswith(f"export_onnx.py: error: --out {str(out)!r}") and len(err.strip().splitlines()) == 1, err
    assert message.format(parent=str(out.parent)) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_export_onnx_out_in_a_folder_refusing_writes_is_one_line_exit_2(tmp_path, capsys, model_file, monkeypatch):
    pytest.importorskip("onnx")
    script = _export_onnx_script()
    # As root, chmod does not stop writes: the first write into the folder is made to fail as it would.
    real_open = os.open

    def refusing(path, *args, **kwargs):
        if pathlib.Path(path).parent == tmp_path / "ro":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(os, "open", refusing)
    status = script.main(["--weights", str(model_file), "--out", str(tmp_path / "ro" / "model.onnx")])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--out {str(tmp_path / 'ro' / 'model.onnx')!r} cannot be written: Permission denied" in err
    assert list((tmp_path / "ro").iterdir()) == []


def test_export_onnx_failed_export_leaves_no_file(tmp_path, capsys, model_file, monkeypatch):
    pytest.importorskip("onnx")
    import tinynet.onnx

    (tmp_path / "model.onnx").write_bytes(b"an earlier export")
    real_export = tinynet.onnx.export

    def failing(model, path, *args, **kwargs):  # dies half-way through writing the file
        pathlib.Path(path).write_bytes(b"half a graph")
        raise tinynet.onnx.ExportError("cannot export 3 (Swish): no ONNX translation")

    monkeypatch.setattr(tinynet.onnx, "export", failing)
    status = _export_onnx_script().main(["--weights", str(model_file), "--out", str(tmp_path / "model.onnx")])
    err = capsys.readouterr().err
    assert status == 2 and "no ONNX translation" in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "model.onnx").read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors", "model.onnx"]
    monkeypatch.setattr(tinynet.onnx, "export", real_export)
    status = _export_onnx_script().main(["--weights", str(model_file), "--out", str(tmp_path / "model.onnx")])
    assert status == 0 and (tmp_path / "model.onnx").read_bytes() != b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors", "model.onnx"]
