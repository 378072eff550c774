"""Prediction + clustering with the defaults a model carries.

Clustering runs at the model's scale, where every image's objects have the target diameter
(:mod:`.scale`): the mutex-watershed offsets and the size limits are then in units of the objects
themselves, whatever the image's pixel size. The labels are resized to the image at the end.
User-facing sizes (``min_size``, ``max_size``) are in the image's pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import Model
from .clustering import GRAPH_METHODS, METHODS, default_offsets, segment_embeddings
from .errors import SparseSegError
from .prediction import Prediction, predict_scaled
from .rescue import CANDIDATE_STRIDE, DEFAULT_NDIMS, FAINT_CONTRAST, RESCUE_CONTRAST, drop_faint, rescue
from .resplit import split_area, split_large

#: segments smaller than this fraction of the median annotated object are fragments: dropped
MIN_SIZE_FRACTION = 1 / 4
#: mutex watershed keeps the segments that the EMA network g reproduces with at least this IoU
#: (measured on CVPPP@0.1, docs/benchmarks.md); 0 turns the filter off. Used when background is
#: found by the largest-segment rule; with a foreground head the filter is off by default
AGREEMENT = 0.8
#: a segment is foreground when its mean foreground probability reaches this fraction of c (the
#: head's mean on annotated objects held out of its loss, methods.base.ForegroundConstant): 1/2 is
#: P(object) >= 1/2 in positive-unlabeled terms (docs/method.md). Per method, chosen on the
#: benchmark suite (benchmarks/sweep.py): for CRAC 0.25 ranks best (0.5 and 0.1 after it), for SPOCO 0.5
FOREGROUND_FRACTION = {"spoco": 0.5, "crac": 0.25}
#: c is at least this fraction of the head's mean on the objects it trained on (c_trained): a head
#: that learned to reject the objects it was not shown (c_heldout far below c_trained) would
#: otherwise let background through and merge objects with it. Chosen on the benchmark suite
#: (benchmarks/sweep.py, six runs, docs/benchmarks.md): 1 (the larger of the two means) raised
#: nuclei 2D/3D and the nuclei mix and lowered no dataset, once the dense-tissue decision no longer
#: read this threshold alone (:data:`DENSE_CONTRAST`)
HELDOUT_MIN_RATIO = 1.0
#: pixels below this fraction of the segment threshold are not clustered at all (surely background);
#: chosen on the benchmark suite (benchmarks/sweep.py, mean rank over its datasets)
PREMASK_FRACTION = 1.0
#: the bias (> 0 splits more, < 0 merges more) each graph clustering takes by default, per method.
#: The two clusterings' scales differ (the mutex watershed shifts its weights, the multicut its
#: boundary bias beta = 0.5 + bias). Re-clustering the CRAC models of four suite runs
#: (benchmarks/sweep.py, docs/benchmarks.md): on dense tissue the multicut gains from merging a
#: little more (-0.05: VOI lower on gala, ovule and VNC cells in every run); for the mutex watershed
#: on objects on a background +0.05 helped three runs, not the fourth nor CVPPP's 20-minute models,
#: so it stays at 0. SPOCO's distances have another scale, and its CVPPP models scored best at 0:
#: it keeps 0 for both
BIAS = {"crac": {"mws": 0.0, "multicut": -0.05}, "spoco": {"mws": 0.0, "multicut": 0.0}}
#: share of the affinity head in the repulsive (long-range) mutex-watershed weights (the rest:
#: embedding distances); suite mean rank
AFFINITY_MIX = 0.5
#: share of the affinity head in the attractive (nearest-neighbour) weights: boundaries come from
#: the head, which sees them directly; suite mean rank
ATTRACTIVE_MIX = 1.0

BACKGROUNDS = ("auto", "foreground", "largest", "none")
#: clustering choices; "auto" (the default) takes the multicut on superpixels for an image that is
#: mostly foreground (dense tissue: membranes, EM neuropil) and the mutex watershed for objects on a
#: background (nuclei, leaves, organelles): chosen on the benchmark suite (docs/benchmarks.md)
CLUSTERINGS = ("auto", *METHODS)
#: "auto" calls an image dense tissue when at least this fraction of it is foreground
DENSE_FRACTION = 0.5
#: ... or, whatever the foreground head says, when the model's annotation looks like dense tissue
#: (:func:`.annotation.annotation_statistics`): its objects hard to tell from the pixels just around
#: them (ring contrast below DENSE_CONTRAST) and most of the image like their interiors (interior
#: share at least DENSE_INTERIOR). The foreground head alone fails on dense tissue trained long with
#: few cells painted: it learns to reject the cells it was not shown. Chosen on the benchmark suite
#: (docs/benchmarks.md): ring contrast 0.60-0.80 on dense tissue, 0.84-0.96 on objects on a
#: background (0.79 on the crowded synthetic cells of the demo); interior share 0.70-0.96 against 0.13-0.45
DENSE_CONTRAST = 0.82
DENSE_INTERIOR = 0.6
#: the background rule "auto" stands for on an image "auto" calls dense tissue (with a foreground
#: head; a rule the user names is kept): "none", every pixel in a cell. In dense tissue the
#: positive-unlabeled head learns little (its unlabeled pixels are mostly cells) and removed whole
#: cells where it dipped; chosen on the benchmark suite (docs/benchmarks.md)
DENSE_BACKGROUND = "none"
#: CRAC models: which affinity map the mutex watershed reads (the affinity head's share of the
#: weights): the explicit map from the embeddings (the paper's choice), the implicit one, or both
AFFINITY_SOURCES = {"eam": 0.0, "iam": 1.0, "mean": 0.5}
CRAC_AFFINITY_SOURCE = "eam"
#: the mutex watershed's segments larger than this many median annotated diameters are clustered
#: again with either affinity map's repulsion (:mod:`.resplit`), per method (CRAC: two maps); 0 off.
#: Chosen on the benchmark suite (benchmarks/sweep.py, docs/benchmarks.md): sqrt(2) (twice the
#: area in 2D) ranked best of sqrt(2) / 1.5 against off
SPLIT_RATIO = {"crac": 2 ** 0.5}
#: a piece of a segment split again is kept apart when it has at least this fraction of the median
#: annotated object's area (volume)
SPLIT_MIN_PIECE = 0.5


def split_ratio(config: dict[str, Any], method: str, ratio: float | None = None) -> float:
    """The diameter ratio above which clustering ``method`` splits a segment again for a model of
    this ``config`` (:data:`SPLIT_RATIO`; ``ratio`` overrides, 0 turns it off): 0 for clusterings
    other than the mutex watershed and for models without an affinity head."""
    if ratio is not None and ratio < 0:
        raise SparseSegError(f"split ratio {ratio:g}: expected 0 (off) or a ratio of diameters, e.g. 1.41")
    if method != "mws" or not config.get("network", {}).get("affinities"):
        return 0.0
    return float(SPLIT_RATIO.get(config.get("method", "spoco"), 0.0) if ratio is None else ratio)


def _zoom_area(zoom: float, z_zoom: float = 1.0) -> float:
    """Pixels (voxels) at the model's scale per image pixel (voxel)."""
    return zoom * zoom * z_zoom


def clustering_options(config: dict[str, Any], method: str = "mws", zoom: float = 1.0, z_zoom: float = 1.0,
                       **overrides) -> dict[str, Any]:
    """Keyword arguments for :func:`segment_embeddings` at the model's scale, derived from a model's
    config. ``overrides`` whose value is None keep the model-derived default; ``min_size`` and
    ``max_size`` overrides are in image pixels (converted with ``zoom`` and ``z_zoom``)."""
    loss = config.get("loss", {})
    med = config.get("object_area_median") or 0
    opts: dict[str, Any] = {
        "delta_var": loss.get("delta_var", 0.5),
        "delta_dist": loss.get("delta_dist", 2.0),
        "offsets": config.get("offsets"),
        "min_size": int(med * MIN_SIZE_FRACTION),
        "bias": default_bias(config, method),
        "agreement": AGREEMENT if method in GRAPH_METHODS or method == "auto" else None,
        "affinity_mix": AFFINITY_MIX,
        "attractive_mix": ATTRACTIVE_MIX,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    source = overrides.pop("affinity_source", None)
    if config.get("method") == "crac":
        if method not in GRAPH_METHODS and method != "auto":
            raise SparseSegError(f"clustering {method!r}: a CRAC model's affinities are segmented with "
                                 f"{' or '.join(repr(m) for m in GRAPH_METHODS)} only")
        if overrides.get("agreement"):
            raise SparseSegError("agreement filtering needs an EMA network; a CRAC model has none")
        source = source or CRAC_AFFINITY_SOURCE
        if source not in AFFINITY_SOURCES:
            raise SparseSegError(f"affinity source {source!r}: expected one of {', '.join(AFFINITY_SOURCES)}")
        mix = AFFINITY_SOURCES[source]
        opts.update(embedding_metric="cosine", affinity_mix=mix, attractive_mix=mix, agreement=None)
    elif source is not None:
        raise SparseSegError(f"affinity source {source!r}: only CRAC models have a choice of affinity maps")
    for key in ("min_size", "max_size"):
        if key in overrides:
            overrides[key] = int(round(overrides[key] * _zoom_area(zoom, z_zoom)))
    opts.update(overrides)
    return opts


def default_bias(config: dict[str, Any], method: str) -> float:
    """The bias clustering ``method`` takes by default for a model of this ``config``
    (:data:`BIAS`; 0 for clusterings without one and for "auto", which :func:`cluster` resolves
    first)."""
    return float(BIAS.get(config.get("method", "spoco"), {}).get(method, 0.0))


def default_min_size(config: dict[str, Any], zoom: float | None = None, z_zoom: float | None = None) -> int:
    """The default minimum object size in image pixels (at the model's common zoom by default;
    for a model trained with a voxel size, at the z zoom that goes with it)."""
    from .scale import model_zoom, stack_z_zoom

    zoom = model_zoom(config) if zoom is None else zoom
    if z_zoom is None:
        z_zoom = stack_z_zoom(zoom, None, config, int(config.get("network", {}).get("ndim", 2)))
    return int(round((config.get("object_area_median") or 0) * MIN_SIZE_FRACTION / _zoom_area(zoom, z_zoom)))


def foreground_threshold(config: dict[str, Any]) -> float | None:
    """The mean probability above which the foreground head calls a segment foreground: a fraction
    of c, the head's mean probability during training on annotated objects held out of its loss,
    or :data:`HELDOUT_MIN_RATIO` times its mean on the trained ones where that is larger (the
    trained ones alone for a model without held-out objects; methods.base.ForegroundConstant);
    None for a model without a foreground head."""
    fg = config.get("foreground") or {}
    c = fg.get("c")
    if c is None:
        return None
    if fg.get("c_trained") is not None and fg.get("c_heldout") is not None:
        c = max(float(c), HELDOUT_MIN_RATIO * float(fg["c_trained"]))
    return foreground_fraction(config) * float(c)


def foreground_fraction(config: dict[str, Any]) -> float:
    """The fraction of c that makes the foreground threshold of a model of this ``config``'s method."""
    return FOREGROUND_FRACTION.get(config.get("method", "spoco"), 0.5)


def resolve_background(config: dict[str, Any], background: str | None = "auto") -> str:
    """"auto" -> "foreground" for a model with a foreground head, else "largest"."""
    background = background or "auto"
    if background not in BACKGROUNDS:
        raise SparseSegError(f"background: expected one of {', '.join(BACKGROUNDS)}, got {background!r}")
    has_fg = foreground_threshold(config) is not None
    if background == "auto":
        return "foreground" if has_fg else "largest"
    if background == "foreground" and not has_fg:
        raise SparseSegError(
            "background 'foreground': this model has no foreground head (trained by an older version or "
            "with --no-foreground); use background 'largest' or 'none'"
        )
    return background


def resolve(config: dict[str, Any], method: str = "mws", zoom: float = 1.0, z_zoom: float = 1.0,
            **overrides) -> tuple[str, dict[str, Any]]:
    """(background rule, options for :func:`segment_embeddings`) for a model ``config``."""
    overrides = dict(overrides)
    background = resolve_background(config, overrides.pop("background", None))
    overrides.pop("fg_threshold", None)
    opts = clustering_options(config, method, zoom, z_zoom, **overrides)
    if background == "foreground" and overrides.get("agreement") is None:
        opts["agreement"] = None
    return background, opts


def needs_g(method: str, config: dict[str, Any] | None = None, **overrides) -> bool:
    """Whether clustering with ``method`` uses the EMA network's embeddings too."""
    return method == "consistency" or bool(resolve(config or {}, method, **overrides)[1]["agreement"])


@dataclass
class Embedded:
    """Cached network outputs for one image: f's prediction and, when needed, g's."""

    f: Prediction
    g: Prediction | None = None

    @property
    def zoom(self) -> float:
        return self.f.zoom


class PredictionCache:
    """The network outputs of the last image segmented, so that a change of a clustering knob
    re-clusters them without a network call (the napari Segment tab; a notebook loop).

    ``key`` is whatever changes the prediction for the caller (image, model and its training
    iteration, object diameter, region); anything hashable. A prediction made without the EMA
    network's embeddings does not serve a choice that needs them (:func:`needs_g`)."""

    def __init__(self):
        self.key: Any = None
        self.embedded: Embedded | None = None
        self.extra: Any = None

    def get(self, key, need_g: bool = False) -> Embedded | None:
        """The cached outputs for ``key``, or None when there are none or they lack g."""
        if self.embedded is None or self.key != key or (need_g and self.embedded.g is None):
            return None
        return self.embedded

    def put(self, key, embedded: Embedded, extra: Any = None) -> None:
        """Keep ``embedded`` for ``key`` (and the caller's ``extra``, e.g. where it was shown)."""
        self.key, self.embedded, self.extra = key, embedded, extra

    def clear(self) -> None:
        self.key = self.embedded = self.extra = None


def embed(model: Model, image: np.ndarray, need_g: bool = False, device: str = "auto", name: str = "image",
          diameter: float | None = None, voxel_size=None, precision: str = "auto") -> Embedded:
    """Predict f (and g when ``need_g``) at the model's scale; ``diameter`` (pixels) sets the zoom,
    a stack's ``voxel_size`` (z, y, x) its z zoom (default: the model's); ``precision`` the autocast
    (:func:`.device.resolve_precision`)."""
    f = predict_scaled(model, image, device=device, name=name, diameter=diameter, voxel_size=voxel_size,
                       precision=precision)
    g = (predict_scaled(model, image, device=device, name=name, use_ema=True, zoom=f.zoom, z_zoom=f.z_zoom,
                        precision=precision)
         if need_g else None)
    return Embedded(f, g)


def resize_labels(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resize of a label image to ``shape``."""
    if labels.shape == tuple(shape):
        return labels
    t = torch.from_numpy(labels.astype(np.float64))[None, None]
    return F.interpolate(t, size=tuple(shape), mode="nearest-exact")[0, 0].numpy().astype(np.int64)


def is_dense(fraction: float, annotation: dict[str, Any] | None = None) -> bool:
    """Whether "auto" calls an image dense tissue: at least :data:`DENSE_FRACTION` of it is
    foreground, or the model's ``annotation`` statistics (its config's ``annotation``; None for
    models from before them) look like dense tissue (:data:`DENSE_CONTRAST`, :data:`DENSE_INTERIOR`)."""
    if fraction >= DENSE_FRACTION:
        return True
    contrast, share = (annotation or {}).get("ring_contrast"), (annotation or {}).get("interior_share")
    return contrast is not None and share is not None and contrast < DENSE_CONTRAST and share >= DENSE_INTERIOR


def choose_clustering(method: str, foreground: np.ndarray | None, fg_threshold: float | None,
                      annotation: dict[str, Any] | None = None) -> str:
    """The clustering "auto" stands for on one image: "multicut" for dense tissue (:func:`is_dense`
    of the share of the image that is foreground and the model's ``annotation`` statistics), else
    "mws"; other choices are returned unchanged."""
    if method != "auto":
        if method not in METHODS:
            raise SparseSegError(f"clustering method {method!r}: expected one of {', '.join(CLUSTERINGS)}")
        return method
    if foreground is None or fg_threshold is None:
        return "mws"
    return "multicut" if is_dense(float(np.mean(foreground >= fg_threshold)), annotation) else "mws"


def resolved_clustering(model: Model, embedded: Embedded, method: str = "auto", fg_threshold: float | None = None,
                        **overrides) -> str:
    """The clustering :func:`cluster` runs for these choices on this image: "auto" is the multicut
    where it calls the image dense tissue (:func:`dense_reason`), else the mutex watershed; a named
    method is itself."""
    if method != "auto":
        return choose_clustering(method, None, None)
    return "multicut" if dense_reason(model, embedded, fg_threshold, **overrides) else "mws"


def dense_reason(model: Model, embedded: Embedded, fg_threshold: float | None = None, **overrides) -> str:
    """What makes "auto" call this image dense tissue, for status lines: "background none", "the
    foreground head" (at least :data:`DENSE_FRACTION` foreground) or "the annotation" (the model's
    annotation statistics, :func:`is_dense`); "" when "auto" does not call it dense (also without
    a foreground head, where the background is the largest segment)."""
    background = resolve_background(model.config, overrides.get("background"))
    if background == "none":
        return "background none"
    thr = fg_threshold if fg_threshold is not None else foreground_threshold(model.config)
    if background != "foreground" or embedded.f.foreground is None or thr is None:
        return ""
    fraction = float(np.mean(embedded.f.foreground >= thr))
    if is_dense(fraction):
        return "the foreground head"
    return "the annotation" if is_dense(fraction, model.config.get("annotation")) else ""


def cluster(model: Model, embedded: Embedded, method: str = "auto", fg_threshold: float | None = None,
            **overrides) -> np.ndarray:
    """Cluster cached predictions with the model's defaults unless overridden (no network call);
    labels at the image's resolution.

    ``method``: "auto" (default: :func:`choose_clustering` on this image; "multicut" with
    background "none") or one of :data:`.clustering.METHODS`. ``background`` (override): "auto"
    (default: "none" on an image "auto" clustering calls dense tissue, :data:`DENSE_BACKGROUND`;
    else the foreground head, or the largest segment without one), "foreground" (segments the
    foreground head calls background are 0; threshold from the model unless ``fg_threshold``),
    "largest" or "none". ``split_ratio`` (override): the mutex watershed's segments more than this
    many median annotated diameters across are clustered again (:mod:`.resplit`; default
    :data:`SPLIT_RATIO` for the model's method, 0 off), with a background rule other than "none"
    (objects on a background, where it was measured). ``rescue`` (override): with background
    "auto" deciding by the foreground head, segments the head dropped that stand out from their
    surroundings at least this many times as much as the painted objects are kept (:mod:`.rescue`;
    default :data:`.rescue.RESCUE_CONTRAST`, 0 off; needs the image in ``embedded``).
    ``min_contrast`` (override): in the same case, segments the head kept that stand out from the
    background beside them less than this fraction of the painted objects' contrast become
    background (:func:`faint_fraction`; default :data:`.rescue.FAINT_CONTRAST`, 0 off).
    """
    pred = embedded.f
    overrides = dict(overrides)
    ratio = overrides.pop("split_ratio", None)
    factor = rescue_factor(model.config, overrides.pop("rescue", None))  # a bad one is an error even unused
    faint = faint_fraction(model.config, overrides.pop("min_contrast", None))
    asked = overrides.get("background") in (None, "auto")
    chosen = resolved_clustering(model, embedded, method, fg_threshold, **overrides)
    if method == "auto" and chosen == "multicut" and asked and resolve_background(model.config) == "foreground":
        overrides = dict(overrides, background=DENSE_BACKGROUND)
    method = chosen
    background, opts = resolve(model.config, method, pred.zoom, pred.z_zoom, **overrides)
    thr = fg_threshold if fg_threshold is not None else foreground_threshold(model.config)
    if opts.get("mask") is not None:
        # a mask is given at the image's resolution; clustering runs at the model's scale
        mask = np.asarray(opts["mask"])
        if mask.shape != tuple(pred.shape):
            raise SparseSegError(f"mask: shape {mask.shape} does not match the image's {tuple(pred.shape)}")
        opts["mask"] = resize_labels(mask.astype(np.uint8), pred.embeddings.shape[1:]).astype(bool)
    user_mask = opts.get("mask")
    if embedded.g is None and method != "consistency":
        opts["agreement"] = None  # g's embeddings were not computed: cluster f alone
    if background == "foreground":
        if pred.foreground is None:
            raise SparseSegError("background 'foreground' needs the foreground probability of the model")
        premask = pred.foreground >= PREMASK_FRACTION * thr
        if opts.get("mask") is not None:
            premask &= np.asarray(opts["mask"], bool)
        opts.update(mask=premask, foreground=pred.foreground, fg_threshold=thr)
    g = embedded.g
    if method == "multicut":
        opts.update(image_boundary_options(model.config, pred))
    seg = segment_embeddings(pred.embeddings, method, embeddings_g=None if g is None else g.embeddings,
                             background=background, affinities=pred.affinities,
                             affinities_g=None if g is None else g.affinities, **opts)
    ratio = split_ratio(model.config, method, ratio)
    median = model.config.get("object_area_median") or 0
    if ratio > 0 and median > 0 and pred.affinities is not None and background != "none":
        seg = split_large(seg, pred.embeddings, pred.affinities, opts["offsets"] or default_offsets(seg.ndim),
                          split_area(ratio, median, seg.ndim), SPLIT_MIN_PIECE * median, opts["bias"],
                          **{k: opts[k] for k in ("delta_dist", "affinity_mix", "attractive_mix", "embedding_metric")
                             if k in opts})
    if asked and background == "foreground":
        seg = keep_dropped(model, pred, seg, factor, user_mask, **{k: v for k, v in overrides.items() if k != "mask"})
        seg = drop_faint_segments(model, pred, seg, faint)
    return resize_labels(seg, pred.shape)


def image_boundary_options(config: dict[str, Any], pred: Prediction) -> dict[str, Any]:
    """The multicut's ``image_boundaries`` and ``image_weight`` for an image (:mod:`.agglomeration`):
    from the image the network saw and the border statistics of the model's annotation; none
    without either."""
    from .agglomeration import image_boundaries, image_share

    ann = config.get("annotation") or {}
    weight = image_share(ann)
    if weight <= 0 or pred.image is None:
        return {}
    return {"image_boundaries": image_boundaries(pred.image, ann["border_direction"]), "image_weight": weight}


def rescue_factor(config: dict[str, Any], factor: float | None = None) -> float:
    """How many times the painted objects' contrast a segment the foreground head dropped must
    stand out by to be kept (:mod:`.rescue`): ``factor`` if given (0: off), else
    :data:`RESCUE_CONTRAST` for 2D models and 0 for 3D ones (:data:`.rescue.DEFAULT_NDIMS`); 0 for a
    model that did not measure its annotation's contrast."""
    if factor is not None and factor < 0:
        raise SparseSegError(f"rescue {factor:g}: expected 0 (off) or a factor of the painted objects' contrast, e.g. 2")
    if not (config.get("annotation") or {}).get("object_contrast"):
        return 0.0
    if factor is None:
        ndim = int((config.get("network") or {}).get("ndim", 2))
        return float(RESCUE_CONTRAST) if ndim in DEFAULT_NDIMS else 0.0
    return float(factor)


def faint_fraction(config: dict[str, Any], fraction: float | None = None) -> float:
    """The fraction of the painted objects' contrast that a segment the foreground head kept must
    stand out by to stay (:func:`.rescue.drop_faint`): ``fraction`` if given (0: off), else
    :data:`.rescue.FAINT_CONTRAST`; 0 for a model that did not measure its annotation's contrast."""
    if fraction is not None and fraction < 0:
        raise SparseSegError(f"min contrast {fraction:g}: expected 0 (off) or a fraction of the painted objects' "
                             "contrast, e.g. 0.5")
    if not (config.get("annotation") or {}).get("object_contrast"):
        return 0.0
    return float(FAINT_CONTRAST if fraction is None else fraction)


def drop_faint_segments(model: Model, pred: Prediction, seg: np.ndarray, fraction: float) -> np.ndarray:
    """``seg`` (the model's scale) without the segments that stand out less than ``fraction``
    (:func:`faint_fraction`) times the painted objects' contrast (:func:`.rescue.drop_faint`)."""
    if fraction <= 0 or pred.image is None:
        return seg
    return drop_faint(pred.image, seg, model.config.get("object_area_median") or 0,
                      model.config["annotation"]["object_contrast"], fraction, pred.image_spread)


def keep_dropped(model: Model, pred: Prediction, seg: np.ndarray, factor: float, mask: np.ndarray | None = None,
                 give_way: int = 0, **overrides) -> np.ndarray:
    """``seg`` (the model's scale) with the objects the foreground head dropped added (:func:`.rescue.rescue`):
    segments of a mutex watershed without the head (largest segment as background, within the user's
    ``mask``) of the painted size that stand out ``factor`` (:func:`rescue_factor`) times as much as
    the painted objects. Segments of ``seg`` under ``give_way`` pixels count as background (a block
    clustered without the size limit, :mod:`.blocks`). ``overrides``: those of :func:`cluster`."""
    median = model.config.get("object_area_median") or 0
    if factor <= 0 or median <= 0 or pred.image is None:
        return seg
    keep = {k: v for k, v in overrides.items() if k in ("bias", "min_size", "affinity_mix", "affinity_source")}
    _, opts = resolve(model.config, "mws", pred.zoom, pred.z_zoom, background="largest", **keep)
    opts.update(agreement=None, mask=mask, strides=[CANDIDATE_STRIDE] * seg.ndim)
    candidates = segment_embeddings(pred.embeddings, "mws", background="largest", affinities=pred.affinities, **opts)
    return rescue(pred.image, seg, candidates, median, model.config["annotation"]["object_contrast"], factor,
                  spread=pred.image_spread, min_size=give_way)


def segment(model: Model, image: np.ndarray, method: str = "auto", device: str = "auto", name: str = "image",
            diameter: float | None = None, voxel_size=None, precision: str = "auto", **overrides) -> np.ndarray:
    """Instance labels for ``image``: :func:`embed`, then :func:`cluster`."""
    embedded = embed(model, image, needs_g(method, model.config, **overrides), device, name, diameter, voxel_size,
                     precision)
    return cluster(model, embedded, method, **overrides)
