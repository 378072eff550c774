"""Tiled embedding prediction at the model's scale, returned at the image's own resolution."""

from __future__ import annotations

import itertools
from typing import Callable

import numpy as np
from scipy.special import expit
import torch
import torch.nn.functional as F

from .checkpoint import Model, check_compatible
from .data import rescale
from .io import normalize, to_channels_first
from .training import resolve_device


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
def _run(net, x: np.ndarray, device, origin=None) -> np.ndarray:
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
    out = net(t, origin=origin)[0]
    return out[(slice(None),) + tuple(slice(0, s) for s in spatial)].float().cpu().numpy()


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
):
    """Embeddings (D, *S) of ``image`` (same spatial shape), predicted tile by tile.

    ``use_ema`` predicts with the EMA network g instead of f (needed for consistency clustering).
    ``foreground=True`` returns ``(embeddings, probability)``, the second the foreground head's
    probability (*S) in [0, 1], or None for a model without one.
    """
    ndim, channels = model.ndim, model.in_channels
    x = to_channels_first(image, ndim, name, channels)
    check_compatible(model.config, ndim, x.shape[0], name)
    spatial = x.shape[1:]
    norm = model.config["normalization"]
    x = normalize(x, norm["low"], norm["high"])
    scale = float(model.config.get("scale", 1.0))
    xs = rescale(x, scale, 1)
    net = model.ema if (use_ema and model.ema is not None) else model.net
    dev = resolve_device(device)
    net = net.to(dev).eval()
    tile = tile_shape or ((512, 512) if ndim == 2 else (48, 192, 192))
    halo = halo or ((32, 32) if ndim == 2 else (8, 32, 32))
    d = net.config["out_channels"]
    out = np.zeros((d + int(bool(net.config.get("foreground"))),) + xs.shape[1:], np.float32)
    blocks = list(_tiles(xs.shape[1:], tile, halo))
    for i, (inner, outer) in enumerate(blocks):
        origin = [o.start - s // 2 for o, s in zip(outer, xs.shape[1:])]
        pred = _run(net, xs[(slice(None),) + outer], dev, origin)
        local = tuple(slice(a.start - o.start, a.stop - o.start) for a, o in zip(inner, outer))
        out[(slice(None),) + inner] = pred[(slice(None),) + local]
        if progress is not None:
            progress(i + 1, len(blocks))
    if out.shape[1:] != spatial:
        t = torch.from_numpy(out)[None]
        mode = "bilinear" if ndim == 2 else "trilinear"
        out = F.interpolate(t, size=spatial, mode=mode, align_corners=False)[0].numpy()
    emb = out[:d]
    if not foreground:
        return emb
    prob = expit(out[d]) if out.shape[0] > d else None
    return emb, prob
