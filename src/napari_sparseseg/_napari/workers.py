"""Generators that the widget runs in napari thread workers. They only call the engine."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..core.segment import cluster, embed, segment
from ..core.training import Trainer

__all__ = ["Preview", "cluster", "embed", "preview_region", "train_steps"]


#: previews keep every PREVIEW_STRIDE-th long-range (mutex) edge of the mutex watershed
PREVIEW_STRIDE = 4


@dataclass
class Preview:
    iteration: int
    labels: np.ndarray
    z_start: int = 0


def preview_region(image: np.ndarray, ndim: int, z: int, depth: int = 16) -> tuple[np.ndarray, int]:
    """The part of ``image`` a preview segments: the whole 2D image, or a slab of a 3D stack."""
    if ndim == 2:
        return image, 0
    z0 = int(np.clip(z - depth // 2, 0, max(0, image.shape[0] - depth)))
    return image[z0 : z0 + depth], z0


def train_steps(trainer: Trainer, preview_image=None, preview_every: float = 15.0, first_preview: float = 5.0,
                z: int = 0):
    """Yield every TrainEvent of the trainer, and a :class:`Preview` now and then.

    Previews come ``first_preview`` seconds after the start, then every ``preview_every`` seconds, and once
    more when training ends on its budget, so the preview layer always shows the final model. A run the
    user stopped ends without a last preview: Stop must return at once.
    """
    next_preview = time.perf_counter() + first_preview
    for ev in trainer.run():
        yield ev
        due = not ev.done and time.perf_counter() >= next_preview
        final = ev.done and ev.reason != "stopped"
        if preview_image is not None and (due or final):
            yield _preview(trainer, preview_image, z, ev.iteration)
            next_preview = time.perf_counter() + preview_every


def _preview(trainer: Trainer, image: np.ndarray, z: int, iteration: int) -> Preview:
    region, z0 = preview_region(image, trainer.net.ndim, z)
    was_training = trainer.net.training
    trainer.net.eval()
    try:
        # subsampled mutex edges: a preview of an early model takes 0.6 s instead of 3 s on 384x384
        labels = segment(trainer.model, region, device=str(trainer.device), strides=[PREVIEW_STRIDE] * trainer.net.ndim)
    finally:
        trainer.net.train(was_training)
    return Preview(iteration, labels, z0)
