"""From pixel embeddings to instance labels: mutex watershed, multicut on superpixels
(:mod:`.agglomeration`), HDBSCAN, mean-shift and consistency clustering, plus the post-processing
users expect.

Embeddings are float arrays (D, Y, X) or (D, Z, Y, X). Every function returns an integer label
image where 0 is background (when background handling is on) and ids are consecutive.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import relabel_sequential

from .errors import SparseSegError
from .offsets import default_offsets  # noqa: F401  (part of this module's API)

METHODS = ("mws", "multicut", "hdbscan", "meanshift", "consistency")
#: the methods that read per-offset weights (embedding distances and the affinity head)
GRAPH_METHODS = ("mws", "multicut")


def _check(embeddings: np.ndarray) -> np.ndarray:
    embeddings = np.asarray(embeddings)
    if embeddings.ndim not in (3, 4) or not np.issubdtype(embeddings.dtype, np.floating):
        raise SparseSegError(
            f"embeddings: expected a float array shaped (D, Y, X) or (D, Z, Y, X), got {embeddings.dtype} {embeddings.shape}"
        )
    return embeddings.astype(np.float32, copy=False)


def embedding_distances(embeddings: np.ndarray, offsets: list[list[int]]) -> np.ndarray:
    """||e_i - e_{i+o}|| for every offset: (len(offsets), *S); NaN where i+o leaves the image."""
    embeddings = _check(embeddings)
    spatial = embeddings.shape[1:]
    out = np.full((len(offsets),) + spatial, np.nan, dtype=np.float32)
    for c, off in enumerate(offsets):
        if any(abs(o) >= s for o, s in zip(off, spatial)):
            continue  # an offset longer than the image: no such edge (NaN -> weight 0)
        src = tuple(slice(max(0, -o), s - max(0, o)) for o, s in zip(off, spatial))
        dst = tuple(slice(max(0, o), s - max(0, -o)) for o, s in zip(off, spatial))
        diff = embeddings[(slice(None),) + src] - embeddings[(slice(None),) + dst]
        out[(c,) + src] = np.sqrt(np.einsum("d...,d...->...", diff, diff))
    return out


def embeddings_to_affinities(embeddings: np.ndarray, offsets: list[list[int]], delta_dist: float = 2.0) -> np.ndarray:
    """Repulsive weights ("disaffinities") w = 1 - max((2 dd - d) / (2 dd), 0)^2, as SPOCO defines them.

    0 = same object, 1 = different objects. Edges leaving the image get 0 (no repulsion).
    """
    dist = embedding_distances(embeddings, offsets)
    w = 1.0 - np.maximum((2 * delta_dist - dist) / (2 * delta_dist), 0.0) ** 2
    return np.nan_to_num(w, nan=0.0).astype(np.float32)


EMBEDDING_METRICS = ("distance", "cosine")


def cosine_affinities(embeddings: np.ndarray, offsets: list[list[int]]) -> np.ndarray:
    """CRAC's explicit affinities: the cosine similarity of the embeddings of each pixel pair,
    clamped to [0, 1] (1 = same object); edges leaving the image get 1 (no repulsion)."""
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=0, keepdims=True), 1e-8)
    spatial = embeddings.shape[1:]
    out = np.ones((len(offsets),) + spatial, np.float32)
    for c, off in enumerate(offsets):
        if any(abs(o) >= s for o, s in zip(off, spatial)):
            continue
        src = tuple(slice(max(0, -o), s - max(0, o)) for o, s in zip(off, spatial))
        dst = tuple(slice(max(0, o), s - max(0, -o)) for o, s in zip(off, spatial))
        cos = np.einsum("d...,d...->...", unit[(slice(None),) + src], unit[(slice(None),) + dst])
        out[(c,) + src] = np.clip(cos, 0.0, 1.0)
    return out


def mws_weights(
    embeddings: np.ndarray,
    offsets: list[list[int]],
    delta_dist: float = 2.0,
    affinities: np.ndarray | None = None,
    affinity_mix: float = 0.5,
    attractive_mix: float | None = None,
    embedding_metric: str = "distance",
) -> np.ndarray:
    """Disaffinities for the mutex watershed: from the embedding distances
    (:func:`embeddings_to_affinities`, SPOCO) or cosine similarities (:func:`cosine_affinities`,
    CRAC; ``embedding_metric="cosine"``), blended with the affinity head's (1 - probability of "same
    object", one channel per offset) when ``affinities`` are given: ``attractive_mix`` of the head
    for the nearest-neighbour (attractive) channels (default: ``affinity_mix``), ``affinity_mix``
    for the long-range (repulsive) ones."""
    if embedding_metric not in EMBEDDING_METRICS:
        raise SparseSegError(f"embedding metric {embedding_metric!r}: expected one of {', '.join(EMBEDDING_METRICS)}")
    if embedding_metric == "cosine":
        w = 1.0 - cosine_affinities(embeddings, offsets)
    else:
        w = embeddings_to_affinities(embeddings, offsets, delta_dist)
    if affinities is not None:
        if affinities.shape != w.shape:
            raise SparseSegError(f"affinities: shape {affinities.shape} does not fit the offsets, expected {w.shape}")
        nd = embeddings.ndim - 1
        mixes = np.full(len(offsets), float(affinity_mix), np.float32)
        mixes[:nd] = affinity_mix if attractive_mix is None else attractive_mix
        head = 1.0 - affinities.astype(np.float32)
        for c, m in enumerate(mixes):
            if m > 0:
                w[c] = (1 - m) * w[c] + m * head[c]
    return w


def mutex_watershed(
    embeddings: np.ndarray,
    offsets: list[list[int]] | None = None,
    delta_dist: float = 2.0,
    bias: float = 0.0,
    strides: list[int] | None = None,
    mask: np.ndarray | None = None,
    affinities: np.ndarray | None = None,
    affinity_mix: float = 0.5,
    attractive_mix: float | None = None,
    embedding_metric: str = "distance",
) -> np.ndarray:
    """Mutex watershed (python-elf / bioimage-cpp) on the long-range grid graph of the embeddings
    (and the affinity head's affinities, :func:`mws_weights`).

    ``bias`` > 0 favours splits (adds to the repulsive and subtracts from the attractive
    weights), < 0 favours merges.
    """
    offsets = offsets or default_offsets(embeddings.ndim - 1)
    w = mws_weights(embeddings, offsets, delta_dist, affinities, affinity_mix, attractive_mix, embedding_metric)
    return mws_on_weights(w, offsets, bias, strides, mask)


def mws_on_weights(w: np.ndarray, offsets: list[list[int]], bias: float = 0.0, strides: list[int] | None = None,
                   mask: np.ndarray | None = None) -> np.ndarray:
    """The mutex watershed (python-elf) on disaffinities ``w`` (K, *S), one channel per offset
    (:func:`mws_weights`); ``bias`` > 0 favours splits."""
    from elf.segmentation.mutex_watershed import mutex_watershed as elf_mws

    # w is a disaffinity in every channel, so one shift raises repulsion and lowers attraction; a
    # copy either way: elf flips the attractive channels of what it is given in place
    w = np.clip(w + bias, 0.0, 1.0) if bias else np.array(w, np.float32, copy=True)
    # elf expects "disaffinities" for every channel and flips the first ndim (attractive) itself
    strides = list(strides) if strides is not None else [1] * (w.ndim - 1)
    seg = elf_mws(w, offsets, strides=strides, randomize_strides=False, mask=mask)
    return seg.astype(np.int64)


def multicut(embeddings: np.ndarray, offsets: list[list[int]] | None = None, bias: float = 0.0,
             mask: np.ndarray | None = None, image_boundaries: np.ndarray | None = None, image_weight: float = 0.0,
             **weights) -> np.ndarray:
    """Multicut on superpixels (:func:`.agglomeration.multicut_segmentation`) of the same weights
    the mutex watershed reads (:func:`mws_weights`, whose options ``weights`` are: delta_dist,
    affinities, affinity_mix, attractive_mix, embedding_metric); ``bias`` > 0 splits more; the
    superpixels and edge costs also follow ``image_boundaries`` at ``image_weight``."""
    from .agglomeration import multicut_segmentation

    offsets = offsets or default_offsets(embeddings.ndim - 1)
    return multicut_segmentation(mws_weights(embeddings, offsets, **weights), offsets, bias, mask,
                                 image_boundaries, image_weight)


def _flat(embeddings: np.ndarray, mask: np.ndarray | None):
    d = embeddings.shape[0]
    flat = embeddings.reshape(d, -1).T
    sel = np.ones(flat.shape[0], bool) if mask is None else mask.ravel().astype(bool)
    return flat[sel], sel


def hdbscan_clustering(embeddings: np.ndarray, min_size: int = 200, mask: np.ndarray | None = None) -> np.ndarray:
    """HDBSCAN on the pixel embeddings (noise -> 0)."""
    import hdbscan

    pts, sel = _flat(embeddings, mask)
    labels = hdbscan.HDBSCAN(min_cluster_size=max(2, int(min_size))).fit_predict(pts)
    out = np.zeros(sel.shape, np.int64)
    out[sel] = labels + 1
    return out.reshape(embeddings.shape[1:])


def meanshift_clustering(embeddings: np.ndarray, bandwidth: float = 0.5, mask: np.ndarray | None = None) -> np.ndarray:
    """Mean-shift (scikit-learn, bin seeding) with the pull margin as bandwidth."""
    from sklearn.cluster import MeanShift

    pts, sel = _flat(embeddings, mask)
    labels = MeanShift(bandwidth=bandwidth, bin_seeding=True, cluster_all=True).fit_predict(pts)
    out = np.zeros(sel.shape, np.int64)
    out[sel] = labels + 1
    return out.reshape(embeddings.shape[1:])


def consistency_clustering(
    embeddings: np.ndarray,
    embeddings_g: np.ndarray,
    delta_var: float = 0.5,
    iou_threshold: float = 0.6,
    n_anchors: int = 10,
    seed: int = 0,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """SPOCO Algorithm 1: mean-shift on f, keep a cluster if the median IoU with masks grown
    around ``n_anchors`` of its pixels in g's embedding space exceeds ``iou_threshold``.

    (elf's version handles 2D only; this one is N-D.)
    """
    seg = meanshift_clustering(embeddings, delta_var, mask)
    rng = np.random.default_rng(seed)
    d = embeddings_g.shape[0]
    eg = embeddings_g.reshape(d, -1)
    flat = seg.ravel()
    for lid in np.unique(flat):
        if lid == 0:
            continue
        members = np.flatnonzero(flat == lid)
        ious = []
        for a in rng.choice(members, size=min(n_anchors, members.size), replace=False):
            grown = np.sum((eg - eg[:, a : a + 1]) ** 2, axis=0) < delta_var**2
            inter = np.count_nonzero(grown[members])
            ious.append(inter / (members.size + np.count_nonzero(grown) - inter))
        if np.median(ious) <= iou_threshold:
            flat[members] = 0
    return seg


def best_iou(seg: np.ndarray, other: np.ndarray) -> np.ndarray:
    """For each id of ``seg`` (index = id), the largest IoU with any segment of ``other``."""
    seg = np.asarray(seg, np.int64).ravel()
    other = np.asarray(other, np.int64).ravel()
    n_s, n_o = int(seg.max()) + 1, int(other.max()) + 1
    pairs, counts = np.unique(seg * n_o + other, return_counts=True)  # sparse contingency table
    a, b = pairs // n_o, pairs % n_o
    size_s = np.bincount(seg, minlength=n_s)
    size_o = np.bincount(other, minlength=n_o)
    iou = counts / (size_s[a] + size_o[b] - counts)
    best = np.zeros(n_s)
    np.maximum.at(best, a, iou)
    return best


def agreement_filter(seg_f: np.ndarray, seg_g: np.ndarray, threshold: float) -> np.ndarray:
    """Keep the segments of f that the EMA network g reproduces: a segment whose best IoU with a
    segment of g (clustered the same way) is below ``threshold`` becomes 0.

    The idea of SPOCO's consistency clustering (Algorithm 1) for any clustering: objects have
    sharp, stable boundaries in both networks, while unlabeled background, which sparse training
    never groups, is cut into pieces that differ between f and g.
    """
    best = best_iou(seg_f, seg_g)
    out = np.array(seg_f, np.int64, copy=True)
    drop = best < threshold
    drop[0] = False
    out[drop[out]] = 0
    return out


BACKGROUND_RULES = ("largest", "foreground", "none")


def remove_background(
    seg: np.ndarray,
    background: str = "largest",
    foreground: np.ndarray | None = None,
    fg_threshold: float | None = None,
) -> np.ndarray:
    """Turn background segments into 0.

    ``background``: "largest" (the largest segment is background), "foreground" (a segment whose
    mean foreground probability ``foreground`` is below ``fg_threshold`` is background: decided per
    segment, so its outline is the clustering's, not a threshold's) or "none" (dense tissue).
    """
    if background not in BACKGROUND_RULES:
        raise SparseSegError(f"background: expected one of {', '.join(BACKGROUND_RULES)}, got {background!r}")
    seg = np.asarray(seg).astype(np.int64, copy=True)
    if background == "largest":
        counts = np.bincount(seg.ravel())
        if counts[1:].size and counts[1:].max() > 0:
            seg[seg == int(np.argmax(counts[1:]) + 1)] = 0
    elif background == "foreground":
        if foreground is None or fg_threshold is None:
            raise SparseSegError("background 'foreground' needs the foreground probability and a threshold")
        if foreground.shape != seg.shape:
            raise SparseSegError(f"foreground: shape {foreground.shape} does not match the segmentation's {seg.shape}")
        counts = np.bincount(seg.ravel())
        sums = np.bincount(seg.ravel(), weights=np.asarray(foreground, np.float64).ravel(), minlength=counts.size)
        low = sums < fg_threshold * counts
        low[0] = False
        seg[low[seg]] = 0
    return seg


def filter_sizes(seg: np.ndarray, min_size: int = 0, max_size: int | None = None, fill: bool = False,
                 mask: np.ndarray | None = None) -> np.ndarray:
    """Segments over ``max_size`` pixels become 0 (background), segments under ``min_size`` become 0
    or, with ``fill`` (dense tissue), are filled from their nearest neighbouring segment (within
    ``mask``); ids made consecutive."""
    seg = np.asarray(seg).astype(np.int64, copy=True)
    counts = np.bincount(seg.ravel())
    if max_size:
        big = counts > max_size
        big[0] = False
        if big.any():
            seg[big[seg]] = 0
            counts = np.bincount(seg.ravel())
    if min_size > 0:
        small = counts < min_size
        small[0] = False
        if small.any():
            seg[small[seg]] = 0
            if fill and seg.any():
                holes = seg == 0 if mask is None else (seg == 0) & mask.astype(bool)
                idx = ndimage.distance_transform_edt(seg == 0, return_distances=False, return_indices=True)
                filled = seg[tuple(idx)]
                seg[holes] = filled[holes]
    return relabel_sequential(seg)[0]


def postprocess(
    seg: np.ndarray,
    min_size: int = 0,
    background: str = "largest",
    mask: np.ndarray | None = None,
    max_size: int | None = None,
    foreground: np.ndarray | None = None,
    fg_threshold: float | None = None,
) -> np.ndarray:
    """Foreground mask, background rule (:func:`remove_background`) and object size limits
    (:func:`filter_sizes`; small segments are filled from their neighbours without background)."""
    seg = np.asarray(seg).astype(np.int64, copy=True)
    if mask is not None:
        seg[~mask.astype(bool)] = 0
    seg = remove_background(seg, background, foreground, fg_threshold)
    return filter_sizes(seg, min_size, max_size, fill=background == "none", mask=mask)


def segment_embeddings(
    embeddings: np.ndarray,
    method: str = "mws",
    *,
    delta_var: float = 0.5,
    delta_dist: float = 2.0,
    offsets: list[list[int]] | None = None,
    strides: list[int] | None = None,
    bias: float = 0.0,
    min_size: int = 0,
    max_size: int | None = None,
    background: str = "largest",
    mask: np.ndarray | None = None,
    embeddings_g: np.ndarray | None = None,
    iou_threshold: float = 0.6,
    agreement: float | None = None,
    seed: int = 0,
    foreground: np.ndarray | None = None,
    fg_threshold: float | None = None,
    affinities: np.ndarray | None = None,
    affinities_g: np.ndarray | None = None,
    affinity_mix: float = 0.5,
    attractive_mix: float | None = None,
    embedding_metric: str = "distance",
    image_boundaries: np.ndarray | None = None,
    image_weight: float = 0.0,
) -> np.ndarray:
    """Instance labels from embeddings (D, Y, X) or (D, Z, Y, X).

    ``method``: "mws" (mutex watershed, default), "multicut" (on superpixels), "hdbscan", "meanshift"
    or "consistency" (needs
    ``embeddings_g``, the EMA network's embeddings). ``background``: see :func:`remove_background`
    (by default the largest segment, the background cluster, comes out as 0; "foreground" needs
    ``foreground`` and ``fg_threshold``). With ``agreement`` (and ``embeddings_g``), g's
    embeddings are clustered the same way and segments of f that g does not reproduce with at
    least that IoU become 0 (:func:`agreement_filter`). The multicut's superpixels and edge costs also
    follow ``image_boundaries`` (a boundary map of the image, :func:`.agglomeration.image_boundaries`) at
    ``image_weight``.
    """
    embeddings = _check(embeddings)
    if mask is not None and mask.shape != embeddings.shape[1:]:
        raise SparseSegError(f"mask: shape {mask.shape} does not match the embeddings' {embeddings.shape[1:]}")
    if method not in METHODS:
        raise SparseSegError(f"clustering method {method!r}: expected one of {', '.join(METHODS)}")
    if method == "consistency" or agreement:
        if embeddings_g is None:
            need = "consistency clustering" if method == "consistency" else "agreement filtering"
            raise SparseSegError(f"{need} needs embeddings_g (the EMA network's embeddings)")
        embeddings_g = _check(embeddings_g)
        if embeddings_g.shape != embeddings.shape:
            raise SparseSegError(
                f"embeddings_g: shape {embeddings_g.shape} does not match the embeddings' {embeddings.shape}"
            )
    if agreement is not None and not 0 <= agreement <= 1:
        raise SparseSegError(f"agreement: expected an IoU threshold in [0, 1], got {agreement}")

    mws_mask = None if mask is None else mask.astype(bool)

    def run(emb, aff=None):
        if method == "mws":
            return mutex_watershed(emb, offsets, delta_dist, bias, strides, mws_mask, aff, affinity_mix, attractive_mix,
                                   embedding_metric)
        if method == "multicut":
            return multicut(emb, offsets, bias, mws_mask, image_boundaries, image_weight, delta_dist=delta_dist,
                            affinities=aff, affinity_mix=affinity_mix, attractive_mix=attractive_mix,
                            embedding_metric=embedding_metric)
        if method == "hdbscan":
            return hdbscan_clustering(emb, max(min_size, 2) if min_size else 200, mask)
        return meanshift_clustering(emb, delta_var, mask)

    if method == "consistency":
        seg = consistency_clustering(embeddings, embeddings_g, delta_var, iou_threshold, seed=seed, mask=mask)
    else:
        seg = run(embeddings, affinities)
    if mask is not None:
        seg[~mws_mask] = 0
    # background first: the agreement filter may itself drop the background segment, after which
    # "the largest segment" would be a real object
    seg = remove_background(seg, background, foreground, fg_threshold)
    if agreement and method != "consistency":
        seg = agreement_filter(seg, run(embeddings_g, affinities_g), agreement)
    return filter_sizes(seg, min_size, max_size, fill=background == "none", mask=mask)
