"""Training: the fit/evaluate loops and checkpoints."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .loop import EpochStats, History, NonFiniteLossError, TrainingInterrupted, evaluate, fit, predict

__all__ = ["fit", "evaluate", "predict", "History", "EpochStats", "NonFiniteLossError", "TrainingInterrupted",
           "save_checkpoint", "load_checkpoint", "CheckpointError"]
