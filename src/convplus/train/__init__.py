"""Training and evaluation of (Conv+) timm models: ``from convplus.train import TrainConfig, train, load_run``."""

from .config import TrainConfig
from .engine import TrainingDiverged, train
from .run import Run, load_run

__all__ = ["Run", "TrainConfig", "TrainingDiverged", "load_run", "train"]
