"""Annotate tab: pick or create the annotation layer and see what will hurt training."""

from __future__ import annotations

import napari
import numpy as np
from magicgui.widgets import ComboBox, Label, PushButton, SpinBox
from qtpy.QtWidgets import QVBoxLayout, QWidget

from ..core.annotation import check_annotations
from ..core.errors import SparseSegError
from ..core.regions import labeled_regions
from . import layers as L
from .train_data import reads_regions


class AnnotatePanel(QWidget):
    def __init__(self, viewer: napari.Viewer):
        super().__init__()
        self.viewer = viewer
        self.image = ComboBox(choices=L.layer_choices(viewer, napari.layers.Image))
        self.labels = ComboBox(choices=L.layer_choices(viewer, napari.layers.Labels), nullable=True)
        self.new_labels = PushButton(text="New annotation layer")
        self.background = SpinBox(value=-1, min=-1, max=2**31 - 1,
                                  tooltip="a label id painted on background (full supervision); -1: none")
        self.ignore = ComboBox(choices=self._mask_choices, nullable=True,
                               tooltip="optional: a layer whose nonzero pixels take no part in training "
                                       "(artefacts, regions you are unsure of)")
        self.status = Label(value="")
        self.status.native.setWordWrap(True)
        self.status.native.setMinimumHeight(90)
        self.check = PushButton(text="Check annotations")
        lay = QVBoxLayout(self)
        lay.addWidget(L.form(("image", self.image), ("annotations", self.labels), (None, self.new_labels),
                             ("background label", self.background), ("ignore mask", self.ignore), (None, self.check),
                             (None, self.status)))
        lay.addStretch()
        self.new_labels.changed.connect(self.add_labels_layer)
        self.check.changed.connect(self.check_now)
        self.labels.changed.connect(self._watch)
        self.background.changed.connect(self.refresh)
        self._watched = None

    def _mask_choices(self, _widget=None):
        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, (napari.layers.Labels, napari.layers.Image)) and layer is not self.labels.value]

    @property
    def background_id(self) -> int | None:
        return None if self.background.value < 0 else int(self.background.value)

    def add_labels_layer(self) -> None:
        img = self.image.value
        if img is None:
            L.notify_error("Open or select an image first; the annotation layer takes its shape.")
            return
        layer = self.viewer.add_labels(new_annotation_data(img), name=f"{img.name} annotations",
                                       scale=img.scale[-len(L.spatial_shape(img)):],
                                       translate=img.translate[-len(L.spatial_shape(img)):])
        self.labels.reset_choices()
        self.labels.value = layer
        layer.mode = "paint"
        self.refresh()

    def _watch(self, layer=None) -> None:
        if self._watched is not None:
            for ev in ("data", "paint"):
                if hasattr(self._watched.events, ev):
                    getattr(self._watched.events, ev).disconnect(self.refresh)
        self._watched = self.labels.value
        if self._watched is not None:
            for ev in ("data", "paint"):
                if hasattr(self._watched.events, ev):
                    getattr(self._watched.events, ev).connect(self.refresh)
        self.refresh()

    def check_now(self, *_) -> None:
        """The Check button: also scans an annotation layer too large to check on every stroke."""
        self.refresh(scan=True)

    def refresh(self, *_, scan: bool = False) -> None:
        layer = self.labels.value
        if layer is None:
            self.status.value = "Pick an annotation (Labels) layer or create one, then paint a few complete objects."
            return
        if L.is_lazy(layer):
            self.status.value = self._lazy_report(layer) if scan else (
                "A large annotation layer (kept on disk): press Check annotations to count its objects.")
            return
        report = check_annotations(np.asarray(layer.data), self.background_id)
        self.status.value = "\n".join([report.summary()] + [f"⚠ {w}" for w in report.warnings])

    def _lazy_report(self, layer) -> str:
        try:
            found = labeled_regions(L.level0(layer), background_id=self.background_id)
        except SparseSegError as err:
            return str(err)
        return (f"{found.objects} labeled object(s) in a stack of {np.prod(found.shape):,} voxels; training reads "
                f"{len(found.regions)} region(s) around them ({100 * found.fraction:.2g}% of the stack).")


def new_annotation_data(image):
    """An empty annotation array of ``image``'s spatial shape: in memory, or for a stack too large
    to hold (:func:`.train_data.reads_regions`) a chunked zarr array in a temporary folder, which
    napari paints into and training reads region by region."""
    shape = L.spatial_shape(image)
    if not reads_regions(image):
        return np.zeros(shape, np.int32)
    import tempfile

    import zarr

    path = tempfile.mkdtemp(prefix="sparseseg-annotations-") + "/labels.zarr"
    chunks = tuple(min(s, 64) for s in shape)
    return zarr.create_array(path, shape=shape, chunks=chunks, dtype="int32", fill_value=0)
