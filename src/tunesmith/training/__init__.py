"""The one training loop and what it needs: optimiser, schedule, checkpoints, metrics."""

from tunesmith.training.loop import EXIT_INTERRUPTED, TrainResult, train

__all__ = ["EXIT_INTERRUPTED", "TrainResult", "train"]
