"""The trainer: one loop (:mod:`peftlab.train.loop`) with its config, run directory,
checkpoints, evaluation and optimizers. It knows nothing of measurement or the CLI."""

from peftlab.train.config import TrainConfig, apply_overrides
from peftlab.train.loop import TrainingDiverged, train

__all__ = ["TrainConfig", "TrainingDiverged", "apply_overrides", "train"]
