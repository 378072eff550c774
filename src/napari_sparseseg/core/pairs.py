"""Training pairs from files, as the command line finds them: images and labels paired in sorted
file-name order, optional ignore masks, each file's voxel size; a large stack becomes the regions
around its labels (:mod:`.regions`)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from . import io
from .errors import SparseSegError
from .regions import LAZY_VOXELS, read_regions


def is_zarr(path: Path) -> bool:
    return path.suffix == ".zarr" or (path.is_dir() and any((path / m).exists() for m in (".zarray", ".zgroup", "zarr.json")))


def is_large(path: Path) -> bool:
    """Whether a training image is read only around its labels: every zarr / OME-Zarr, and TIFFs
    of more than :data:`.regions.LAZY_VOXELS` voxels."""
    if is_zarr(path):
        return True
    if path.suffix.lower() not in (".tif", ".tiff"):
        return False
    try:
        return int(np.prod(io.open_lazy(path).shape)) > LAZY_VOXELS
    except SparseSegError:
        return False


def load_training_pairs(images: str, labels: str, masks: str | None = None, background_id: int | None = None,
                        report: Callable[[str], None] | None = None):
    """(images, labels, names, ignore masks or None, normalisation bounds (None: each image's own),
    voxel sizes) for :class:`.training.Trainer`, from glob patterns. ``report`` receives a line per
    large stack (how much of it training reads)."""
    pairs = io.pair(io.expand(images, "--images"), io.expand(labels, "--labels"))
    mask_files = [None] * len(pairs)
    if masks is not None:
        mask_files = io.expand(masks, "--ignore-mask")
        if len(mask_files) != len(pairs):
            raise SparseSegError(
                f"--ignore-mask matched {len(mask_files)} file(s) but --images matched {len(pairs)}; "
                "masks pair up with the images in sorted order, so the counts must be equal"
            )
    imgs, labs, names, ignore, bounds, voxels = [], [], [], [], [], []
    for (ip, lp), mp in zip(pairs, mask_files):
        voxel = io.voxel_size(ip)
        if is_large(ip):
            got = read_regions(ip, lp, background_id=background_id)
            if report is not None:
                report(f"{ip}: {got.found.objects} labeled object(s); training reads {len(got.found.regions)} region(s) "
                       f"around them, {100 * got.found.fraction:.2g}% of the stack")
            mask = None if mp is None else io.open_lazy(mp)
            for img, lab, name, r in zip(got.images, got.labels, got.names, got.found.regions):
                imgs.append(img)
                labs.append(lab)
                names.append(name)
                ignore.append(None if mask is None else np.asarray(mask[r]) > 0)
                bounds.append(got.bounds)
                voxels.append(voxel)
            continue
        imgs.append(io.read(ip))
        labs.append(io.read_labels(lp))
        names.append(str(ip))
        ignore.append(None if mp is None else io.read_labels(mp) > 0)
        bounds.append(None)
        voxels.append(voxel)
    return imgs, labs, names, (ignore if masks is not None else None), bounds, voxels
