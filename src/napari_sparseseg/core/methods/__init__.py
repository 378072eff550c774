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
#: what "auto" trains, per dimensionality: the better method on the benchmark suite's datasets of
#: that kind (docs/benchmarks.md: CRAC, better on six of seven datasets and equal on the seventh)
DEFAULT_METHOD = {2: "crac", 3: "crac"}


def describe_default() -> str:
    """What "auto" trains, in words: "crac", or "spoco in 2D, crac in 3D" when it differs."""
    names = set(DEFAULT_METHOD.values())
    if len(names) == 1:
        return names.pop()
    return ", ".join(f"{m} in {d}D" for d, m in DEFAULT_METHOD.items())


def resolve_method(name: str, ndim: int) -> str:
    """``"auto"`` -> the default method for ``ndim``-D labels; a registered name as it is."""
    if name == "auto":
        return DEFAULT_METHOD[ndim]
    get_method(name)
    return name


def get_method(name: str) -> type[Method]:
    """The method class registered under ``name``."""
    try:
        return METHODS[name]
    except KeyError:
        raise SparseSegError(f"method {name!r}: expected one of {', '.join(METHOD_NAMES)}") from None


__all__ = ["DEFAULT_METHOD", "describe_default", "METHODS", "METHOD_NAMES", "resolve_method", "CracMethod", "Method", "SpocoMethod", "get_method"]
