"""Length scales from the user's own annotation.

The network works at one object size: every image is zoomed (in y/x) so that its annotated
objects have ``TARGET_DIAMETER`` pixels across, each image by its own factor, so a training set may
mix objects of very different sizes. A stack with a known voxel size is also zoomed in z, so that
its voxels are as deep as they are wide at that scale (:func:`z_zoom`); without one, z is left as
it is. Everything else that has a length (crop size, coordinate
channels, mutex-watershed offsets, minimum object size) is then fixed in units of that diameter.

At segmentation time an image has no annotation. Its zoom is, in this order: the user's object
diameter (as in cellpose); the training images' common zoom when their objects had about one size;
otherwise an estimate from the image itself (:func:`fit_size_model`: a ridge regression from the
network's pooled encoder features (every level) to the zoom, fitted on zoomed views of the training images, the
idea of cellpose's size model).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .errors import SparseSegError

#: object diameter (pixels) at the network's working scale, in y/x
TARGET_DIAMETER = {2: 32.0, 3: 16.0}
#: zoom limits: objects larger than 16 targets are not shrunk further; small ones are enlarged at most 2x
MIN_ZOOM, MAX_ZOOM = 1 / 16, 2.0
#: training images whose median object diameters differ by more than this factor are "mixed sizes":
#: then each new image's zoom is estimated instead of taking the training images' common one
MIXED_SIZES = 1.5


def object_diameters(labels: np.ndarray, background_id: int | None = None) -> np.ndarray:
    """Equivalent diameters of the annotated objects; in-plane (mean area per slice) for 3D stacks."""
    labels = np.asarray(labels)
    counts = np.bincount(labels.ravel()).astype(float)
    counts[0] = 0
    if background_id is not None and background_id < counts.size:
        counts[background_id] = 0
    if labels.ndim == 3:
        slices = ndimage.find_objects(labels)
        depth = np.ones(counts.size)
        for i, s in enumerate(slices, start=1):
            if s is not None:
                depth[i] = s[0].stop - s[0].start
        counts = counts / depth
    counts = counts[counts > 0]
    return 2 * np.sqrt(counts / np.pi)


def _log_diameters(labels: list[np.ndarray], background_id: int | None) -> list[np.ndarray]:
    """Each label image's annotated objects' log diameters (empty for an image without any)."""
    logs = [np.log(object_diameters(lab, background_id)) for lab in labels]
    return [v[np.isfinite(v)] for v in logs]


#: within-image spread (sd of log diameter) assumed when no image has two annotated objects
PRIOR_LOG_SD = 0.35


def image_diameters(labels: list[np.ndarray], background_id: int | None = None) -> list[float | None]:
    """Each label image's annotated-object diameter (None: no object in that image).

    With a few objects per image, an image's median says little about its own scale: the estimate
    is shrunk towards the common diameter by how much images really differ (empirical Bayes on
    log diameters: between-image variance beyond what the within-image spread explains). Images
    of truly different scales (say 10 vs 60 px nuclei) keep their own; a plant with one small
    labeled leaf among many does not become a "small-object image".
    """
    logs = _log_diameters(labels, background_id)
    have = [v for v in logs if v.size]
    if not have:
        return [None] * len(labels)
    # robust: medians, and the spread from median absolute deviations (objects cut by the image
    # border or a stray speck must not make an image look "noisy")
    centres = np.array([np.median(v) for v in have])
    counts = np.array([v.size for v in have], float)
    multi = [v for v in have if v.size > 1]
    if multi:
        within = float(np.average([(1.4826 * np.median(np.abs(v - np.median(v)))) ** 2 for v in multi],
                                  weights=[v.size - 1 for v in multi]))
    else:
        within = PRIOR_LOG_SD**2
    noise = np.pi / 2 * within / counts  # variance of a median of n draws
    grand = float(np.median(centres))
    # between-image variance of the scales, robust to a few odd images (MAD), less the noise
    spread = (1.4826 * float(np.median(np.abs(centres - grand)))) ** 2 if centres.size > 2 else float(np.var(centres))
    tau2 = max(0.0, spread - float(np.median(noise)))
    out: list[float | None] = []
    for v in logs:
        if not v.size:
            out.append(None)
            continue
        n = np.pi / 2 * within / v.size
        dev = float(np.median(v)) - grand
        # strong evidence of a scale of its own (more than 3 sd of what noise and the other images
        # explain) is kept as it is; weak evidence is shrunk towards the common scale
        keep = abs(dev) > 3 * np.sqrt(n + tau2)
        shrink = 1.0 if keep or tau2 + n == 0 else tau2 / (tau2 + n)
        out.append(float(np.exp(grand + shrink * dev)))
    return out


#: training warns that the painted objects' median diameter may be off when two standard errors
#: of it span more than this factor (a handful of painted objects of different sizes); such a
#: diameter may enlarge images of dense tissue but does not shrink them (:func:`training_zooms`)
UNCERTAIN_DIAMETER = 1.5


def diameter_uncertainty(labels: list[np.ndarray], background_id: int | None = None) -> float:
    """How far off (a factor, at least 1) the painted objects' median diameter may be: two
    standard errors of it. The error is read off the painted objects (half the spread between
    their quantiles at 0.5 -/+ 0.5/sqrt(n), distribution-free: sqrt(pi/2) sd / sqrt(n) for normal
    log diameters), and is at least what a within-image spread of PRIOR_LOG_SD gives. 1 without
    any painted object."""
    return _uncertainty([v for v in _log_diameters(labels, background_id) if v.size])


def _uncertainty(logs: list[np.ndarray]) -> float:
    """:func:`diameter_uncertainty` of the images' log diameters (those with an object)."""
    if not logs:
        return 1.0
    residuals = np.concatenate([v - np.median(v) for v in logs])
    n = residuals.size
    half = 0.5 / math.sqrt(n)
    spread = float(np.quantile(residuals, 0.5 + half) - np.quantile(residuals, 0.5 - half)) / 2 if n > 1 else 0.0
    return math.exp(2 * max(spread, math.sqrt(np.pi / 2) * PRIOR_LOG_SD / math.sqrt(n)))


def uncertain_diameter(labels: list[np.ndarray], background_id: int | None = None) -> bool:
    """Whether the painted objects say too little about their size to shrink dense tissue by it."""
    return diameter_uncertainty(labels, background_id) >= UNCERTAIN_DIAMETER


def few_objects_note(labels: list[np.ndarray], diameters: list[float | None],
                     background_id: int | None = None, kept: bool = False) -> str:
    """A warning when the painted objects' median diameter says little about the objects' size,
    e.g. "object diameter 27 px, from only 3 painted objects (6-42 px): it may be off by up to
    3.0x ..." (:func:`diameter_uncertainty`). A wrong diameter zooms the images to the wrong
    scale (docs/benchmarks.md, "The object size from a few painted objects"); moving it towards
    the target by that uncertainty was measured and is not the default. ``kept``: the images are
    kept at full resolution instead of shrunk (:func:`training_zooms`), and the note says so."""
    used = common_diameter(diameters)
    logs = [v for v in _log_diameters(labels, background_id) if v.size]
    if not used or not logs:
        return ""
    factor = _uncertainty(logs)
    if factor < UNCERTAIN_DIAMETER:
        return ""
    d = np.exp(np.concatenate(logs))
    n = d.size
    sizes = f" ({d.min():.0f}-{d.max():.0f} px)" if n > 1 else ""
    how = ("so the images are not shrunk for it (dense tissue kept at full resolution)" if kept
           else "and the images are zoomed by it")
    return (f"object diameter {used:.0f} px, from only {n} painted object{'s' * (n > 1)}{sizes}: it may be off by up "
            f"to {factor:.1f}x, {how}; set the object diameter if you know it")


#: coordinate channels: embedding units across one object of the target diameter (objects are
#: zoomed to it, so the scale follows the annotation), so that the centres of two touching objects
#: start 2 dd apart (the push margin). SPOCO's network only: CRAC's (the default) has no coordinate
#: channels, so the suite's CRAC runs cannot choose this constant (docs/benchmarks.md, run s33)
COORD_UNITS = 4.0


def coordinate_scale(ndim: int) -> float:
    """Units per pixel of the coordinate channels at the model's scale."""
    return COORD_UNITS / TARGET_DIAMETER[ndim]


def zoom_for(diameter: float, ndim: int) -> float:
    """The y/x zoom that brings objects of ``diameter`` pixels to the target diameter, clipped."""
    if not diameter or diameter <= 0 or not math.isfinite(diameter):
        raise SparseSegError(f"object diameter must be a positive number of pixels, got {diameter}")
    return float(np.clip(TARGET_DIAMETER[ndim] / diameter, MIN_ZOOM, MAX_ZOOM))


#: z zoom limits: z is never enlarged more than this (memory), nor shrunk below one plane in 8
MIN_Z_ZOOM, MAX_Z_ZOOM = 1 / 8, 4.0


def check_voxel_size(voxel_size, name: str = "voxel size") -> tuple[float, float, float] | None:
    """``voxel_size`` (z, y, x) as three positive floats, or None."""
    if voxel_size is None:
        return None
    try:
        v = tuple(float(a) for a in voxel_size)
    except (TypeError, ValueError):
        raise SparseSegError(f"{name}: expected three numbers (z y x), got {voxel_size!r}") from None
    if len(v) != 3 or not all(math.isfinite(a) and a > 0 for a in v):
        raise SparseSegError(f"{name}: expected three positive numbers (z y x), got {voxel_size!r}")
    return v


def z_zoom(zoom: float, voxel_size) -> float:
    """The z zoom that goes with the y/x ``zoom`` for a stack of ``voxel_size`` (z, y, x): voxels
    as deep as they are wide at the model's scale (physically isotropic), clipped. Without a voxel
    size, 1: z is taken as it is (what models trained without one assume)."""
    v = check_voxel_size(voxel_size)
    if v is None:
        return 1.0
    return float(np.clip(zoom * v[0] / (0.5 * (v[1] + v[2])), MIN_Z_ZOOM, MAX_Z_ZOOM))


def common_diameter(diameters: list[float | None]) -> float | None:
    """Geometric median of the per-image diameters (None without any)."""
    d = np.array([v for v in diameters if v], float)
    return float(np.exp(np.median(np.log(d)))) if d.size else None


def mixed_sizes(diameters: list[float | None]) -> bool:
    d = np.array([v for v in diameters if v], float)
    return bool(d.size > 1 and d.max() / d.min() > MIXED_SIZES)


def training_zooms(diameters: list[float | None], ndim: int, user_diameter: float | None = None,
                   keep_resolution: bool = False) -> list[float]:
    """Each training image's zoom: from the user's diameter, else from its own objects (images
    without an annotated object take the common one). ``keep_resolution``: images are enlarged
    but not shrunk. The trainer asks for it for dense tissue whose size only a few painted cells
    give (:func:`uncertain_diameter`): shrinking drops detail no later step gets back (a cell wall
    a few pixels thin fades out) on the word of a few cells, while enlarging only costs time."""
    if user_diameter is not None:
        return [zoom_for(user_diameter, ndim)] * len(diameters)
    common = common_diameter(diameters)
    if common is None:
        return [1.0] * len(diameters)
    zooms = [zoom_for(d if d else common, ndim) for d in diameters]
    return [max(z, 1.0) for z in zooms] if keep_resolution else zooms


def scale_config(diameters: list[float | None], ndim: int, user_diameter: float | None = None,
                 voxel_size=None, keep_resolution: bool = False) -> dict[str, Any]:
    """What a model stores about scales (``config["scale"]``). ``voxel_size`` (z, y, x): the
    training stacks' (the default for stacks segmented without one), None where not known.
    ``keep_resolution``: the painted objects' diameter does not shrink images (:func:`training_zooms`)."""
    common = user_diameter if user_diameter is not None else common_diameter(diameters)
    unshrunk = keep_resolution and user_diameter is None
    zoom = zoom_for(common, ndim) if common else 1.0
    v = check_voxel_size(voxel_size)
    return {
        "voxel_size": None if v is None else list(v),
        "target_diameter": TARGET_DIAMETER[ndim],
        "diameter": common,
        "zoom": max(zoom, 1.0) if unshrunk else zoom,
        "unshrunk": bool(unshrunk and zoom < 1.0),
        "train_diameters": [None if d is None else round(d, 2) for d in diameters],
        "mixed": user_diameter is None and mixed_sizes(diameters),
        "size_model": None,
    }


def model_voxel_size(config: dict[str, Any]) -> list[float] | None:
    """The voxel size (z, y, x) the model was trained with, None where not known."""
    scale = config.get("scale")
    return scale.get("voxel_size") if isinstance(scale, dict) else None


def training_voxel_sizes(voxel_size, given: list | None, init_config: dict[str, Any] | None, ndim: int,
                         names: list[str]) -> list:
    """Each training stack's voxel size: ``voxel_size`` for all if given, else the one each states
    (``given``), else that of the model being fine-tuned (``init_config``); None per stack where
    none is known (and always in 2D)."""
    if ndim != 3:
        if voxel_size is not None:
            raise SparseSegError(f"voxel_size {tuple(voxel_size)}: the images are 2D; a voxel size applies to 3D "
                                 "stacks only")
        return [None] * len(names)
    if voxel_size is not None:
        return [check_voxel_size(voxel_size, "voxel_size")] * len(names)
    given = given or [None] * len(names)
    if len(given) != len(names):
        raise SparseSegError(f"{len(given)} voxel size(s) for {len(names)} image(s); they must pair up")
    fallback = None if init_config is None else model_voxel_size(init_config)
    return [check_voxel_size(v, f"{n}: voxel size") if v is not None else fallback for v, n in zip(given, names)]


def common_voxel_size(voxels: list) -> list[float] | None:
    """What a model stores as its training voxel size: the per-axis median of the known ones."""
    known = [v for v in voxels if v is not None]
    return [float(a) for a in np.median(np.array(known, float), axis=0)] if known else None


def stack_z_zoom(zoom: float, voxel_size, config: dict[str, Any], ndim: int) -> float:
    """The z zoom for a stack at y/x ``zoom``: from its ``voxel_size`` if known, else the model's
    training voxel size (none: 1); 1 for 2D images."""
    if ndim != 3:
        return 1.0
    return z_zoom(zoom, voxel_size if voxel_size is not None else model_voxel_size(config))


def model_zoom(config: dict[str, Any]) -> float:
    """The model's common zoom (also for models written before per-image scales: a number)."""
    scale = config.get("scale", 1.0)
    return float(scale["zoom"]) if isinstance(scale, dict) else float(scale)


def uses_size_model(config: dict[str, Any]) -> bool:
    """Whether a model estimates each new image's zoom (trained on mixed object sizes, with a size model)."""
    scale = config.get("scale")
    return bool(isinstance(scale, dict) and scale.get("mixed") and scale.get("size_model"))


def diameter_note(config: dict[str, Any], ndim: int, zoom: float, diameter: float | None = None) -> str:
    """The object diameter an image was segmented at and where it came from, for the user (whose
    objects may be another size: then they set the diameter), e.g. "object diameter 46 px,
    estimated from the image"."""
    seen = TARGET_DIAMETER[ndim] / zoom
    # at a zoom limit the image is zoomed as for objects of another size, and an estimate is a bound
    enlarged, shrunk = zoom >= MAX_ZOOM * (1 - 1e-6), zoom <= MIN_ZOOM * (1 + 1e-6)
    why = (f"objects are enlarged at most {MAX_ZOOM:g}x" if enlarged else
           f"objects are shrunk at most {1 / MIN_ZOOM:g}x" if shrunk else "")
    if diameter:
        clipped = why and abs(diameter - seen) >= 0.5
        return f"object diameter {diameter:g} px, given" + (f"; zoomed as for {seen:.0f} px: {why}" if clipped else "")
    if uses_size_model(config):
        bound = " or less" if enlarged else " or more" if shrunk else ""
        return f"object diameter {seen:.0f} px{bound}, estimated from the image" + (f": {why}" if why else "")
    scale = config.get("scale")
    painted = scale.get("diameter") if isinstance(scale, dict) else None
    # the painted objects' diameter (at a zoom limit the training images were zoomed the same way)
    if painted and math.isclose(zoom, model_zoom(config), rel_tol=1e-6):
        if scale.get("unshrunk"):  # a few painted objects' diameter does not shrink images
            return f"object diameter {painted:.0f} px, the training scale, at full resolution (few painted cells)"
        seen = painted
    return f"object diameter {seen:.0f} px, the training scale"


# -- size model -----------------------------------------------------------------------------------
def _resize(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """Zoom the last two axes of a (B, C, *S) tensor."""
    if zoom == 1.0:
        return x
    size = [max(8, int(round(s * zoom))) for s in x.shape[-2:]]
    lead = x.shape[:-2]
    flat = x.reshape(1, -1, *x.shape[-2:])
    out = F.interpolate(flat, size=size, mode="area" if zoom < 1 else "bilinear")
    return out.reshape(*lead, *size)


def _fit_window(x: torch.Tensor, window: tuple[int, ...], divisor: tuple[int, ...], rng) -> torch.Tensor:
    """A random crop of at most ``window`` (padded by replication to the network's divisor)."""
    spatial = x.shape[2:]
    sl = []
    for s, w in zip(spatial, window):
        start = int(rng.integers(0, s - w + 1)) if s > w else 0
        sl.append(slice(start, start + min(s, w)))
    x = x[(slice(None), slice(None)) + tuple(sl)]
    pad = []
    for s, d in zip(reversed(x.shape[2:]), reversed(divisor)):
        pad += [0, (-s) % d]
    if any(pad):
        x = F.pad(x, pad, mode="replicate")
    return x


#: what the size model reads: the mean and sd of every encoder level's features ("levels"), or of
#: the deepest level's only ("deepest", size models written before; their file has no "features")
SIZE_FEATURES = "levels"


@torch.no_grad()
def pooled_features(net, x: torch.Tensor, which: str = SIZE_FEATURES) -> np.ndarray:
    """Mean and standard deviation of the network's encoder features over a (1, C, *S) view: of
    every level (``which="levels"``; the fine levels see texture and edges at the pixel scale, the
    deep ones whole objects) or of the deepest one only."""
    levels = net.encoder_features(x)
    if which != "levels":
        levels = levels[-1:]
    out = []
    for f in levels:
        f = f[0].flatten(1)
        out += [f.mean(1), f.std(1)]
    return torch.cat(out).double().cpu().numpy()


def _window(ndim: int) -> tuple[int, ...]:
    return (256, 256) if ndim == 2 else (32, 96, 96)


def fit_size_model(net, images: list[np.ndarray], zooms: list[float], seed: int = 0,
                   views: int = 160, device="cpu") -> dict[str, Any]:
    """Ridge regression from pooled features (:func:`pooled_features`) to log(zoom error), on views
    of the training images (normalised, channels first) zoomed by their true zoom times a random
    factor in [1/2, 2]."""
    rng = np.random.default_rng(seed)
    ndim = net.ndim
    feats, targets = [], []
    per_image = max(4, views // max(1, len(images)))
    was_training = net.training
    net.eval()
    try:
        for img, z in zip(images, zooms):
            t = torch.from_numpy(np.ascontiguousarray(img, np.float32))[None]
            for _ in range(per_image):
                err = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
                view = _fit_window(_resize(t, z * err), _window(ndim), net.divisor, rng).to(device)
                feats.append(pooled_features(net, view, SIZE_FEATURES))
                targets.append(np.log(err))
    finally:
        net.train(was_training)
    X, y = np.array(feats), np.array(targets)
    mean, std = X.mean(0), X.std(0) + 1e-8
    Xs = (X - mean) / std
    # ridge strength by leave-one-out (closed form through the hat matrix)
    best = None
    u, s, vt = np.linalg.svd(Xs, full_matrices=False)
    for lam in (0.1, 1.0, 10.0, 100.0, 1000.0):
        d = s / (s**2 + lam)
        w = vt.T @ (d * (u.T @ (y - y.mean())))
        hat = (u * (s**2 / (s**2 + lam))) @ u.T
        resid = (y - y.mean() - Xs @ w) / np.clip(1 - np.diag(hat) - 1 / len(y), 1e-6, None)
        loo = float(np.mean(resid**2))
        if best is None or loo < best[0]:
            best = (loo, lam, w)
    loo, lam, w = best
    return {"mean": mean.tolist(), "std": std.tolist(), "weights": w.tolist(), "bias": float(y.mean()),
            "lambda": lam, "loo_rmse_log": math.sqrt(loo), "n_views": len(y), "features": SIZE_FEATURES}


def predict_log_error(net, size_model: dict[str, Any], x: torch.Tensor, rng=None) -> float:
    """log(objects' diameter / target) in a (1, C, *S) view, by the size model (median over windows)."""
    rng = rng or np.random.default_rng(0)
    w = np.array(size_model["weights"])
    mean, std = np.array(size_model["mean"]), np.array(size_model["std"])
    preds = []
    n = 1 if all(s <= v for s, v in zip(x.shape[2:], _window(net.ndim))) else 5
    for _ in range(n):
        view = _fit_window(x, _window(net.ndim), net.divisor, rng)
        f = pooled_features(net, view, size_model.get("features", "deepest"))
        preds.append(float((f - mean) / std @ w + size_model["bias"]))
    return float(np.median(preds))


#: rounds of the size model for a new image, each at the zoom the previous one found: the ridge
#: regression shrinks each estimate towards "no error", so few rounds under-correct a large error
#: (6 models of nuclei_mix and cvppp_mix: 4 rounds had the smaller mean error on each; docs/benchmarks.md §1)
SIZE_PASSES = 4


def estimate_zoom(net, config: dict[str, Any], image: np.ndarray, device="cpu", passes: int | None = None) -> float:
    """The zoom of a new, normalised (C, *S) image, by the model's size model (``passes`` rounds,
    default :data:`SIZE_PASSES`, each at the zoom the previous one found); the common zoom if the
    model has none."""
    scale = config.get("scale")
    zoom = model_zoom(config)
    if not isinstance(scale, dict) or not scale.get("size_model"):
        return zoom
    t = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None]
    net = net.to(device)
    lo, hi = MIN_ZOOM, MAX_ZOOM
    for _ in range(SIZE_PASSES if passes is None else passes):
        err = math.exp(predict_log_error(net, scale["size_model"], _resize(t, zoom).to(device)))
        zoom = float(np.clip(zoom / max(err, 1e-3), lo, hi))
    return zoom
