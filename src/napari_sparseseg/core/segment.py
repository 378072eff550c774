"""Prediction + clustering with the defaults a model carries (object sizes, loss margins)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .checkpoint import Model
from .clustering import segment_embeddings
from .prediction import predict

#: segments smaller than this fraction of the median annotated object are fragments: dropped.
#: 1/4 measured best of 1/20, 1/8, 1/4, 1/2 on the demo data and CVPPP (docs/benchmarks.md)
MIN_SIZE_FRACTION = 1 / 4


def clustering_options(config: dict[str, Any], **overrides) -> dict[str, Any]:
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
    }
    opts.update({k: v for k, v in overrides.items() if v is not None})
    return opts


def embed(model: Model, image: np.ndarray, need_g: bool = False, device: str = "auto", name: str = "image"):
    """Embeddings of f, and of g when ``need_g`` (consistency clustering); g is None otherwise."""
    emb = predict(model, image, device=device, name=name)
    emb_g = predict(model, image, device=device, name=name, use_ema=True) if need_g else None
    return emb, emb_g


def cluster(model: Model, emb: np.ndarray, emb_g: np.ndarray | None, method: str = "mws", **overrides) -> np.ndarray:
    """Cluster cached embeddings with the model's defaults unless overridden (no network call)."""
    return segment_embeddings(emb, method, embeddings_g=emb_g, **clustering_options(model.config, **overrides))


def segment(model: Model, image: np.ndarray, method: str = "mws", device: str = "auto", name: str = "image",
            **overrides) -> np.ndarray:
    """Instance labels for ``image``: :func:`embed`, then :func:`cluster`."""
    emb, emb_g = embed(model, image, method == "consistency", device, name)
    return cluster(model, emb, emb_g, method, **overrides)
