"""Training and evaluation of (Conv+) timm models: ``from convplus.train import TrainConfig, train, load_run``."""

from .config import TrainConfig
from .engine import TrainingDiverged, train
from .run import Run, finished_summary, load_run

__all__ = ["Run", "TrainConfig", "TrainingDiverged", "finished_summary", "load_run", "train"]
