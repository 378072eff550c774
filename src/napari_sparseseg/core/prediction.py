"""Tiled prediction at the model's scale (embeddings and foreground probability), and back to
the image's own resolution."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.special import expit
import torch
import torch.nn.functional as F

from . import scale as scales
from .checkpoint import Model, check_compatible
from .data import rescale
from .io import normalize, to_channels_first
from .device import autocast, resolve_device, resolve_precision


def _tiles(shape, tile, halo):
    """(inner slice, outer slice) pairs covering ``shape`` with blocks of ``tile`` plus ``halo``."""
    ranges = []
    for s, t, h in zip(shape, tile, halo):
        core = max(1, t - 2 * h)
        starts = list(range(0, s, core)) if s > t else [0]
        ranges.append([(st, min(st + core, s) if s > t else s) for st in starts])
    for combo in itertools.product(*ranges):
        inner = tuple(slice(a, b) for a, b in combo)
        outer = tuple(slice(max(0, a - h), min(s, b + h)) for (a, b), h, s in zip(combo, halo, shape))
        yield inner, outer


@torch.no_grad()
def _run(net, x: np.ndarray, device, origin=None, dtype=None) -> np.ndarray:
    """Run ``net`` on one (C, *S) block, padding each axis by reflection to the network's divisor.

    ``origin`` is the block's position relative to the image centre (for coordinate channels)."""
    div = net.divisor
    spatial = x.shape[1:]
    pad = [(-s) % d for s, d in zip(spatial, div)]
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None].to(device)
    if any(pad):
        flat = []
        for p in reversed(pad):
            flat += [0, p]
        mode = "reflect" if all(p < s for p, s in zip(pad, spatial)) else "replicate"
        t = F.pad(t, flat, mode=mode)
    with autocast(device, dtype):
        out = net(t, origin=origin)[0]
    return out[(slice(None),) + tuple(slice(0, s) for s in spatial)].float().cpu().numpy()


#: default tile and halo of tiled prediction, per dimensionality (the halo hides the tiles' borders)
TILE = {2: (512, 512), 3: (48, 192, 192)}
HALO = {2: (32, 32), 3: (8, 32, 32)}


def predict_normalized(
    net,
    xs: np.ndarray,
    device,
    dtype=None,
    tile_shape: tuple[int, ...] | None = None,
    halo: tuple[int, ...] | None = None,
    offset: tuple[int, ...] | None = None,
    full_shape: tuple[int, ...] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """The network's raw output (channels, *S) for a normalised (C, *S) array at the model's scale,
    tile by tile. ``offset`` and ``full_shape`` place ``xs`` inside a larger image (a block of a
    stack): coordinate channels then count from that image's centre, as for the whole image."""
    ndim = xs.ndim - 1
    spatial = tuple(xs.shape[1:])
    offset = tuple(offset) if offset is not None else (0,) * ndim
    full_shape = tuple(full_shape) if full_shape is not None else spatial
    tile = tile_shape or TILE[ndim]
    halo = halo or HALO[ndim]
    out = None
    blocks = list(_tiles(spatial, tile, halo))
    for i, (inner, outer) in enumerate(blocks):
        origin = [o.start + off - s // 2 for o, off, s in zip(outer, offset, full_shape)]
        pred = _run(net, xs[(slice(None),) + outer], device, origin, dtype)
        if len(blocks) == 1:
            out = pred  # one tile covers the image: its output is the result, no second copy
        else:
            if out is None:
                out = np.zeros((pred.shape[0],) + spatial, np.float32)
            local = tuple(slice(a.start - o.start, a.stop - o.start) for a, o in zip(inner, outer))
            out[(slice(None),) + inner] = pred[(slice(None),) + local]
        if progress is not None:
            progress(i + 1, len(blocks))
    return out


def split_channels(out: np.ndarray, config: dict) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(embeddings, foreground probability or None, affinity probabilities or None) from a raw
    network output (channels, *S) of a network with this ``config``."""
    d = config["out_channels"]
    has_fg, k = int(bool(config.get("foreground"))), int(config.get("affinities", 0))
    fg = expit(out[d]) if has_fg else None
    aff = expit(out[d + has_fg : d + has_fg + k]) if k else None
    return out[:d], fg, aff


@dataclass
class Prediction:
    """What the network says about one image, at the model's scale: ``embeddings`` (D, *S'),
    ``foreground`` probability (*S') or None, the ``zoom`` the image was brought to the model's
    scale by, the image's own spatial ``shape`` and ``affinities`` (K, *S'), the probability that
    each pixel and its partner at each of the model's offsets are one object, or None."""

    embeddings: np.ndarray
    foreground: np.ndarray | None
    zoom: float
    shape: tuple[int, ...]
    affinities: np.ndarray | None = None
    #: the zoom of z (3D; :func:`.scale.z_zoom`)
    z_zoom: float = 1.0
    #: the normalised image (C, *S') the network saw, or None (:func:`.segment.cluster` reads it to
    #: find the objects the foreground head dropped, :mod:`.rescue`)
    image: np.ndarray | None = None
    #: the 1-99 % spread of each channel of the whole image, when ``image`` is only a part of it (a
    #: block of a stack, :mod:`.blocks`); None: ``image``'s own (:func:`.rescue.image_spread`)
    image_spread: np.ndarray | None = None


def resolve_zoom(model: Model, x: np.ndarray, diameter: float | None = None, device="cpu") -> float:
    """The zoom for a normalised (C, *S) image: from the user's object ``diameter`` (pixels), else
    the model's common zoom, or, for a model trained on mixed object sizes, its size model's estimate."""
    if diameter is not None:
        return scales.zoom_for(diameter, model.ndim)
    if scales.uses_size_model(model.config):
        return scales.estimate_zoom(model.net, model.config, x, device=device)
    return scales.model_zoom(model.config)


def predict_scaled(
    model: Model,
    image: np.ndarray,
    *,
    use_ema: bool = False,
    device: str = "auto",
    diameter: float | None = None,
    zoom: float | None = None,
    tile_shape: tuple[int, ...] | None = None,
    halo: tuple[int, ...] | None = None,
    name: str = "image",
    progress: Callable[[int, int], None] | None = None,
    precision: str = "auto",
    voxel_size=None,
    z_zoom: float | None = None,
) -> Prediction:
    """Embeddings and foreground probability of ``image`` at the model's scale, tile by tile.

    ``zoom`` (if given) fixes the zoom; otherwise :func:`resolve_zoom` chooses it (``diameter``:
    the objects' diameter in pixels). A stack's z is zoomed by ``z_zoom`` if given, else as its
    ``voxel_size`` (z, y, x) asks (:func:`.scale.z_zoom`; default: the model's training voxel size,
    and none for models trained without one). ``precision``: see :func:`.device.resolve_precision`.
    """
    ndim, channels = model.ndim, model.in_channels
    x = to_channels_first(image, ndim, name, channels)
    check_compatible(model.config, ndim, x.shape[0], name)
    spatial = tuple(x.shape[1:])
    norm = model.config["normalization"]
    x = normalize(x, norm["low"], norm["high"])
    dev = resolve_device(device)
    if zoom is None:
        zoom = resolve_zoom(model, x, diameter, dev)
    if z_zoom is None:
        z_zoom = scales.stack_z_zoom(zoom, voxel_size, model.config, ndim)
    xs = rescale(x, zoom, 1, z_zoom)
    net = model.ema if (use_ema and model.ema is not None) else model.net
    net = net.to(dev).eval()
    out = predict_normalized(net, xs, dev, resolve_precision(precision, dev), tile_shape, halo, progress=progress)
    emb, fg, aff = split_channels(out, net.config)
    return Prediction(emb, fg, float(zoom), spatial, aff, float(z_zoom), np.asarray(xs, np.float32))


def to_image_shape(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Resize a (C, *S') float array from the model's scale to the image's spatial ``shape``."""
    if array.shape[1:] == tuple(shape):
        return array
    t = torch.from_numpy(np.ascontiguousarray(array, np.float32))[None]
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(t, size=tuple(shape), mode=mode, align_corners=False)[0].numpy()


def predict(
    model: Model,
    image: np.ndarray,
    *,
    use_ema: bool = False,
    device: str = "auto",
    tile_shape: tuple[int, ...] | None = None,
    halo: tuple[int, ...] | None = None,
    name: str = "image",
    progress: Callable[[int, int], None] | None = None,
    foreground: bool = False,
    diameter: float | None = None,
):
    """Embeddings (D, *S) of ``image`` (same spatial shape), predicted tile by tile.

    ``use_ema`` predicts with the EMA network g instead of f (needed for consistency clustering).
    ``foreground=True`` returns ``(embeddings, probability)``, the second the foreground head's
    probability (*S) in [0, 1], or None for a model without one. ``diameter``: the objects'
    diameter in pixels (default: from the model, see :func:`resolve_zoom`).
    """
    p = predict_scaled(model, image, use_ema=use_ema, device=device, diameter=diameter, tile_shape=tile_shape,
                       halo=halo, name=name, progress=progress)
    emb = to_image_shape(p.embeddings, p.shape)
    if not foreground:
        return emb
    prob = None if p.foreground is None else to_image_shape(p.foreground[None], p.shape)[0]
    return emb, prob
