"""Training on stacks larger than memory: only the regions around the labeled objects are read.

A user paints a few objects in a stack of hundreds of GB; training needs those objects and some
context around them, never the whole stack. :func:`labeled_regions` scans the label array chunk by
chunk (only labels are read, one chunk at a time) for the bounding boxes of the objects, grows each
by a margin of context (by default two object extents per axis: a training crop is four object
diameters across at the model's scale) and merges boxes that overlap, so every object lies whole in
one region. :func:`read_regions` then reads those regions of image and labels; each region is one
training image (its own zoom, its own normalisation) for :class:`.training.Trainer`.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from . import io
from .blocks import ArrayVolume, Volume
from .errors import SparseSegError

#: stacks with more voxels than this are trained on the regions around their labels (the CLI
#: also does so for every zarr / OME-Zarr input)
LAZY_VOXELS = 1 << 27
#: context around each labeled object, in object extents (per axis)
MARGIN_EXTENTS = 2.0
#: labels are scanned in blocks of at most this many voxels
SCAN_VOXELS = 1 << 24


@dataclass
class Regions:
    """The regions (slices of the stack's spatial axes) and what the scan found."""

    regions: list[tuple[slice, ...]]
    shape: tuple[int, ...]
    objects: int

    @property
    def fraction(self) -> float:
        """The fraction of the stack the regions cover."""
        return float(sum(np.prod([s.stop - s.start for s in r]) for r in self.regions) / np.prod(self.shape))


def _scan_blocks(shape: tuple[int, ...], chunks: tuple[int, ...] | None) -> list[tuple[slice, ...]]:
    """Blocks covering ``shape``: whole chunks along every axis, at most SCAN_VOXELS each."""
    chunks = tuple(chunks) if chunks else tuple(shape)
    # a dask array's chunks are the sizes of every chunk per axis
    chunks = tuple(c if isinstance(c, (int, np.integer)) else max(c) for c in chunks)
    block = list(min(c, s) for c, s in zip(chunks, shape))
    # grow along the leading axes (whole chunks) while the block stays small
    for a in range(len(shape)):
        while block[a] < shape[a] and np.prod(block) * 2 <= SCAN_VOXELS:
            block[a] = min(shape[a], block[a] * 2)
    return [tuple(slice(o, min(o + b, s)) for o, b, s in zip(origin, block, shape))
            for origin in itertools.product(*[range(0, s, b) for s, b in zip(shape, block)])]


def object_boxes(labels) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{id: (start, stop)} bounding boxes of the objects (ids > 0) of a label array that is read
    block by block (a zarr array, a lazily read TIFF, a numpy array)."""
    shape = tuple(labels.shape)
    boxes: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for block in _scan_blocks(shape, getattr(labels, "chunks", None)):
        lab = np.asarray(labels[block])
        if not lab.any():
            continue
        ids, inverse = np.unique(lab, return_inverse=True)
        dense = inverse.reshape(lab.shape).astype(np.int32) + 1  # 1 .. len(ids): ids[j - 1]
        origin = np.array([s.start for s in block])
        for k, sl in enumerate(ndimage.find_objects(dense)):
            if sl is None or ids[k] == 0:
                continue
            start = origin + [s.start for s in sl]
            stop = origin + [s.stop for s in sl]
            old = boxes.get(int(ids[k]))
            boxes[int(ids[k])] = (start, stop) if old is None else (np.minimum(old[0], start), np.maximum(old[1], stop))
    return boxes


def merge_boxes(boxes: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Merge overlapping boxes until none overlap (each result is the bounding box of its group)."""
    boxes = [(np.array(a), np.array(b)) for a, b in boxes]
    merged = True
    while merged:
        merged = False
        out: list[tuple[np.ndarray, np.ndarray]] = []
        for a, b in boxes:
            for i, (c, d) in enumerate(out):
                if np.all(a < d) and np.all(c < b):
                    out[i] = (np.minimum(a, c), np.maximum(b, d))
                    merged = True
                    break
            else:
                out.append((a, b))
        boxes = out
    return boxes


def labeled_regions(labels, margin: tuple[int, ...] | None = None, background_id: int | None = None) -> Regions:
    """The regions of a (lazily read) label array to train on: each labeled object's box grown
    by ``margin`` pixels per axis (default: MARGIN_EXTENTS x the median object extent), clipped to
    the stack, overlapping ones merged."""
    shape = tuple(labels.shape)
    boxes = object_boxes(labels)
    if background_id is not None:
        boxes.pop(int(background_id), None)
    if not boxes:
        raise SparseSegError("no labeled object in the label stack: paint at least one complete object (id > 0) "
                             "before training")
    if margin is None:
        extents = np.array([b - a for a, b in boxes.values()])
        margin = tuple(int(np.ceil(MARGIN_EXTENTS * e)) for e in np.median(extents, axis=0))
    margin = np.array(margin)
    grown = [(np.maximum(a - margin, 0), np.minimum(b + margin, shape)) for a, b in boxes.values()]
    regions = [tuple(slice(int(s), int(e)) for s, e in zip(a, b)) for a, b in merge_boxes(grown)]
    regions.sort(key=lambda r: tuple(s.start for s in r))
    return Regions(regions, shape, len(boxes))


def _is_path(source) -> bool:
    return isinstance(source, (str, os.PathLike))


def _source_name(source) -> str:
    """How messages and region names call an image: its path, or "image" for an open array."""
    return str(source) if _is_path(source) else "image"


def open_image_like(source, spatial: tuple[int, ...], level: int = 0) -> Volume:
    """The image stack ``source`` (a path, or an array already open such as a napari layer's) as a
    :class:`.blocks.Volume` whose spatial shape is the labels' ``spatial`` shape (a channel axis
    first or last, leading axes of length 1 dropped)."""
    arr = io.open_lazy(source, level) if _is_path(source) else source
    shape, drop = tuple(arr.shape), 0
    while len(shape) > len(spatial) and shape[0] == 1 and shape[1:] != spatial[1:]:
        shape, drop = shape[1:], drop + 1

    def volume(channels: int, axis: int | None) -> Volume:
        if _is_path(source):
            return Volume(str(source), level, spatial, channels, axis, drop)
        return ArrayVolume("", level, spatial, channels, axis, drop, arr)

    if shape == spatial:
        return volume(1, None)
    if len(shape) == len(spatial) + 1 and shape[:-1] == spatial and shape[-1] <= 4:
        return volume(shape[-1], len(shape) - 1)
    if len(shape) == len(spatial) + 1 and shape[1:] == spatial:
        return volume(shape[0], 0)
    raise SparseSegError(f"{_source_name(source)}: image shape {tuple(arr.shape)} does not match its labels' shape {spatial}")


@dataclass
class StackRegions:
    """What :func:`read_regions` read: per region an image (C, *R) float32, its labels and a name,
    the stack's normalisation ``bounds`` (C, 2) shared by all regions, and the scan's :class:`Regions`."""

    images: list[np.ndarray]
    labels: list[np.ndarray]
    names: list[str]
    bounds: np.ndarray
    found: Regions


def read_regions(image, labels, level: int = 0, margin: tuple[int, ...] | None = None,
                 background_id: int | None = None, low: float = 1.0, high: float = 99.8,
                 name: str | None = None) -> StackRegions:
    """The regions around the labeled objects of a stack, read from image and labels (each a
    path, or an array already open: a napari layer's dask or zarr array); nothing else of either
    is kept in memory. The normalisation bounds are the ``low`` / ``high`` percentiles of the
    whole stack (sampled as for blockwise segmentation), not of each region. Regions are named
    ``name`` (default: the image's path) with their slices."""
    from .blocks import sample_bounds

    lab = io.open_lazy(labels, level) if _is_path(labels) else labels
    found = labeled_regions(lab, margin, background_id)
    volume = open_image_like(image, tuple(lab.shape), level)
    name = name or _source_name(image)
    imgs, labs, names = [], [], []
    for r in found.regions:
        imgs.append(volume.read(r))
        labs.append(np.asarray(lab[r]).astype(np.int64))
        names.append(f"{name} [{', '.join(f'{s.start}:{s.stop}' for s in r)}]")
    return StackRegions(imgs, labs, names, sample_bounds(volume, low, high), found)
