"""Whole-stack segmentation from the Segment tab: the engine's blockwise path
(:func:`..core.blockwise.segment_blockwise`) on the file the image layer was opened from, in a
thread, into a zarr store that comes back as a lazy Labels layer. Memory stays that of one block,
whatever the stack's size; the widget only translates the layer and its knobs."""

from __future__ import annotations

import queue
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

from ..core.blockwise import BLOCKWISE_METHODS, TIFF_SUFFIXES, segment_blockwise
from ..core.errors import SparseSegError
from ..core.pairs import is_zarr
from . import layers as L


def stack_path(layer) -> Path:
    """The file a stack layer was opened from (zarr / OME-Zarr / TIFF), or a clear error."""
    path = getattr(getattr(layer, "source", None), "path", None)
    if path is None:
        raise SparseSegError(
            f"image '{layer.name}' was not opened from a file: segmenting a whole stack block by block reads "
            "it from disk; open the stack from its zarr / OME-Zarr / TIFF file, or segment 'only inside' a box")
    path = Path(path)
    if not (is_zarr(path) or path.suffix.lower() in TIFF_SUFFIXES):
        raise SparseSegError(f"image '{layer.name}': {path.name} is not a zarr, OME-Zarr or TIFF file; "
                             "whole-stack segmentation reads those block by block")
    if len(L.spatial_shape(layer)) != 3:
        raise SparseSegError(f"image '{layer.name}' is 2D: segment it with Segment (whole-stack segmentation is "
                             "for 3D stacks)")
    return path


def check_method(method: str) -> None:
    if method not in BLOCKWISE_METHODS:
        raise SparseSegError(f"clustering {method!r}: block by block, the clustering is one of "
                             f"{', '.join(BLOCKWISE_METHODS)}")


def new_output(name: str) -> Path:
    """A fresh zarr path for a layer's whole-stack labels (in a new temporary folder)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "stack"
    return Path(tempfile.mkdtemp(prefix="sparseseg-stack-")) / f"{safe}-labels.zarr"


def events(model: Path, image: Path, out: Path, method: str, voxel_size=None,
           **overrides: Any) -> Iterator[tuple[str, int, int]]:
    """Run :func:`segment_blockwise` in a thread (in this process: no cluster to start); yield its
    progress as (step, done, total) and return its :class:`..core.blockwise.BlockwiseResult`."""
    messages: queue.Queue = queue.Queue()

    def run() -> None:
        try:
            res = segment_blockwise(model, image, out, workers=0, method=method, voxel_size=voxel_size,
                                    progress=lambda *p: messages.put(("progress", p)), **overrides)
            messages.put(("result", res))
        except BaseException as err:  # handed to the worker's errored signal
            messages.put(("error", err))

    threading.Thread(target=run, daemon=True, name="sparseseg-stack").start()
    while True:
        kind, value = messages.get()
        if kind == "progress":
            yield value
        elif kind == "error":
            raise value
        else:
            return value
