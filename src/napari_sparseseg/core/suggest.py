"""Where to label next: an uncertainty map and the predicted objects where it is highest.

The uncertainty of a pixel is the disagreement of two estimates of its affinities (the probability
that it and its partner at each offset belong to one object), each a model already has:

- a model with an EMA network g (SPOCO): f's affinities against g's, and f's foreground
  probability against g's (the disagreement of f and g SPOCO's consistency term trains down);
- a model without g (CRAC): the affinity head's (implicit) affinities against the cosine
  similarities of the embeddings (explicit), the two representations CRAC trains to agree.

Where they disagree the network has not learnt what the labels say; one more painted object
there teaches it most. :func:`suggest` ranks the predicted segments by their mean uncertainty
times their typicality (min / max of the segment's size and the median painted object's: a clump
or a fragment teaches less than a typical object, the cold start of active learning; chosen on the
benchmark, docs/benchmarks.md section 7), skipping those the annotation already covers and
fragments much smaller than a painted object, and
spreads the list out: a segment whose box overlaps a box already suggested waits until the spread-out
ones are listed (uncertain segments cluster, and five suggestions on one tangle teach less than five
places).

A model with a foreground head can also be blind: with a few painted objects it learns "as bright as
these" and calls much brighter objects background (docs/method.md), and a predicted segment can never
point there. :func:`suggest_for_image` therefore also clusters without the head (the largest segment
as background) and lists, as ``kind`` "background", one in each run of five places (the first of
them; :data:`MISSED_SHARE`, :func:`interleave`) where a segment of the painted size that the head
dropped stands out from its surroundings at least twice as much as the painted objects do
(:data:`MISSED_CONTRAST`, :func:`missed_objects`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .checkpoint import Model
from .clustering import cosine_affinities
from .errors import SparseSegError
from .io import to_channels_first
from .prediction import predict_scaled, to_image_shape
from .rescue import dropped_objects, painted_contrast
from .segment import Embedded, cluster, dense_reason, rescue_factor, resolve_background

#: a segment counts as annotated when this fraction of it is painted already
ANNOTATED_FRACTION = 0.2
#: segments smaller than this fraction of the median painted object (of the median segment when
#: nothing is painted) are fragments, not objects one would paint
MIN_SIZE_FRACTION = 0.25
#: at most this share of the suggestions (at least one) are segments the foreground head dropped
MISSED_SHARE = 0.2
#: ... that stand out from a ring around them at least this many times as much as the median painted
#: object does from its ring (:func:`.rescue.ring_contrasts`). On the suite's blob datasets (s30's
#: models, training images) the nuclei the head dropped stand out 2.4-6.3x (nuclei 2D) and 3.5-5.5x
#: (nuclei_mix, fluorescence), the dropped non-objects 1.4-1.7x (mitochondria: membranes, dark
#: organelles) and below 1.1x (nuclei_mix). Lower than segmentation's :data:`.rescue.RESCUE_CONTRAST`:
#: a place pointed at costs the annotator a look, a segment kept costs the score when it is wrong
MISSED_CONTRAST = 2.0


@dataclass
class Suggestion:
    """One place to paint next: a predicted segment (``label`` in the segmentation), its mean
    uncertainty ``score``, ``centroid`` and bounding box (``start``, ``stop``) in pixels, ``size``."""

    label: int
    score: float
    centroid: tuple[float, ...]
    start: tuple[int, ...]
    stop: tuple[int, ...]
    size: int
    #: "uncertain": a predicted object the model is unsure of; "background": a segment the
    #: foreground head calls background although it stands out like the painted objects
    kind: str = "uncertain"
    #: the segment within its bounding box (start, stop)
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def box(self) -> tuple[slice, ...]:
        """The bounding box as slices (``mask`` covers it)."""
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))


def pair_inside(offsets: list[list[int]], shape: tuple[int, ...]) -> np.ndarray:
    """(K, *shape) mask: the pixel's partner at each offset lies inside the image."""
    valid = np.zeros((len(offsets),) + tuple(shape), bool)
    for c, off in enumerate(offsets):
        valid[(c,) + tuple(slice(max(0, -o), s - max(0, o)) for o, s in zip(off, shape))] = True
    return valid


def _disagreement(a: np.ndarray, b: np.ndarray, offsets: list[list[int]] | None = None) -> np.ndarray:
    """Mean |a - b| over channels; for affinities (``offsets``) only over the pairs inside the image,
    where the two estimates mean something (edges leaving the image are a convention, not a guess)."""
    diff = np.abs(a.astype(np.float32) - b.astype(np.float32))
    if offsets is None or len(offsets) != a.shape[0]:
        return diff.mean(axis=0)
    valid = pair_inside(offsets, a.shape[1:])
    return (diff * valid).sum(axis=0) / np.maximum(valid.sum(axis=0), 1)


def uncertainty(model: Model, image: np.ndarray, *, device: str = "auto", name: str = "image",
                diameter: float | None = None, embedded: Embedded | None = None) -> tuple[np.ndarray, Embedded]:
    """Per-pixel uncertainty in [0, 1] at the image's resolution, and the predictions it came from
    (pass them to :func:`suggest` or :func:`.segment.cluster`; ``embedded`` reuses earlier ones)."""
    if embedded is None:
        f = predict_scaled(model, image, device=device, name=name, diameter=diameter)
        g = None
        if model.ema is not None:
            g = predict_scaled(model, image, device=device, name=name, use_ema=True, zoom=f.zoom)
        embedded = Embedded(f, g)
    f, g = embedded.f, embedded.g
    offsets = model.config.get("offsets")
    if g is None and model.ema is not None:
        g = predict_scaled(model, image, device=device, name=name, use_ema=True, zoom=f.zoom)
        embedded = Embedded(f, g)
    if g is not None and f.affinities is not None and g.affinities is not None:
        u = _disagreement(f.affinities, g.affinities, offsets)
        if f.foreground is not None and g.foreground is not None:
            u = 0.5 * (u + np.abs(f.foreground - g.foreground))
    elif g is not None:
        u = _disagreement(f.embeddings, g.embeddings) / 2.0  # unit-norm embeddings: |a - b| <= 2
    elif f.affinities is not None and offsets:
        u = _disagreement(f.affinities, cosine_affinities(f.embeddings, offsets), offsets)
    else:
        raise SparseSegError(f"model {model.path}: neither an EMA network nor an affinity head to measure "
                             "uncertainty with")
    u = to_image_shape(np.clip(u, 0.0, 1.0)[None], f.shape)[0]
    return u.astype(np.float32), embedded


def _overlap(a: Suggestion, b: Suggestion) -> bool:
    return all(s0 < t1 and t0 < s1 for s0, s1, t0, t1 in zip(a.start, a.stop, b.start, b.stop))


def _check_annotation(annotation: np.ndarray | None, shape: tuple[int, ...]) -> None:
    if annotation is not None and np.shape(annotation) != shape:
        raise SparseSegError(f"annotation: shape {np.shape(annotation)} does not match the image's {shape}")


def suggest(uncertainty_map: np.ndarray, segmentation: np.ndarray, annotation: np.ndarray | None = None,
            n: int = 5) -> list[Suggestion]:
    """The ``n`` predicted segments with the highest mean uncertainty times typicality (see the
    module) that the ``annotation`` (labels, 0 = unpainted; same shape) does not already cover,
    highest first (``score``: the mean uncertainty alone); fragments
    (:data:`MIN_SIZE_FRACTION`) are left out and segments overlapping an earlier suggestion's box come
    after the ones that do not."""
    u, seg = np.asarray(uncertainty_map, np.float32), np.asarray(segmentation)
    if u.shape != seg.shape:
        raise SparseSegError(f"uncertainty: shape {u.shape} does not match the segmentation's {seg.shape}")
    _check_annotation(annotation, seg.shape)
    ids = np.unique(seg)
    ids = ids[ids > 0]
    if ids.size == 0:
        return []
    index = ids.tolist()
    sizes = ndimage.sum_labels(np.ones_like(u), seg, index)
    scores = ndimage.mean(u, seg, index)
    painted = np.zeros(len(index))
    reference = float(np.median(sizes))
    if annotation is not None:
        lab = np.asarray(annotation)
        painted = ndimage.sum_labels((lab > 0).astype(np.float32), seg, index) / sizes
        objects = np.bincount(lab[lab > 0].ravel().astype(np.int64))
        if np.any(objects > 0):
            reference = float(np.median(objects[objects > 0]))
    centroids = ndimage.center_of_mass(np.ones_like(u), seg, index)
    boxes = ndimage.find_objects(seg.astype(np.int64))
    # typical objects first: an atypical segment (a clump, a fragment) is ranked down by how many
    # times larger or smaller than the painted median it is
    typical = np.minimum(sizes, reference) / np.maximum(sizes, reference)  # both >= 1 pixel
    spread, crowded = [], []
    for k in np.argsort(-(np.asarray(scores) * typical), kind="stable"):
        if painted[k] >= ANNOTATED_FRACTION or sizes[k] < MIN_SIZE_FRACTION * reference:
            continue
        box = boxes[index[k] - 1]
        cand = Suggestion(int(index[k]), float(scores[k]), tuple(float(c) for c in centroids[k]),
                          tuple(s.start for s in box), tuple(s.stop for s in box), int(sizes[k]),
                          mask=seg[box] == index[k])
        (crowded if any(_overlap(cand, s) for s in spread) else spread).append(cand)
        if len(spread) == n:
            break
    return (spread + crowded)[:n]


def missed_objects(image: np.ndarray, candidates: np.ndarray, segmentation: np.ndarray, annotation: np.ndarray,
                   n: int, uncertainty_map: np.ndarray | None = None) -> list[Suggestion]:
    """Up to ``n`` segments of ``candidates`` (a clustering without the foreground head) that the
    ``segmentation`` leaves as background and nothing in the ``annotation`` covers, of the painted
    size, that stand out from their surroundings at least :data:`MISSED_CONTRAST` times as much as
    the median painted object does (:func:`.rescue.dropped_objects`, :func:`.rescue.painted_contrast`);
    most contrasted first, ``kind`` "background", ``score`` their mean in ``uncertainty_map`` (0
    without one)."""
    lab = np.asarray(annotation)
    objects = np.bincount(lab[lab > 0].ravel().astype(np.int64))
    objects = objects[objects > 0]
    if n <= 0 or objects.size == 0:
        return []
    img = to_channels_first(image, candidates.ndim).astype(np.float32, copy=False)
    if img.shape[1:] != candidates.shape:
        raise SparseSegError(f"image: shape {np.shape(image)} does not match the segmentation's {candidates.shape}")
    needed = MISSED_CONTRAST * painted_contrast([img], [lab])
    ids, _ = dropped_objects(img, candidates, segmentation, float(np.median(objects)), needed, covered=lab > 0)
    boxes = ndimage.find_objects(candidates.astype(np.int64))
    out = []
    for i in ids[:n]:
        box = boxes[i - 1]
        mask = candidates[box] == i
        centroid = tuple(float(np.mean(c)) + b.start for c, b in zip(np.nonzero(mask), box))
        score = 0.0 if uncertainty_map is None else float(np.asarray(uncertainty_map)[box][mask].mean())
        out.append(Suggestion(int(i), score, centroid, tuple(b.start for b in box),
                              tuple(b.stop for b in box), int(mask.sum()), kind="background", mask=mask))
    return out


def suggest_for_image(model: Model, image: np.ndarray, annotation: np.ndarray | None = None, n: int = 5, *,
                      device: str = "auto", name: str = "image", diameter: float | None = None, **cluster_options):
    """Predict, segment (the model's defaults unless ``cluster_options``) and suggest: returns the
    uncertainty map, the segmentation and the suggestions. Where the foreground head decided the
    background, segments it dropped that stand out like the painted objects take one place in each
    five (:func:`missed_objects`, :func:`interleave`; ``kind`` "background", their ``label`` is not
    one of the segmentation's, their ``mask`` says where they are): the segmentation may keep them
    (:mod:`.rescue`), but the head still calls them background, and one painted teaches it most."""
    u, embedded = uncertainty(model, image, device=device, name=name, diameter=diameter)
    seg = cluster(model, embedded, **cluster_options)
    _check_annotation(annotation, seg.shape)
    missed: list[Suggestion] = []
    if (annotation is not None and not cluster_options and embedded.f.foreground is not None
            and resolve_background(model.config) == "foreground" and not dense_reason(model, embedded)):
        # the head's own decision: the segmentation itself unless it kept dropped segments (core.rescue)
        by_head = cluster(model, embedded, rescue=0) if rescue_factor(model.config) else seg
        candidates = cluster(model, embedded, method="mws", background="largest")
        missed = missed_objects(image, candidates, by_head, annotation, max(1, int(np.ceil(MISSED_SHARE * n))), u)
    # a dropped segment the segmentation keeps is listed once, as "background"
    kept = {int(v) for m in missed for v in np.unique(seg[m.box][m.mask]) if v}
    uncertain = [s for s in suggest(u, seg, annotation, n + len(kept)) if s.label not in kept]
    return u, seg, interleave(missed, uncertain, n)


def interleave(missed: list[Suggestion], uncertain: list[Suggestion], n: int) -> list[Suggestion]:
    """``n`` suggestions: one of ``missed`` first in each run of 1 / :data:`MISSED_SHARE` places
    (the first five hold one), ``uncertain`` ones in the others; either fills in when the other runs out."""
    every = max(1, int(round(1 / MISSED_SHARE)))
    missed, uncertain, out = list(missed), list(uncertain), []
    while (missed or uncertain) and len(out) < n:
        take_missed = missed and (len(out) % every == 0 or not uncertain)
        out.append((missed if take_missed else uncertain).pop(0))
    return out
