"""Training methods behind one small interface (:class:`.base.Method`), and their registry: the
one list the command line, the Python API and the napari widget offer."""

from __future__ import annotations

from ..errors import SparseSegError
from .base import Method
from .crac import CracMethod
from .spoco import SpocoMethod

#: name -> class; a model's ``config.json`` records the name
METHODS: dict[str, type[Method]] = {"spoco": SpocoMethod, "crac": CracMethod}
METHOD_NAMES = tuple(METHODS)


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name``."""
    try:
        return METHODS[name]
    except KeyError:
        raise SparseSegError(f"method {name!r}: expected one of {', '.join(METHOD_NAMES)}") from None


__all__ = ["METHODS", "METHOD_NAMES", "CracMethod", "Method", "SpocoMethod", "get_method"]
