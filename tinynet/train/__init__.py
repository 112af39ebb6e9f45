"""Training: the fit/evaluate loops and checkpoints."""
from .checkpoint import CheckpointError, CheckpointWriteError, load_checkpoint, save_checkpoint
from .loop import (EpochStats, History, NonFiniteLossError, NonFiniteParametersError, TrainingInterrupted, evaluate,
                   fit, predict)

__all__ = ["fit", "evaluate", "predict", "History", "EpochStats", "NonFiniteLossError", "NonFiniteParametersError",
           "TrainingInterrupted", "save_checkpoint", "load_checkpoint", "CheckpointError", "CheckpointWriteError"]
