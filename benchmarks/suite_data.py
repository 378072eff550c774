"""Datasets of the benchmark suite (from ../shared/data, never copied into the project) and the
classical floors the suite compares against.

Each dataset is written once as TIFF/PNG links into a work folder, in the layout the command line
reads: ``train_images/``, ``train_gt/`` (dense labels, sparsified per seed by ``sparseseg
sparsify``), ``test_images/``, ``test_gt/``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.segmentation import find_boundaries, relabel_sequential, watershed

from napari_sparseseg.core.annotation import fisher_direction

#: the shared data folder; SPARSESEG_DATA overrides (e.g. when running from a copy of benchmarks/)
SHARED = Path(os.environ.get("SPARSESEG_DATA") or Path(__file__).resolve().parents[1] / ".." / "shared" / "data")


@dataclass
class Dataset:
    name: str
    ndim: int
    kind: str  # "blobs" (objects on background) or "membranes" (dense cells between boundaries)
    primary: str  # the metric the suite ranks by
    budget: float  # training seconds (one CPU thread) in the full suite
    voxel: tuple[float, ...] | None = None  # physical voxel size (z, y, x) where known
    polarity_per_image: bool = False  # floor: each image's polarity its own (modalities mixed)
    extra: bool = False  # run only when named (--datasets), not in the full suite
    note: str = ""


DATASETS = {
    "cvppp": Dataset("cvppp", 2, "blobs", "sbd", 480, note="CVPPP A1, split.json: 103 train / 25 val"),
    "nuclei2d": Dataset("nuclei2d", 2, "blobs", "ap50", 300, note="DSB 2018 fluorescence image, left half / right half"),
    "vnc_cells": Dataset("vnc_cells", 2, "membranes", "voi", 360, note="ssTEM slices 0-9 / 10-19, 2D cells"),
    "vnc_mito": Dataset("vnc_mito", 2, "blobs", "ap50", 300, note="ssTEM slices 0-9 / 10-19, mitochondria"),
    "ovule": Dataset("ovule", 3, "membranes", "voi", 480, voxel=(0.235, 0.15, 0.15),
                     note="PlantSeg ovule crop 32x128x128, x < 64 / x >= 64"),
    "nuclei3d": Dataset("nuclei3d", 3, "blobs", "ap50", 480, voxel=(0.284, 0.127, 0.127),
                        note="PlantSeg nuclei crops: 1135 / 1136 (1137 holds no signal: in/out mean 127/125)"),
    "gala": Dataset("gala", 3, "membranes", "voi", 480, note="FIB-SEM gala train / test volumes"),
    # a stand-in for a mixed nuclei collection (fluorescence, brightfield, histology; nuclei of
    # different sizes), rendered from the DSB image's own nuclei: see render_nuclei
    "nuclei_mix": Dataset("nuclei_mix", 2, "blobs", "ap50", 300,
                          polarity_per_image=True,
                          note="DSB image rendered as fluorescence / brightfield / H&E at zooms 0.6-2, "
                               "left half (3 images) / right half (4 images)"),
    # a second check of the size model on another kind of object: CVPPP, each image zoomed
    "cvppp_mix": Dataset("cvppp_mix", 2, "blobs", "sbd", 480, extra=True,
                         note="CVPPP A1 as cvppp, training images zoomed by 0.6 / 1 / 1.6 in turn, "
                              "validation images by 0.75 / 1.33"),
}

#: cvppp_mix: the zooms of the training and the validation images, in turn
CVPPP_MIX_ZOOMS = {"train": (0.6, 1.0, 1.6), "test": (0.75, 1.33)}

#: nuclei_mix: (rendering, zoom) of the training images (left half) and test images (right half)
MIX_TRAIN = (("fluorescence", 1.0), ("brightfield", 2.0), ("histology", 1.0))
MIX_TEST = (("fluorescence", 2.0), ("brightfield", 1.0), ("histology", 1.5), ("fluorescence", 0.6))

#: metrics where lower is better
LOWER_IS_BETTER = {"voi", "arand", "abs_dic", "voi_split", "voi_merge"}


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tifffile.imwrite(path, arr, compression="zlib")


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.symlink(src.resolve(), dst)


def prepare(name: str, work: Path, quick: bool = False) -> Path:
    """Write (or link) dataset ``name`` into ``work/name``; returns that folder."""
    root = work / name
    if (root / ".ready").exists():
        return root
    src = SHARED
    if name == "cvppp":
        split = json.loads((src / "cvppp_a1" / "split.json").read_text())
        for part, names in (("train", split["train"]), ("test", split["val"])):
            for n in names:
                _link(src / "cvppp_a1" / "images" / f"{n}_rgb.png", root / f"{part}_images" / f"{n}.png")
                _link(src / "cvppp_a1" / "labels" / f"{n}_label.png", root / f"{part}_gt" / f"{n}.png")
    elif name == "nuclei2d":
        img = tifffile.imread(src / "nuclei_2d_sample" / "nuclei2d_image.tif")
        lab = tifffile.imread(src / "nuclei_2d_sample" / "nuclei2d_labels.tif")
        h = img.shape[1] // 2
        _write(root / "train_images" / "left.tif", img[:, :h])
        _write(root / "train_gt" / "left.tif", relabel_sequential(lab[:, :h])[0])
        _write(root / "test_images" / "right.tif", img[:, h:])
        _write(root / "test_gt" / "right.tif", relabel_sequential(lab[:, h:])[0])
    elif name in ("vnc_cells", "vnc_mito"):
        raw = tifffile.imread(src / "vnc_em" / "raw.tif")
        gt = tifffile.imread(src / "vnc_em" / ("cells_2d_instances.tif" if name == "vnc_cells" else "mito_2d_instances.tif"))
        for z in range(raw.shape[0]):
            part = "train" if z < 10 else "test"
            _write(root / f"{part}_images" / f"slice{z:02d}.tif", raw[z])
            _write(root / f"{part}_gt" / f"slice{z:02d}.tif", relabel_sequential(gt[z])[0].astype(np.uint32))
    elif name == "ovule":
        raw = tifffile.imread(src / "ovule_sample" / "sample_ovule_raw.tif")
        lab = tifffile.imread(src / "ovule_sample" / "sample_ovule_label.tif")
        h = raw.shape[2] // 2
        _write(root / "train_images" / "ovule.tif", raw[..., :h])
        _write(root / "train_gt" / "ovule.tif", relabel_sequential(lab[..., :h])[0].astype(np.uint32))
        _write(root / "test_images" / "ovule.tif", raw[..., h:])
        _write(root / "test_gt" / "ovule.tif", relabel_sequential(lab[..., h:])[0].astype(np.uint32))
    elif name == "nuclei3d":
        for part, k in (("train", 1135), ("test", 1136)):
            _write(root / f"{part}_images" / f"{k}.tif", tifffile.imread(src / "ovule_sample" / f"{k}_mini_raw.tif"))
            _write(root / f"{part}_gt" / f"{k}.tif",
                   tifffile.imread(src / "ovule_sample" / f"{k}_mini_label.tif").astype(np.uint32))
    elif name == "gala":
        for part in ("train", "test"):
            _write(root / f"{part}_images" / "gala.tif", tifffile.imread(src / "fibsem_gala" / f"{part}_raw.tif"))
            _write(root / f"{part}_gt" / "gala.tif", tifffile.imread(src / "fibsem_gala" / f"{part}_gt.tif"))
    elif name == "cvppp_mix":
        from napari_sparseseg.core import io as sio

        split = json.loads((src / "cvppp_a1" / "split.json").read_text())
        for part, names in (("train", split["train"]), ("test", split["val"])):
            zooms = CVPPP_MIX_ZOOMS[part]
            for i, n in enumerate(names):
                z = zooms[i % len(zooms)]
                img = sio.read(src / "cvppp_a1" / "images" / f"{n}_rgb.png")
                lab = sio.read_labels(src / "cvppp_a1" / "labels" / f"{n}_label.png")
                _write(root / f"{part}_images" / f"{n}.tif", ndimage.zoom(img, (z, z, 1), order=1))
                _write(root / f"{part}_gt" / f"{n}.tif", relabel_sequential(ndimage.zoom(lab, z, order=0))[0].astype(np.uint32))
    elif name == "nuclei_mix":
        img = tifffile.imread(src / "nuclei_2d_sample" / "nuclei2d_image.tif")
        lab = tifffile.imread(src / "nuclei_2d_sample" / "nuclei2d_labels.tif")
        h = img.shape[1] // 2
        for part, cols, views in (("train", slice(0, h), MIX_TRAIN), ("test", slice(h, None), MIX_TEST)):
            for i, (kind, zoom) in enumerate(views):
                im, gt = render_nuclei(img[:, cols], lab[:, cols], kind, zoom, seed=i)
                _write(root / f"{part}_images" / f"{i}-{kind}-x{zoom:g}.tif", im)
                _write(root / f"{part}_gt" / f"{i}-{kind}-x{zoom:g}.tif", gt)
    else:
        raise KeyError(name)
    (root / ".ready").touch()
    return root


def render_nuclei(img: np.ndarray, lab: np.ndarray, kind: str, zoom: float, seed: int = 0):
    """One view of a fluorescence nuclei image as another modality, zoomed: ``fluorescence``
    (bright nuclei, grey), ``brightfield`` (dark nuclei on a bright, uneven field, grey) or
    ``histology`` (purple nuclei on a pink, textured stroma, RGB). Returns (uint8 image, labels)."""
    rng = np.random.default_rng(seed)
    g = np.clip(img.astype(np.float32) / np.percentile(img, 99.8), 0, 1)
    if zoom != 1:
        g = ndimage.zoom(g, zoom, order=1)
        lab = ndimage.zoom(lab, zoom, order=0)
    shape = g.shape
    smooth = ndimage.gaussian_filter(rng.standard_normal(shape), 8 * zoom)
    smooth /= np.abs(smooth).max() + 1e-9  # slow variation in [-1, 1]
    if kind == "fluorescence":
        out = g + 0.02 * rng.standard_normal(shape)
    elif kind == "brightfield":
        yy, xx = np.mgrid[: shape[0], : shape[1]] / max(shape)
        out = 0.8 + 0.08 * (yy - xx) - 0.55 * g ** 0.8 + 0.03 * smooth + 0.02 * rng.standard_normal(shape)
    elif kind == "histology":
        t = np.clip(1.6 * g, 0, 1)[..., None] ** 0.7
        stroma = np.array([0.93, 0.72, 0.84]) - 0.12 * np.clip(smooth, 0, 1)[..., None] * np.array([0.2, 1, 0.6])
        nucleus = np.array([0.36, 0.22, 0.55])
        out = stroma * (1 - t) + nucleus * t + 0.03 * rng.standard_normal(shape + (3,))
    else:
        raise ValueError(kind)
    im = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
    return im, relabel_sequential(lab)[0].astype(np.uint32)


def test_files(root: Path, quick: bool) -> list[str]:
    """Names of the test images to score (every one; in --quick mode at most 6)."""
    names = sorted(p.name for p in (root / "test_images").iterdir())
    if quick and len(names) > 6:
        names = names[:: max(1, len(names) // 6)][:6]
    return names


# -- classical floors -----------------------------------------------------------------------------
def _gray(img: np.ndarray, ndim: int) -> np.ndarray:
    img = np.asarray(img, np.float32)
    return img.mean(-1) if img.ndim == ndim + 1 else img


def _annotation_stats(images: list[np.ndarray], sparse: list[np.ndarray], ndim: int, kind: str = "blobs"):
    """What the floor reads from the annotation: the median object diameter (equivalent sphere/disc)
    and whether the objects are brighter than the unlabeled rest (a channel weighting for colour);
    for membranes, whether object interiors are brighter than the objects' own borders."""
    areas = np.concatenate([np.bincount(s.ravel())[1:] for s in sparse])
    areas = areas[areas > 0]
    diam = float(np.median(2 * (areas / np.pi) ** 0.5 if ndim == 2 else 2 * (3 * areas / (4 * np.pi)) ** (1 / 3)))
    # colour images: project on the direction that separates labeled from unlabeled pixels
    if images[0].ndim == ndim + 1:
        inside = np.concatenate([im[s > 0] for im, s in zip(images, sparse)]).astype(np.float64)
        outside = np.concatenate([im[s == 0][::7] for im, s in zip(images, sparse)]).astype(np.float64)
        return diam, fisher_direction(inside, outside)
    if kind == "membranes":
        border = [find_boundaries(s, mode="inner") & (s > 0) for s in sparse]
        inside = np.mean([im[(s > 0) & ~b].mean() for im, s, b in zip(images, sparse, border) if ((s > 0) & ~b).any()])
        outside = np.mean([im[b].mean() for im, b in zip(images, border) if b.any()])
        return diam, np.array([1.0 if inside >= outside else -1.0])
    inside = np.mean([im[s > 0].mean() for im, s in zip(images, sparse) if (s > 0).any()])
    outside = np.mean([im[s == 0].mean() for im, s in zip(images, sparse)])
    return diam, np.array([1.0 if inside >= outside else -1.0])


def _project(img: np.ndarray, w: np.ndarray, ndim: int) -> np.ndarray:
    img = np.asarray(img, np.float32)
    if img.ndim == ndim + 1:
        return img @ w.astype(np.float32)
    return img * float(w[0])


def blob_floor(img: np.ndarray, diam: float, w: np.ndarray, ndim: int) -> np.ndarray:
    """Otsu threshold + distance-transform watershed, scales from the annotated objects."""
    g = ndimage.gaussian_filter(_project(img, w, ndim), max(1.0, diam / 16))
    fg = g > threshold_otsu(g)
    fg = ndimage.binary_opening(fg, iterations=1)
    dist = ndimage.distance_transform_edt(fg)
    peaks = peak_local_max(ndimage.gaussian_filter(dist, 1.0), min_distance=max(2, int(diam / 4)),
                           labels=ndimage.label(fg)[0], exclude_border=False)
    markers = np.zeros(fg.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    seg = watershed(-dist, markers, mask=fg)
    return _min_size(seg, diam, ndim)


def membrane_floor(img: np.ndarray, diam: float, w: np.ndarray, ndim: int) -> np.ndarray:
    """Seeded watershed on the (smoothed) boundary signal: seeds are maxima of the distance to the
    Otsu-thresholded boundaries; every pixel is assigned (dense tissue)."""
    # objects brighter than the unlabeled rest (boundaries) -> boundaries are the dark signal
    b = -ndimage.gaussian_filter(_project(img, w, ndim), 2.0)
    interior = b < threshold_otsu(b)
    dist = ndimage.distance_transform_edt(interior)
    peaks = peak_local_max(ndimage.gaussian_filter(dist, 1.0), min_distance=max(2, int(diam / 2)),
                           labels=ndimage.label(interior)[0], exclude_border=False)
    markers = np.zeros(b.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(b, markers).astype(np.int32)


def _min_size(seg: np.ndarray, diam: float, ndim: int) -> np.ndarray:
    area = np.pi * (diam / 2) ** 2 if ndim == 2 else 4 / 3 * np.pi * (diam / 2) ** 3
    counts = np.bincount(seg.ravel())
    small = counts < area / 4
    small[0] = False
    seg = seg.copy()
    seg[small[seg]] = 0
    return relabel_sequential(seg)[0]


def classical(ds: Dataset, train_images, sparse, test_images) -> list[np.ndarray]:
    """The classical floor of dataset ``ds`` on its test images, tuned only by the sparse labels."""
    if ds.polarity_per_image:
        diam = _annotation_stats([_gray(i, ds.ndim) for i in train_images], sparse, ds.ndim, ds.kind)[0]
        return [blob_floor(g, diam, _minority_polarity(g), ds.ndim) for g in (_gray(i, ds.ndim) for i in test_images)]
    diam, w = _annotation_stats(train_images, sparse, ds.ndim, ds.kind)
    floor = blob_floor if ds.kind == "blobs" else membrane_floor
    return [floor(img, diam, w, ds.ndim) for img in test_images]


def _minority_polarity(gray: np.ndarray) -> np.ndarray:
    """+1 if the pixels above Otsu's threshold are the fewer (bright objects), else -1."""
    return np.array([1.0 if (gray > threshold_otsu(gray)).mean() <= 0.5 else -1.0])
