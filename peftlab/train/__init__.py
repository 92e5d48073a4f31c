"""The trainer: one loop (:mod:`peftlab.train.loop`) with its config, run directory,
checkpoints, evaluation and optimizers. It knows nothing of measurement or the CLI: whoever
measures passes :class:`TrainCallback` hooks and reads a :class:`StepRecord` per step."""

from peftlab.train.callbacks import StepRecord, TrainCallback
from peftlab.train.config import TrainConfig, apply_overrides
from peftlab.train.loop import TrainingDiverged, train

__all__ = [
    "StepRecord",
    "TrainCallback",
    "TrainConfig",
    "TrainingDiverged",
    "apply_overrides",
    "train",
]
