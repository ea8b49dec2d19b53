"""The shared training loop."""

from petah.train.distributed import barrier, is_main_process, setup
from petah.train.trainer import TrainConfig, Trainer, TrainResult

__all__ = ["TrainConfig", "TrainResult", "Trainer", "barrier", "is_main_process", "setup"]
