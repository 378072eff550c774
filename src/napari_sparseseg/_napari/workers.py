"""What the widget runs in napari thread workers. They only call the engine."""

from __future__ import annotations

from ..core.segment import cluster, embed, segment
from ..core.training_process import Preview, TrainJob, TrainingProcess, preview_region, train_steps

__all__ = ["Preview", "TrainJob", "TrainingProcess", "cluster", "embed", "preview_region", "segment", "train_steps"]
