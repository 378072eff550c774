"""Instance segmentation metrics. Ground-truth 0 is background and never an object."""

from __future__ import annotations

import numpy as np
from skimage.metrics import adapted_rand_error, variation_of_information

from .errors import SparseSegError

KEYS = ("sbd", "abs_dic", "ap50", "map", "f1", "aji", "pq", "arand", "voi_split", "voi_merge")


def _overlaps(gt: np.ndarray, pred: np.ndarray):
    """Object ids, sizes and the pixel overlap matrix of gt (rows) and pred (columns), 0 excluded."""
    gt = np.asarray(gt).ravel().astype(np.int64)
    pred = np.asarray(pred).ravel().astype(np.int64)
    g_ids, g_inv = np.unique(gt, return_inverse=True)
    p_ids, p_inv = np.unique(pred, return_inverse=True)
    overlap = np.zeros((g_ids.size, p_ids.size), np.int64)
    np.add.at(overlap, (g_inv, p_inv), 1)
    g_size, p_size = overlap.sum(1), overlap.sum(0)
    g_keep, p_keep = g_ids != 0, p_ids != 0
    return overlap[g_keep][:, p_keep], g_size[g_keep], p_size[p_keep]


def _iou(overlap, g_size, p_size):
    union = g_size[:, None] + p_size[None, :] - overlap
    return np.where(union > 0, overlap / np.maximum(union, 1), 0.0)


def best_dice(a_overlap: np.ndarray, a_size: np.ndarray, b_size: np.ndarray) -> float:
    """Mean over objects of A of the best Dice with any object of B (rows of ``a_overlap`` = A)."""
    if a_size.size == 0:
        return 1.0 if b_size.size == 0 else 0.0
    if b_size.size == 0:
        return 0.0
    dice = 2 * a_overlap / (a_size[:, None] + b_size[None, :])
    return float(dice.max(1).mean())


def matching(iou: np.ndarray, threshold: float = 0.5):
    """(TP, FP, FN, matched IoUs) at IoU > threshold (>= 0.5 makes matches unique)."""
    hit = iou > threshold
    tp = int(hit.sum())
    return tp, iou.shape[1] - tp, iou.shape[0] - tp, iou[hit]


def aji(overlap, g_size, p_size) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017).

    Each true object is paired with the prediction of highest IoU: the pair's intersection goes
    into the numerator and its union into the denominator, and the prediction counts as used. A
    true object that no prediction overlaps adds only its own area and uses nothing. Predictions
    never used are added to the denominator at the end. The score does not depend on label ids.
    """
    if g_size.size == 0:
        return 1.0 if p_size.size == 0 else 0.0
    if p_size.size == 0:
        return 0.0
    iou = _iou(overlap, g_size, p_size)
    rows = np.arange(g_size.size)
    best = iou.argmax(1)
    hit = overlap[rows, best] > 0
    inter = overlap[rows, best][hit].sum()
    union = (g_size[hit] + p_size[best[hit]] - overlap[rows, best][hit]).sum() + g_size[~hit].sum()
    used = np.zeros(p_size.size, bool)
    used[best[hit]] = True
    union += p_size[~used].sum()
    return float(inter / union)


def evaluate(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Every metric for one image: SBD, |DiC|, AP50 = TP/(TP+FP+FN) at IoU > 0.5, mAP over
    0.5:0.05:0.95, F1 at 0.5, AJI, PQ, adapted Rand error and VOI split/merge (gt 0 ignored)."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise SparseSegError(f"prediction shape {pred.shape} does not match ground-truth shape {gt.shape}")
    overlap, g_size, p_size = _overlaps(gt, pred)
    iou = _iou(overlap, g_size, p_size)
    sbd = min(best_dice(overlap, g_size, p_size), best_dice(overlap.T, p_size, g_size))
    aps = []
    for t in np.arange(0.5, 1.0, 0.05):
        tp, fp, fn, _ = matching(iou, float(t))
        aps.append(tp / max(tp + fp + fn, 1) if (tp + fp + fn) else 1.0)
    tp, fp, fn, ious = matching(iou, 0.5)
    f1 = 2 * tp / max(2 * tp + fp + fn, 1) if (tp + fp + fn) else 1.0
    pq = float(ious.sum() / (tp + 0.5 * fp + 0.5 * fn)) if (tp + fp + fn) else 1.0
    gt_i = gt.astype(np.int64)
    pred_i = pred.astype(np.int64)
    if (gt_i > 0).any():
        arand = float(adapted_rand_error(gt_i, pred_i, ignore_labels=(0,))[0])
        split, merge = variation_of_information(gt_i, pred_i, ignore_labels=(0,))
    else:
        arand, split, merge = 0.0, 0.0, 0.0
    return {
        "sbd": sbd,
        "abs_dic": float(abs(p_size.size - g_size.size)),
        "ap50": aps[0],
        "map": float(np.mean(aps)),
        "f1": float(f1),
        "aji": aji(overlap, g_size, p_size),
        "pq": pq,
        "arand": arand,
        "voi_split": float(split),
        "voi_merge": float(merge),
    }


def mean_scores(scores: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([s[k] for s in scores])) for k in KEYS} if scores else {}
