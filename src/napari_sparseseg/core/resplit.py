"""Segments larger than the annotation says objects are: clustered again, with either map's repulsion.

The mutex watershed on a CRAC model reads one affinity map (the explicit one, from the embeddings,
by default; :data:`.segment.CRAC_AFFINITY_SOURCE`). Where touching objects merge (CVPPP's leaves
meeting at the rosette's centre) the implicit map often still sees the border, but reading it
everywhere over-splits nuclei and mitochondria (docs/benchmarks.md). So only a segment whose size
is implausible for the objects the user painted, more than ``ratio`` times their median diameter,
is clustered again inside its own mask, its long-range (repulsive) weights the larger of the two
maps' disaffinities: a border either map sees separates. A new piece smaller than ``min_piece``
stays with the largest one.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .clustering import mws_on_weights, mws_weights


def split_area(ratio: float, median_area: float, ndim: int) -> float:
    """The size (pixels or voxels) above which a segment is split again: ``ratio`` times the
    median annotated object's diameter, i.e. ``ratio ** ndim`` times its area (volume)."""
    return float(ratio) ** ndim * float(median_area)


def split_large(seg: np.ndarray, embeddings: np.ndarray, affinities: np.ndarray, offsets: list[list[int]],
                max_area: float, min_piece: float, bias: float = 0.0, **weights) -> np.ndarray:
    """``seg`` (*S) with every segment of more than ``max_area`` pixels clustered again by the
    mutex watershed on its own pixels, the repulsive channels of :func:`.clustering.mws_weights`
    (``weights``: its options) raised to the affinity head's disaffinities where those are larger.
    New pieces of at least ``min_piece`` pixels get new ids; smaller ones keep the segment's id."""
    seg = np.asarray(seg, np.int64).copy()
    ids, counts = np.unique(seg, return_counts=True)
    large = ids[(ids > 0) & (counts > max_area)]
    if large.size == 0:
        return seg
    nd = seg.ndim
    boxes = ndimage.find_objects(seg)
    next_id = int(seg.max()) + 1
    for i in large:
        box = boxes[int(i) - 1]
        inside = seg[box] == i
        emb = embeddings[(slice(None),) + box]
        aff = affinities[(slice(None),) + box]
        w = mws_weights(emb, offsets, affinities=aff, **weights)
        w[nd:] = np.maximum(w[nd:], 1.0 - aff[nd:].astype(np.float32))
        pieces = mws_on_weights(w, offsets, bias, mask=inside)
        pid, pcount = np.unique(pieces[inside], return_counts=True)
        kept = pid[pcount >= min_piece]
        if kept.size <= 1:
            continue
        largest = pid[np.argmax(pcount)]  # the largest piece is among the kept ones
        view = seg[box]
        for p in kept:
            if p != largest:
                view[inside & (pieces == p)] = next_id
                next_id += 1
    return seg
