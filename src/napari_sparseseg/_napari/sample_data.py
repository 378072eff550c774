"""Sample data for File > Open Sample: an image plus a Labels layer with a few objects painted.

The cell images are synthetic (generated on the fly), so no licence restricts them; the histology
image is a real one that ships with scikit-image (:func:`..core.samples.histology_nuclei`); the
ovule and FIB-SEM stacks are real ones downloaded on first use (:mod:`..core.real_samples`).
"""

from __future__ import annotations

import numpy as np

from ..core.real_samples import load_real_sample
from ..core.samples import histology_nuclei, synthetic_cells
from ..core.sparsify import sparsify


def _layers(img: np.ndarray, gt: np.ndarray, fraction: float, seed: int, name: str):
    sparse = sparsify(gt, fraction, np.random.default_rng(seed))
    return [
        (img, {"name": name}, "image"),
        (sparse.astype(np.int32), {"name": f"{name} annotations"}, "labels"),
    ]


def cells_2d():
    img, gt = synthetic_cells((384, 384), seed=11)
    return _layers(img, gt, 0.15, 0, "cells 2D")


def cells_3d():
    img, gt = synthetic_cells((32, 128, 128), radius=(7.0, 12.0), seed=5)
    return _layers(img, gt, 0.2, 0, "cells 3D")


def histology():
    img, sparse = histology_nuclei()
    name = "histology nuclei"
    return [
        (img, {"name": name, "rgb": True,
               "metadata": {"source": "scikit-image data.immunohistochemistry (CMMI; no known copyright restrictions)"}},
         "image"),
        (sparse, {"name": f"{name} annotations"}, "labels"),
    ]


def _real(key: str, name: str):
    img, sparse, _, sample = load_real_sample(key)
    meta = {"metadata": {"source": sample.attribution}}
    if sample.voxel_size is not None:
        meta["scale"] = sample.voxel_size
    return [
        (img, {"name": name, **meta}, "image"),
        (sparse, {"name": f"{name} annotations", **meta}, "labels"),
    ]


def ovule():
    return _real("ovule", "ovule cells")


def fibsem():
    return _real("fibsem", "FIB-SEM neurons")
