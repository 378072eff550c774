"""Multicut on learned boundaries: superpixels, a region graph and a multicut (python-elf on
bioimage-cpp), from the same per-offset weights the mutex watershed reads.

The mutex watershed decides pixel by pixel, so a few noisy long-range weights inside a large object
cut it up. Here the nearest-neighbour weights become a boundary map, a distance-transform watershed
over-segments it into superpixels (Beier et al. 2017), and a multicut on the superpixels' region
graph, with edge costs from the mean of *all* offsets' weights along each superpixel boundary,
decides which superpixels form one object: a decision over whole boundaries, not pixels. Where
the annotation shows that the image itself marks the objects' borders (a membrane stain, EM
membranes: :func:`.annotation.border_statistics`), the superpixels follow the image's border
signal too, as much as it told the painted borders from their interiors, and the edge costs read
it at a share of that (:data:`IMAGE_COST_WEIGHT`), put on the network's scale by rank.

Lengths are at the model's scale, where objects have the target diameter (:mod:`.scale`), so the
constants below hold across datasets (chosen on the benchmark suite, ``benchmarks/sweep.py``).
"""

from __future__ import annotations

import numpy as np

from .errors import SparseSegError

#: boundary-map threshold of the distance transform that seeds the superpixels
SUPERPIXEL_THRESHOLD = 0.5
#: smoothing (pixels at the model's scale) of the distance transform before seeding
SUPERPIXEL_SIGMA = 1.0
#: superpixels smaller than this (pixels at the model's scale) are merged into a neighbour
SUPERPIXEL_MIN_SIZE = 10
#: weight of the image's own border signal in the superpixels' boundary map (the network's map
#: takes the rest) at a border contrast (ROC AUC) of 1; at AUC a it is IMAGE_WEIGHT (2 a - 1)
#: (:func:`image_share`), so with 1 the annotation alone sets it. A network trained on a few
#: painted objects draws weaker, patchier membranes than a membrane stain or an EM image shows, and
#: a superpixel that spans two cells cannot be undone by the multicut. 0 / 0.5 / 0.75 / 1 on the
#: stored models of the suite's dense sets (benchmarks/sweep.py, docs/benchmarks.md): mean rank
#: 4 / 2.67 / 1.67 / 1.67; 1 the lowest VOI on the ovule and gala, 0.75 on VNC cells (by 0.006)
IMAGE_WEIGHT = 1.0
#: weight of the image's border signal in the multicut's edge costs, relative to its share in the
#: superpixels (:func:`image_share`): each superpixel boundary's mean image border signal, put on
#: the scale of the network's edge probabilities of the same image by rank (:func:`rank_match`), is
#: mixed with the network's at IMAGE_COST_WEIGHT x share. A wall the image shows and the network
#: misses is then not merged again. 0 / 0.5 / 0.75 / 1 on the stored models of the suite's dense
#: sets (benchmarks/sweep.py, docs/benchmarks.md): 0.75 the best mean rank, each set better than at 0
IMAGE_COST_WEIGHT = 0.75
#: smoothing (pixels at the model's scale) of the image before it becomes a boundary map (as the
#: superpixels' seeds, SUPERPIXEL_SIGMA; not swept)
IMAGE_SIGMA = 1.0


def boundary_map(weights: np.ndarray, offsets: list[list[int]]) -> np.ndarray:
    """Per-pixel boundary probability from the nearest-neighbour channels of the mutex-watershed
    weights (disaffinities, 1 = different objects): a pixel's largest weight to any of its direct
    neighbours, both directions of every axis."""
    ndim = weights.ndim - 1
    out = np.zeros(weights.shape[1:], np.float32)
    for c, off in enumerate(offsets):
        if sum(abs(o) for o in off) != 1:
            continue
        w = np.nan_to_num(weights[c].astype(np.float32), nan=0.0)
        np.maximum(out, w, out=out)
        # the edge to the neighbour at -1 is stored at the pixel; the neighbour sees it at +1
        ax = int(np.flatnonzero(off)[0])
        if weights.shape[ax + 1] > 1:
            src = [slice(None)] * ndim
            dst = [slice(None)] * ndim
            src[ax], dst[ax] = slice(1, None), slice(None, -1)
            np.maximum(out[tuple(dst)], w[tuple(src)], out=out[tuple(dst)])
    return out


def image_share(annotation: dict | None) -> float:
    """The weight of the image's border signal for a model's ``annotation`` statistics
    (:func:`.annotation.border_statistics`): :data:`IMAGE_WEIGHT` scaled by how much better than
    chance the image tells the painted objects' borders from their interiors (2 AUC - 1, clipped to
    [0, 1]); 0 for models trained before the statistic."""
    ann = annotation or {}
    auc = ann.get("border_contrast")
    if auc is None or ann.get("border_direction") is None:
        return 0.0
    return IMAGE_WEIGHT * float(np.clip(2.0 * auc - 1.0, 0.0, 1.0))


def image_share_note(share: float) -> str:
    """What a report line says about the image's part in a multicut at ``share``
    (:func:`image_share`), e.g. ", superpixels and edge costs 78% from the image's own borders";
    "" at 0."""
    if share <= 0:
        return ""
    cost = IMAGE_COST_WEIGHT * share
    if round(cost * 100) == round(share * 100):
        return f", superpixels and edge costs {share:.0%} from the image's own borders"
    if round(cost * 100) > 0:
        return f", superpixels {share:.0%} and edge costs {cost:.0%} from the image's own borders"
    return f", superpixels {share:.0%} from the image's own borders"


def image_boundaries(image: np.ndarray, direction) -> np.ndarray:
    """A boundary map in [0, 1] from a normalised image (C, *S) (about 0 to 1 per channel, as the
    network sees it): each channel counted with the weight of ``direction``
    (:func:`.annotation.border_statistics`), inverted where borders are dark, then smoothed by
    :data:`IMAGE_SIGMA`."""
    from scipy import ndimage

    w = np.asarray(direction, np.float32)
    if w.shape != (image.shape[0],):
        raise SparseSegError(f"border direction: expected one weight per channel ({image.shape[0]}), got {w.shape}")
    x = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
    out = np.zeros(image.shape[1:], np.float32)
    for c, wc in enumerate(w):
        out += abs(float(wc)) * (x[c] if wc >= 0 else 1.0 - x[c])
    out /= max(float(np.abs(w).sum()), 1e-12)
    return ndimage.gaussian_filter(out, IMAGE_SIGMA)


def rank_match(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``values`` mapped monotonically onto the distribution of ``reference`` (same length): the
    k-th smallest value takes the k-th smallest reference value, tied values the mean of theirs.
    Puts the image's border signal on the network's probability scale, image by image, without a
    calibration constant."""
    from scipy.stats import rankdata

    values = np.asarray(values, np.float64)
    reference = np.asarray(reference, np.float64)
    if values.shape != reference.shape or values.ndim != 1:
        raise SparseSegError(f"rank match: expected two 1D arrays of one length, "
                             f"got {values.shape} and {reference.shape}")
    if len(values) == 0:
        return reference.copy()
    ranks = rankdata(values, method="average") - 1.0  # tied values share their mean rank
    return np.interp(ranks, np.arange(len(reference)), np.sort(reference))


def superpixels(boundaries: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Distance-transform watershed superpixels of a boundary map (python-elf), with the module's
    constants."""
    from elf.segmentation.watershed import distance_transform_watershed

    ws, _ = distance_transform_watershed(
        boundaries.astype(np.float32), SUPERPIXEL_THRESHOLD, SUPERPIXEL_SIGMA, sigma_weights=1.0,
        min_size=SUPERPIXEL_MIN_SIZE, mask=None if mask is None else mask.astype(bool),
    )
    return ws.astype(np.uint64)


def multicut_segmentation(weights: np.ndarray, offsets: list[list[int]], bias: float = 0.0,
                          mask: np.ndarray | None = None, image_boundaries: np.ndarray | None = None,
                          image_weight: float = 0.0) -> np.ndarray:
    """Instance labels from per-offset disaffinities ``weights`` (len(offsets), *S), nearest
    neighbours included: superpixels, region graph, edge costs, multicut (Kernighan-Lin warm-started
    by greedy additive contraction). ``bias`` > 0 splits more, < 0 merges more (the boundary bias
    beta = 0.5 + bias of the costs). Pixels outside ``mask`` are 0. The superpixels follow the
    weights' boundary map mixed with ``image_boundaries`` (*S, in [0, 1]; :func:`image_boundaries`)
    at ``image_weight``; the edge costs are the network's, mixed with the image's border signal at
    :data:`IMAGE_COST_WEIGHT` x ``image_weight``."""
    import elf.segmentation.features as feats
    import elf.segmentation.multicut as mc

    weights = np.asarray(weights, np.float32)
    if weights.ndim not in (3, 4) or weights.shape[0] != len(offsets):
        raise SparseSegError(f"weights: expected one channel per offset ({len(offsets)}, *S), got {weights.shape}")
    if not -0.5 < bias < 0.5:
        raise SparseSegError(f"bias: expected a value in (-0.5, 0.5) for the multicut, got {bias}")
    if mask is not None and not np.any(mask):
        return np.zeros(weights.shape[1:], np.int64)
    boundaries = boundary_map(weights, offsets)
    use_image = image_boundaries is not None and image_weight > 0
    if use_image:
        if image_boundaries.shape != boundaries.shape:
            raise SparseSegError(f"image boundaries: shape {image_boundaries.shape} does not match the weights' "
                                 f"{boundaries.shape}")
        boundaries = (1.0 - image_weight) * boundaries + image_weight * image_boundaries
    ws = superpixels(boundaries, mask)
    if ws.max() <= 1:
        return ws.astype(np.int64)
    rag = feats.compute_rag(ws)
    if rag.number_of_edges == 0:
        return ws.astype(np.int64)  # no two superpixels touch: nothing to decide
    edge = feats.compute_affinity_features(rag, ws, np.nan_to_num(weights, nan=0.0), offsets)
    probs = edge[:, 0]
    cost_share = IMAGE_COST_WEIGHT * image_weight if use_image else 0.0
    if cost_share > 0:
        img = feats.compute_boundary_mean_and_length(rag, ws, image_boundaries.astype(np.float32))[:, 0]
        probs = (1.0 - cost_share) * probs + cost_share * rank_match(img, probs)
    costs = mc.transform_probabilities_to_costs(probs, beta=0.5 + bias, edge_sizes=edge[:, -1])
    if mask is not None:
        # superpixel 0 is the masked-out region: never joined to an object (it would bridge objects)
        costs[(rag.uv_ids() == 0).any(axis=1)] = -np.abs(costs).max() - 1.0
    nodes = mc.multicut_kernighan_lin(rag, costs).astype(np.int64) + 1
    nodes[0] = 0
    return feats.project_node_labels_to_pixels(rag, ws, nodes).astype(np.int64)
