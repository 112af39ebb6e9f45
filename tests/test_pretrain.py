"""examples/pretrain_resnet.py on a small archive built here: pretraining, the saved weights, fine-tuning from them.

The archive holds 4 classes of 32x32 JPEGs told apart by their colour (a few
hundred images, learnt in two short epochs), plus a corrupt member; the
fine-tuning photos are PNGs of the same four colours in class folders.
"""
import importlib.util
import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from tinynet import optim
from tinynet.io import load_weights
from tinynet.models import resnet18

from test_examples import ROOT, run_script

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200), "yellow": (210, 200, 40)}
PRETRAIN = ["--epochs", "2", "--batch-size", "16", "--lr", "0.01", "--no-progress"]


def picture(colour, rng, size=32):
    """A photo-like image of ``colour``: jittered, shaded in 4x4 blocks, with pixel noise."""
    base = np.array(colour, float) + rng.uniform(-40, 40, 3)
    shade = rng.uniform(0.5, 1.2, (size // 4, size // 4, 1)).repeat(4, 0).repeat(4, 1)
    return np.clip(base * shade + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)


def encode(image, fmt):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """``(archive, photos)``: a Tiny-ImageNet-like zip (64 + 16 images per class) and a class-folder set (20 per class)."""
    root = tmp_path_factory.mktemp("pretrain-data")
    rng = np.random.default_rng(0)
    archive = root / "tiny.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zipped:
        for c, colour in enumerate(COLOURS.values()):
            for split, count in (("train", 64), ("val", 16)):
                for k in range(count):
                    zipped.writestr(f"{split}/n0{c}/{k}.JPEG", encode(picture(colour, rng), "JPEG"))
        zipped.writestr("train/n00/broken.JPEG", b"\xff\xd8\xff\xe0 not a JPEG after all")
    photos = root / "photos"
    for name, colour in COLOURS.items():
        (photos / name).mkdir(parents=True)
        for k in range(20):
            (photos / name / f"{k}.png").write_bytes(encode(picture(colour, rng), "PNG"))
    return archive, photos


@pytest.fixture(scope="module")
def pretrained(data, tmp_path_factory):
    """One two-epoch pretraining run: ``(out folder, its stdout)``."""
    out = tmp_path_factory.mktemp("pretrain-run")
    result = run_script("pretrain_resnet.py", "--data", data[0], "--out", out, *PRETRAIN)
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_pretraining_learns_reports_and_saves_weights_with_a_record(pretrained):
    out, stdout = pretrained
    assert "broken.JPEG" in stdout and "1 files skipped" in stdout  # the corrupt member, skipped and named
    assert "it never starves the step" in stdout
    summary = json.loads((out / "resnet18-tinyimagenet-32px.json").read_text())
    assert summary["epochs"] == 2 and len(summary["history"]["epochs"]) == 2
    assert summary["data"] == {**summary["data"], "train_images": 256, "val_images": 64, "classes": 4}
    assert summary["recipe"]["batch_size"] == 16 and summary["recipe"]["weight_decay"] == 5e-4
    assert summary["val_top1"] > 0.5  # chance is 0.25
    assert summary["val_top5"] is None  # 4 classes: top-5 says nothing
    speed = summary["speed"]
    assert speed["loader_images_per_second"] > speed["step_images_per_second"] > 0
    weights = load_weights(out / "resnet18-tinyimagenet-32px.npz")
    assert weights.keys() == resnet18(4, head="linear").state_dict().keys()
    assert (out / "checkpoint.npz").exists() and json.loads((out / "plan.json").read_text())["epochs"] == 2


def test_fine_tuning_from_the_weights_starts_better_than_from_scratch(pretrained, data, tmp_path):
    out, _ = pretrained
    first_epoch = {}
    for name, extra in (("scratch", []), ("pretrained", ["--pretrained", out / "resnet18-tinyimagenet-32px.npz"])):
        result = run_script("train_resnet.py", "--data", data[1], "--epochs", "1", "--batch-size", "32",
                            "--image-size", "32", "--no-tsne", "--no-progress", "--out", tmp_path / name, *extra)
        assert result.returncode == 0, result.stderr
        first_epoch[name] = json.loads((tmp_path / name / "metrics.json").read_text())["history"]["epochs"][0]
        if name == "pretrained":
            assert "loaded 120 of the backbone's tensors" in result.stdout
            assert "ignored from the file: fc.* (the file's own head, if it has one)" in result.stdout
    # The same seed gives both runs the same head and batches: only the backbone differs.
    assert first_epoch["pretrained"]["val_loss"] < first_epoch["scratch"]["val_loss"] / 3
    assert first_epoch["pretrained"]["val_acc"] >= first_epoch["scratch"]["val_acc"]


def test_resume_keeps_the_plan_and_a_changed_recipe_is_refused(pretrained, data):
    out, _ = pretrained
    before = load_weights(out / "resnet18-tinyimagenet-32px.npz")
    result = run_script("pretrain_resnet.py", "--data", data[0], "--out", out, *PRETRAIN, "--resume")
    assert result.returncode == 0, result.stderr
    assert "annealed over 2 epochs" in result.stdout and "resumed from" in result.stdout
    after = load_weights(out / "resnet18-tinyimagenet-32px.npz")
    for key in before:
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    result = run_script("pretrain_resnet.py", "--data", data[0], "--out", out, *PRETRAIN, "--resume",
                        "--weight-decay", "1e-4")
    assert result.returncode == 2 and "weight_decay = 0.0005" in result.stderr
    # More epochs would stretch the cosine that the first epochs followed: refused too (before the fix: the plan's
    # 2 epochs ran while --epochs 3 was asked for, without a word).
    more = [*PRETRAIN[:1], "3", *PRETRAIN[2:]]
    result = run_script("pretrain_resnet.py", "--data", data[0], "--out", out, *more, "--resume")
    assert result.returncode == 2 and "was started with epochs = 2, this one has 3" in result.stderr


@pytest.mark.parametrize("damage", [b"{\"epochs\": 2, \"reci", b'{"epochs": "two", "recipe": {}}'],
                         ids=["truncated", "bad-epochs"])
def test_resume_with_a_damaged_plan_is_one_line_exit_2(pretrained, data, tmp_path, damage):
    out, _ = pretrained
    copy = tmp_path / "out"
    copy.mkdir()
    for name in ("checkpoint.npz", "tinyimagenet-train-32px.npz", "tinyimagenet-val-32px.npz"):
        (copy / name).write_bytes((out / name).read_bytes())
    (copy / "plan.json").write_bytes(damage)
    result = run_script("pretrain_resnet.py", "--data", data[0], "--out", copy, *PRETRAIN, "--resume")
    assert result.returncode == 2, result.stderr  # before the fix: a JSONDecodeError or KeyError traceback
    assert f"--resume: {str(copy / 'plan.json')!r} is damaged" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args,message", [
    (["--data", "/nonexistent/tiny.zip"], "Tiny-ImageNet archive '/nonexistent/tiny.zip' does not exist"),
    (["--save", "weights.pth"], "--save must name an .npz or .safetensors file"),
    (["--padding", "40"], "--padding must lie in 0..32"),
    (["--time-budget", "0"], "--time-budget must be a positive number"),
    (["--batch-size", "1000"], "--batch-size 1000 is larger than the 256 training images"),
    (["--time-budget", "0.0001"], "holds no epoch"),
    (["--seed", "-1"], "--seed must lie in 0..4294967295, got -1"),
    (["--size", "4096"], "--size must lie in 1..512 pixels, got 4096"),
    (["--batch-size", "1"], "--batch-size 1: ResNet18's BatchNorm layers cannot train on one image at a time"),
])
def test_usage_errors_are_one_line_with_status_2(args, message, data, tmp_path):
    result = run_script("pretrain_resnet.py", "--data", data[0], "--out", tmp_path, *PRETRAIN, *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def load_script():
    spec = importlib.util.spec_from_file_location("pretrain_resnet", ROOT / "examples" / "pretrain_resnet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_deadline_cosine_shortens_the_schedule_to_the_epochs_that_fit(monkeypatch):
    script = load_script()
    clock = iter([0.0, 10.0, 30.0, 40.0, 50.0, 60.0])  # epochs of 10, 20, 10, 10, 10 seconds
    monkeypatch.setattr(script.time, "perf_counter", lambda: next(clock))
    changes = []
    opt = optim.SGD(resnet18(2, width=2).parameters(), lr=0.1)
    scheduler = script.DeadlineCosine(opt, T_max=10, deadline=75.0, on_change=changes.append)
    scheduler.step()  # at 10 s: 65 s left, 6 more epochs of 10 s fit: 7 < 10
    assert scheduler.T_max == 7 and changes == [7]
    scheduler.step()  # at 30 s: the longest epoch is now 20 s; 45 s left: 2 more fit
    assert scheduler.T_max == 4 and changes == [7, 4]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * (1 + np.cos(np.pi * 2 / 4)))
    scheduler.step()  # at 40 s: 35 s left, 1 more of 20 s fits: 4 epochs, as planned
    assert scheduler.T_max == 4 and opt.param_groups[0]["lr"] == pytest.approx(0.05 * (1 + np.cos(np.pi * 3 / 4)))
    for _ in range(2):
        scheduler.step()  # at 4 epochs the rate reaches 0, and past them it stays there, never rises again
        assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert changes == [7, 4]
