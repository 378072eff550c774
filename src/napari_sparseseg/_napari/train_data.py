"""What the Train tab hands to training: the layers whole, or, for a stack too large to read
(a dask / zarr / multiscale layer of more than :data:`..core.regions.LAZY_VOXELS` voxels), only
the regions around its labeled objects (:func:`..core.regions.read_regions`), as the command line
does for large files."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..core import regions
from ..core.errors import SparseSegError
from . import layers as L


def reads_regions(image) -> bool:
    """Whether training on ``image`` reads only the regions around the labels."""
    return L.is_lazy(image) and int(np.prod(L.spatial_shape(image))) > regions.LAZY_VOXELS


def training_inputs(image, labels, ignore=None, background_id: int | None = None, z: int = 0) -> dict[str, Any]:
    """Keyword arguments of :class:`..core.training_process.TrainJob` for an image layer, its
    annotation layer and an optional ignore-mask layer: images, labels, names, ignore, voxel
    sizes, bounds and the preview (image, z and, for regions, where it lies in the image)."""
    shape = L.spatial_shape(image)
    lab = L.level0(labels)
    if tuple(lab.shape) != shape:
        raise SparseSegError(f"annotation layer '{labels.name}' has shape {tuple(lab.shape)} but image '{image.name}' "
                             f"has {shape}; annotate on a layer of the image's shape")
    mask = None
    if ignore is not None:
        mask = L.level0(ignore)
        if tuple(mask.shape) != shape:
            raise SparseSegError(f"ignore mask layer '{ignore.name}' has shape {tuple(mask.shape)} but the annotations "
                                 f"have shape {shape}; draw the mask on a layer of the image's shape")
    name = f"image '{image.name}'"
    voxel = L.voxel_size(image)
    if not reads_regions(image):
        img = L.image_array(image)
        return dict(images=[img], labels=[np.asarray(lab)], names=[name],
                    ignore=None if mask is None else [np.asarray(mask) != 0], voxel_sizes=[voxel],
                    preview_image=img, z=z)
    got = regions.read_regions(L.level0(image), lab, background_id=background_id, name=name)
    n = len(got.images)
    first = got.images[0]  # (C, *R): the preview takes the layer's own layout
    preview = first[0] if first.shape[0] == 1 else np.moveaxis(first, 0, -1)
    return dict(images=got.images, labels=got.labels, names=got.names,
                ignore=None if mask is None else [np.asarray(mask[r]) != 0 for r in got.found.regions],
                voxel_sizes=[voxel] * n, bounds=[got.bounds] * n, preview_image=preview,
                z=preview.shape[0] // 2 if len(shape) == 3 else 0,
                preview_origin=tuple(s.start for s in got.found.regions[0]))
