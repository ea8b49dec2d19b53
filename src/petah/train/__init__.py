"""The shared training loop."""

from petah.train.trainer import TrainConfig, Trainer, TrainResult, is_main_process

__all__ = ["TrainConfig", "TrainResult", "Trainer", "is_main_process"]
