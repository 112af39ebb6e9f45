"""Shipped weights (best/last.safetensors) and predicting on new photos (tinynet.predict, examples/predict.py)."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import save_file

from tinynet import backend
from tinynet.data import DataLoader, ImageFolder, digits_dataset, stratified_split
from tinynet.data.decode import decode_rgb
from tinynet.models import simple_cnn
from tinynet.nn import CrossEntropyLoss
from tinynet.predict import (BestWeights, ModelFileError, find_images, load_model, model_forward, model_metadata,
                             predict_files, read_model_file, save_model)
from tinynet.train import EpochStats, History, evaluate
from tinynet.train.checkpoint import load_checkpoint

from test_examples import run_script

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # training size; the photos on disk are 40x40, so both paths resize




def write_digit_photos(root, per_class=20, size=40):
    """The bundled digits as PNG files in class folders (root/<digit>/<i>.png), as a user's photos would be."""
    digits = digits_dataset(size)
    for k in range(10):
        (root / str(k)).mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(digits.labels == k)[:per_class]:
            Image.fromarray(digits.image(i)).save(root / str(k) / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short CNN run on 200 digit photos; returns (run folder, photo folder, metrics)."""
    base = tmp_path_factory.mktemp("trained")
    photos = write_digit_photos(base / "photos")
    out = base / "run"
    result = run_script("train_cnn.py", "--data", photos, "--image-size", SIZE, "--epochs", 4, "--out", out,
                         "--no-progress")
    assert result.returncode == 0, result.stderr
    return out, photos, json.loads((out / "metrics.json").read_text()), result.stdout


def held_back(photos):
    """The test split's files of that run: the same folder scan and the same split as train_cnn.py."""
    dataset = ImageFolder(photos, size=SIZE)
    _, _, test_idx = stratified_split(dataset.labels, seed=42, classes=dataset.classes)
    return dataset, test_idx


def test_run_writes_best_and_last_with_metadata_and_no_optimizer_state(trained):
    out, photos, metrics, stdout = trained
    best_epoch, epochs = metrics["best_epoch"], len(metrics["history"]["epochs"])
    for kind, epoch in (("best", best_epoch), ("last", epochs)):
        tensors, meta = read_model_file(out / f"{kind}.safetensors")
        assert meta["model"] == "cnn" and meta["classes"] == [str(k) for k in range(10)]
        assert meta["image_size"] == SIZE and meta["mean"] == [0.5] and meta["std"] == [0.5]
        assert meta["weights"] == kind and meta["epoch"] == epoch
        assert set(tensors) == set(simple_cnn(10, image_size=SIZE).state_dict())  # weights only: no Adam moments
    # last.safetensors is the model of the final checkpoint
    net = simple_cnn(10, image_size=SIZE)
    load_checkpoint(out / "checkpoint.npz", net)
    last, _ = read_model_file(out / "last.safetensors")
    for key, value in net.state_dict().items():
        np.testing.assert_array_equal(last[key], value, err_msg=key)
    # both test scores, labelled, in metrics.json and in the printout
    shipped = metrics["shipped"]
    assert shipped["last"]["epoch"] == epochs and shipped["best"]["epoch"] == best_epoch
    assert shipped["last"]["accuracy"] == metrics["test"]["accuracy"]
    assert f"last: epoch {epochs}'s weights, the assignment's number" in stdout
    assert f"Test accuracy, best: {100 * shipped['best']['accuracy']:.1f} %" in stdout
    assert f"best validation epoch {best_epoch}'s weights" in stdout


def test_best_file_holds_the_best_validation_epochs_weights(tmp_path):
    net = simple_cnn(3, image_size=16)
    meta = model_metadata("cnn", net, ["a", "b", "c"], 16)
    keep = BestWeights(tmp_path / "best.safetensors", meta)
    history, snapshots = History(), {}
    for epoch, val_acc in enumerate([0.5, 0.8, 0.7, 0.8], start=1):  # best: epoch 2 (ties keep the first)
        net[0].weight.data = net[0].weight.data + 1.0  # another model each epoch
        snapshots[epoch] = net[0].weight.data.copy()
        stats = EpochStats(epoch, 1.0, 0.5, 1.0, val_acc, 1.0, 1.0, 1e-3)
        history.epochs.append(stats)
        keep(stats, net, history)
    tensors, saved = read_model_file(tmp_path / "best.safetensors")
    assert saved["epoch"] == 2 and saved["val_accuracy"] == 0.8
    np.testing.assert_array_equal(tensors["0.weight"], snapshots[2])


def test_predict_on_held_back_photos_matches_evaluate(trained, tmp_path):
    out, photos, metrics, _ = trained
    dataset, test_idx = held_back(photos)
    files = [dataset.samples[i] for i in test_idx]
    result = run_script("predict.py", "--weights", out / "best.safetensors", *files, "--top-k", 3,
                         "--csv", tmp_path / "out.csv")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(tmp_path / "out.csv", encoding="utf-8")))
    assert [row["path"] for row in rows] == files
    predicted = np.array([int(row["class1"]) for row in rows])
    truth = np.array([int(Path(f).parent.name) for f in files])
    accuracy = float(np.mean(predicted == truth))
    # evaluate() on the same images, with the same weights: the same predictions, image by image
    model, _ = load_model(out / "best.safetensors")
    scored = evaluate(model, DataLoader(dataset, test_idx, 16), CrossEntropyLoss())
    np.testing.assert_array_equal(predicted, scored["predictions"])
    assert accuracy == scored["accuracy"] == metrics["shipped"]["best"]["accuracy"]
    # the printout: one line per image, top-3 with probabilities that are the CSV's
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(files) and lines[0].startswith(f"{files[0]}: {rows[0]['class1']} ")
    assert sum(float(rows[0][f"p{i}"]) for i in (1, 2, 3)) <= 1.0 + 1e-6
    print(f"predict.py on {len(files)} held-back photos: accuracy {accuracy:.4f} (evaluate: {scored['accuracy']:.4f})")


def test_report_names_the_file_of_each_mistake(trained):
    """Before: the mistakes gallery of a run on a folder showed each photo and its classes, but not its file."""
    import html
    import re

    out, photos, metrics, _ = trained
    page = (out / "report.html").read_text(encoding="utf-8")
    dataset, test_idx = held_back(photos)
    test_files = {str(Path(dataset.samples[i]).relative_to(photos)) for i in test_idx}
    shown = re.findall(r"<span class='source'>([^<]*)</span>", page)
    matrix = np.array(metrics["test"]["confusion_matrix"])
    assert len(shown) == page.count("predicted: ") == min(16, int(matrix.sum() - np.trace(matrix))) > 0
    assert {html.unescape(name) for name in shown} <= test_files
    for name in shown:  # under the photo of its true class
        true = re.search(r"true: (\d)<br>[^<]*<span class='wrong'>[^<]*</span><br>[^<]*<br><span class='source'>"
                         + re.escape(name), page)
        assert true and name.startswith(true.group(1) + "/"), name
    assert f"Files relative to the data folder {html.escape(str(photos.resolve()), quote=True)}" in page


def test_predictions_do_not_depend_on_the_batch_size(trained):
    out, photos, _, _ = trained
    model, meta = load_model(out / "last.safetensors")
    files, _ = find_images([photos])
    files = files[::9]
    one = list(predict_files(model_forward(model), meta, files, top_k=10, batch_size=1, progress=False))
    many = list(predict_files(model_forward(model), meta, files, top_k=10, batch_size=7, progress=False))
    assert [p.path for p in one] == files
    for a, b in zip(one, many):
        assert [name for name, _ in a.top] == [name for name, _ in b.top]
        np.testing.assert_allclose([p for _, p in a.top], [p for _, p in b.top], rtol=1e-5, atol=1e-7)
        assert abs(sum(p for _, p in a.top) - 1.0) < 1e-6  # all 10 classes: the probabilities sum to one


def test_unreadable_files_are_skipped_with_the_training_decoders_reason(trained, tmp_path):
    out, photos, _, _ = trained
    folder = tmp_path / "mixed" / "0"
    folder.mkdir(parents=True)
    good = sorted((photos / "3").iterdir())[0]
    (folder / "good.png").write_bytes(good.read_bytes())
    (folder / "text.png").write_text("not an image")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.png").write_bytes(good.read_bytes()[:200])
    training = {Path(s.path).name: s.reason for s in ImageFolder(tmp_path / "mixed", size=SIZE).skipped}
    assert set(training) == {"text.png", "empty.jpg", "truncated.png"}
    result = run_script("predict.py", "--weights", out / "best.safetensors", tmp_path / "mixed",
                         tmp_path / "missing.jpg", "--no-progress")
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    for name, reason in training.items():
        assert lines[str(folder / name)] == f"skipped: {reason}"
    assert lines[str(tmp_path / "missing.jpg")] == "skipped: no such file or folder"
    assert not lines[str(folder / "good.png")].startswith("skipped")
    assert "1 image classified, 4 skipped" in result.stderr


def test_same_pixels_as_training(trained):
    """predict_files feeds the model exactly the array the training loader makes from the same file."""
    out, photos, _, _ = trained
    dataset = ImageFolder(photos, size=SIZE)
    path = dataset.samples[5]
    np.testing.assert_array_equal(decode_rgb(Path(path).read_bytes(), (SIZE, SIZE)), dataset.image(5))
    model, meta = load_model(out / "best.safetensors")
    seen = []
    list(predict_files(lambda x: seen.append(x) or np.zeros((len(x), 10)), meta, [path], progress=False))
    x, _ = next(iter(DataLoader(dataset, [5], 1)))
    np.testing.assert_array_equal(seen[0], x)


@pytest.mark.parametrize("case", ["classes", "image_size", "checkpoint", "no_metadata", "missing", "model"])
def test_weights_that_do_not_fit_are_refused_in_one_line(trained, tmp_path, case):
    out, photos, _, _ = trained
    tensors, meta = read_model_file(out / "best.safetensors")
    path = tmp_path / "weights.safetensors"
    expected = "do not fit"
    if case == "classes":  # 10 outputs, but 5 names
        meta["classes"] = list("abcde")
    elif case == "image_size":  # the linear layer was made for 32x32
        meta["image_size"] = 64
    elif case == "model":
        meta["model"] = "resnet"
    if case == "checkpoint":
        path, expected = out / "checkpoint.npz", "has no tinynet model metadata"
    elif case == "missing":
        path, expected = tmp_path / "nope.safetensors", "does not exist"
    elif case == "no_metadata":
        save_file(tensors, str(path))
        expected = "has no tinynet model metadata"
    else:
        save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in meta.items()})
    with pytest.raises(ModelFileError, match=expected):
        load_model(path)
    result = run_script("predict.py", "--weights", path, photos)
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    if case == "classes":
        assert "'10.weight' has shape (10, 512), the model expects (5, 512); and 1 more" in result.stderr


def test_cuda_without_a_gpu_is_a_usage_error(trained):
    if backend.gpu_available():
        pytest.skip("a GPU is present")
    out, photos, _, _ = trained
    result = run_script("predict.py", "--weights", out / "best.safetensors", "--device", "cuda", photos)
    assert result.returncode == 2 and "cuda" in result.stderr and "Traceback" not in result.stderr


def test_saved_file_round_trips_buffers_and_metadata(tmp_path):
    from tinynet.models import resnet18

    net = resnet18(4, width=8)
    net.bn1.running_mean[...] = np.arange(8)
    meta = model_metadata("resnet", net, list("wxyz"), 32, mean=[0.4, 0.5, 0.6], std=0.25)
    save_model(tmp_path / "m.safetensors", net, meta)
    with safe_open(str(tmp_path / "m.safetensors"), framework="numpy") as file:
        raw = file.metadata()
    assert json.loads(raw["classes"]) == list("wxyz") and json.loads(raw["width"]) == 8
    model, loaded = load_model(tmp_path / "m.safetensors")
    assert loaded["mean"] == [0.4, 0.5, 0.6] and loaded["std"] == [0.25] and loaded["head"] == "mlp"
    for key, value in net.state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[key], value, err_msg=key)
    assert not model.training


def test_resumed_run_keeps_the_best_weights_of_the_epochs_before_the_stop(tmp_path):
    out = tmp_path / "run"
    # lr 0.03 overshoots: validation accuracy peaks in epoch 1 (0.21), before the stop, and falls after it
    common = ("--limit", 12, "--image-size", 16, "--out", out, "--no-progress", "--lr", 0.03)
    first = run_script("train_cnn.py", "--epochs", 2, *common)
    assert first.returncode == 0, first.stderr
    before, meta_before = read_model_file(out / "best.safetensors")
    resumed = run_script("train_cnn.py", "--epochs", 4, "--resume", *common)
    assert resumed.returncode == 0, resumed.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    tensors, meta = read_model_file(out / "best.safetensors")
    assert meta["epoch"] == metrics["best_epoch"] == metrics["shipped"]["best"]["epoch"]
    assert metrics["best_epoch"] <= 2, "precondition: the best epoch comes before the stop"
    assert meta == meta_before  # the file written before the stop, untouched by the epochs after it
    for key in before:
        np.testing.assert_array_equal(tensors[key], before[key])
    assert read_model_file(out / "last.safetensors")[1]["epoch"] == 4


def test_real_photos_get_the_training_pipelines_pixels(trained):
    """WEBP named .jpg, RGBA and palette PNGs (the shared photos): the same arrays as the training decoder's."""
    from conftest import popular_animals_or_skip
    from tinynet.data import ArrayDataset
    from tinynet.data.decode import decode_all, read_file

    root = popular_animals_or_skip()
    files = [str(root / "snake" / "snake (1).jpg"), *map(str, sorted((root / "bear").iterdir())[:3])]
    _, meta = read_model_file(trained[0] / "best.safetensors")
    seen = []
    predictions = list(predict_files(lambda x: seen.append(x) or np.zeros((len(x), 10)), meta, files,
                                     progress=False))
    assert all(p.skipped is None for p in predictions)
    images, kept, skipped, _ = decode_all(files, read_file, (SIZE, SIZE))
    assert not skipped
    x, _ = next(iter(DataLoader(ArrayDataset(images, np.zeros(len(files), np.int64), ["any"]), None, len(files))))
    np.testing.assert_array_equal(seen[0], x)  # decoded, resized and normalised exactly as for training


@pytest.mark.parametrize("edit", [{"model": "resnet", "width": 10 ** 6}, {"image_size": 10 ** 6},
                                  {"classes": [str(i) for i in range(2 * 10 ** 6)]}, {"width": -3},
                                  {"image_size": True}])
def test_metadata_that_would_build_a_huge_model_is_refused_before_building(tmp_path, edit):
    """The metadata is someone else's text: it is bounded before a model is built from it."""
    import subprocess
    import sys

    from tinynet.models import resnet18

    net = resnet18(3, width=8)
    meta = {**model_metadata("resnet", net, list("abc"), 32), **edit}
    path = tmp_path / "hostile.safetensors"
    save_file({k: np.asarray(v) for k, v in net.state_dict().items()}, str(path),
              metadata={k: json.dumps(v) for k, v in meta.items()})
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
            "from tinynet.predict import ModelFileError, load_model\n"
            "try:\n    load_model(sys.argv[1])\nexcept ModelFileError as e:\n    print('refused:', e); sys.exit(0)\n"
            "sys.exit('loaded')\n")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("refused:"), result.stdout + result.stderr[-400:]
    assert len(result.stdout) < 400
