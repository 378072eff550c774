"""What a training method provides to the method-agnostic training loop (:mod:`..training`).

The loop owns the data (zoomed samples, crops, augmentation), the optimizer and its schedule,
budgets, stopping, events and checkpoints. A method owns its networks (by role), its loss and
what it adds to a model's ``config.json``. A second method lives beside the first as another
subclass registered in :mod:`.` (``METHODS``), never as a branch inside the loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterable

import torch

from .. import checkpoint
from ..offsets import default_offsets


class Method(ABC):
    """One training method. Built by the loop with the run's settings::

        method = SpocoMethod(config, ndim, channels, offsets, device, init)

    ``init`` is a model to start from (fine-tuning or resuming), whose networks are reused.
    """

    #: the name stored as ``"method"`` in a model's config
    name: str = ""

    @staticmethod
    def default_offsets(ndim: int) -> list[list[int]]:
        """The pixel-pair offsets of a new model (affinities, mutex watershed), nearest first."""
        return default_offsets(ndim)

    def __init__(self, config, ndim: int, channels: int, offsets: list[list[int]], device: torch.device,
                 autocast_dtype: torch.dtype | None = None, init: checkpoint.Model | None = None):
        self.config = config
        self.ndim = ndim
        self.channels = channels
        self.offsets = offsets
        self.device = device
        self.autocast_dtype = autocast_dtype

    @property
    @abstractmethod
    def networks(self) -> dict[str, torch.nn.Module]:
        """The method's networks by role; the trained one is ``"f"``."""

    @property
    def divisor(self) -> tuple[int, ...]:
        """Crop sizes must be multiples of this per axis (the trained network's pooling)."""
        return self.networks["f"].divisor

    def parameters(self) -> Iterable[torch.nn.Parameter]:
        """What the optimizer updates."""
        return self.networks["f"].parameters()

    @abstractmethod
    def losses(self, image: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
               generator: torch.Generator, progress: float,
               heldout: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The loss terms of one batch (image (B, C, *P) on the CPU, labels and valid (B, *P) on
        the device), ``"loss"`` being the total to minimise; ``progress`` in [0, 1] is how far the
        run is through its budget (for schedules). ``heldout`` (B, *P) bool: pixels of objects
        held out of the foreground loss (:func:`..data.hold_out`); every other term uses them."""

    def start_heads(self, foreground: float) -> None:
        """Called once for a fresh network (not when fine-tuning or resuming) with the annotated
        share of the pixels on training crops: start a foreground head there
        (:func:`..network.set_foreground_prior`). A method without one ignores it."""

    def after_step(self, iteration: int) -> None:
        """Called after each optimizer step (e.g. to update an EMA network), never at evaluation."""

    def model_config(self) -> dict[str, Any]:
        """What this method adds to the model's ``config.json`` (network, loss, learned constants)."""
        return {"method": self.name}

    def model(self, config: dict[str, Any], optimizer_state: dict | None, path) -> checkpoint.Model:
        """The model as the checkpoint module stores it."""
        nets = self.networks
        return checkpoint.Model(net=nets["f"], ema=nets.get("g"), config=config,
                                optimizer_state=optimizer_state, path=path)


class ForegroundConstant:
    """The positive-unlabeled constant c of a foreground head: a running mean of its probability
    on annotated pixels (:func:`..losses.foreground_term`; segmentation keeps segments whose mean
    probability is a fraction of c, :func:`..segment.foreground_threshold`).

    Two means are kept: ``trained``, on the objects the head learns from, and ``heldout``, on the
    objects held out of its loss (:func:`..data.hold_out`). ``c`` is the held-out one when there is
    one: what the head gives an object it has not learned, as the objects to be found are.
    """

    #: the running mean moves by this much per step
    RATE = 0.02

    def __init__(self, trained: float | None = None, heldout: float | None = None):
        self.trained = trained
        self.heldout = heldout

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ForegroundConstant":
        fg = config.get("foreground") or {}
        return cls(fg.get("c_trained", fg.get("c")), fg.get("c_heldout"))

    @property
    def c(self) -> float | None:
        return self.heldout if self.heldout is not None else self.trained

    def to_config(self) -> dict[str, Any]:
        return {"c": self.c, "c_trained": self.trained, "c_heldout": self.heldout}

    @staticmethod
    def _mean(old: float | None, probs: torch.Tensor) -> float:
        new = float(probs.mean())
        return new if old is None else (1 - ForegroundConstant.RATE) * old + ForegroundConstant.RATE * new

    @torch.no_grad()
    def update(self, fg_logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
               heldout: torch.Tensor | None = None) -> None:
        annotated = (labels > 0) & valid
        if heldout is None:
            # a run that holds no object out (e.g. fine-tuning on two objects) has no held-out mean
            # of its own: a parent model's would calibrate this run's head on another data set
            self.heldout = None
        held = annotated & heldout if heldout is not None else torch.zeros_like(annotated)
        trained = annotated & ~held
        if trained.any():
            self.trained = self._mean(self.trained, torch.sigmoid(fg_logits[trained]))
        if held.any():
            self.heldout = self._mean(self.heldout, torch.sigmoid(fg_logits[held]))
