"""Prediction + clustering with the defaults a model carries (object sizes, loss margins)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .checkpoint import Model
from .clustering import segment_embeddings
from .errors import SparseSegError
from .prediction import predict

#: segments smaller than this fraction of the median annotated object are fragments: dropped.
#: 1/4 measured best of 1/20, 1/8, 1/4, 1/2 on the demo data and CVPPP (docs/benchmarks.md)
MIN_SIZE_FRACTION = 1 / 4
#: mutex watershed keeps the segments that the EMA network g reproduces with at least this IoU
#: (measured on CVPPP@0.1, docs/benchmarks.md); 0 turns the filter off. Used when background is
#: found by the largest-segment rule; with a foreground head the filter is off by default (it
#: lowered SBD there)
AGREEMENT = 0.8
#: the foreground threshold as a fraction of c (below), as the theory says (docs/method.md)
FOREGROUND_FRACTION = 0.5
#: mutex-watershed bias of the default segmentation (> 0 splits more); chosen on CVPPP@0.1
#: *training* images from 0, 0.05, 0.1, 0.15, 0.2 (docs/benchmarks.md)
BIAS = 0.05


BACKGROUNDS = ("auto", "foreground", "largest", "none")


def clustering_options(config: dict[str, Any], method: str = "mws", **overrides) -> dict[str, Any]:
    """Keyword arguments for :func:`segment_embeddings` derived from a model's config.

    ``overrides`` whose value is None keep the model-derived default.
    """
    loss = config.get("loss", {})
    med = config.get("object_area_median") or 0
    opts: dict[str, Any] = {
        "delta_var": loss.get("delta_var", 0.5),
        "delta_dist": loss.get("delta_dist", 2.0),
        "offsets": config.get("offsets"),
        "min_size": int(med * MIN_SIZE_FRACTION),
        "bias": BIAS,
        "agreement": AGREEMENT if method == "mws" else None,
    }
    opts.update({k: v for k, v in overrides.items() if v is not None})
    return opts


def foreground_threshold(config: dict[str, Any]) -> float | None:
    """The probability above which the foreground head calls a pixel foreground: a fraction of c,
    the head's mean probability on annotated pixels during training (losses.foreground_term);
    None for a model without a foreground head."""
    c = (config.get("foreground") or {}).get("c")
    return None if c is None else FOREGROUND_FRACTION * float(c)


def resolve_background(config: dict[str, Any], background: str | None = "auto") -> str:
    """"auto" -> "foreground" for a model with a foreground head, else "largest"."""
    background = background or "auto"
    if background not in BACKGROUNDS:
        raise SparseSegError(f"background: expected one of {', '.join(BACKGROUNDS)}, got {background!r}")
    has_fg = foreground_threshold(config) is not None
    if background == "auto":
        return "foreground" if has_fg else "largest"
    if background == "foreground" and not has_fg:
        raise SparseSegError(
            "background 'foreground': this model has no foreground head (trained with a background label or "
            "by an older version); use background 'largest' or 'none'"
        )
    return background


def resolve(config: dict[str, Any], method: str = "mws", **overrides) -> tuple[str, dict[str, Any]]:
    """(background rule, options for :func:`segment_embeddings`) for a model ``config``."""
    overrides = dict(overrides)
    background = resolve_background(config, overrides.pop("background", None))
    overrides.pop("fg_threshold", None)
    opts = clustering_options(config, method, **overrides)
    if background == "foreground" and overrides.get("agreement") is None:
        opts["agreement"] = None
    return background, opts


def needs_g(method: str, config: dict[str, Any] | None = None, **overrides) -> bool:
    """Whether clustering with ``method`` uses the EMA network's embeddings too."""
    return method == "consistency" or bool(resolve(config or {}, method, **overrides)[1]["agreement"])


def embed(model: Model, image: np.ndarray, need_g: bool = False, device: str = "auto", name: str = "image"):
    """(embeddings of f, of g when ``need_g`` else None, foreground probability or None)."""
    emb, fg = predict(model, image, device=device, name=name, foreground=True)
    emb_g = predict(model, image, device=device, name=name, use_ema=True) if need_g else None
    return emb, emb_g, fg


def cluster(model: Model, emb: np.ndarray, emb_g: np.ndarray | None, method: str = "mws",
            fg: np.ndarray | None = None, fg_threshold: float | None = None, **overrides) -> np.ndarray:
    """Cluster cached embeddings with the model's defaults unless overridden (no network call).

    ``background`` (override): "auto" (default), "foreground" (pixels the foreground head ``fg``
    calls background are 0; threshold from the model unless ``fg_threshold``), "largest"
    or "none".
    """
    background, opts = resolve(model.config, method, **overrides)
    if emb_g is None and method != "consistency":
        opts["agreement"] = None  # g's embeddings were not computed: cluster f alone
    if background == "foreground":
        if fg is None:
            raise SparseSegError("background 'foreground' needs the foreground probability (fg) of the model")
        thr = fg_threshold if fg_threshold is not None else foreground_threshold(model.config)
        mask = fg >= thr
        if opts.get("mask") is not None:
            mask &= np.asarray(opts["mask"], bool)
        opts["mask"], background = mask, "none"
    return segment_embeddings(emb, method, embeddings_g=emb_g, background=background, **opts)


def segment(model: Model, image: np.ndarray, method: str = "mws", device: str = "auto", name: str = "image",
            **overrides) -> np.ndarray:
    """Instance labels for ``image``: :func:`embed`, then :func:`cluster`."""
    emb, emb_g, fg = embed(model, image, needs_g(method, model.config, **overrides), device, name)
    return cluster(model, emb, emb_g, method, fg=fg, **overrides)
