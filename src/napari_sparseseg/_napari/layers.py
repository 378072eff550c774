"""Layer helpers shared by the tabs, and the one place errors reach the user."""

from __future__ import annotations

import numpy as np
from magicgui.widgets import FloatSpinBox
from napari.utils.notifications import show_error
from qtpy.QtWidgets import QFormLayout, QWidget


def notify_error(message: str) -> None:
    """Every error a user can cause ends here: a notification, never a traceback."""
    show_error(message)


def layer_choices(viewer, kind):
    def choices(_widget=None):
        return [(layer.name, layer) for layer in viewer.layers if isinstance(layer, kind)]

    return choices


def level0(layer):
    """The layer's full-resolution array, not read (numpy, dask or zarr)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def image_array(layer) -> np.ndarray:
    return np.asarray(level0(layer))


def is_lazy(layer) -> bool:
    """Whether the layer's pixels stay on disk until read (a dask or zarr array, a multiscale
    pyramid): such a layer is never read whole."""
    return getattr(layer, "multiscale", False) or not isinstance(layer.data, np.ndarray)


def box_region(shapes, image, slab: int = 8) -> tuple[slice, ...]:
    """The bounding box of the shapes in ``shapes`` in ``image``'s pixel grid (spatial axes); a
    box drawn on one slice of a stack covers ``slab`` slices on each side of it."""
    from ..core.errors import SparseSegError

    shape = spatial_shape(image)
    if len(shapes.data) == 0:
        raise SparseSegError(f"Shapes layer '{shapes.name}' holds no shape: draw a rectangle around the region "
                             "to segment, or choose no region")
    pts = np.concatenate([np.asarray(d, float) for d in shapes.data])
    pts = np.stack([image.world_to_data(shapes.data_to_world(p)) for p in pts])[:, -len(shape):]
    lo, hi = np.floor(pts.min(0)).astype(int), np.ceil(pts.max(0)).astype(int) + 1
    if len(shape) == 3 and hi[0] - lo[0] <= 1:
        lo[0], hi[0] = lo[0] - slab, hi[0] + slab
    lo, hi = np.maximum(lo, 0), np.minimum(hi, shape)
    if np.any(hi - lo < 2):
        raise SparseSegError(f"the shapes of '{shapes.name}' lie outside image '{image.name}' (shape {shape})")
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def view_region(viewer, image, slab: int = 8) -> tuple[slice, ...]:
    """The part of ``image`` shown in the canvas, in its full-resolution pixel grid (spatial axes):
    the visible extent of the displayed axes (napari's ``corner_pixels``, set when the canvas
    draws; for a pyramid at the level shown), and on a stack shown slice by slice ``slab`` slices
    on each side of the current one."""
    from ..core.errors import SparseSegError

    shape = spatial_shape(image)
    n = len(shape)
    corners = np.asarray(image.corner_pixels, float)[:, -n:]
    factor = np.ones(n)
    if getattr(image, "multiscale", False):
        factor = np.asarray(image.downsample_factors[image.data_level], float)[-n:]
    lo, hi = corners[0] * factor, (corners[1] + 1) * factor
    first = viewer.dims.ndim - n  # world axis of the first spatial axis (layers are right-aligned)
    shown = [ax for ax in range(n) if ax + first in viewer.dims.displayed]
    here = np.asarray(image.world_to_data(viewer.dims.point), float)[-n:]
    for ax in set(range(n)) - set(shown):
        lo[ax], hi[ax] = round(here[ax]) - slab, round(here[ax]) + slab + 1
    lo, hi = np.maximum(np.floor(lo), 0).astype(int), np.minimum(np.ceil(hi), shape).astype(int)
    # out of view, napari clips the canvas to the image's edge: one pixel (at the level shown) wide
    if np.any(hi - lo < 2) or np.any(corners[1, shown] - corners[0, shown] < 1):
        raise SparseSegError(f"image '{image.name}' is not in view: pan or zoom the canvas onto the part to segment "
                             "(or draw a box and choose it under 'only inside')")
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def image_region(layer, region: tuple[slice, ...] | None) -> np.ndarray:
    """The layer's pixels (all of them, or only ``region``; a lazy layer reads just that)."""
    data = level0(layer)
    return np.asarray(data if region is None else data[region])


def spatial_shape(layer) -> tuple[int, ...]:
    """The layer's spatial shape, read from its metadata (no data is loaded)."""
    shape = tuple(level0(layer).shape)
    return shape[:-1] if getattr(layer, "rgb", False) else shape


def voxel_size(layer) -> tuple[float, float, float] | None:
    """A stack's voxel size (z, y, x) from its layer's scale; None for 2D layers and for napari's
    default scale of ones (no voxel size stated)."""
    if len(spatial_shape(layer)) != 3:
        return None
    scale = tuple(float(s) for s in layer.scale[-3:])
    return None if all(s == 1.0 for s in scale) else scale


def count_box(**kwargs) -> FloatSpinBox:
    """A spin box for a pixel count that can show a text at its minimum (Qt's special value text,
    used for the sentinels -1 = auto and 0 = no limit). magicgui's SpinBox is superqt's
    QLargeIntSpinBox, which has no special value text; a QDoubleSpinBox without decimals has it and
    holds whole numbers exactly far beyond any image size."""
    box = FloatSpinBox(step=1, **kwargs)
    box.native.setDecimals(0)
    return box


def form(*rows) -> QWidget:
    w = QWidget()
    form = QFormLayout(w)
    for label, widget in rows:
        native = widget.native if hasattr(widget, "native") else widget
        if label is None:
            form.addRow(native)
        else:
            form.addRow(label, native)
    return w


