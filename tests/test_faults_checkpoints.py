"""Fault injection, checkpoints: a full disk, a kill or Ctrl-C never costs more than the current epoch.

tests/test_train.py resumes in-process after a stop and after a simulated
Ctrl-C, and refuses a truncated or foreign checkpoint; tests/test_io.py checks
that save_weights is atomic.  This file adds real processes (SIGKILL mid-epoch
and mid-write, SIGINT mid-epoch, each followed by ``--resume`` and compared
bit for bit with an uninterrupted run), a full disk half-way through a
checkpoint (directly, in fit and through the command line), Ctrl-C during the
validation pass, hostile checkpoint archives, and resuming another run's
checkpoint.
"""
import errno
import signal
import zipfile

import numpy as np
import pytest

import tinynet
from tinynet import nn, optim
from tinynet.data import ArrayDataset, DataLoader
from tinynet.io import load_weights
from tinynet.models import simple_cnn
from tinynet.train import (CheckpointError, CheckpointWriteError, TrainingInterrupted, fit, load_checkpoint,
                           save_checkpoint)
from tinynet.train import loop

from fault_inject import QUICK, call_main, image_folder, inject, run_cli, start_cli
from test_io import _patch_declared_size


def toy(seed=0, classes=("a", "b")):
    tinynet.manual_seed(seed)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (48, 16, 16, 3)).astype(np.uint8)
    data = ArrayDataset(images, np.arange(48) % 2, list(classes))
    model = simple_cnn(2, image_size=16)
    return (model, optim.Adam(model.parameters(), lr=1e-3), DataLoader(data, np.arange(32), 8, shuffle=True),
            DataLoader(data, np.arange(32, 48), 8))


def state_of(path):
    """The model and optimizer arrays of a checkpoint file (its metadata holds timings, which differ)."""
    return {k: v for k, v in load_weights(path).items() if k.startswith(("model/", "optimizer/"))}


def assert_same_state(a, b):
    assert a.keys() == b.keys() and a
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ---------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------
def test_full_disk_mid_write_keeps_the_previous_checkpoint_byte_identical(tmp_path, monkeypatch):
    model, opt, _, _ = toy()
    path = save_checkpoint(tmp_path / "checkpoint.npz", model, opt, epoch=1)
    before = path.read_bytes()
    inject("enospc", 1, patch=monkeypatch.setattr)  # the next write fails after 1000 bytes
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint(path, model, opt, epoch=2)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert f"checkpoint of epoch 2 to {path}" in str(info.value) and "is unchanged" in str(info.value)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.npz"]  # no temporary file left


def test_full_disk_in_fit_stops_and_keeps_the_last_epochs_checkpoint(tmp_path, monkeypatch):
    model, opt, train, val = toy()
    path = tmp_path / "checkpoint.npz"
    inject("enospc", 2, patch=monkeypatch.setattr)
    with pytest.raises(CheckpointWriteError, match="No space left on device"):
        fit(model, opt, nn.CrossEntropyLoss(), train, val, epochs=3, checkpoint_path=path, progress=False,
            log=None)
    assert load_checkpoint(path, simple_cnn(2, image_size=16))["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.npz"]


def test_cli_full_disk_is_one_line_exit_1_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    data, out = image_folder(tmp_path / "data"), tmp_path / "out"
    inject("enospc", 2, patch=monkeypatch.setattr)
    status, _, err = call_main(capsys, "cnn", "--data", data, "--out", out, *QUICK)
    assert status == 1 and len(err.strip().splitlines()) == 1, err  # before the fix: a traceback
    assert "No space left on device" in err and str(out / "checkpoint.npz") in err
    assert load_checkpoint(out / "checkpoint.npz", simple_cnn(2, image_size=16))["epoch"] == 1


# ---------------------------------------------------------------------------
# Killed processes, Ctrl-C, and resuming to the same weights
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The final checkpoint of a run that nothing interrupts (2 epochs of 2 batches), and its data folder."""
    base = tmp_path_factory.mktemp("uninterrupted")
    data = image_folder(base / "data")
    result = run_cli("cnn", "--data", data, "--out", base / "out", *QUICK)
    assert result.returncode == 0, result.stderr
    return state_of(base / "out" / "checkpoint.npz"), data


def test_process_killed_mid_write_leaves_the_previous_checkpoint_whole(tmp_path, uninterrupted):
    _, data = uninterrupted
    out = tmp_path / "out"
    process = start_cli("cnn", "--data", data, "--out", out, *QUICK, fault=("stall", 2, tmp_path / "stalled"))
    before = (out / "checkpoint.npz").read_bytes()  # epoch 1's; epoch 2's is half written
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    assert (out / "checkpoint.npz").read_bytes() == before
    assert load_checkpoint(out / "checkpoint.npz", simple_cnn(2, image_size=16))["epoch"] == 1
    # What the kill left behind is the hidden temporary file, never a half checkpoint under the real name.
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].startswith(".checkpoint.npz.")
    # The next run in the folder removes it (and only such files), and says so.
    (out / ".notes.tmp").write_text("someone else's")
    result = run_cli("cnn", "--data", data, "--out", out, *QUICK, "--resume")
    assert result.returncode == 0, result.stderr
    assert f"removed {out / leftovers[0]}, a temporary file left by a run that was killed" in result.stdout
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == [".notes.tmp"]


def test_sigkill_mid_epoch_then_resume_reaches_the_uninterrupted_weights(tmp_path, uninterrupted):
    expected, data = uninterrupted
    out = tmp_path / "out"
    process = start_cli("cnn", "--data", data, "--out", out, *QUICK, fault=("pause", 3, tmp_path / "paused"))
    process.send_signal(signal.SIGKILL)  # in epoch 2, batch 1
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert load_checkpoint(out / "checkpoint.npz", simple_cnn(2, image_size=16))["epoch"] == 1

    result = run_cli("cnn", "--data", data, "--out", out, *QUICK, "--resume")
    assert result.returncode == 0, result.stderr
    assert "continuing at epoch 2 of 2" in result.stdout
    assert_same_state(state_of(out / "checkpoint.npz"), expected)


# SIGTERM (kill, a batch scheduler, a container stop) is handled as Ctrl-C; before the fix it ended the
# process at once (-15), nothing saved and no message.
@pytest.mark.parametrize("signum, status, how", [(signal.SIGINT, 130, ""),
                                                 (signal.SIGTERM, 143, "terminated (SIGTERM): ")], ids=["int", "term"])
def test_sigint_or_sigterm_mid_epoch_saves_exits_and_resume_reaches_the_uninterrupted_weights(
        tmp_path, uninterrupted, signum, status, how):
    expected, data = uninterrupted
    out = tmp_path / "out"
    process = start_cli("cnn", "--data", data, "--out", out, *QUICK, fault=("pause", 4, tmp_path / "paused"))
    process.send_signal(signum)  # in epoch 2, batch 2
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == status, stderr
    assert "Traceback" not in stderr
    assert f"{how}interrupted in epoch 2 after 1 batches" in stderr and "--resume" in stderr
    meta = load_checkpoint(out / "checkpoint.npz", simple_cnn(2, image_size=16))
    assert (meta["epoch"], meta["batch"]) == (1, 1)

    result = run_cli("cnn", "--data", data, "--out", out, *QUICK, "--resume")
    assert result.returncode == 0, result.stderr
    assert "continuing at epoch 2, batch 2 of 2" in result.stdout
    assert_same_state(state_of(out / "checkpoint.npz"), expected)


def test_ctrl_c_during_validation_keeps_the_epoch_and_resume_matches(tmp_path, monkeypatch):
    model, opt, train, val = toy()
    fit(model, opt, nn.CrossEntropyLoss(), train, val, epochs=2, progress=False, log=None)
    straight = {k: np.array(v) for k, v in model.state_dict().items()}

    evaluate, passes = loop.evaluate, [0]

    def interrupted_evaluate(*args, **kwargs):
        passes[0] += 1
        if passes[0] == 2:  # the validation pass of epoch 2, after its 4 training batches
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", interrupted_evaluate)
    model, opt, train, val = toy()
    path = tmp_path / "c.npz"
    try:
        fit(model, opt, nn.CrossEntropyLoss(), train, val, epochs=2, checkpoint_path=path, progress=False, log=None)
    except TrainingInterrupted as stop:
        assert (stop.epoch, stop.batch) == (1, 4)
    except KeyboardInterrupt as error:  # pytest would stop the whole session on it
        raise AssertionError("the Ctrl-C escaped fit without saving the epoch") from error
    else:
        raise AssertionError("fit was not interrupted")
    meta = load_checkpoint(path, simple_cnn(2, image_size=16))
    assert (meta["epoch"], meta["batch"]) == (1, 4)  # epoch 2's training is kept

    monkeypatch.setattr(loop, "evaluate", evaluate)
    model, opt, train, val = toy()
    history = fit(model, opt, nn.CrossEntropyLoss(), train, val, epochs=2, checkpoint_path=path, resume=True,
                  progress=False, log=None)
    assert [e.epoch for e in history.epochs] == [1, 2]
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, straight[key], err_msg=key)


# ---------------------------------------------------------------------------
# Checkpoints that must be refused
# ---------------------------------------------------------------------------
def _rewrite_member(src, dst, member, data):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, data if info.filename == member else zin.read(info))


def test_checkpoint_claiming_a_huge_array_is_refused_without_allocating(tmp_path):
    model, opt, _, _ = toy()
    path = save_checkpoint(tmp_path / "c.npz", model, opt, epoch=1)
    header = {"descr": "<f4", "fortran_order": False, "shape": (10 ** 7, 10 ** 6)}  # 40 TB
    with open(tmp_path / "header", "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
    _rewrite_member(path, tmp_path / "huge.npz", "model/0.weight.npy", (tmp_path / "header").read_bytes())
    with pytest.raises(CheckpointError, match=r"huge\.npz cannot be read .*claims shape \(10000000, 1000000\)"):
        load_checkpoint(tmp_path / "huge.npz", simple_cnn(2, image_size=16))


def test_checkpoint_zip_bomb_is_refused(tmp_path):
    model, opt, _, _ = toy()
    path = save_checkpoint(tmp_path / "c.npz", model, opt, epoch=1)
    for member in ("model/0.weight.npy", "model/3.weight.npy"):  # 2 x 4 GiB declared
        _patch_declared_size(path, member, 0xFFFFFFF0)
    with pytest.raises(CheckpointError, match="more than the limit"):
        load_checkpoint(path, simple_cnn(2, image_size=16))


def test_checkpoint_whose_metadata_is_not_an_object_is_refused(tmp_path):
    np.savez(tmp_path / "c.npz", __meta__=np.frombuffer(b"[1, 2]", np.uint8))  # JSON, but a list
    with pytest.raises(CheckpointError, match=r"unknown checkpoint format \[1, 2\], expected 'tinynet-checkpoint-1'"):
        load_checkpoint(tmp_path / "c.npz", simple_cnn(2, image_size=16))


def test_resume_refuses_the_checkpoint_of_another_run(tmp_path):
    model, opt, train, val = toy()
    path = tmp_path / "c.npz"
    fit(model, opt, nn.CrossEntropyLoss(), train, val, epochs=1, checkpoint_path=path, progress=False, log=None,
        extra={"classes": ["a", "b"], "seed": 0})
    model, opt, train, val = toy(classes=("cats", "dogs"))  # same shapes, other data
    before = {k: np.array(v) for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"another run: its classes is \['a', 'b'\], this run's is "
                                              r"\['cats', 'dogs'\]"):
        fit(model, opt, nn.CrossEntropyLoss(), train, val, epochs=2, checkpoint_path=path, resume=True,
            progress=False, log=None, extra={"classes": ["cats", "dogs"], "seed": 0})
    for key, value in model.state_dict().items():  # refused before anything was loaded
        np.testing.assert_array_equal(value, before[key])


def test_resume_without_a_checkpoint_says_it_starts_afresh(tmp_path):
    model, opt, train, val = toy()
    lines = []
    fit(model, opt, nn.CrossEntropyLoss(), train, val, epochs=1, checkpoint_path=tmp_path / "c.npz", resume=True,
        progress=False, log=lines.append)
    assert lines[0] == f"no checkpoint at {tmp_path / 'c.npz'} to resume from: starting at epoch 1"


def test_cli_resume_from_a_truncated_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    data, out = image_folder(tmp_path / "data"), tmp_path / "out"
    out.mkdir()
    model, opt, _, _ = toy()
    whole = save_checkpoint(out / "checkpoint.npz", model, opt, epoch=1).read_bytes()
    (out / "checkpoint.npz").write_bytes(whole[: len(whole) // 3])
    status, _, err = call_main(capsys, "cnn", "--data", data, "--out", out, *QUICK, "--resume")
    assert status == 2 and len(err.strip().splitlines()) == 1 and "truncated" in err


# ---------------------------------------------------------------------------
# Resuming on other data, or from a position the data does not hold
# ---------------------------------------------------------------------------
def _files_of(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _stop_at_training_step(monkeypatch, at):
    """Ctrl-C in training step ``at`` (1-based, over the run), before its backward."""
    forward, steps = nn.CrossEntropyLoss.forward, [0]

    def interrupted(self, logits, target):
        if tinynet.nn.module.is_grad_enabled():
            steps[0] += 1
            if steps[0] == at:
                raise KeyboardInterrupt
        return forward(self, logits, target)

    monkeypatch.setattr(nn.CrossEntropyLoss, "forward", interrupted)


def test_resume_on_a_folder_with_added_and_replaced_images_is_refused_before_writing(tmp_path, capsys):
    data, out = image_folder(tmp_path / "data"), tmp_path / "out"
    status, _, err = call_main(capsys, "cnn", "--data", data, "--out", out, *QUICK[2:], "--epochs", "1")
    assert status == 0, err
    image_folder(tmp_path / "more", per_class=12)  # 2 images per class the run never saw
    for name in ("dark", "bright"):
        for i in (10, 11):
            (data / name / f"{i}.png").write_bytes((tmp_path / "more" / name / f"{i}.png").read_bytes())
    (data / "dark" / "3.png").write_bytes((data / "bright" / "3.png").read_bytes())  # a photo replaced
    before = _files_of(out)
    status, _, err = call_main(capsys, "cnn", "--data", data, "--out", out, *QUICK, "--resume")
    # Before the fix: accepted (exit 0), the split redone over the new images.
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "the images data has changed since (4 files added (e.g. 'bright/10.png'), 1 changed (e.g. 'dark/3.png'))" \
        in err
    assert _files_of(out) == before  # nothing written: no figure, no skipped.tsv, no checkpoint


def test_mid_epoch_stop_then_a_smaller_folder_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    data, out = image_folder(tmp_path / "data", per_class=20), tmp_path / "out"  # 28 training images: 4 batches
    with monkeypatch.context() as patch:
        _stop_at_training_step(patch, 4)
        status, _, err = call_main(capsys, "cnn", "--data", data, "--out", out, *QUICK)
    assert status == 130 and "interrupted in epoch 1 after 3 batches" in err, err
    for name in ("dark", "bright"):
        for i in range(8, 20):
            (data / name / f"{i}.png").unlink()  # 16 images left: 2 training batches
    status, _, err = call_main(capsys, "cnn", "--data", data, "--out", out, *QUICK, "--resume")
    # Before the fix: a ValueError traceback from DataLoader.iter_from.
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "the images data has changed since (24 removed)" in err


def _edit_meta(path, **changes):
    """Rewrite the checkpoint's JSON metadata with ``changes`` (a hand-edited file)."""
    import io
    import json

    meta = json.loads(load_weights(path)["__meta__"].tobytes())
    meta.update(changes)
    buffer = io.BytesIO()
    np.save(buffer, np.frombuffer(json.dumps(meta).encode(), np.uint8))
    _rewrite_member(path, path.with_name("edited.npz"), "__meta__.npy", buffer.getvalue())
    path.with_name("edited.npz").replace(path)


@pytest.mark.parametrize("edit, message", [
    ({"batch": 10 ** 9}, "stopped after batch 1000000000 of epoch 1, but an epoch here has 4 batches"),
    ({"epoch": 10 ** 9, "batch": 0}, "epoch is 1000000000, but its history holds 0 completed epochs")],
    ids=["batch", "epoch"])
def test_checkpoint_with_an_edited_position_is_refused(tmp_path, monkeypatch, edit, message):
    model, opt, train, val = toy()
    path = tmp_path / "c.npz"
    with monkeypatch.context() as patch:
        _stop_at_training_step(patch, 2)
        with pytest.raises(TrainingInterrupted):
            fit(model, opt, nn.CrossEntropyLoss(), train, val, epochs=2, checkpoint_path=path, progress=False,
                log=None)
    _edit_meta(path, **edit)
    model, opt, train, val = toy()
    # Before the fix: a ValueError from DataLoader.iter_from (batch), or a run that trained nothing (epoch).
    with pytest.raises(CheckpointError, match=message):
        fit(model, opt, nn.CrossEntropyLoss(), train, val, epochs=2, checkpoint_path=path, resume=True,
            progress=False, log=None)


def test_cli_resume_from_an_edited_batch_position_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    data, out = image_folder(tmp_path / "data"), tmp_path / "out"
    with monkeypatch.context() as patch:
        _stop_at_training_step(patch, 2)
        assert call_main(capsys, "cnn", "--data", data, "--out", out, *QUICK)[0] == 130
    _edit_meta(out / "checkpoint.npz", batch=10 ** 9)
    status, _, err = call_main(capsys, "cnn", "--data", data, "--out", out, *QUICK, "--resume")
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "stopped after batch 1000000000 of epoch 1, but an epoch here has 2 batches" in err
