"""The example scripts end to end on the CPU, and their command-line errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinynet import backend
from tinynet.io import save_weights
from tinynet.models import resnet18

from conftest import popular_animals_or_skip

ROOT = Path(__file__).resolve().parents[1]


def run_script(name, *args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def check_run(out, model):
    metrics = json.loads((out / "metrics.json").read_text())
    for figure in metrics["figures"]:
        assert (out / figure).stat().st_size > 1000, figure
    assert {"class_distribution.png", "batch_grid.png", "curves.png", "confusion_matrix.png"} <= set(metrics["figures"])
    if model == "resnet":
        assert {"tsne_train_2d.png", "tsne_validation_2d.png", "tsne_test_3d.png"} <= set(metrics["figures"])
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0 and 0.0 <= metrics["test"]["f1_weighted"] <= 1.0
    assert (out / "checkpoint.npz").exists()
    return metrics


def test_train_cnn_end_to_end_on_bundled_digits(tmp_path):
    out = tmp_path / "cnn"
    result = run_script("train_cnn.py", "--limit", "20", "--epochs", "2", "--out", out, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "bundled handwritten digits" in result.stdout and "--data DIR" in result.stdout
    assert "Test accuracy:" in result.stdout and "weighted F1:" in result.stdout
    metrics = check_run(out, "cnn")
    assert metrics["split"] == {"train": 140, "validation": 40, "test": 20}
    assert len(metrics["history"]["epochs"]) == 2


def test_train_resnet_end_to_end_with_augmentation_and_pretrained(tmp_path):
    backbone = resnet18(188)  # e.g. from examples/pretrain_resnet.py: another head, same backbone keys
    save_weights(backbone.state_dict(), tmp_path / "backbone.npz")
    out = tmp_path / "resnet"
    result = run_script("train_resnet.py", "--limit", "12", "--epochs", "1", "--augment", "--out", out,
                        "--pretrained", tmp_path / "backbone.npz", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "loaded 120 of the backbone's tensors" in result.stdout
    assert "freshly initialised: fc.0.weight, fc.0.bias, fc.2.weight, fc.2.bias" in result.stdout
    metrics = check_run(out, "resnet")
    assert len(metrics["pretrained"]["loaded"]) == 120
    # the augmentation run trains on each image twice per epoch
    assert metrics["history"]["epochs"][0]["train_acc"] is not None


@pytest.mark.parametrize("args,message", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--data", "/nonexistent/photos"], "data folder '/nonexistent/photos' does not exist"),
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--lr", "nan"], "--lr must be a positive number"),
])
def test_usage_errors_are_one_line_with_status_2(args, message, tmp_path):
    result = run_script("train_cnn.py", *args, "--out", tmp_path / "o")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cuda_without_gpu_is_a_usage_error(tmp_path):
    if backend.gpu_available():
        pytest.skip("a GPU is present")
    result = run_script("train_resnet.py", "--device", "cuda", "--out", tmp_path / "o")
    assert result.returncode == 2 and "cuda" in result.stderr and "Traceback" not in result.stderr


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_script("train_cnn.py", "--out", blocker / "sub")
    assert result.returncode == 2 and "cannot be written" in result.stderr and "Traceback" not in result.stderr


def test_empty_data_folder_is_a_usage_error(tmp_path):
    (tmp_path / "data" / "cats").mkdir(parents=True)
    result = run_script("train_cnn.py", "--data", tmp_path / "data", "--out", tmp_path / "o")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cats" in result.stderr


def test_short_cnn_run_on_real_photos_learns(tmp_path):
    data = popular_animals_or_skip()
    out = tmp_path / "animals"
    result = run_script("train_cnn.py", "--data", data, "--epochs", "4", "--out", out, "--no-progress",
                        timeout=600)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 1997 and metrics["skipped_files"] == 0 and len(metrics["classes"]) == 22
    chance = 1 / 22
    assert metrics["best_val_accuracy"] > 3 * chance, metrics["best_val_accuracy"]


def test_a_figure_or_metrics_write_that_fails_midway_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from tinynet import cli, plots
    from tinynet.train import EpochStats, History

    history = History([EpochStats(1, 1.0, 0.5, 1.1, 0.4, 2.0, 50.0, 1e-3),
                       EpochStats(2, 0.8, 0.6, 1.0, 0.5, 2.0, 50.0, 1e-3)])
    path = plots.plot_curves(history, tmp_path / "curves.png")
    before = path.read_bytes()
    savefig = Figure.savefig

    def dying(self, target, **kwargs):  # half a PNG written, then the process is stopped
        savefig(self, target, **kwargs)
        if isinstance(target, (str, os.PathLike)):  # how plots wrote before the fix: straight to the file
            os.truncate(target, 100)
        else:
            target.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", dying)
    with pytest.raises(KeyboardInterrupt):
        plots.plot_curves(history, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]

    cli.write_json(tmp_path / "metrics.json", {"accuracy": 0.5})
    monkeypatch.setattr(cli.json, "dumps", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        cli.write_json(tmp_path / "metrics.json", {"accuracy": 0.9})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"accuracy": 0.5}
