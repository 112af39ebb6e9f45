"""Run tracking: Weights & Biases and TensorBoard, both optional.

The assignment logged its runs to Weights & Biases.  ``--wandb PROJECT`` does
the same here, and ``--tensorboard`` writes TensorBoard event files; both go
through one small interface that the experiment calls:

    trackers = Trackers.from_args(args, config, out)   # nothing enabled: every call does nothing
    fit(..., on_epoch_end=trackers.on_epoch_end)        # every epoch's metrics
    trackers.log_figures({"curves": "runs/cnn/curves.png", ...})
    trackers.log_confusion_matrix(labels, predictions, classes)
    trackers.log_summary({"test/last/accuracy": 0.91, ...})
    trackers.finish()

What is logged, with the epoch (1-based) as the step:

- ``train/loss``, ``train/accuracy``, ``val/loss``, ``val/accuracy``,
  ``val/top5_accuracy`` (more than 5 classes), ``lr``, ``seconds``,
  ``images_per_second``;
- at the end, the figures (W&B: images; TensorBoard: not, its scalars only),
  the test confusion matrix (W&B's interactive matrix) and the test numbers
  (W&B's run summary; TensorBoard: scalars at the last step).

W&B runs offline (files under ``<out>/wandb``, to upload later with ``wandb
sync``) unless the user has logged in (``wandb login``) or chose a mode with
the ``WANDB_MODE`` environment variable.  Both packages are the optional
extra ``track`` (``pip install -e ".[track]"`` from the checkout) and imported only when
asked for.
"""
from __future__ import annotations

import os
import pathlib

__all__ = ["Trackers", "WandbTracker", "TensorBoardTracker", "TrackingUnavailable", "epoch_scalars"]


class TrackingUnavailable(RuntimeError):
    """A tracker was asked for but its package is not installed."""


def _require(module: str, flag: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise TrackingUnavailable(f"{flag} needs the {module} package, which is not installed: "
                                  f"pip install -e \".[track]\" in the tinynet checkout (or pip install {module})") from None


def epoch_scalars(stats) -> dict:
    """One epoch's numbers (an :class:`~tinynet.train.EpochStats`) under tracker names; None values left out."""
    named = {"train/loss": stats.train_loss, "train/accuracy": stats.train_acc, "val/loss": stats.val_loss,
             "val/accuracy": stats.val_acc, "val/top5_accuracy": stats.val_top5, "lr": stats.lr,
             "seconds": stats.seconds, "images_per_second": stats.images_per_second}
    return {key: float(value) for key, value in named.items() if value is not None}


class WandbTracker:
    """Weights & Biases: one run per training run, offline unless the user is logged in."""

    def __init__(self, project: str, config: dict, out, name: str | None = None):
        wandb = _require("wandb", "--wandb")
        self.wandb = wandb
        mode = None  # WANDB_MODE set: wandb follows it
        if not os.environ.get("WANDB_MODE"):
            # Asks for no key and never prompts: True only if credentials are already configured.
            mode = "online" if wandb.login(prompt=False, verify=False) else "offline"
        folder = pathlib.Path(os.environ.get("WANDB_DIR") or out)
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, config=config, dir=str(folder), name=name, mode=mode,
                              reinit="finish_previous")
        self.mode = "offline" if self.run.settings._offline else "online"

    def log_epoch(self, step: int, scalars: dict) -> None:
        self.run.log({**scalars, "epoch": step}, step=step)

    def log_figures(self, figures: dict) -> None:
        self.run.log({f"figures/{name}": self.wandb.Image(str(path)) for name, path in figures.items()})

    def log_confusion_matrix(self, labels, predictions, classes) -> None:
        matrix = self.wandb.plot.confusion_matrix(y_true=[int(v) for v in labels], preds=[int(v) for v in predictions],
                                                  class_names=list(classes), title="Test set")
        self.run.log({"test/confusion_matrix": matrix})

    def log_summary(self, summary: dict) -> None:
        for key, value in summary.items():
            self.run.summary[key] = value

    def finish(self) -> None:
        self.run.finish()


class TensorBoardTracker:
    """TensorBoard scalar event files (tensorboardX's writer) in ``<out>/tensorboard``."""

    def __init__(self, logdir):
        tensorboardX = _require("tensorboardX", "--tensorboard")
        self.logdir = pathlib.Path(logdir)
        self.writer = tensorboardX.SummaryWriter(str(self.logdir))
        self.step = 0

    def log_epoch(self, step: int, scalars: dict) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.step = step
        self.writer.flush()

    def log_figures(self, figures: dict) -> None:
        pass  # scalars only: the figures are in the run folder and in report.html

    def log_confusion_matrix(self, labels, predictions, classes) -> None:
        pass

    def log_summary(self, summary: dict) -> None:
        for key, value in summary.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, float(value), self.step)

    def finish(self) -> None:
        self.writer.close()


class Trackers:
    """The trackers of one run; every call goes to each of them (none: nothing happens)."""

    def __init__(self, trackers=()):
        self.trackers = list(trackers)

    @classmethod
    def from_args(cls, args, config: dict, out) -> "Trackers":
        """Trackers for ``args.wandb`` (a project name or None) and ``args.tensorboard`` (a flag)."""
        out = pathlib.Path(out)
        trackers = []
        if getattr(args, "tensorboard", False):
            trackers.append(TensorBoardTracker(out / "tensorboard"))
        if getattr(args, "wandb", None):
            trackers.append(WandbTracker(args.wandb, config, out, name=out.name))
        return cls(trackers)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def describe(self) -> str:
        parts = []
        for tracker in self.trackers:
            if isinstance(tracker, WandbTracker):
                parts.append(f"W&B run {tracker.run.name!r} ({tracker.mode}) in {pathlib.Path(tracker.run.dir).parent}")
            else:
                parts.append(f"TensorBoard event files in {tracker.logdir}")
        return "; ".join(parts)

    def on_epoch_end(self, stats, model=None, history=None) -> None:
        """A :func:`~tinynet.train.fit` ``on_epoch_end`` callback: logs the epoch's scalars."""
        scalars = epoch_scalars(stats)
        for tracker in self.trackers:
            tracker.log_epoch(stats.epoch, scalars)

    def log_figures(self, figures: dict) -> None:
        for tracker in self.trackers:
            tracker.log_figures(figures)

    def log_confusion_matrix(self, labels, predictions, classes) -> None:
        for tracker in self.trackers:
            tracker.log_confusion_matrix(labels, predictions, classes)

    def log_summary(self, summary: dict) -> None:
        for tracker in self.trackers:
            tracker.log_summary(summary)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()

    def log_run(self, result: dict, out, labels, predictions) -> None:
        """At the end of a run: its figures, the test confusion matrix and test numbers; then finish."""
        if not self.trackers:
            return
        out = pathlib.Path(out)
        self.log_figures({name.rsplit(".", 1)[0]: out / name for name in result.get("figures", [])})
        self.log_confusion_matrix(labels, predictions, result["classes"])
        summary = {"test/accuracy": result["test"]["accuracy"], "test/f1_weighted": result["test"]["f1_weighted"],
                   "best_epoch": result.get("best_epoch")}
        for kind, entry in (result.get("shipped") or {}).items():
            if entry:
                summary.update({f"test/{kind}/accuracy": entry["accuracy"],
                                f"test/{kind}/f1_weighted": entry["f1_weighted"], f"test/{kind}/epoch": entry["epoch"]})
        self.log_summary({key: value for key, value in summary.items() if value is not None})
        self.finish()
