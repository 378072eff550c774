"""Checks on a user's sparse annotation that predict trouble in training."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage, stats

from .rescue import painted_contrast
from .scale import object_diameters


@dataclass
class AnnotationReport:
    n_objects: int
    ids: list[int]
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.n_objects == 0:
            return "No objects annotated yet: paint a few complete objects, one id each."
        return f"{self.n_objects} object{'s' if self.n_objects != 1 else ''} annotated"


def check_annotations(labels: np.ndarray, background_id: int | None = None) -> AnnotationReport:
    """Count annotated objects and warn about pieces sharing one id, specks and border cuts."""
    labels = np.asarray(labels)
    ids = [int(i) for i in np.unique(labels) if i != 0 and i != background_id]
    report = AnnotationReport(len(ids), ids)
    slices = ndimage.find_objects(labels)
    specks = speck_ids(labels, background_id).tolist()
    speck_set = set(specks)
    split, border = [], []
    for i in ids:
        sl = slices[i - 1] if i - 1 < len(slices) else None
        if sl is None or i in speck_set:
            continue
        mask = labels[sl] == i
        if ndimage.label(mask)[1] > 1:
            split.append(i)
        if any(s.start == 0 or s.stop == n for s, n in zip(sl, labels.shape)):
            border.append(i)

    if split:
        report.warnings.append(
            f"Label(s) {_ids_text(split)} consist of separate pieces: touching or distant objects need their own id."
        )
    if specks:
        report.warnings.append(f"Label(s) {_ids_text(specks)} have no interior pixel: too thin or small to learn "
                               "from (stray brush strokes?)")
    if border:
        report.warnings.append(
            f"Label(s) {_ids_text(border)} touch the image border: they are treated as complete objects."
        )
    return report


def speck_ids(labels: np.ndarray, background_id: int | None = None) -> np.ndarray:
    """Ids of the painted objects without an interior pixel: no pixel of theirs has all four
    in-plane (y/x) neighbours in the same object (a 3 x 3 square has one). Beyond the image border
    counts as the same object, so an object cut by the border keeps its interior.

    Such an object has no inside to tell from its boundary: a stray click, a line, what is left of
    an erased object, a sliver cut by the border. The Annotate tab warns about them; training uses
    them as painted (leaving them out of training and of the object size was measured on the
    suite and is not the default: docs/benchmarks.md, "Painted specks")."""
    lab = np.asarray(labels)
    p = np.pad(lab, [(0, 0)] * (lab.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    c = p[..., 1:-1, 1:-1]
    inner = (c == p[..., :-2, 1:-1]) & (c == p[..., 2:, 1:-1]) & (c == p[..., 1:-1, :-2]) & (c == p[..., 1:-1, 2:])
    ids = np.setdiff1d(np.unique(lab), np.unique(c[inner]))
    return ids[(ids > 0) & (ids != (background_id if background_id is not None else 0))]


def _ids_text(v) -> str:
    return ", ".join(map(str, v[:8])) + (" ..." if len(v) > 8 else "")


#: annotation_statistics: the image is smoothed by this many object diameters before pixels are compared
RING_SMOOTH = 0.1
#: ... interiors are the annotated pixels deeper than this many diameters inside an object
RING_INNER = 0.075
#: ... and the ring the unannotated pixels between RING_INNER and this many diameters outside
RING_OUTER = 0.4
#: ... an unannotated pixel looks like an interior when its projection lies within these quantiles
#: of the interiors' projections
INTERIOR_RANGE = (0.02, 0.98)
#: at most this many pixels of either kind are compared
RING_PIXELS = 20000
#: at most this many objects per image are looked at
RING_OBJECTS = 200


def annotation_statistics(images: list[np.ndarray], labels: list[np.ndarray],
                          valid: list[np.ndarray] | None = None, seed: int = 0) -> dict:
    """What the annotation shows about the images, before any training: dense tissue (cells that
    fill the image) or objects on a background, and how much the objects stand out. Two figures,
    each a mean over the images, and a median:

    - ``ring_contrast``: how well intensity tells the annotated objects from what lies just outside
      them: per image, the ROC AUC in [0.5, 1] of one projection of the channels (Fisher's
      discriminant, either polarity) between object interiors and a ring of unannotated pixels
      around them (:data:`RING_INNER`-:data:`RING_OUTER` median diameters away; the image smoothed
      by :data:`RING_SMOOTH` diameters). Objects on a background score high (the ring is
      background); dense tissue and crowded objects low (the ring is their unannotated neighbours).
    - ``interior_share``: the share of the unannotated pixels whose projection lies in the range of
      the interiors' (:data:`INTERIOR_RANGE`): most of the image in dense tissue, the objects'
      share of it on a background, crowded or not.

    ``images`` are (C, *S), ``labels`` (*S) with 0 unannotated, ``valid`` (*S) False where ignored.
    - ``object_contrast``: the median painted object's contrast to the ring around it
      (:func:`.rescue.painted_contrast`): how much an object stands out, for the objects the
      foreground head drops (:mod:`.rescue`).

    - ``border_direction`` and ``border_contrast``: the channel weighting that is high on the
      painted objects' own borders and low in their interiors, and the ROC AUC in [0, 1] of that
      projection between border and interior pixels (:func:`border_statistics`): where a membrane
      stain or an EM membrane shows in the image itself, for the multicut's superpixels and edge
      costs (:func:`.agglomeration.image_boundaries`).

    A figure is None where there is nothing to compare (no object; every pixel annotated)."""
    valid = valid if valid is not None else [None] * len(labels)
    out: dict = {"ring_contrast": None, "interior_share": None, "object_contrast": None,
                 "border_direction": None, "border_contrast": None}
    diam = [d for lab in labels if np.any(lab) for d in object_diameters(lab)]
    if not diam:
        return out
    out["object_contrast"] = painted_contrast(images, labels)
    out["border_direction"], out["border_contrast"] = border_statistics(images, labels, valid, seed)
    d = float(np.median(diam))
    rng = np.random.default_rng(seed)
    aucs, shares, weights, rest = [], [], [], []
    for img, lab, ok in zip(images, labels, valid):
        lab = np.asarray(lab)
        ok = np.ones(lab.shape, bool) if ok is None else np.asarray(ok, bool)
        if not lab.any():
            continue
        smooth = np.stack([ndimage.gaussian_filter(np.asarray(c, np.float32), RING_SMOOTH * d) for c in img], -1)
        inside, ring = _object_pixels(smooth, lab, ok, d, rng)
        if min(len(inside), len(ring)) < 2:
            continue
        a, b = _draw(inside, rng), _draw(ring, rng)
        w = fisher_direction(a, b)
        aucs.append(_auc(a @ w, b @ w))
        weights.append(min(len(inside), len(ring)))
        unpainted = ok & (lab == 0)
        others = _draw(smooth[unpainted], rng) @ w
        lo, hi = np.quantile(a @ w, INTERIOR_RANGE)
        shares.append(float(np.mean((others >= lo) & (others <= hi))))
        rest.append(int(np.count_nonzero(unpainted)))
    if aucs:
        out["ring_contrast"] = float(np.average(aucs, weights=weights))
        out["interior_share"] = float(np.average(shares, weights=rest))
    return out


def looks_dense(images: list[np.ndarray], labels: list[np.ndarray], ignore: list | None = None, seed: int = 0,
                background_id: int | None = None) -> bool:
    """Whether the painted objects look like dense tissue: :func:`.segment.is_dense` of their
    :func:`annotation_statistics` alone (the images as given; ``ignore``: per image a mask of
    pixels to leave out, or None; pixels labeled ``background_id`` are not an object)."""
    from .segment import is_dense

    if background_id is not None:
        labels = [np.where(np.asarray(lab) == background_id, 0, lab) for lab in labels]
    valid = [None if m is None else ~np.asarray(m).astype(bool) for m in ignore or [None] * len(labels)]
    return is_dense(0.0, annotation_statistics(images, labels, valid, seed))


def border_statistics(images: list[np.ndarray], labels: list[np.ndarray], valid: list[np.ndarray | None] | None = None,
                      seed: int = 0) -> tuple[list[float] | None, float | None]:
    """How the image itself marks the painted objects' borders: (channel weights, ROC AUC).

    Border pixels are a painted object's own outermost pixels (where it meets anything else),
    interior pixels the rest of it. The weights (C,) point from the interiors to the borders
    (Fisher's discriminant; for one channel +1 if borders are brighter, else -1), scaled so that
    their absolute values sum to 1; the AUC (in [0, 1], 0.5: the borders look like the interiors)
    is that projection's, borders against interiors. (None, None) without both kinds of pixel."""
    from skimage.segmentation import find_boundaries

    rng = np.random.default_rng(seed)
    valid = valid if valid is not None else [None] * len(labels)
    border, inside = [], []
    for img, lab, ok in zip(images, labels, valid):
        lab = np.asarray(lab)
        if not lab.any():
            continue
        painted = lab > 0 if ok is None else (lab > 0) & np.asarray(ok, bool)
        edge = find_boundaries(lab, mode="inner") & painted
        pixels = np.moveaxis(np.asarray(img, np.float32), 0, -1)
        border.append(_draw(pixels[edge], rng))
        inside.append(_draw(pixels[painted & ~edge], rng))
    b = np.concatenate(border) if border else np.zeros((0, 1))
    a = np.concatenate(inside) if inside else np.zeros((0, 1))
    if min(len(a), len(b)) < 2:
        return None, None
    w = fisher_direction(b, a) if b.shape[1] > 1 else np.array([1.0 if b.mean() >= a.mean() else -1.0])
    w = w / max(float(np.abs(w).sum()), 1e-12)
    return [float(x) for x in w], _roc_auc(b @ w, a @ w)


def _object_pixels(smooth: np.ndarray, lab: np.ndarray, ok: np.ndarray, d: float,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (N, C) of ``smooth`` (*S, C) in one image's object interiors and in the ring around
    them, each ring pixel counted for the annotated object nearest to it. Computed object by object
    in a box around each (at most :data:`RING_OBJECTS` objects, drawn at random), so that a large
    stack costs what its annotated objects cost."""
    boxes = [(i, s) for i, s in enumerate(ndimage.find_objects(lab), start=1) if s is not None]
    if len(boxes) > RING_OBJECTS:
        boxes = [boxes[j] for j in sorted(rng.choice(len(boxes), RING_OBJECTS, replace=False))]
    margin = int(np.ceil(2 * RING_OUTER * d)) + 2  # a ring pixel's nearest object lies within 2 RING_OUTER d
    inside, ring = [], []
    for i, box in boxes:
        crop = tuple(slice(max(0, s.start - margin), min(n, s.stop + margin)) for s, n in zip(box, lab.shape))
        sub, valid = lab[crop], ok[crop]
        fg = sub > 0
        depth = ndimage.distance_transform_edt(fg)
        dist, nearest = ndimage.distance_transform_edt(~fg, return_indices=True)
        pick_in = valid & (sub == i) & (depth > RING_INNER * d)
        pick_out = (valid & ~fg & (dist > RING_INNER * d) & (dist <= RING_OUTER * d)
                    & (sub[tuple(nearest)] == i))
        inside.append(_draw(smooth[crop][pick_in], rng, np.float32))
        ring.append(_draw(smooth[crop][pick_out], rng, np.float32))
    channels = smooth.shape[-1]
    return (np.concatenate(inside) if inside else np.zeros((0, channels), np.float32),
            np.concatenate(ring) if ring else np.zeros((0, channels), np.float32))


def _roc_auc(a: np.ndarray, b: np.ndarray) -> float:
    """ROC AUC in [0, 1] of two sets of scores: the chance that a score of ``a`` exceeds one of ``b``."""
    ranks = stats.rankdata(np.concatenate([a, b]))
    return float((ranks[: len(a)].sum() - len(a) * (len(a) + 1) / 2) / (len(a) * len(b)))


def _auc(a: np.ndarray, b: np.ndarray) -> float:
    """ROC AUC in [0.5, 1] of two sets of scores (either polarity: per image, objects may be
    brighter or darker than their surroundings)."""
    auc = _roc_auc(a, b)
    return max(auc, 1.0 - auc)


def _draw(pixels: np.ndarray, rng: np.random.Generator, dtype=np.float64) -> np.ndarray:
    """At most RING_PIXELS rows of ``pixels`` (N, C), drawn without replacement."""
    if len(pixels) > RING_PIXELS:
        pixels = pixels[rng.choice(len(pixels), RING_PIXELS, replace=False)]
    return pixels.astype(dtype)


def fisher_direction(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fisher's linear discriminant of two sets of pixels (N, C): the channel weighting that best
    separates them, pointing from ``b`` to ``a`` (the channel itself for one channel)."""
    if a.shape[1] == 1:
        return np.ones(1)
    cov = np.cov(np.concatenate([a - a.mean(0), b - b.mean(0)]).T)
    return np.linalg.solve(cov + 1e-3 * np.eye(cov.shape[0]), a.mean(0) - b.mean(0))
