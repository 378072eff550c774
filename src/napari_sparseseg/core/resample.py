"""Zooming (y, x, and z for a stack with a voxel size) of a stack region by region, pixel for pixel what :func:`.data.rescale` (images)
and :func:`.segment.resize_labels` (labels) do to the whole image: every output pixel is computed
from global coordinates, so blocks fit together without seams.

torch's rules are reproduced: "bilinear" (align_corners=False) when enlarging, "area" (adaptive
average pooling) when shrinking, "nearest-exact" for labels.
"""

from __future__ import annotations

import numpy as np


def scaled_shape(shape: tuple[int, ...], zoom: float, z_zoom: float = 1.0) -> tuple[int, ...]:
    """The spatial shape at the model's scale: y/x zoomed by ``zoom``, z (of a 3D shape) by ``z_zoom``."""
    out = list(shape)
    if zoom != 1.0:
        out[-2:] = [max(1, int(round(s * zoom))) for s in shape[-2:]]
    if z_zoom != 1.0 and len(shape) >= 3:
        out[-3] = max(1, int(round(shape[-3] * z_zoom)))
    return tuple(out)


def _weights(out: slice, n_in: int, n_out: int) -> tuple[slice, np.ndarray]:
    """(source range, weights (len(out), len(range))) taking an axis of ``n_in`` pixels to the
    pixels ``out`` of its zoomed version of ``n_out`` pixels."""
    dst = np.arange(out.start, out.stop)
    ratio = n_in / n_out
    if n_out >= n_in:  # bilinear, align_corners=False
        src = np.maximum((dst + 0.5) * ratio - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        lam = src - i0
        lo, hi = int(i0.min()), int(i1.max()) + 1
        w = np.zeros((dst.size, hi - lo), np.float32)
        np.add.at(w, (np.arange(dst.size), i0 - lo), 1 - lam)
        np.add.at(w, (np.arange(dst.size), i1 - lo), lam)
        return slice(lo, hi), w
    start = np.floor(dst * ratio).astype(np.int64)  # area: adaptive average pooling
    stop = np.ceil((dst + 1) * ratio).astype(np.int64)
    lo, hi = int(start.min()), int(stop.max())
    cols = np.arange(lo, hi)
    w = ((cols[None] >= start[:, None]) & (cols[None] < stop[:, None])).astype(np.float32)
    return slice(lo, hi), w / w.sum(axis=1, keepdims=True)


def zoom_read(volume, region: tuple[slice, ...], zoom: float, z_zoom: float = 1.0) -> np.ndarray:
    """float32 (C, *region) of ``volume`` (anything with ``shape`` and ``read(region)``) zoomed by
    ``zoom`` in y/x and ``z_zoom`` in z; ``region`` is in the zoomed grid."""
    z_zoom = z_zoom if len(volume.shape) >= 3 else 1.0
    if zoom == 1.0 and z_zoom == 1.0:
        return volume.read(region)
    full = scaled_shape(volume.shape, zoom, z_zoom)
    (ry, wy), (rx, wx) = (_weights(region[a], volume.shape[a], full[a]) for a in (-2, -1))
    if z_zoom == 1.0:
        x = volume.read(tuple(region[:-2]) + (ry, rx))
        return np.einsum("...yx,Yy,Xx->...YX", x, wy, wx, optimize=True).astype(np.float32)
    rz, wz = _weights(region[-3], volume.shape[-3], full[-3])
    x = volume.read(tuple(region[:-3]) + (rz, ry, rx))
    return np.einsum("...zyx,Zz,Yy,Xx->...ZYX", x, wz, wy, wx, optimize=True).astype(np.float32)


def nearest_index(out: slice, n_in: int, n_out: int) -> np.ndarray:
    """Source pixels of the pixels ``out`` of an axis resized from ``n_in`` to ``n_out`` pixels
    by torch's "nearest-exact"."""
    dst = np.arange(out.start, out.stop)
    return np.minimum(np.floor((dst + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)
