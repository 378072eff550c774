"""Objects the foreground head is blind to, found again by how much they stand out.

With a few painted objects the positive-unlabeled foreground head learns "as bright as these": it
calls objects much brighter (or darker) than every painted one background, and the segmentation
drops them whole (docs/method.md; the suite's nuclei 2D). Whether a region is an object can also
be read from the image and the annotation alone: a painted object stands out from the pixels just
around it by some contrast, and a region that stands out from its surroundings much more than
that, and is of the painted size, is an object however the head scores it. The other way round,
a segment the head kept that stands out from the background beside it much less than the painted
objects do from their surroundings is background texture (:func:`drop_faint`).

:func:`painted_contrast` measures the annotation's contrast once, when training starts (stored in
the model's ``config.json`` under ``annotation``); :func:`rescue` adds, to a segmentation whose
background the head decided, the segments of a clustering without the head that the segmentation
left as background, that are of the painted size and stand out at least :data:`RESCUE_CONTRAST`
times as much as the median painted object. :mod:`.suggest` uses the same measure to point at
such places ("background?") when the rescue is off.

Contrast of a region: the distance between its mean intensity and that of a ring around it
(:data:`RING_WIDTH` median painted diameters wide), per channel over the image's 1-99 % spread,
so it is the same figure whatever the image's intensity range and either polarity.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import relabel_sequential

from .clustering import filter_sizes

#: a dropped segment is an object when it stands out at least this many times as much as the median
#: painted object. On the suite's blob datasets (run s30's models, training images) the nuclei the
#: head dropped stand out 2.4-6.3x (nuclei 2D) and 3.5-5.5x (nuclei_mix, fluorescence), the dropped
#: non-objects 1.4-1.7x (mitochondria: membranes, dark organelles) and below 1.1x (nuclei_mix).
#: Chosen on the suite's models (docs/benchmarks.md, "Objects the head is blind to"): 2, 2.5 and 3
#: gain nuclei 2D alike; 2 also keeps non-objects on mitochondria (AP50 0.224 -> 0.218), 3 is the
#: best mean rank
RESCUE_CONTRAST = 3.0
#: on by default for images of these dimensions: in 3D the suite's nuclei gained nothing (no dropped
#: nucleus stood out enough) and the second clustering costs more than the first (docs/benchmarks.md)
DEFAULT_NDIMS = (2,)
#: the clustering without the head draws its long-range (repulsive) pairs on this grid step along
#: each axis (the mutex watershed's ``strides``). 1, every pair: a step of 2 was 2.5x faster on a
#: nuclei 2D test image (4.3 -> 1.7 s) but cut what it found (suite nuclei 2D, seed 2: AP50 0.820 ->
#: 0.762; docs/benchmarks.md)
CANDIDATE_STRIDE = 1
#: the ring is this many times the median painted object's diameter wide (at least 2 pixels)
RING_WIDTH = 0.25
#: a dropped segment is of the painted size within this factor of the median painted object, either way
SIZE_FACTOR = 4.0
#: a segment counts as dropped when less than this share of it is in the segmentation
DROPPED_SHARE = 0.2
#: at most this many painted objects per image are measured
PAINTED_OBJECTS = 50
#: the other way round: a segment the foreground head kept that stands out from the background
#: beside it less than this fraction of the median painted object's contrast is not an object
#: (:func:`drop_faint`; 0: off). On the suite's nuclei 3D models the kept segments that match no
#: nucleus (background texture, cell walls, pieces of a nucleus) stand out a median 0.24-0.34x,
#: the matched ones 0.56x or more (5th percentile). Chosen on the suite's models re-clustered (runs
#: s30, s37, e3d; docs/benchmarks.md, "Segments fainter than the painted objects"): at 0.5 every
#: blob set of every run gains (CVPPP, nuclei 2D, nuclei_mix, mitochondria, nuclei 3D 0.230 -> 0.248
#: over six models); 0.75 and 1 drop dim cells from the synthetic demo's clumps (SBD 0.84 -> 0.82,
#: 0.75)
FAINT_CONTRAST = 0.5
#: :func:`drop_faint` measures a kept segment against the background (the pixels no segment holds)
#: within this many median painted diameters of it, not against its whole ring: a cell in a clump
#: is compared with the background beside the clump, not with its brighter neighbours (against the
#: whole ring, the demo's dim cells in clumps were dropped: SBD 0.84 -> 0.67). 0.25 kept more of
#: nuclei 3D's gain (s30 / s37 0.291 / 0.171 vs 0.287 / 0.154) but cost the demo 0.04 SBD; 1 gains
#: less on nuclei 3D (0.281 / 0.145)
FAINT_RING_WIDTH = 0.5


def image_spread(img: np.ndarray) -> np.ndarray:
    """Per channel of ``img`` (C, *S): its 1-99 % percentile range (from at most ~100 k pixels)."""
    flat = img.reshape(img.shape[0], -1)
    lo, hi = np.percentile(flat[:, :: max(1, flat.shape[1] // 100000)], [1, 99], axis=1)
    return np.maximum(hi - lo, 1e-6)


def ring_width(median_size: float, ndim: int, diameters: float = RING_WIDTH) -> int:
    """The ring's width in pixels for objects of ``median_size`` pixels: ``diameters`` of them."""
    return max(2, int(round(diameters * (float(median_size) ** (1.0 / ndim)))))


def ring_contrasts(img: np.ndarray, spread: np.ndarray, seg: np.ndarray, ids, width: int,
                   background_only: bool = False) -> np.ndarray:
    """Per segment of ``seg`` in ``ids``: the distance between its mean intensity and that of a ring
    ``width`` pixels wide around it, per channel of ``img`` (C, *S) over its ``spread`` (C,); 0 for a
    segment with no ring (it fills the image). ``background_only``: the ring is only the pixels where
    ``seg`` is 0, and a segment with no such pixel around it gets infinity."""
    boxes = ndimage.find_objects(seg.astype(np.int64))
    out = np.zeros(len(ids))
    for k, i in enumerate(ids):
        box = tuple(slice(max(0, b.start - width), b.stop + width) for b in boxes[i - 1])
        inside = seg[box] == i
        ring = ndimage.binary_dilation(inside, iterations=width) & ~inside
        if background_only:
            ring &= seg[box] == 0
            if not ring.any():
                out[k] = np.inf
                continue
        if not ring.any():
            continue
        crop = img[(slice(None),) + box]
        out[k] = float(np.linalg.norm((crop[:, inside].mean(1) - crop[:, ring].mean(1)) / spread))
    return out


def painted_contrast(images: list[np.ndarray], labels: list[np.ndarray]) -> float | None:
    """The median contrast (:func:`ring_contrasts`) of the painted objects of ``labels`` (*S; 0
    unpainted) in ``images`` (C, *S), at most :data:`PAINTED_OBJECTS` per image; None without any."""
    sizes = [np.bincount(np.asarray(lab).ravel().astype(np.int64))[1:] for lab in labels]
    painted = np.concatenate([s[s > 0] for s in sizes]) if sizes else np.zeros(0)
    if painted.size == 0:
        return None
    out = []
    for img, lab in zip(images, labels):
        lab = np.asarray(lab).astype(np.int64)
        ids = np.unique(lab[lab > 0])[:PAINTED_OBJECTS]
        if ids.size:
            img = np.asarray(img, np.float32)
            out.append(ring_contrasts(img, image_spread(img), lab, ids.tolist(), ring_width(np.median(painted), lab.ndim)))
    return float(np.median(np.concatenate(out)))


def dropped_objects(img: np.ndarray, candidates: np.ndarray, segmentation: np.ndarray, median_size: float,
                    needed: float, covered: np.ndarray | None = None,
                    spread: np.ndarray | None = None) -> tuple[list[int], np.ndarray]:
    """The segments of ``candidates`` (a clustering without the foreground head) that stand out at
    least ``needed`` (:func:`ring_contrasts` on ``img`` (C, *S)), most contrasted first, with their
    contrasts: of the painted size (within :data:`SIZE_FACTOR` of ``median_size``) and left as
    background by ``segmentation`` (less than :data:`DROPPED_SHARE` of them in it, or in ``covered``).
    ``spread``: the whole image's (:func:`image_spread`) when ``img`` is a block of it."""
    ids = np.unique(candidates)
    ids = ids[ids > 0]
    if ids.size == 0:
        return [], np.zeros(0)
    index = ids.tolist()
    sizes = ndimage.sum_labels(np.ones(candidates.shape, np.float32), candidates, index)
    taken = segmentation > 0 if covered is None else (segmentation > 0) | covered
    kept = ndimage.mean(taken, candidates, index)
    typical = (sizes >= median_size / SIZE_FACTOR) & (sizes <= median_size * SIZE_FACTOR)
    pick = [i for i, ok, k in zip(index, typical, kept) if ok and k < DROPPED_SHARE]
    if not pick:
        return [], np.zeros(0)
    spread = image_spread(img) if spread is None else np.asarray(spread, np.float64)
    contrast = ring_contrasts(img, spread, candidates, pick, ring_width(median_size, candidates.ndim))
    order = [k for k in np.argsort(-contrast, kind="stable") if contrast[k] >= needed]
    return [pick[k] for k in order], contrast[order]


def rescue(img: np.ndarray, segmentation: np.ndarray, candidates: np.ndarray, median_size: float,
           painted: float, factor: float = RESCUE_CONTRAST, spread: np.ndarray | None = None,
           min_size: int = 0) -> np.ndarray:
    """``segmentation`` with the segments of ``candidates`` the foreground head dropped that stand
    out at least ``factor`` times the ``painted`` contrast (:func:`dropped_objects`; ``spread``: the
    whole image's when ``img`` is a block of it) added, each under a new id, on the pixels still
    background; unchanged when ``factor`` <= 0. Segments of ``segmentation`` under ``min_size``
    pixels count as background and give way (a block's clustering keeps pieces that the size limit
    drops later, :mod:`.blocks`; the whole image's has dropped them already)."""
    if factor <= 0 or not painted or painted <= 0:
        return segmentation
    base = filter_sizes(segmentation, min_size) if min_size > 0 else segmentation  # only its background is read
    ids, _ = dropped_objects(img, candidates, base, median_size, factor * painted, spread=spread)
    if not ids:
        return segmentation
    out = np.array(segmentation, copy=True)
    lookup = np.zeros(int(candidates.max()) + 1, np.int64)
    lookup[ids] = np.arange(len(ids)) + int(out.max()) + 1
    new = lookup[candidates]
    free = (base == 0) & (new > 0)
    out[free] = new[free].astype(out.dtype, copy=False)
    return out


def drop_faint(img: np.ndarray, segmentation: np.ndarray, median_size: float, painted: float,
               fraction: float = FAINT_CONTRAST, spread: np.ndarray | None = None) -> np.ndarray:
    """``segmentation`` with the segments that stand out from the background beside them (the
    pixels no segment holds within :data:`FAINT_RING_WIDTH` median diameters; :func:`ring_contrasts`)
    less than ``fraction`` times the ``painted`` contrast set to 0, ids made consecutive; unchanged
    when ``fraction`` <= 0 or none is faint. A segment with no background beside it stays."""
    if fraction <= 0 or not painted or painted <= 0:
        return segmentation
    ids = np.unique(segmentation)
    ids = ids[ids > 0].tolist()
    if not ids:
        return segmentation
    spread = image_spread(img) if spread is None else np.asarray(spread, np.float64)
    width = ring_width(median_size, segmentation.ndim, FAINT_RING_WIDTH)
    contrast = ring_contrasts(img, spread, segmentation, ids, width, background_only=True)
    drop = [i for i, c in zip(ids, contrast) if c < fraction * painted]
    if not drop:
        return segmentation
    return relabel_sequential(np.where(np.isin(segmentation, drop), 0, segmentation))[0]
