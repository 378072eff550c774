"""Training that a viewer watches: the trainer's events with previews now and then
(:func:`train_steps`), in this process or in a child process (:class:`TrainingProcess`).

napari trains in a child process: the same event stream (progress, losses, previews, the final
event) comes through a queue, Stop takes effect after the current step, a crash in training (or in a
GPU driver) cannot take the viewer down, and the memory training held, on the GPU too, is given back
when the child ends. The model is handed over through its folder, where the child's checkpoints
are written atomically (:mod:`.checkpoint`).
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import checkpoint
from .data import require_objects
from .errors import SparseSegError
from .segment import segment
from .training import TrainConfig, TrainEvent, Trainer

__all__ = ["Preview", "TrainJob", "TrainingProcess", "preview_region", "train_steps"]

#: previews keep every PREVIEW_STRIDE-th long-range (mutex) edge of the mutex watershed
PREVIEW_STRIDE = 4
#: seconds between checks that the child is still alive while no event comes
POLL = 0.2
#: seconds a child may take to end after its last event before it is terminated
JOIN_TIMEOUT = 30.0


@dataclass
class Preview:
    """A segmentation of (a slab of) the preview image by the model at ``iteration``."""

    iteration: int
    labels: np.ndarray
    z_start: int = 0
    seconds: float = 0.0


def preview_region(image: np.ndarray, ndim: int, z: int, depth: int = 16) -> tuple[np.ndarray, int]:
    """The part of ``image`` a preview segments: the whole 2D image, or a slab of a 3D stack."""
    if ndim == 2:
        return image, 0
    z0 = int(np.clip(z - depth // 2, 0, max(0, image.shape[0] - depth)))
    return image[z0 : z0 + depth], z0


def train_steps(trainer: Trainer, preview_image=None, preview_every: float = 15.0, first_preview: float = 5.0,
                z: int = 0) -> Iterator[TrainEvent | Preview]:
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
            yield _preview(trainer, preview_image, z, ev)
            next_preview = time.perf_counter() + preview_every


def _preview(trainer: Trainer, image: np.ndarray, z: int, ev: TrainEvent) -> Preview:
    region, z0 = preview_region(image, trainer.net.ndim, z)
    was_training = trainer.net.training
    trainer.net.eval()
    try:
        # subsampled mutex edges: a preview of an early model takes 0.6 s instead of 3 s on 384x384
        labels = segment(trainer.model, region, device=str(trainer.device), strides=[PREVIEW_STRIDE] * trainer.net.ndim)
    finally:
        trainer.net.train(was_training)
    return Preview(ev.iteration, labels, z0, ev.seconds)


@dataclass
class TrainJob:
    """Everything a training run needs, as plain data that can travel to a child process.

    ``init`` is a model folder to start from: resumed (``resume=True``: optimizer and iteration
    counter too) or fine-tuned. Checkpoints go to ``out``. ``bounds``: per image, the intensities
    mapped to 0 and 1 (the regions of one large stack share the stack's; :mod:`.regions`);
    ``preview_origin``: where the preview image lies in the viewer's image, when it is a region of it.
    """

    images: list[np.ndarray]
    labels: list[np.ndarray]
    config: TrainConfig
    out: Path
    init: Path | None = None
    resume: bool = False
    names: list[str] | None = None
    ignore: list[np.ndarray | None] | None = None
    voxel_sizes: list | None = None
    preview_image: np.ndarray | None = None
    preview_every: float = 15.0
    z: int = 0
    bounds: list | None = None
    preview_origin: tuple[int, ...] | None = None

    def check(self) -> None:
        """The quick checks that need no network: raise now what the child would raise at its start."""
        require_objects(self.labels, self.config.background_id)

    def trainer(self) -> Trainer:
        init = None if self.init is None else checkpoint.load(self.init, with_optimizer=self.resume)
        return Trainer(self.images, self.labels, self.config, out=self.out, init=init, resume=self.resume,
                       names=self.names, ignore=self.ignore, voxel_sizes=self.voxel_sizes, bounds=self.bounds)

    def steps(self, trainer: Trainer) -> Iterator[TrainEvent | Preview]:
        preview = self.preview_image if self.preview_every > 0 else None
        return train_steps(trainer, preview, self.preview_every, min(5.0, self.preview_every), self.z)


@dataclass
class _Failure:
    kind: str
    message: str
    user_error: bool


def _child(job: TrainJob, events, stop) -> None:
    # Ctrl-C in the viewer's terminal reaches the whole process group: the viewer decides, via ``stop``
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        trainer = job.trainer()
        for ev in job.steps(trainer):
            events.put(ev)
            if stop.is_set():
                trainer.stop()
        events.put(None)  # the end: the final event and the last preview were sent
    except BaseException as err:  # everything reaches the viewer as a message, nothing as a crash
        events.put(_Failure(type(err).__name__, str(err), isinstance(err, SparseSegError)))


@contextmanager
def _main_left_alone():
    """Start a spawned child without it importing the parent's ``__main__``.

    A spawned child imports the parent's main script (or ``-m`` module) first, running its top
    level again: a user's script without an ``if __name__ == "__main__":`` guard would open a
    second viewer or fail. The child's target lives in this package and needs nothing from
    ``__main__``, so multiprocessing is not told about it while the child starts.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


class TrainingProcess:
    """Runs a :class:`TrainJob` in a child process; :meth:`events` yields what
    :func:`train_steps` yields in the child, and raises what training raised there."""

    def __init__(self, job: TrainJob):
        ctx = mp.get_context("spawn")  # never fork a process that holds Qt and torch threads
        self.out = Path(job.out)
        self._events = ctx.Queue()
        self._stop = ctx.Event()
        self._process = ctx.Process(target=_child, args=(job, self._events, self._stop), daemon=True,
                                    name="sparseseg-training")
        self.last: TrainEvent | None = None

    def stop(self) -> None:
        """Ask training to end after the current step (a checkpoint is then written)."""
        self._stop.set()

    @property
    def exitcode(self) -> int | None:
        return self._process.exitcode

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def events(self) -> Iterator[TrainEvent | Preview]:
        """Start the child and yield its events until the final one."""
        with _main_left_alone():
            self._process.start()
        try:
            while True:
                try:
                    ev = self._events.get(timeout=POLL)
                except queue.Empty:
                    if self._process.is_alive():
                        continue
                    try:  # it may have put its last words just before it ended
                        ev = self._events.get(timeout=POLL)
                    except queue.Empty:
                        raise SparseSegError(
                            f"the training process ended unexpectedly (exit code {self._process.exitcode}); "
                            f"the last good checkpoint in {self.out} is kept"
                        ) from None
                if isinstance(ev, _Failure):
                    if ev.user_error:
                        raise SparseSegError(ev.message)
                    raise RuntimeError(f"{ev.kind}: {ev.message}")
                if ev is None:
                    return
                if isinstance(ev, TrainEvent):
                    self.last = ev
                yield ev
        finally:
            self._stop.set()
            self._process.join(JOIN_TIMEOUT)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join()
            self._events.close()  # release the pipe and its feeder thread now, not at interpreter exit
            self._events.join_thread()

    def model(self) -> checkpoint.Model:
        """The model the child saved last (with its optimizer state, to continue training)."""
        return checkpoint.load(self.out, with_optimizer=True)
