"""Ctrl-C at any point of a training step, then ``--resume``: the same bits as a run never interrupted.

A step is forward (which updates BatchNorm's running statistics and
``num_batches_tracked``), backward, then the optimizer's update of every
parameter.  SIGINT is raised (``signal.raise_signal``, delivered as a real
signal to this process) in training step 4 of 4 (the second of epoch 2), at one of three points:

- ``forward``: before the model's forward;
- ``backward``: after the forward, before the backward (BatchNorm has updated its statistics);
- ``update``: in the middle of the optimizer's update (half the parameters updated).

The run saves and exits with status 130; ``--resume`` then finishes it, and
its checkpoint (weights, BatchNorm buffers, optimizer moments) must equal the
uninterrupted run's bit for bit.  Covered: the CNN (no BatchNorm), ResNet18
and the pretraining script.
"""
import signal
import zipfile

import numpy as np
import pytest

from tinynet import experiment
from tinynet.nn.module import is_grad_enabled

from fault_inject import call_main, image_folder
from test_faults_checkpoints import assert_same_state, state_of
from test_pretrain import COLOURS, encode, load_script, picture

POINTS = ("forward", "backward", "update")
AT_STEP = 4  # epoch 2, batch 2, of 2 epochs of 2 batches: a stop mid-epoch


def batches_done(point):
    """Batches of epoch 2 the checkpoint records: a stop during the update is acted on once the step is taken."""
    return AT_STEP - 2 if point == "update" else AT_STEP - 3


def sigint_in_fit(monkeypatch, owner, point, at_step=AT_STEP):
    """Wrap ``owner.fit`` so that training step ``at_step`` (1-based, over the run) gets SIGINT at ``point``."""
    fit = owner.fit

    def fit_with_sigint(model, optimizer, *args, **kwargs):
        steps = 0
        forward, backward, update_all = model.forward, model.backward, optimizer._update_all

        def sigint(where):
            if steps == at_step and point == where:
                signal.raise_signal(signal.SIGINT)

        def counted_forward(*a, **k):
            nonlocal steps
            if model.training and is_grad_enabled():  # a training step, not a validation pass
                steps += 1
                sigint("forward")
            return forward(*a, **k)

        def interrupted_backward(*a, **k):
            sigint("backward")
            return backward(*a, **k)

        def half_update(items):
            update_all(items[:len(items) // 2])
            sigint("update")
            update_all(items[len(items) // 2:])

        object.__setattr__(model, "forward", counted_forward)
        object.__setattr__(model, "backward", interrupted_backward)
        optimizer._update_all = half_update
        return fit(model, optimizer, *args, **kwargs)

    monkeypatch.setattr(owner, "fit", fit_with_sigint)


# ---------------------------------------------------------------------------
# train_cnn.py and train_resnet.py
# ---------------------------------------------------------------------------
RUNS = {"cnn": ("--epochs", "2", "--batch-size", "7", "--image-size", "16", "--no-progress"),
        "resnet": ("--epochs", "2", "--batch-size", "7", "--image-size", "32", "--limit", "10", "--no-tsne",
                   "--no-progress")}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("midstep") / "data")  # 14 training images: 2 batches of 7


@pytest.fixture(scope="module")
def straight(folder, tmp_path_factory):
    """``{model: the final checkpoint's arrays}`` of uninterrupted runs."""
    states = {}
    for model, args in RUNS.items():
        out = tmp_path_factory.mktemp(f"straight-{model}")
        status = experiment.main(model, ["--data", str(folder), "--out", str(out), *args])
        assert status == 0
        states[model] = state_of(out / "checkpoint.npz")
    return states


# Before the forward nothing has changed yet: that point is checked on the quick CNN only.
@pytest.mark.parametrize("model, point", [("cnn", point) for point in POINTS] +
                         [("resnet", point) for point in POINTS[1:]])
def test_sigint_mid_step_then_resume_is_bit_identical(model, point, folder, straight, tmp_path, capsys,
                                                      monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        sigint_in_fit(patch, experiment, point)
        status, _, err = call_main(capsys, model, "--data", folder, "--out", out, *RUNS[model])
    assert status == 130, err
    assert f"interrupted in epoch 2 after {batches_done(point)} batches" in err
    status, stdout, err = call_main(capsys, model, "--data", folder, "--out", out, *RUNS[model], "--resume")
    assert status == 0, err
    assert f"continuing at epoch 2, batch {batches_done(point) + 1} of 2" in stdout
    # Before the fix: after "backward", ResNet18's num_batches_tracked was one ahead and its running statistics
    # differed; after "update", half of the parameters had taken the step twice (both models).
    assert_same_state(state_of(out / "checkpoint.npz"), straight[model])


# ---------------------------------------------------------------------------
# pretrain_resnet.py
# ---------------------------------------------------------------------------
PRETRAIN = ["--epochs", "2", "--batch-size", "8", "--lr", "0.01", "--no-progress"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A Tiny-ImageNet-like zip: 2 classes of 8 training (2 batches of 8) and 4 validation images."""
    path = tmp_path_factory.mktemp("midstep-pretrain") / "tiny.zip"
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zipped:
        for c, colour in enumerate(list(COLOURS.values())[:2]):
            for split, count in (("train", 8), ("val", 4)):
                for k in range(count):
                    zipped.writestr(f"{split}/n0{c}/{k}.JPEG", encode(picture(colour, rng), "JPEG"))
    return path


@pytest.fixture(scope="module")
def script():
    """The script, its speed measurement (seconds of throwaway steps, not what is tested here) replaced."""
    module = load_script()
    module.measure_speed = lambda args, train_loader, val_loader, num_classes: {
        "loader_images_per_second": 1000.0, "step_images_per_second": 100.0, "eval_images_per_second": 300.0,
        "batch_size": args.batch_size, "image_size": args.size}
    return module


@pytest.fixture(scope="module")
def straight_pretraining(archive, script, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight-pretrain")
    assert script.main(["--data", str(archive), "--out", str(out), *PRETRAIN]) == 0
    return state_of(out / "checkpoint.npz")


@pytest.mark.parametrize("point", POINTS[1:])
def test_pretraining_sigint_mid_step_then_resume_is_bit_identical(point, archive, script, straight_pretraining,
                                                                 tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        sigint_in_fit(patch, script, point)
        assert script.main(["--data", str(archive), "--out", str(out), *PRETRAIN]) == 130
    assert f"interrupted in epoch 2 after {batches_done(point)} batches" in capsys.readouterr().err
    assert script.main(["--data", str(archive), "--out", str(out), *PRETRAIN, "--resume"]) == 0
    assert f"continuing at epoch 2, batch {batches_done(point) + 1} of 2" in capsys.readouterr().out
    # Before the fix (the report): num_batches_tracked one ahead, other running statistics.
    assert_same_state(state_of(out / "checkpoint.npz"), straight_pretraining)
