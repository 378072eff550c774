"""The training loop, as a generator of progress events that a caller can watch and stop.

The loop is method-agnostic: it prepares the data (per-image zoom, crops, augmentation), runs the
optimizer and its schedule, and writes checkpoints; the method (:mod:`.methods`, e.g. SPOCO) owns
its networks, its loss and what it adds to the model's config.

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

from . import checkpoint, scale as scales
from .annotation import annotation_statistics, looks_dense
from .data import CropSampler, check_shapes, heldout_objects, hold_out, prepare
from .device import resolve_device, resolve_precision, tune_allocator
from .errors import SparseSegError
from .io import normalize, to_channels_first
from .crac_loss import CracLossConfig
from .losses import SpocoLossConfig, foreground_prior
from .methods import METHOD_NAMES, get_method, resolve_method

#: training crops span this many target diameters in y/x (and in z, at most 32 slices)
PATCH_DIAMETERS = 4
#: each crop is zoomed by a random factor in [1/ZOOM_JITTER, ZOOM_JITTER]
ZOOM_JITTER = 1.25
#: the contrast of half the annotated objects of a crop is raised by up to this factor
#: (data.object_contrast): opt-in (1: off). 3 helped five datasets of the benchmark suite and
#: cost CVPPP and the ovule, so it is not the default (docs/method.md)
OBJECT_GAIN = 1.0
#: what ``--object-contrast`` without a value and the Train tab's check box use
OBJECT_GAIN_ON = 3.0
#: the contrast of half the annotated objects of a crop (held-out ones excepted) is lowered by down
#: to this factor (data.object_contrast; 1: off), so that the foreground head does not learn "as
#: bright as the labeled ones" and call dimmer objects background: opt-in. 1/3 helped the nuclei
#: sets of the benchmark suite and cost CVPPP and mitochondria, so it is not the default
#: (docs/benchmarks.md, "Dimming the labeled objects")
OBJECT_DIM = 1.0
#: what ``--object-dim`` without a value uses
OBJECT_DIM_ON = 1 / 3
#: used when neither an iteration count nor a time limit is given
DEFAULT_ITERATIONS = 5000
#: learning rate from scratch
LR = 1e-3
#: learning rate when fine-tuning another model on new data: the same. A 10x lower rate (the rule
#: before) won within EM but lost badly across modalities (ovule -> EM VOI 3.66 vs 1.60 from
#: scratch); the full rate ranked best over three pairs of benchmarks/transfer.py (docs/benchmarks.md §8)
FINE_TUNE_LR = LR


def default_lr_text(when: str) -> str:
    """The default learning rates in words, ``when`` naming fine-tuning (for help texts)."""
    return f"{LR:g}, also {when}" if FINE_TUNE_LR == LR else f"{LR:g}; {FINE_TUNE_LR:g} {when}"
#: the fraction of annotated objects held out of the foreground loss to calibrate its threshold
FOREGROUND_HOLDOUT = 0.2
#: per dimensionality: a 3D crop holds ~30x the voxels of a 2D one, so 3D trains a narrower network
#: on one crop per step and gets ~3x the steps in the same time (better on every 3D suite dataset)
BATCH_SIZE = {2: 2, 3: 1}
BASE_CHANNELS = {2: 16, 3: 8}
NORMALIZATION = {"type": "percentile", "low": 1.0, "high": 99.8}


@dataclass
class TrainConfig:
    """What to train and for how long. ``None`` for both limits means DEFAULT_ITERATIONS."""

    #: the training method (methods.METHOD_NAMES), or "auto": methods.DEFAULT_METHOD for the labels'
    #: dimensionality; a model being fine-tuned or resumed keeps its own
    method: str = "auto"
    iterations: int | None = None
    time_limit: float | None = None
    #: None: BATCH_SIZE for the labels' dimensionality
    batch_size: int | None = None
    patch_shape: tuple[int, ...] | None = None
    #: None: LR from scratch or when resuming, FINE_TUNE_LR when fine-tuning another model
    lr: float | None = None
    #: with a model to start from: "auto" fine-tunes it only if it already finds the painted
    #: objects, else trains a fresh network (:mod:`.transfer`); "always" fine-tunes it
    finetune: str = "auto"
    weight_decay: float = 1e-5
    seed: int = 0
    device: str = "auto"
    #: "auto": bfloat16 autocast on CPUs with native bfloat16 instructions, float32 elsewhere
    #: (CUDA GPUs too: slower there, device.fast_bfloat16)
    precision: str = "auto"
    ema_momentum: float = 0.999
    background_id: int | None = None
    #: the objects' typical diameter in pixels (as in cellpose); None: from the annotation, per image
    diameter: float | None = None
    #: 3D: the stacks' voxel size (z, y, x), any unit; overrides what each stack states
    #: (``Trainer(voxel_sizes=)``). With one, z is zoomed too (scale.z_zoom); without, z stays as it is
    voxel_size: tuple[float, float, float] | None = None
    #: None: BASE_CHANNELS for the labels' dimensionality
    base_channels: int | None = None
    depth: int = 4
    #: coordinate channels added to the embeddings, in embedding units per pixel at the model's scale
    #: ("spatial embeddings"); None: COORD_UNITS per target diameter (scale.coordinate_scale)
    coord_scale: float | None = None
    #: "replicate" gives the network no cue of where a crop's border is ("zeros" does)
    padding_mode: str = "replicate"
    #: a foreground head trained positive-unlabeled (losses.foreground_term)
    foreground: bool = True
    #: the fraction of annotated objects held out of the foreground loss, on which the head's
    #: threshold is calibrated (data.hold_out; none with fewer than three objects; 0: none)
    foreground_holdout: float = FOREGROUND_HOLDOUT
    #: an affinity head for the mutex-watershed offsets, trained on the annotated pixel pairs
    #: (losses.affinity_term): boundary evidence where coordinate channels alone would cut objects
    affinities: bool = True
    elastic: bool = True
    zoom_jitter: float = ZOOM_JITTER
    #: raise the contrast of annotated objects by up to this factor (data.object_contrast; 1: off)
    object_gain: float = OBJECT_GAIN
    #: lower the contrast of annotated objects by down to this factor (data.object_contrast; 1: off)
    object_dim: float = OBJECT_DIM
    checkpoint_every: float = 60.0
    #: SPOCO's loss settings (method "spoco")
    loss: SpocoLossConfig = field(default_factory=SpocoLossConfig)
    #: CRAC's loss settings (method "crac")
    crac: CracLossConfig = field(default_factory=CracLossConfig)

    def __post_init__(self):
        if isinstance(self.loss, dict):
            self.loss = SpocoLossConfig(**self.loss)
        if isinstance(self.crac, dict):
            self.crac = CracLossConfig(**self.crac)
        if self.method not in ("auto", *METHOD_NAMES):
            raise SparseSegError(f"method {self.method!r}: expected auto or one of {', '.join(METHOD_NAMES)}")
        if self.iterations is not None and self.iterations < 1:
            raise SparseSegError(f"iterations must be >= 1, got {self.iterations}")
        if self.time_limit is not None and self.time_limit <= 0:
            raise SparseSegError(f"time limit must be > 0 seconds, got {self.time_limit}")
        if self.batch_size is not None and self.batch_size < 1:
            raise SparseSegError(f"batch size must be >= 1, got {self.batch_size}")
        if not 0 <= self.foreground_holdout < 1:
            raise SparseSegError(f"foreground holdout must be a fraction in [0, 1), got {self.foreground_holdout}")
        if not self.object_gain >= 1:
            raise SparseSegError(f"object contrast must be a factor >= 1 (1: off), got {self.object_gain}")
        if not 0 < self.object_dim <= 1:
            raise SparseSegError(f"object dimming must be a factor in (0, 1] (1: off), got {self.object_dim}")
        if self.diameter is not None and not self.diameter > 0:
            raise SparseSegError(f"diameter must be a positive number of pixels, got {self.diameter}")
        if self.finetune not in ("auto", "always"):
            raise SparseSegError(f"finetune {self.finetune!r}: expected auto or always")


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
    #: on the first event: what the trainer decided at its start (:attr:`Trainer.note`)
    note: str = ""


def _channels_first(images: list[np.ndarray], names: list[str], ndim: int, chans: int | None) -> list[np.ndarray]:
    """Each image as (C, *spatial); ``chans``: a model's input channels (grey repeated into RGB)."""
    imgs = [to_channels_first(img, ndim, name, chans) for img, name in zip(images, names)]
    if chans is None and {i.shape[0] for i in imgs} == {1, 3}:
        imgs = [np.repeat(i, 3, axis=0) if i.shape[0] == 1 else i for i in imgs]  # grey and RGB mixed: all RGB
    for img, name in zip(imgs, names):
        if img.shape[0] != imgs[0].shape[0]:
            raise SparseSegError(f"{name}: has {img.shape[0]} channel(s) but {names[0]} has {imgs[0].shape[0]}")
    return imgs


def _patch_shape(ndim: int, shapes: list[tuple[int, ...]], divisor: tuple[int, ...]) -> tuple[int, ...]:
    """PATCH_DIAMETERS target diameters in y/x (at most 32 slices in z), no larger than the images."""
    side = int(PATCH_DIAMETERS * scales.TARGET_DIAMETER[ndim])
    default = (side, side) if ndim == 2 else (min(32, side), side, side)
    biggest = np.max(np.array(shapes), axis=0)
    return tuple(int(math.ceil(min(d, b) / v) * v) for d, b, v in zip(default, biggest, divisor))


class Trainer:
    """Trains a model on sparse labels with the method of ``config.method`` ("auto": per dimensionality). Images: arrays (Y, X[, C]) or (Z, Y, X[, C]) / (C, ...);
    labels: (Y, X) or (Z, Y, X) integer arrays, 0 = unlabeled.

    ``init`` is a model to start from: to continue training it (``resume=True``, optimizer and
    iteration counter restored) or to fine-tune it on new data (new optimizer). ``ignore``: per
    image, None or a mask whose nonzero pixels take no part in training. ``voxel_sizes``: per
    3D image, its voxel size (z, y, x) or None (``TrainConfig.voxel_size`` overrides). ``bounds``:
    per image, (C, 2) intensities normalised to 0 and 1, or None for its own percentiles.

    Each image is zoomed so that its own annotated objects have the target diameter
    (:mod:`.scale`); a model being fine-tuned keeps its target, the new images get their own zooms.
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
        ignore: list[np.ndarray | None] | None = None,
        voxel_sizes: list | None = None,
        bounds: list | None = None,
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
        imgs = _channels_first(images, names, ndim, None if init is None else init.in_channels)
        channels = imgs[0].shape[0]
        #: what the trainer decided at its start, for the user (the first TrainEvent carries it)
        self.note = ""
        self.fine_tune: dict[str, Any] | None = None
        if init is not None:
            checkpoint.check_compatible(init.config, ndim, channels, names[0])
            if not resume and cfg.finetune == "auto":
                from .transfer import keep_parent

                keep, self.fine_tune, self.note = keep_parent(init, images, labels, cfg, voxel_sizes)
                if not keep:
                    init = None
                    imgs = _channels_first(images, names, ndim, None)
                    channels = imgs[0].shape[0]
        if cfg.batch_size is None:
            cfg.batch_size = BATCH_SIZE[ndim]
        if cfg.base_channels is None:
            cfg.base_channels = BASE_CHANNELS[ndim]
        self.device = resolve_device(cfg.device)
        self.autocast_dtype = resolve_precision(cfg.precision, self.device)
        if self.device.type == "cpu":
            tune_allocator()
        norm = NORMALIZATION if init is None else init.config["normalization"]
        # ``bounds``: per image, (C, 2) intensities mapped to 0 and 1 (regions of one stack share
        # the stack's, as its blockwise segmentation does); else each image's own percentiles
        bounds = bounds or [None] * len(imgs)
        imgs = [normalize(img, norm["low"], norm["high"], b) for img, b in zip(imgs, bounds)]
        if ignore is not None and len(ignore) != len(labels):
            raise SparseSegError(f"{len(ignore)} ignore mask(s) for {len(labels)} label image(s); they must pair up")
        if ignore is not None:
            labels = [np.where(np.asarray(m).astype(bool), 0, lab) if m is not None and np.shape(m) == lab.shape
                      else lab for lab, m in zip(labels, ignore)]
        diameters = scales.image_diameters(labels, cfg.background_id)
        zooms = scales.training_zooms(diameters, ndim, cfg.diameter)
        # dense tissue is not shrunk on the word of a few painted cells (scale.training_zooms)
        check_shapes(imgs, labels, names, ignore)
        unshrunk = (cfg.diameter is None and any(z < 1 for z in zooms)
                    and scales.uncertain_diameter(labels, cfg.background_id)
                    and looks_dense(imgs, labels, ignore, cfg.seed, cfg.background_id))
        note = "" if cfg.diameter else scales.few_objects_note(labels, diameters, cfg.background_id, unshrunk)
        self.note = " ".join(filter(None, [self.note, note]))
        if unshrunk:
            zooms = scales.training_zooms(diameters, ndim, cfg.diameter, keep_resolution=True)
        voxels = scales.training_voxel_sizes(cfg.voxel_size, voxel_sizes, None if init is None else init.config,
                                             ndim, names)
        z_zooms = [scales.z_zoom(z, v) for z, v in zip(zooms, voxels)]
        self.scale_config = scales.scale_config(diameters, ndim, cfg.diameter, scales.common_voxel_size(voxels),
                                                unshrunk)
        self.samples = prepare(imgs, labels, zooms, cfg.background_id, names, ignore, z_zooms)
        keep = (init.config.get("heldout_objects") or None) if (resume and init is not None) else None
        self.heldout = hold_out(self.samples, cfg.foreground_holdout if cfg.foreground else 0.0, cfg.seed, keep)
        # object sizes at the model's scale: what post-processing compares segments with
        areas = np.concatenate([np.bincount(s.labels.ravel())[1:] for s in self.samples])
        areas = areas[areas > 0]
        self._images = imgs  # for the size model at the end of training
        torch.manual_seed(cfg.seed)
        if init is not None:
            cfg.method = init.config.get("method", "spoco")
        cfg.method = resolve_method(cfg.method, ndim)
        if cfg.lr is None:
            cfg.lr = FINE_TUNE_LR if (init is not None and not resume) else LR
        method_cls = get_method(cfg.method)
        offsets = (init.config.get("offsets") if init is not None else None) or method_cls.default_offsets(ndim)
        self.method = method_cls(cfg, ndim, channels, offsets, self.device, self.autocast_dtype, init)
        self.patch = cfg.patch_shape or _patch_shape(ndim, [s.labels.shape for s in self.samples], self.method.divisor)
        if any(p % d for p, d in zip(self.patch, self.method.divisor)):
            raise SparseSegError(f"patch shape {self.patch} must be a multiple of {self.method.divisor} per axis")
        self.sampler = CropSampler(self.samples, self.patch, seed=cfg.seed, elastic=cfg.elastic,
                                   zoom_jitter=cfg.zoom_jitter, object_gain=cfg.object_gain,
                                   object_dim=cfg.object_dim)
        if init is None and cfg.foreground:
            self._start_foreground_head()
        self.optimizer = torch.optim.Adam(self.method.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
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
            "normalization": dict(norm),
            "scale": self.scale_config,
            "patch_shape": list(self.patch),
            "offsets": offsets,
            # at the model's scale (each image zoomed to the target diameter)
            "object_area_median": float(np.median(areas)) if areas.size else None,
            # dense tissue or objects on a background, as the annotation shows it (segment.is_dense)
            "annotation": annotation_statistics([s.image for s in self.samples], [s.labels for s in self.samples],
                                                [s.valid for s in self.samples], cfg.seed),
            "background_id": cfg.background_id,
            # by image name, the user's ids: resuming holds out the same ones (data.hold_out)
            "heldout_objects": heldout_objects(self.samples),
            "training": {},
        }
        if init is not None:
            self.model_config["parent"] = str(init.path) if init.path else None
        if self.fine_tune is not None:
            self.model_config["fine_tune"] = self.fine_tune
        self._stop = False
        self.last_losses: dict[str, float] = {}

    def _start_foreground_head(self, crops: int = 16) -> None:
        """Start a fresh network's foreground head at the annotated share of ``crops`` training crops
        (Method.start_heads), drawn by a sampler of their own so the training crops stay those of
        the seed."""
        probe = CropSampler(self.samples, self.patch, seed=self.config.seed + 1, elastic=False)
        _, lab, val, held = probe.batch(crops)
        self.method.start_heads(foreground_prior(lab, val, held))

    @property
    def net(self) -> torch.nn.Module:
        """The network being trained (the method's role "f")."""
        return self.method.networks["f"]

    @property
    def ema(self) -> torch.nn.Module | None:
        """The method's EMA network (role "g"), if it has one."""
        return self.method.networks.get("g")

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

    @property
    def model(self) -> checkpoint.Model:
        config = {**self.method.model_config(), **self.model_config}
        config["training"] = {
            "iteration": self.iteration,
            "seconds": round(self.seconds, 2),
            "train_config": {k: v for k, v in asdict(self.config).items() if k not in ("loss", "crac")},
            "last_losses": self.last_losses,
        }
        return self.method.model(config, self.optimizer.state_dict(), self.out)

    def save(self, folder: str | Path | None = None) -> Path | None:
        folder = folder or self.out
        if folder is None:
            return None
        return checkpoint.save(folder, self.model)

    def fit_size_model(self) -> None:
        """With training images of mixed object sizes, fit the size model that estimates a new
        image's zoom (:func:`.scale.fit_size_model`); otherwise new images take the common zoom."""
        if not self.scale_config.get("mixed"):
            return
        zooms = [s.zoom for s in self.samples]
        was_training = self.net.training
        try:
            self.scale_config["size_model"] = scales.fit_size_model(
                self.net, self._images, zooms, seed=self.config.seed, device=self.device)
        except (RuntimeError, ValueError, np.linalg.LinAlgError):
            self.scale_config["size_model"] = None  # new images then take the common zoom
        finally:
            self.net.train(was_training)

    # -- the loop ------------------------------------------------------------------------------
    def step(self, progress: float = 0.0) -> dict[str, float]:
        """One optimiser step on a fresh batch; returns the loss terms."""
        img, lab, val, held = self.sampler.batch(self.config.batch_size)
        terms = self.method.losses(img, lab.to(self.device), val.to(self.device), self.generator, progress,
                                   heldout=held.to(self.device) if self.heldout else None)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError("non-finite loss")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.method.after_step(self.iteration)
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
                progress = progress_at(time.perf_counter())
                lr = self._lr(progress)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                try:
                    losses = self.step(progress)
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
                    note=self.note if self.iteration == start_it + 1 else "",
                )
        finally:
            # also on Ctrl-C, generator close and errors: keep the last good state
            self.seconds = start_s + (time.perf_counter() - t0)
            if self.iteration > start_it:
                self.fit_size_model()
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
