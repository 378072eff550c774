"""Prediction + clustering with the defaults a model carries (object sizes, loss margins)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .checkpoint import Model
from .clustering import segment_embeddings
from .prediction import predict

#: segments smaller than this fraction of the median annotated object are dropped
MIN_SIZE_FRACTION = 1 / 20
#: segments larger than this multiple of the largest annotated object are background
MAX_SIZE_FACTOR = 2.0


def clustering_options(config: dict[str, Any], **overrides) -> dict[str, Any]:
    """Keyword arguments for :func:`segment_embeddings` derived from a model's config.

    ``overrides`` whose value is None keep the model-derived default.
    """
    loss = config.get("loss", {})
    med = config.get("object_area_median") or 0
    big = config.get("object_area_max") or 0
    opts: dict[str, Any] = {
        "delta_var": loss.get("delta_var", 0.5),
        "delta_dist": loss.get("delta_dist", 2.0),
        "offsets": config.get("offsets"),
        "min_size": int(med * MIN_SIZE_FRACTION),
        "max_size": int(big * MAX_SIZE_FACTOR) or None,
    }
    opts.update({k: v for k, v in overrides.items() if v is not None})
    return opts


def segment(model: Model, image: np.ndarray, method: str = "mws", device: str = "auto", name: str = "image",
            **overrides) -> np.ndarray:
    """Instance labels for ``image``: embeddings from f (and g for consistency clustering), then
    clustering with the model's defaults unless overridden."""
    emb = predict(model, image, device=device, name=name)
    emb_g = predict(model, image, device=device, name=name, use_ema=True) if method == "consistency" else None
    return segment_embeddings(emb, method, embeddings_g=emb_g, **clustering_options(model.config, **overrides))
