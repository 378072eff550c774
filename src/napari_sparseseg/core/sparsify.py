"""The SPOCO@p benchmark protocol: keep a random fraction of the objects of a dense label image."""

from __future__ import annotations

import numpy as np


def sparsify(labels: np.ndarray, fraction: float, rng: np.random.Generator | int = 0) -> np.ndarray:
    """Keep ``round(fraction * n)`` objects (at least one) chosen uniformly; every other pixel becomes 0.

    The rounding is half up (2.5 -> 3, 1.5 -> 2, 0.5 -> 1), not Python's half to even; a product
    that floating point puts just below a half (0.7 * 45 = 31.499999999999996) counts as the half.

    ``labels`` is a dense instance label image where 0 is background. Background is never kept
    (SPOCO@p is positive-unlabeled). Kept objects keep their ids.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(rng)
    ids = np.unique(labels)
    ids = ids[ids != 0]
    out = np.zeros_like(labels)
    if ids.size == 0:
        return out
    n_keep = max(1, int(np.floor(fraction * ids.size + 0.5 + 1e-9)))
    keep = rng.choice(ids, size=n_keep, replace=False)
    mask = np.isin(labels, keep)
    out[mask] = labels[mask]
    return out


def sparsify_many(label_images: list[np.ndarray], fraction: float, seed: int = 0) -> list[np.ndarray]:
    """Sparsify a list of images with one seeded RNG per image (stable if the list grows)."""
    return [sparsify(lab, fraction, np.random.default_rng([seed, i])) for i, lab in enumerate(label_images)]
