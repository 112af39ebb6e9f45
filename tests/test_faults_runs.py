"""Fault injection, the run folder: stops during the last writes of an epoch, concurrent runs, runs that would
overwrite runs, an output folder inside the data, and a refused ``--resume``.

Each stop is made deterministic by holding one named write just before its rename (``fault_inject.py``'s
``hold`` mode): the test signals or kills the process while that write is in progress, then lets it go on.
"""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import pytest

from tinynet.data import ImageFolder
from tinynet.models import simple_cnn
from tinynet.train import load_checkpoint

from fault_inject import QUICK, call_main, image_folder, run_cli, start_cli


def held(tmp_path, name, number=1):
    """A ``hold`` fault for the ``number``-th write of ``name``; returns ``(fault, release)``."""
    marker = tmp_path / f"held-{name}-{number}"
    return ("hold", f"{name}:{number}", marker), (lambda: pathlib.Path(f"{marker}.go").write_text("go"))


def checkpoint_epoch(out):
    meta = load_checkpoint(out / "checkpoint.npz", simple_cnn(2, image_size=16))
    return meta["epoch"], meta["batch"]


def files_of(folder):
    """Every file below ``folder`` with its bytes and modification time (to see that nothing was written)."""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(pathlib.Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("runs-data") / "data")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):
    """A finished two-epoch CNN run: its folder (copy it before changing anything)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = run_cli("cnn", "--data", data, "--out", out, *QUICK)
    assert result.returncode == 0, result.stderr
    return out


# ---------------------------------------------------------------------------
# A stop during the last writes of an epoch
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["int", "term"])
def test_a_stop_during_the_end_of_epoch_checkpoint_keeps_the_epoch_and_is_not_ignored(tmp_path, data, signum,
                                                                                        status):
    out = tmp_path / "out"
    fault, release = held(tmp_path, "checkpoint.npz", 1)  # epoch 1's checkpoint, being written
    process = start_cli("cnn", "--data", data, "--out", out, *QUICK, fault=fault)
    process.send_signal(signum)
    release()
    _, stderr = process.communicate(timeout=60)
    # Before the fix: SIGTERM cut the write short (the epoch lost, "every checkpoint written so far is
    # intact"); Ctrl-C was ignored and the run trained to the end, exit 0.
    assert process.returncode == status, stderr
    assert "Traceback" not in stderr and "interrupted after epoch 1" in stderr and "--resume" in stderr
    assert checkpoint_epoch(out) == (1, 0)
    assert (out / "best.safetensors").is_file()  # written before the checkpoint that records epoch 1 as best
    assert not (out / "metrics.json").exists()

    result = run_cli("cnn", "--data", data, "--out", out, *QUICK, "--resume")
    assert result.returncode == 0, result.stderr
    assert "continuing at epoch 2 of 2" in result.stdout
    assert checkpoint_epoch(out) == (2, 0)


def test_ctrl_c_in_the_middle_of_a_write_is_raised_once_the_file_is_whole(tmp_path):
    from tinynet.io.files import atomic_write

    path = tmp_path / "file.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(path) as file:
            file.write(b"first half, ")
            signal.raise_signal(signal.SIGINT)  # before the fix: raised here, and the file was never written
            file.write(b"second half")
    assert path.read_bytes() == b"first half, second half"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored


def _claims(stdout):
    """The files the run's last log line says it wrote."""
    line = [line for line in stdout.splitlines() if " written to " in line][-1]
    return line.split(" written to ")[0].replace(" and ", ", ").split(", ")


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_a_kill_while_best_weights_are_written_then_resume_restores_every_claimed_file(tmp_path, data, signum):
    out = tmp_path / "out"
    fault, release = held(tmp_path, "best.safetensors", 1)
    process = start_cli("cnn", "--data", data, "--out", out, *QUICK, fault=fault)
    process.send_signal(signum)
    release()
    process.communicate(timeout=60)
    result = run_cli("cnn", "--data", data, "--out", out, *QUICK, "--resume")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    # Before the fix: the checkpoint recorded epoch 1 as the best before best.safetensors existed, so the
    # resumed run ended with best_epoch 1, no best.safetensors, and a log saying it was written.
    assert (out / "best.safetensors").is_file()
    assert metrics["shipped"]["best"] is not None and metrics["shipped"]["best"]["epoch"] == metrics["best_epoch"]
    claimed = _claims(result.stdout)
    assert "best.safetensors" in claimed and "last.safetensors" in claimed and "report.html" in claimed
    for name in claimed + metrics["figures"]:
        if name != "figures":
            assert (out / name).is_file(), name


def test_ctrl_c_while_metrics_are_written_finishes_the_write_then_stops(tmp_path, data):
    out = tmp_path / "out"
    fault, release = held(tmp_path, "metrics.json", 1)
    process = start_cli("cnn", "--data", data, "--out", out, *QUICK, fault=fault)
    process.send_signal(signal.SIGINT)
    release()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "--resume" in stderr
    assert json.loads((out / "metrics.json").read_text())["best_epoch"]  # before the fix: cut short, no file
    result = run_cli("cnn", "--data", data, "--out", out, *QUICK, "--resume")
    assert result.returncode == 0, result.stderr
    assert (out / "report.html").is_file() and (out / "last.safetensors").is_file()


# ---------------------------------------------------------------------------
# Temporary files and concurrent runs
# ---------------------------------------------------------------------------
def test_a_second_run_never_touches_the_folder_of_a_run_still_writing(tmp_path, data):
    out = tmp_path / "out"
    fault, release = held(tmp_path, "checkpoint.npz", 1)
    first = start_cli("cnn", "--data", data, "--out", out, *QUICK, fault=fault)
    try:
        live = [p for p in out.iterdir() if p.name.startswith(".checkpoint.npz.") and p.name.endswith(".tmp")]
        assert len(live) == 1
        # Before the fix the second run's start-up cleanup deleted the first run's live temporary file.
        resumed = run_cli("cnn", "--data", data, "--out", out, *QUICK, "--resume")
        assert resumed.returncode == 2 and len(resumed.stderr.strip().splitlines()) == 1, resumed.stderr
        assert str(out) in resumed.stderr and f"pid {first.pid}" in resumed.stderr
        second = run_cli("cnn", "--data", data, "--out", out, *QUICK)
        assert second.returncode == 0, second.stderr
        assert live[0].exists()
        assert f"{out}-2" in second.stdout.splitlines()[0]
        assert (tmp_path / "out-2" / "metrics.json").is_file()
    finally:
        release()
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 0, stderr
    assert checkpoint_epoch(out) == (2, 0) and (out / "metrics.json").is_file()


def _dead_pid():
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def test_pretrain_removes_the_image_cache_leftovers_of_dead_runs_only(tmp_path):
    from test_pretrain import PRETRAIN, run_script

    cache = tmp_path / "cache"
    cache.mkdir()
    dead = cache / f"tinyimagenet-train-32px.npz.partial-{_dead_pid()}"
    alive = cache / f"tinyimagenet-val-32px.npz.partial-{os.getpid()}"  # this test's process is alive
    other = cache / "notes.partial-1"
    for path in (dead, alive, other):
        path.write_bytes(b"half a cache")
    # A folder that is not a Tiny-ImageNet copy: refused once the cache folder is tidied, before any decoding.
    result = run_script("pretrain_resnet.py", "--data", tmp_path / "cache", "--out", tmp_path / "out",
                        "--cache-dir", cache, *PRETRAIN)
    assert result.returncode == 2, result.stderr
    assert not dead.exists(), result.stdout + result.stderr  # before the fix: left forever
    assert alive.exists() and other.exists()
    assert f"removed {dead}" in result.stdout


# ---------------------------------------------------------------------------
# A finished run is never destroyed by the next one
# ---------------------------------------------------------------------------
def test_training_again_with_the_same_out_goes_to_a_new_folder(tmp_path, capsys, data, finished):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = files_of(out)
    status, stdout, err = call_main(capsys, "cnn", "--data", data, "--out", out, *QUICK, "--epochs", "1")
    assert status == 0, err
    # Before the fix the finished run's weights, metrics and report were replaced.
    assert files_of(out) == before
    first = stdout.splitlines()[0]
    assert f"{out}-2" in first and str(out) in first and "--resume" in first
    assert json.loads((tmp_path / "run-2" / "metrics.json").read_text())["config"]["epochs"] == 1
    status, stdout, err = call_main(capsys, "cnn", "--data", data, "--out", out, *QUICK, "--epochs", "1")
    assert status == 0 and f"{out}-3" in stdout.splitlines()[0], err
    assert files_of(out) == before


def test_a_resnet_run_after_a_cnn_run_never_mixes_its_files_with_it(tmp_path, capsys, data, finished):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    status, _, err = call_main(capsys, "resnet", "--data", data, "--out", out, "--epochs", "1", "--batch-size", "8",
                               "--image-size", "16", "--no-progress")
    assert status == 0, err
    assert not list(out.glob("tsne_*")) and list((tmp_path / "run-2").glob("tsne_*"))
    assert json.loads((out / "metrics.json").read_text())["model"] == "cnn"


# ---------------------------------------------------------------------------
# An output folder inside the data folder
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["dark/run", "run", "."])
def test_out_inside_data_is_one_line_exit_2_and_nothing_is_written(tmp_path, capsys, where):
    data = image_folder(tmp_path / "data")
    before = files_of(data)
    status, _, err = call_main(capsys, "cnn", "--data", data, "--out", data / where, *QUICK)
    assert status == 2 and len(err.strip().splitlines()) == 1, err  # before the fix: the run went ahead
    assert "--out" in err and "--data" in err
    assert files_of(data) == before and not (data / "dark" / "run").exists() and not (data / "run").exists()


def test_the_folder_scanner_skips_a_run_folder_inside_the_data(tmp_path, finished):
    data = image_folder(tmp_path / "data")
    shutil.copytree(finished, data / "dark" / "old-run")  # say, moved there by hand
    shutil.copytree(finished, data / "runs")
    dataset = ImageFolder(data, size=16)
    # Before the fix the run's figures were read as images of "dark", and "runs" became a class.
    assert dataset.classes == ["bright", "dark"] and len(dataset) == 20
    skipped = {pathlib.Path(item.path).name: item.reason for item in dataset.skipped}
    assert "run" in skipped["old-run"] and "run" in skipped["runs"]


# ---------------------------------------------------------------------------
# A refused --resume writes nothing
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("change", [["--lr", "0.0005"], ["--data", "other"]], ids=["lr", "data"])
def test_a_refused_resume_writes_nothing(tmp_path, capsys, data, finished, change):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    if change[0] == "--data":
        change = ["--data", image_folder(tmp_path / "other", per_class=12)]
    else:
        change = ["--data", data, *change]
    before = files_of(out)
    status, _, err = call_main(capsys, "cnn", *change, "--out", out, *QUICK, "--resume")
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    after = files_of(out)
    # Before the fix batch_grid.png and class_distribution.png (and skipped.tsv) were already rewritten.
    assert {name for name in after if after[name] != before.get(name)} <= {pathlib.Path(".tinynet-run")}
