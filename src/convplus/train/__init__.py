"""Training and evaluation of (Conv+) timm models: ``from convplus.train import TrainConfig, train``."""

from .config import TrainConfig
from .engine import TrainingDiverged, train

__all__ = ["TrainConfig", "TrainingDiverged", "train"]
