"""Synthetic microscopy-like sample data, generated on the fly (no licence strings attached).

Touching, irregular cells with a bright rim and textured interior on a structured background,
with dense ground truth, in 2D or 3D. Used by ``sparseseg demo``, the napari sample menu and the
tests.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import find_boundaries


def synthetic_cells(
    shape: tuple[int, ...] = (256, 256),
    n_cells: int | None = None,
    radius: tuple[float, float] = (9.0, 17.0),
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """An image (uint8, ``shape``) and its dense instance labels (int32, 0 = background)."""
    rng = np.random.default_rng(seed)
    ndim = len(shape)
    if n_cells is None:
        vol = np.prod(shape)
        n_cells = max(3, int(0.35 * vol / (np.pi * np.mean(radius) ** 2 if ndim == 2 else 4 / 3 * np.pi * np.mean(radius) ** 3)))
    # seeds clustered into colonies so that cells touch, background in between
    n_col = max(1, n_cells // 6)
    centres = rng.uniform(0, 1, (n_col, ndim)) * np.array(shape)
    spread = np.mean(radius) * 2.2
    pts = centres[rng.integers(n_col, size=n_cells)] + rng.normal(0, spread, (n_cells, ndim))
    pts = np.clip(pts, 0, np.array(shape) - 1)
    radii = rng.uniform(*radius, n_cells)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), -1)
    # wobbly cell outlines from smooth noise added to the distance
    wobble = ndimage.gaussian_filter(rng.normal(0, 1, shape), 4) * 12
    best = np.full(shape, np.inf, np.float32)
    labels = np.zeros(shape, np.int32)
    for i, (p, r) in enumerate(zip(pts, radii), start=1):
        d = np.sqrt(((grid - p) ** 2).sum(-1)) / r
        inside = (d + wobble / r * 0.3 < 1.0) & (d < best)
        labels[inside] = i
        best[inside] = d[inside]
    labels = _relabel(labels)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, shape), 1.5)
    bg = ndimage.gaussian_filter(rng.normal(0, 1, shape), 6) * 0.6 + 0.15
    img = np.where(labels > 0, 0.0, bg)
    levels = rng.uniform(0.35, 0.75, labels.max() + 1)
    img = np.where(labels > 0, levels[labels] + 0.08 * texture, img)
    rim = find_boundaries(labels, mode="inner")
    img[rim] += 0.35
    img = ndimage.gaussian_filter(img, 0.8) + rng.normal(0, 0.04, shape)
    img = np.clip(img * 255, 0, 255).astype(np.uint8)
    return img, labels


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Drop empty and tiny ids, keep each id one connected piece, make ids consecutive."""
    out = np.zeros_like(labels)
    nxt = 1
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        comp, n = ndimage.label(labels[sl] == i)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())[1:]
        keep = comp == (np.argmax(sizes) + 1)
        if keep.sum() < 20:
            continue
        out[sl][keep] = nxt
        nxt += 1
    return out


def synthetic_dataset(n: int, shape=(256, 256), seed: int = 0):
    """``n`` (image, labels) pairs with different seeds."""
    return [synthetic_cells(shape, seed=seed + i) for i in range(n)]


#: nuclei painted in the histology sample: one point inside each (row, column); stromal nuclei
#: and a few in the glands, picked by eye on the image
HISTOLOGY_POINTS = ((141, 492), (185, 497), (181, 307), (279, 489), (292, 357), (391, 352), (343, 434),
                    (351, 80), (393, 181), (425, 173), (463, 181), (480, 385), (481, 277))


def histology_nuclei() -> tuple[np.ndarray, np.ndarray]:
    """A real microscopy image with a few nuclei painted: colonic glands, immunohistochemistry
    (DAB, brown) with hematoxylin counterstain (nuclei, blue), 512 x 512 RGB. The image ships with
    scikit-image (``skimage.data.immunohistochemistry``, acquired at the Center for Microscopy And
    Molecular Imaging (CMMI), no known copyright restrictions).

    Returns the RGB image (uint8, (512, 512, 3)) and sparse labels (int32): the nuclei under
    :data:`HISTOLOGY_POINTS`, outlined by a classical segmentation of the hematoxylin channel
    (Otsu threshold, distance-transform watershed); everything else is unlabeled (0).
    """
    from skimage import color, data, feature, filters, segmentation

    rgb = data.immunohistochemistry()
    h = filters.gaussian(color.rgb2hed(rgb)[..., 0], 1.5)
    fg = ndimage.binary_fill_holes(h > filters.threshold_otsu(h))
    dist = ndimage.distance_transform_edt(fg)
    peaks = feature.peak_local_max(filters.gaussian(dist, 2), min_distance=7, labels=ndimage.label(fg)[0],
                                   exclude_border=False)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    seg = segmentation.watershed(-dist, markers, mask=fg)
    sparse = np.zeros(seg.shape, np.int32)
    for i, p in enumerate(HISTOLOGY_POINTS, start=1):
        if seg[p]:
            sparse[seg == seg[p]] = i
    return rgb, sparse
