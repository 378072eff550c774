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


def image_array(layer) -> np.ndarray:
    data = layer.data[0] if layer.multiscale else layer.data
    return np.asarray(data)


def spatial_shape(layer) -> tuple[int, ...]:
    """The layer's spatial shape, read from its metadata (no data is loaded)."""
    data = layer.data[0] if layer.multiscale else layer.data
    shape = tuple(data.shape)
    return shape[:-1] if getattr(layer, "rgb", False) else shape


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


