"""Fine-tune a model, or train from scratch: does the model already find the painted objects?

A model trained on another kind of image can be a worse start than a fresh network
(docs/benchmarks.md §8: fine-tuning won every run between two EM datasets and lost most runs
across modalities). Whether a model knows the new objects is read from the user's own
annotation: the model segments the new training images with its defaults, and each painted object
is matched with its best segment. A model that recovers the painted objects (a mean best IoU of at
least :data:`MIN_RECOVERY`) is fine-tuned; one that does not is set aside and the network starts
fresh (``TrainConfig.finetune = "always"`` keeps it anyway).
"""

from __future__ import annotations

import numpy as np

#: the least mean best IoU of the painted objects under the model's own segmentation at which
#: fine-tuning keeps the model. On the transfer pairs of docs/benchmarks.md §8 (12 source models and
#: label sets): 0.57-0.59 on the EM pair where fine-tuning won 4 of 4 runs, at most 0.05 on the
#: pairs across modalities where training from scratch won 6 of 8
MIN_RECOVERY = 0.2
#: at most this many images are segmented for the check (those with the most painted objects)
MAX_IMAGES = 8


def best_ious(seg: np.ndarray, labels: np.ndarray, background_id: int | None = None) -> np.ndarray:
    """For each painted object of ``labels`` (ids > 0, not ``background_id``), its best IoU with a
    segment of ``seg`` (segments > 0)."""
    lab = np.asarray(labels).ravel().astype(np.int64)
    sg = np.asarray(seg).ravel().astype(np.int64)
    painted = (lab > 0) if background_id is None else (lab > 0) & (lab != background_id)
    ids = np.unique(lab[painted])
    if ids.size == 0:
        return np.zeros(0)
    seg_ids, seg_inv = np.unique(sg, return_inverse=True)
    seg_area = np.bincount(seg_inv)
    lab_idx = np.searchsorted(ids, lab[painted])
    lab_area = np.bincount(lab_idx, minlength=ids.size)
    pairs, inter = np.unique(np.stack([lab_idx, seg_inv[painted]]), axis=1, return_counts=True)
    fg = seg_ids[pairs[1]] > 0
    iou = inter[fg] / (lab_area[pairs[0][fg]] + seg_area[pairs[1][fg]] - inter[fg])
    best = np.zeros(ids.size)
    np.maximum.at(best, pairs[0][fg], iou)
    return best


def painted_recovery(model, images: list[np.ndarray], labels: list[np.ndarray], diameters: list[float | None],
                     voxel_sizes: list | None = None, background_id: int | None = None,
                     max_images: int = MAX_IMAGES) -> float:
    """The mean best IoU of the painted objects under ``model``'s default segmentation of their
    images, each image seen at its painted objects' diameter (as fine-tuning will see it).
    At most ``max_images`` images are segmented, those with the most painted objects."""
    from .segment import segment

    counts = [len(np.unique(lab[lab > 0])) for lab in labels]
    order = [i for i in np.argsort(counts, kind="stable")[::-1] if counts[i] > 0][:max_images]
    voxel_sizes = voxel_sizes or [None] * len(images)
    ious = []
    for i in order:
        seg = segment(model, images[i], diameter=diameters[i], voxel_size=voxel_sizes[i], name=f"image {i}")
        ious.append(best_ious(seg, labels[i], background_id))
    ious = np.concatenate(ious) if ious else np.zeros(0)
    return float(ious.mean()) if ious.size else 0.0  # nothing painted but background: nothing found


def keep_parent(init, images: list[np.ndarray], labels: list[np.ndarray], cfg, voxel_sizes: list | None = None
                ) -> tuple[bool, dict, str]:
    """Whether to fine-tune ``init`` on these painted objects (:data:`MIN_RECOVERY`), with the
    record the model keeps (``config["fine_tune"]``) and a sentence for the user."""
    from .scale import image_diameters

    diameters = ([cfg.diameter] * len(labels) if cfg.diameter else image_diameters(labels, cfg.background_id))
    if cfg.voxel_size is not None:
        voxel_sizes = [cfg.voxel_size] * len(images)
    recovery = painted_recovery(init, images, labels, diameters, voxel_sizes, cfg.background_id)
    keep = recovery >= MIN_RECOVERY
    where = str(init.path) if init.path else "the model"
    record = {"parent": where, "recovery": round(recovery, 4), "min_recovery": MIN_RECOVERY, "kept": keep}
    if keep:
        note = f"fine-tuning {where}: it already finds the painted objects (mean best IoU {recovery:.2f})"
    else:
        note = (f"{where} does not find the painted objects (mean best IoU {recovery:.2f}, below "
                f"{MIN_RECOVERY:g}): a model of another kind of image, so a fresh network is trained "
                "instead (fine-tune 'always' keeps it)")
    return keep, record, note
