"""The SPOCO training loop, as a generator of progress events that a caller can watch and stop.

The command line, the napari thread worker and the tests all consume :meth:`Trainer.run`;
:meth:`Trainer.stop` takes effect at the next step. A checkpoint is written every
``checkpoint_every`` seconds and whenever the loop ends (finished, stopped, interrupted, crashed),
so a model folder always holds the last good state.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from . import checkpoint
from .clustering import default_offsets
from .data import CropSampler, auto_scale, photometric, prepare
from .errors import SparseSegError
from .io import normalize, to_channels_first
from .losses import SpocoLossConfig, spoco_loss
from .network import UNet, ema_update, make_ema, split_output

#: default coordinate scale for sparse labels (TrainConfig.coord_scale)
SPATIAL_SCALE = 0.125
#: used when neither an iteration count nor a time limit is given
DEFAULT_ITERATIONS = 5000
NORMALIZATION = {"type": "percentile", "low": 1.0, "high": 99.8}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA if present, else Apple MPS, else CPU. An unavailable device is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SparseSegError(f"device {device!r}: no CUDA GPU is available here; use --device cpu or auto")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise SparseSegError(f"device {device!r}: expected auto, cpu, cuda (or cuda:N) or mps")
    return torch.device(device)


@dataclass
class TrainConfig:
    """What to train and for how long. ``None`` for both limits means DEFAULT_ITERATIONS."""

    iterations: int | None = None
    time_limit: float | None = None
    batch_size: int = 2
    patch_shape: tuple[int, ...] | None = None
    lr: float = 1e-3
    weight_decay: float = 1e-5
    seed: int = 0
    device: str = "auto"
    ema_momentum: float = 0.999
    background_id: int | None = None
    scale: float | None = None
    base_channels: int = 16
    depth: int = 4
    #: coordinate channels added to the embeddings, in embedding units per pixel at the model's scale
    #: ("spatial embeddings"): objects are ~32 px across there, so 1/8 puts neighbouring object
    #: centres ~4 units (2 dd) apart. Measured on CVPPP@0.1 against 0 and 1/16 (docs/benchmarks.md).
    #: None: 1/8 for sparse labels; 0 with a background label, whose one "object" spans the image
    #: and could not be pulled together in coordinate space
    coord_scale: float | None = None
    #: "replicate" gives the network no cue of where a crop's border is ("zeros" does)
    padding_mode: str = "replicate"
    #: a foreground head trained positive-unlabeled (losses.foreground_term); sparse labels only
    foreground: bool = True
    elastic: bool = True
    checkpoint_every: float = 60.0
    loss: SpocoLossConfig = field(default_factory=SpocoLossConfig)

    def __post_init__(self):
        if isinstance(self.loss, dict):
            self.loss = SpocoLossConfig(**self.loss)
        if self.iterations is not None and self.iterations < 1:
            raise SparseSegError(f"iterations must be >= 1, got {self.iterations}")
        if self.time_limit is not None and self.time_limit <= 0:
            raise SparseSegError(f"time limit must be > 0 seconds, got {self.time_limit}")
        if self.batch_size < 1:
            raise SparseSegError(f"batch size must be >= 1, got {self.batch_size}")
        if self.scale is not None and not 0 < self.scale <= 1:
            raise SparseSegError(f"scale must be in (0, 1], got {self.scale}")


@dataclass
class TrainEvent:
    """Progress after one optimiser step."""

    iteration: int
    total: int | None
    seconds: float
    losses: dict[str, float]
    lr: float
    progress: float
    checkpoint: Path | None = None
    done: bool = False
    reason: str = ""


def object_areas(labels: np.ndarray, background_id: int | None = None) -> np.ndarray:
    """Pixel counts of the annotated objects (the background label excluded)."""
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    if background_id is not None and background_id < counts.size:
        counts[background_id] = 0
    return counts[counts > 0]


def _patch_shape(ndim: int, shapes: list[tuple[int, ...]], divisor: tuple[int, ...]) -> tuple[int, ...]:
    # objects are brought to ~32 px across (auto scale): a 128 px crop holds a few with context
    default = (128, 128) if ndim == 2 else (32, 96, 96)
    biggest = np.max(np.array(shapes), axis=0)
    return tuple(int(math.ceil(min(d, b) / v) * v) for d, b, v in zip(default, biggest, divisor))


class Trainer:
    """Trains SPOCO on sparse labels. Images: arrays (Y, X[, C]) or (Z, Y, X[, C]) / (C, ...);
    labels: (Y, X) or (Z, Y, X) integer arrays, 0 = unlabeled.

    ``init`` is a model to start from: to continue training it (``resume=True``, optimizer and
    iteration counter restored) or to fine-tune it on new data (new optimizer).
    """

    def __init__(
        self,
        images: list[np.ndarray],
        labels: list[np.ndarray],
        config: TrainConfig | None = None,
        out: str | Path | None = None,
        init: checkpoint.Model | None = None,
        resume: bool = False,
        names: list[str] | None = None,
    ):
        self.config = config or TrainConfig()
        cfg = self.config
        if len(images) == 0:
            raise SparseSegError("no training image given")
        if len(images) != len(labels):
            raise SparseSegError(f"{len(images)} image(s) but {len(labels)} label image(s); they must pair up")
        names = names or [f"image {i}" for i in range(len(images))]
        ndim = labels[0].ndim
        if ndim not in (2, 3):
            raise SparseSegError(f"{names[0]}: labels must be 2D or 3D, got shape {labels[0].shape}")
        for lab, name in zip(labels, names):
            if lab.ndim != ndim:
                raise SparseSegError(f"{name}: labels are {lab.ndim}D but {names[0]} is {ndim}D; mix no dimensionalities")
        chans = None if init is None else init.in_channels
        imgs = [to_channels_first(img, ndim, name, chans) for img, name in zip(images, names)]
        channels = imgs[0].shape[0]
        for img, name in zip(imgs, names):
            if img.shape[0] != channels:
                raise SparseSegError(f"{name}: has {img.shape[0]} channel(s) but {names[0]} has {channels}")
        if init is not None:
            checkpoint.check_compatible(init.config, ndim, channels, names[0])
        self.device = resolve_device(cfg.device)
        norm = NORMALIZATION if init is None else init.config["normalization"]
        imgs = [normalize(img, norm["low"], norm["high"]) for img in imgs]
        if init is not None:
            scale = float(init.config["scale"])
        else:
            scale = cfg.scale if cfg.scale is not None else auto_scale(labels)
        self.samples = prepare(imgs, labels, scale, cfg.background_id, names)
        areas = np.concatenate([object_areas(lab, cfg.background_id) for lab in labels])
        torch.manual_seed(cfg.seed)
        if init is not None:
            self.net = init.net
            self.ema = init.ema if init.ema is not None else make_ema(init.net)
            net_cfg = init.config["network"]
        else:
            # with a background label the largest-segment rule finds background; no foreground head
            coord_scale = cfg.coord_scale if cfg.coord_scale is not None else (SPATIAL_SCALE if cfg.background_id is None else 0.0)
            self.net = UNet(ndim, channels, 16, cfg.base_channels, cfg.depth, coord_scale=coord_scale,
                            padding_mode=cfg.padding_mode, foreground=cfg.foreground and cfg.background_id is None)
            self.ema = make_ema(self.net)
            net_cfg = self.net.config
        self.net.to(self.device).train()
        self.ema.to(self.device).eval()
        self.patch = cfg.patch_shape or _patch_shape(ndim, [s.labels.shape for s in self.samples], self.net.divisor)
        if any(p % d for p, d in zip(self.patch, self.net.divisor)):
            raise SparseSegError(f"patch shape {self.patch} must be a multiple of {self.net.divisor} per axis")
        self.sampler = CropSampler(self.samples, self.patch, seed=cfg.seed, elastic=cfg.elastic)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.iteration = 0
        self.seconds = 0.0
        if resume and init is not None:
            state = init.config.get("training", {})
            self.iteration = int(state.get("iteration", 0))
            self.seconds = float(state.get("seconds", 0.0))
            if init.optimizer_state is not None:
                self.optimizer.load_state_dict(init.optimizer_state)
                for group in self.optimizer.param_groups:
                    group["lr"] = cfg.lr
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.out = Path(out) if out is not None else None
        self.model_config: dict[str, Any] = {
            "network": net_cfg,
            "method": "spoco",
            "loss": self.config.loss.to_dict(),
            "normalization": dict(norm),
            "scale": scale,
            "patch_shape": list(self.patch),
            "offsets": default_offsets(ndim),
            "object_area_median": float(np.median(areas)) if areas.size else None,
            "background_id": cfg.background_id,
            "training": {},
        }
        if init is not None:
            self.model_config["parent"] = str(init.path) if init.path else None
        self._stop = False
        self.last_losses: dict[str, float] = {}
        #: running mean of the foreground probability over annotated pixels (the PU constant c)
        self.fg_c: float | None = (init.config.get("foreground") or {}).get("c") if init is not None else None

    # -- control -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to end after the current step (a checkpoint is then written)."""
        self._stop = True

    def limits(self) -> tuple[int | None, float | None]:
        """(iterations, seconds) this run stops at; DEFAULT_ITERATIONS when neither is set."""
        cfg = self.config
        if cfg.iterations is None and cfg.time_limit is None:
            return DEFAULT_ITERATIONS, None
        return cfg.iterations, cfg.time_limit

    def _lr(self, progress: float) -> float:
        # cosine decay to 5 % over the run's budget (iterations or time, whichever is nearer)
        return self.config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    def _momentum(self, it: int) -> float:
        # ramp up so that g tracks f early on; capped at the configured m (0.999)
        return min(self.config.ema_momentum, (1 + it) / (10 + it))

    @property
    def model(self) -> checkpoint.Model:
        config = dict(self.model_config)
        config["training"] = {
            "iteration": self.iteration,
            "seconds": round(self.seconds, 2),
            "train_config": {k: v for k, v in asdict(self.config).items() if k != "loss"},
            "last_losses": self.last_losses,
        }
        if self.net.config.get("foreground"):
            config["foreground"] = {"c": self.fg_c}
        return checkpoint.Model(
            net=self.net, ema=self.ema, config=config, optimizer_state=self.optimizer.state_dict(), path=self.out
        )

    def save(self, folder: str | Path | None = None) -> Path | None:
        folder = folder or self.out
        if folder is None:
            return None
        return checkpoint.save(folder, self.model)

    # -- the loop ------------------------------------------------------------------------------
    def step(self) -> dict[str, float]:
        """One optimiser step on a fresh batch; returns the loss terms."""
        img, lab, val = self.sampler.batch(self.config.batch_size)
        x_f = photometric(img, self.generator).to(self.device)
        x_g = photometric(img, self.generator).to(self.device)
        lab, val = lab.to(self.device), val.to(self.device)
        emb_f, fg = split_output(self.net(x_f), self.net.config)
        with torch.no_grad():
            emb_g, _ = split_output(self.ema(x_g), self.net.config)
        terms = spoco_loss(emb_f, emb_g, lab, val, self.config.loss, self.generator, fg_logits=fg)
        if fg is not None:
            with torch.no_grad():
                annotated = (lab > 0) & val
                if annotated.any():
                    c = float(torch.sigmoid(fg[annotated]).mean())
                    self.fg_c = c if self.fg_c is None else 0.98 * self.fg_c + 0.02 * c
        loss = terms["loss"]
        if not torch.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError("non-finite loss")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        ema_update(self.ema, self.net, self._momentum(self.iteration))
        return {k: float(v.detach()) for k, v in terms.items()}

    def run(self) -> Iterator[TrainEvent]:
        """Train until the iteration or time budget is spent or :meth:`stop` is called."""
        iters, time_limit = self.limits()
        start_it, start_s = self.iteration, self.seconds
        t0 = time.perf_counter()
        last_ckpt = t0
        bad_steps = 0
        reason = ""
        self._stop = False
        def progress_at(now: float) -> float:
            return min(1.0, max((self.iteration - start_it) / iters if iters else 0.0,
                                (now - t0) / time_limit if time_limit else 0.0))

        try:
            while True:
                done_its = self.iteration - start_it
                elapsed = time.perf_counter() - t0
                if self._stop:
                    reason = "stopped"
                    break
                if iters is not None and done_its >= iters:
                    reason = "iterations"
                    break
                if time_limit is not None and elapsed >= time_limit:
                    reason = "time limit"
                    break
                lr = self._lr(progress_at(time.perf_counter()))
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                try:
                    losses = self.step()
                    bad_steps = 0
                except FloatingPointError:
                    bad_steps += 1
                    if bad_steps >= 10:
                        raise SparseSegError(
                            "training diverged (10 non-finite losses in a row); the last good checkpoint "
                            "is kept; try a lower learning rate"
                        ) from None
                    continue
                self.iteration += 1
                self.last_losses = losses
                now = time.perf_counter()
                self.seconds = start_s + (now - t0)
                ckpt = None
                if self.out is not None and now - last_ckpt >= self.config.checkpoint_every:
                    ckpt = self.save()
                    last_ckpt = time.perf_counter()
                yield TrainEvent(
                    iteration=self.iteration,
                    total=(start_it + iters) if iters else None,
                    seconds=self.seconds,
                    losses=losses,
                    lr=lr,
                    progress=progress_at(now),
                    checkpoint=ckpt,
                )
        finally:
            # also on Ctrl-C, generator close and errors: keep the last good state
            self.seconds = start_s + (time.perf_counter() - t0)
            ckpt = self.save() if self.iteration > start_it or self.out is not None else None
        yield TrainEvent(
            iteration=self.iteration, total=None, seconds=self.seconds, losses=self.last_losses,
            lr=self.optimizer.param_groups[0]["lr"], progress=1.0, checkpoint=ckpt, done=True, reason=reason,
        )


def train(images, labels, config: TrainConfig | None = None, out=None, **kwargs) -> checkpoint.Model:
    """Train to the end without watching; returns the model (saved to ``out`` if given)."""
    trainer = Trainer(images, labels, config, out, **kwargs)
    for _ in trainer.run():
        pass
    return trainer.model
