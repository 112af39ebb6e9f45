"""What a training run did, epoch by epoch: kept by :func:`tinynet.train.fit`, saved in every checkpoint."""
from __future__ import annotations

import dataclasses

__all__ = ["EpochStats", "History"]


@dataclasses.dataclass
class EpochStats:
    epoch: int  # 1-based
    train_loss: float
    train_acc: float
    val_loss: float | None
    val_acc: float | None
    seconds: float
    images_per_second: float
    lr: float
    skipped_batches: int = 0
    val_top5: float | None = None  # with more than 5 classes


@dataclasses.dataclass
class History:
    epochs: list = dataclasses.field(default_factory=list)
    #: fit's up-front estimate of the training steps it had left, in seconds (None: too few steps to time);
    #: not saved in checkpoints: each call of fit measures its own
    estimated_seconds: float | None = dataclasses.field(default=None, compare=False)

    @property
    def best_epoch(self):
        """The epoch (1-based) with the highest validation accuracy (the first on ties), or None."""
        scored = [e for e in self.epochs if e.val_acc is not None]
        if not scored:
            return None
        return max(scored, key=lambda e: (e.val_acc, -e.epoch)).epoch

    def to_dict(self) -> dict:
        return {"epochs": [dataclasses.asdict(e) for e in self.epochs], "best_epoch": self.best_epoch}

    @classmethod
    def from_dict(cls, data) -> "History":
        return cls([EpochStats(**e) for e in (data or {}).get("epochs", [])])
