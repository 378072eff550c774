"""Reading and writing images and label images: TIFF, PNG, NumPy ``.npy`` and zarr.

:func:`read` loads a whole image into memory (small data); :func:`open_lazy` opens a zarr,
OME-Zarr or TIFF stack without reading its pixels, for blockwise processing (:mod:`.blockwise`).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np

from .errors import SparseSegError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy", ".zarr")


def expand(pattern: str | os.PathLike, what: str = "--images") -> list[Path]:
    """Expand a (quoted) glob, a file or a folder into a sorted list of image files."""
    pattern = str(pattern)
    path = Path(pattern)
    if path.is_dir() and path.suffix != ".zarr":
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    elif path.exists():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(pattern))
        files = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise SparseSegError(f"{what} {pattern!r}: no image file matches (expected TIFF, PNG, .npy or zarr)")
    return files


def pair(images: list[Path], labels: list[Path]) -> list[tuple[Path, Path]]:
    """Pair images with labels in sorted file-name order; the counts must agree."""
    if len(images) != len(labels):
        raise SparseSegError(
            f"--images matched {len(images)} file(s) but --labels matched {len(labels)}; "
            "images and labels pair up in sorted order, so the counts must be equal"
        )
    return list(zip(images, labels))


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        if im.mode == "P":  # palette label images: keep the indices, not the colours
            return np.asarray(im)
        if im.mode in ("RGBA", "LA"):  # alpha is transparency, not signal
            im = im.convert("RGB" if im.mode == "RGBA" else "L")
        if im.mode == "I;16":
            return np.asarray(im).astype(np.uint16)
        return np.asarray(im)


def _read_zarr(path: Path) -> np.ndarray:
    import zarr

    node = zarr.open(str(path), mode="r")
    if isinstance(node, zarr.Array):
        return node
    arrays = sorted(node.array_keys())
    if len(arrays) != 1:
        raise SparseSegError(
            f"{path}: zarr group holds arrays {arrays}; expected exactly one array (or point to it: {path}/<name>)"
        )
    return node[arrays[0]]


def read(path: str | os.PathLike) -> np.ndarray:
    """Read one image or label file into an array."""
    path = Path(path)
    if not path.exists():
        raise SparseSegError(f"{path}: file not found")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(path)
        elif suffix in (".png", ".jpg", ".jpeg"):
            arr = _read_png(path)
        elif suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif suffix == ".zarr" or (path.is_dir() and any((path / m).exists() for m in (".zgroup", ".zarray", "zarr.json"))):
            arr = _read_zarr(path)
        else:
            raise SparseSegError(f"{path}: unsupported file type {suffix!r}; expected TIFF, PNG, .npy or zarr")
    except SparseSegError:
        raise
    except Exception as err:  # corrupt or truncated files
        raise SparseSegError(f"{path}: could not be read as an image ({err})") from err
    return np.asarray(arr)


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Read an instance label image: integers, 0 = unlabeled, each id > 0 one object."""
    arr = read(path)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and Path(path).suffix.lower() in (".png", ".jpg", ".jpeg"):
        raise SparseSegError(f"{path}: a colour (RGB) image, expected a label image with one integer id per pixel")
    if not np.issubdtype(arr.dtype, np.integer) and not np.issubdtype(arr.dtype, np.bool_):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.mod(arr, 1) == 0):
            arr = arr.astype(np.int64)
        else:
            raise SparseSegError(f"{path}: label images must hold integer ids, got {arr.dtype}")
    if arr.min() < 0:
        raise SparseSegError(f"{path}: label ids must be >= 0 (0 = unlabeled), found {arr.min()}")
    return arr.astype(np.int64 if arr.max() > np.iinfo(np.int32).max else np.int32)


def write(path: str | os.PathLike, arr: np.ndarray, voxel_size: tuple[float, float, float] | None = None) -> Path:
    """Write an array as a compressed TIFF, atomically (no half-written file is left behind).

    ``voxel_size`` (z, y, x, micrometres) for a 3D stack: written as ImageJ metadata (spacing and
    resolution; the ImageJ format takes uint8, uint16 and float32), which :func:`voxel_size` reads.
    """
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if voxel_size is not None:
        z, y, x = (float(v) for v in voxel_size)
        tifffile.imwrite(tmp, arr, imagej=True, resolution=(1 / x, 1 / y), compression="zlib",
                         metadata={"spacing": z, "unit": "um", "axes": "ZYX"})
    else:
        tifffile.imwrite(tmp, arr, compression="zlib", photometric="minisblack")
    os.replace(tmp, path)
    return path


def to_channels_first(image: np.ndarray, ndim: int, name: str = "image", channels: int | None = None) -> np.ndarray:
    """Bring an image to (C, *spatial) with ``ndim`` spatial axes.

    A trailing axis of length <= 4 is taken as colour channels (RGB); otherwise a leading one.
    A grey image for ``channels`` = 3 (an RGB model or training set) is repeated into 3 channels.
    """
    image = np.asarray(image)
    if image.ndim == ndim:
        out = image[None]
    elif image.ndim == ndim + 1:
        if image.shape[-1] <= 4 and (channels is None or image.shape[-1] == channels):
            out = np.moveaxis(image, -1, 0)
        elif channels is None or image.shape[0] == channels:
            out = image
        elif image.shape[-1] <= 4:
            hint = "; convert it to greyscale first" if channels == 1 and image.shape[-1] == 3 else ""
            raise SparseSegError(f"{name}: has {image.shape[-1]} channel(s) but the model expects {channels}{hint}")
        else:
            raise SparseSegError(
                f"{name}: is {image.ndim}D but the model was trained on {ndim}D images with {channels} "
                f"channel(s) (got shape {image.shape})"
            )
    else:
        raise SparseSegError(
            f"{name}: shape {image.shape} does not fit a {ndim}D image "
            f"(expected {ndim} spatial axes, optionally plus one channel axis)"
        )
    if channels == 3 and out.shape[0] == 1:
        return np.repeat(out, 3, axis=0)
    if channels is not None and out.shape[0] != channels:
        raise SparseSegError(f"{name}: has {out.shape[0]} channel(s), the model expects {channels}")
    return out


def percentile_bounds(image: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Per-channel (low, high) percentiles of a (C, ...) array: (C, 2), what :func:`normalize` maps
    to 0 and 1."""
    image = np.asarray(image, dtype=np.float32)
    return np.array([np.percentile(image[c], (low, high)) for c in range(image.shape[0])], np.float64)


def normalize(image: np.ndarray, low: float = 1.0, high: float = 99.8, bounds: np.ndarray | None = None) -> np.ndarray:
    """Per-channel percentile normalisation of a (C, *spatial) array to about [0, 1].

    ``bounds`` (C, 2) fixes the values mapped to 0 and 1 (e.g. percentiles of a whole stack, for a
    block of it); by default they are this image's own ``low`` and ``high`` percentiles."""
    image = np.asarray(image, dtype=np.float32)
    bounds = percentile_bounds(image, low, high) if bounds is None else np.asarray(bounds, np.float64)
    out = np.empty_like(image)
    for c in range(image.shape[0]):
        lo, hi = bounds[c]
        out[c] = (image[c] - lo) / max(hi - lo, 1e-6)
    return out


def _multiscales(attrs: dict) -> list | None:
    """The OME-Zarr ``multiscales`` metadata (NGFF 0.4: top level; 0.5: under ``ome``), if any."""
    ms = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
    return ms if isinstance(ms, list) and ms else None


def open_lazy(path: str | os.PathLike, level: int = 0):
    """Open an image stack without reading its pixels: a zarr array (indexing reads only the chunks
    it touches). Accepts a zarr array, a zarr group holding one array, an OME-Zarr image (multiscale
    ``level``, 0 = full resolution) and a TIFF file (through tifffile's zarr store)."""
    import zarr

    path = Path(path)
    if not path.exists():
        raise SparseSegError(f"{path}: file not found")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            node = zarr.open(tifffile.imread(path, aszarr=True), mode="r")
        else:
            node = zarr.open(str(path), mode="r")
    except Exception as err:
        raise SparseSegError(f"{path}: could not be opened as zarr or TIFF ({err})") from err
    if isinstance(node, zarr.Array):
        if level:
            raise SparseSegError(f"{path}: is a single-resolution array; level {level} does not exist (use 0)")
        return node
    ms = _multiscales(dict(node.attrs))
    if ms is not None:
        datasets = ms[0].get("datasets", [])
        if not 0 <= level < len(datasets):
            raise SparseSegError(f"{path}: OME-Zarr image has {len(datasets)} resolution level(s) (0 to "
                                 f"{len(datasets) - 1}), got level {level}")
        return node[datasets[level]["path"]]
    arrays = sorted(node.array_keys())
    if len(arrays) != 1:
        if arrays and all(a.isdigit() for a in arrays):  # a pyramid without OME metadata (e.g. TIFF levels)
            if not 0 <= level < len(arrays):
                raise SparseSegError(f"{path}: has {len(arrays)} resolution level(s), got level {level}")
            return node[str(level)]
        raise SparseSegError(
            f"{path}: zarr group holds arrays {arrays}; expected exactly one array, an OME-Zarr image "
            f"or a path to one array ({path}/<name>)")
    if level:
        raise SparseSegError(f"{path}: is a single-resolution array; level {level} does not exist (use 0)")
    return node[arrays[0]]


def _tiff_voxel_size(path: Path) -> tuple[float, float, float] | None:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        if tif.is_ome and tif.ome_metadata:
            import re

            sizes = {a: re.search(rf'PhysicalSize{a}="([0-9.eE+-]+)"', tif.ome_metadata) for a in "ZYX"}
            if all(sizes.values()):
                return tuple(float(sizes[a].group(1)) for a in "ZYX")
        ij = tif.imagej_metadata or {}
        page = tif.pages.first
        if "spacing" in ij and "XResolution" in page.tags and "YResolution" in page.tags:
            def size(tag):
                num, den = page.tags[tag].value
                return den / num if num else None

            y, x = size("YResolution"), size("XResolution")
            if y and x:
                return float(ij["spacing"]), y, x
    return None


def _zarr_voxel_size(path: Path, level: int = 0) -> tuple[float, float, float] | None:
    import zarr

    node = zarr.open(str(path), mode="r")
    ms = None if isinstance(node, zarr.Array) else _multiscales(dict(node.attrs))
    if not ms:
        return None
    datasets = ms[0].get("datasets", [])
    if not 0 <= level < len(datasets):
        return None
    scale = [1.0] * len(ms[0].get("axes", []))
    for group in (ms[0].get("coordinateTransformations") or [], datasets[level].get("coordinateTransformations") or []):
        for t in group:
            if t.get("type") == "scale":
                scale = [a * b for a, b in zip(scale, t["scale"])] if len(scale) == len(t["scale"]) else list(t["scale"])
    axes = [a.get("name") if isinstance(a, dict) else a for a in ms[0].get("axes", [])]
    if len(axes) == len(scale) and all(a in axes for a in "zyx"):
        return tuple(float(scale[axes.index(a)]) for a in "zyx")
    return tuple(float(a) for a in scale[-3:]) if len(scale) >= 3 else None


def voxel_size(path: str | os.PathLike, level: int = 0) -> tuple[float, float, float] | None:
    """The voxel size (z, y, x) a 3D image file states: OME-TIFF physical sizes, ImageJ TIFF
    spacing and resolution, OME-Zarr ``scale`` transformations (of multiscale ``level``). None
    when the file states none (or cannot say)."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            return _tiff_voxel_size(path)
        if path.is_dir():
            return _zarr_voxel_size(path, level)
    except Exception:  # metadata that cannot be parsed is metadata not stated
        return None
    return None
