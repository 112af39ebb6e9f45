"""The training loop: learning, history, checkpoints, resume (after a stop or Ctrl-C), non-finite losses."""
import numpy as np
import pytest

import tinynet
from tinynet import nn, optim
from tinynet.data import ArrayDataset, DataLoader
from tinynet.models import simple_cnn
from tinynet.train import (CheckpointError, NonFiniteLossError, TrainingInterrupted, evaluate, fit,
                           load_checkpoint, save_checkpoint)


def toy_dataset(n=96, size=16, seed=0):
    """Two classes the CNN can tell apart: bright squares top-left vs bottom-right, plus noise."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (n, size, size, 3)).astype(np.uint8)
    labels = np.arange(n) % 2
    half = size // 2
    images[labels == 0, :half, :half] += 150
    images[labels == 1, half:, half:] += 150
    return ArrayDataset(images, labels, ["top-left", "bottom-right"])


def setup(seed=0, lr=3e-3):
    tinynet.manual_seed(seed)
    data = toy_dataset()
    model = simple_cnn(2, image_size=16)
    opt = optim.Adam(model.parameters(), lr=lr)
    train = DataLoader(data, np.arange(64), batch_size=16, shuffle=True, seed=seed)
    val = DataLoader(data, np.arange(64, 96), batch_size=16)
    return model, opt, train, val


def weights(model):
    return {k: np.array(v, copy=True) for k, v in model.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_fit_learns_and_keeps_history(tmp_path):
    model, opt, train, val = setup()
    history = fit(model, opt, nn.CrossEntropyLoss(), train, val, epochs=4, checkpoint_path=tmp_path / "ckpt.npz",
                  progress=False, log=None)
    assert [e.epoch for e in history.epochs] == [1, 2, 3, 4]
    assert history.epochs[-1].train_loss < history.epochs[0].train_loss
    assert history.epochs[-1].val_acc > 0.9
    assert history.best_epoch == max(history.epochs, key=lambda e: (e.val_acc, -e.epoch)).epoch
    meta = load_checkpoint(tmp_path / "ckpt.npz", simple_cnn(2, image_size=16))
    assert meta["epoch"] == 4 and meta["batch"] == 0 and len(meta["history"]["epochs"]) == 4
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporary files
    result = evaluate(model, val, nn.CrossEntropyLoss())
    assert result["predictions"].shape == (32,) and result["accuracy"] == history.epochs[-1].val_acc


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path):
    model, opt, train, val = setup()
    fit(model, opt, nn.CrossEntropyLoss(), train, val, epochs=3, progress=False, log=None)
    straight = weights(model)

    model, opt, train, val = setup()
    fit(model, opt, nn.CrossEntropyLoss(), train, val, epochs=2, checkpoint_path=tmp_path / "c.npz",
        progress=False, log=None)
    model, opt, train, val = setup(seed=0)  # a fresh process: new model, optimizer and loaders
    history = fit(model, opt, nn.CrossEntropyLoss(), train, val, epochs=3, checkpoint_path=tmp_path / "c.npz",
                  resume=True, progress=False, log=None)
    assert [e.epoch for e in history.epochs] == [1, 2, 3]
    assert_same_weights(weights(model), straight)


class InterruptingLoader:
    """Wraps a loader and raises KeyboardInterrupt (Ctrl-C) before batch ``at`` of epoch ``epoch``."""

    def __init__(self, loader, epoch, at):
        self.loader, self.epoch, self.at = loader, epoch, at

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, e):
        self.loader.set_epoch(e)
        self.current = e

    def iter_from(self, b):
        return self.loader.iter_from(b)

    def __iter__(self):
        for b, batch in enumerate(self.loader):
            if self.current == self.epoch and b == self.at:
                raise KeyboardInterrupt
            yield batch


def test_ctrl_c_saves_mid_epoch_and_resume_continues_exactly(tmp_path):
    model, opt, train, val = setup()
    fit(model, opt, nn.CrossEntropyLoss(), train, val, epochs=3, progress=False, log=None)
    straight = weights(model)

    model, opt, train, val = setup()
    with pytest.raises(TrainingInterrupted) as info:
        fit(model, opt, nn.CrossEntropyLoss(), InterruptingLoader(train, epoch=1, at=2), val, epochs=3,
            checkpoint_path=tmp_path / "c.npz", progress=False, log=None)
    assert info.value.epoch == 1 and info.value.batch == 2
    meta = load_checkpoint(tmp_path / "c.npz", simple_cnn(2, image_size=16))
    assert (meta["epoch"], meta["batch"]) == (1, 2)

    model, opt, train, val = setup()
    history = fit(model, opt, nn.CrossEntropyLoss(), train, val, epochs=3, checkpoint_path=tmp_path / "c.npz",
                  resume=True, progress=False, log=None)
    assert [e.epoch for e in history.epochs] == [1, 2, 3]
    assert_same_weights(weights(model), straight)


class PoisonLoader(InterruptingLoader):
    """Serves NaN images in batch ``at`` of epoch ``epoch``."""

    def __iter__(self):
        for b, (x, y) in enumerate(self.loader):
            if self.current == self.epoch and b == self.at:
                x = np.full_like(x, np.nan)
            yield x, y


def test_nan_loss_stops_with_epoch_and_batch_and_keeps_last_checkpoint(tmp_path):
    model, opt, train, val = setup()
    path = tmp_path / "c.npz"
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, batch 3") as info:
        fit(model, opt, nn.CrossEntropyLoss(), PoisonLoader(train, epoch=1, at=2), val, epochs=3,
            checkpoint_path=path, progress=False, log=None)
    assert info.value.checkpoint == path
    fresh = simple_cnn(2, image_size=16)
    meta = load_checkpoint(path, fresh)  # the checkpoint of epoch 1 is intact and finite
    assert meta["epoch"] == 1
    assert all(np.all(np.isfinite(v)) for v in fresh.state_dict().values())


def test_nan_loss_skip_policy_counts_and_continues(tmp_path):
    model, opt, train, val = setup()
    history = fit(model, opt, nn.CrossEntropyLoss(), PoisonLoader(train, epoch=0, at=1), val, epochs=2,
                  on_nan="skip", progress=False, log=None)
    assert history.epochs[0].skipped_batches == 1 and history.epochs[1].skipped_batches == 0
    assert all(np.all(np.isfinite(v)) for v in model.state_dict().values())


def test_truncated_and_foreign_checkpoints_are_refused(tmp_path):
    model, opt, _, _ = setup()
    path = save_checkpoint(tmp_path / "c.npz", model, opt, epoch=1)
    data = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "cut.npz", model)
    other = simple_cnn(3, image_size=16)
    with pytest.raises(CheckpointError, match=r"(?s)different model.*shape mismatch for 10\.weight"):
        load_checkpoint(path, other)
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a tinynet checkpoint"):
        load_checkpoint(tmp_path / "plain.npz", model)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.npz", model)


def test_checkpoint_restores_optimizer_state(tmp_path):
    model, opt, train, val = setup()
    fit(model, opt, nn.CrossEntropyLoss(), train, None, epochs=1, progress=False, log=None)
    save_checkpoint(tmp_path / "c.npz", model, opt, epoch=1)
    model2, opt2, _, _ = setup(seed=5)
    load_checkpoint(tmp_path / "c.npz", model2, opt2)
    for p, q in zip(model.parameters(), model2.parameters()):
        a, b = opt.state[id(p)], opt2.state[id(q)]
        assert a["step"] == b["step"]
        np.testing.assert_array_equal(a["exp_avg"], b["exp_avg"])
        np.testing.assert_array_equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_fit_argument_errors():
    model, opt, train, val = setup()
    with pytest.raises(ValueError, match="on_nan"):
        fit(model, opt, nn.CrossEntropyLoss(), train, val, epochs=1, on_nan="ignore")
    with pytest.raises(ValueError, match="epochs"):
        fit(model, opt, nn.CrossEntropyLoss(), train, val, epochs=0)


def test_time_budget_stops_at_the_end_of_the_last_epoch_that_fits(tmp_path):
    model, opt, train, val = setup()
    lines = []
    history = fit(model, opt, nn.CrossEntropyLoss(), train, val, epochs=5, checkpoint_path=tmp_path / "ckpt.npz",
                  progress=False, log=lines.append, time_budget=1e-6)  # one epoch always runs
    assert len(history.epochs) == 1 and "time budget: stopping after epoch 1 of 5" in lines[-1]
    assert load_checkpoint(tmp_path / "ckpt.npz", simple_cnn(2, image_size=16))["epoch"] == 1
    model, opt, train, val = setup()
    history = fit(model, opt, nn.CrossEntropyLoss(), train, val, epochs=2, progress=False, log=None,
                  time_budget=3600)
    assert len(history.epochs) == 2
    with pytest.raises(ValueError, match="time_budget must be a positive number"):
        fit(model, opt, nn.CrossEntropyLoss(), train, val, epochs=1, progress=False, log=None, time_budget=0)


class FixedLogits:
    """A stand-in model whose logits are the batch itself."""
    training = False

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def __call__(self, x):
        return x


def test_evaluate_reports_top5_accuracy_with_more_than_five_classes():
    logits = np.array([[9, 8, 7, 6, 5, 0, 1],      # label 4: fifth largest, in the top 5
                       [9, 8, 7, 6, 5, 0, 1],      # label 6: sixth largest, out
                       [0, 1, 2, 3, 4, 5, 6]], dtype=np.float32)  # label 6: the largest
    result = evaluate(FixedLogits(), [(logits, np.array([4, 6, 6]))])
    assert result["accuracy"] == pytest.approx(1 / 3) and result["top5_accuracy"] == pytest.approx(2 / 3)
    assert evaluate(FixedLogits(), [(logits[:, :5], np.array([4, 0, 1]))])["top5_accuracy"] is None
    model, opt, train, val = setup()
    history = fit(model, opt, nn.CrossEntropyLoss(), train, val, epochs=1, progress=False, log=None)
    assert history.epochs[0].val_top5 is None  # two classes


def test_fit_makes_the_malloc_tuning_call_itself(monkeypatch):
    # Importing tinynet must change nothing in the process; the glibc tuning is an explicit call that fit makes.
    calls = []
    monkeypatch.setattr(tinynet.backend, "keep_freed_host_memory", lambda *a, **k: calls.append(1) or True)
    model, opt, train, val = setup()
    fit(model, opt, nn.CrossEntropyLoss(), train, None, epochs=1, progress=False, log=None)
    assert calls == [1]
