"""'Where to label next' (Annotate tab): the model's uncertainty as an image layer and the most
uncertain predicted objects as numbered points; painting one of them teaches the network most."""

from __future__ import annotations

import napari
import numpy as np
from magicgui.widgets import Label, PushButton, SpinBox
from napari.qt.threading import create_worker
from qtpy.QtWidgets import QVBoxLayout, QWidget

from ..core import checkpoint
from ..core.errors import SparseSegError
from ..core.suggest import suggest_for_image
from . import layers as L
from .session import Session


class SuggestPanel(QWidget):
    def __init__(self, viewer: napari.Viewer, annotate, session: Session):
        super().__init__()
        self.viewer, self.annotate, self.session = viewer, annotate, session
        self.n = SpinBox(value=5, min=1, max=50, tooltip="how many places to suggest")
        self.button = PushButton(text="Where to label next?",
                                 tooltip="predict with the current model; show where it is least sure "
                                         "(uncertainty layer) and the objects to paint next (points)")
        self.status = Label(value="")
        self.status.native.setWordWrap(True)
        self.status.native.setMinimumHeight(110)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(L.form(("suggestions", self.n), (None, self.button), (None, self.status)))
        self.button.changed.connect(self.run)
        self.worker = None
        self.suggestions = []

    def run(self) -> None:
        image, labels, model = self.annotate.image.value, self.annotate.labels.value, self.session.model
        if model is None:
            L.notify_error("Where to label next needs a model: train one (Train tab) or load one first.")
            return
        if image is None:
            L.notify_error("Select the image to suggest on (Annotate tab).")
            return
        if self.worker is not None:
            return
        try:
            chans = 3 if getattr(image, "rgb", False) else 1
            checkpoint.check_compatible(model.config, len(L.spatial_shape(image)), chans, f"image '{image.name}'")
            annotation = None if labels is None else np.asarray(labels.data)
            if annotation is not None and annotation.shape != L.spatial_shape(image):
                raise SparseSegError(f"annotation layer '{labels.name}' has shape {annotation.shape}, the image "
                                     f"'{image.name}' {L.spatial_shape(image)}")
        except SparseSegError as err:
            L.notify_error(str(err))
            return
        img, n = L.image_array(image), int(self.n.value)
        self.status.value = "Predicting…"
        self.button.enabled = False
        self.worker = create_worker(lambda: suggest_for_image(model, img, annotation, n, name=image.name))
        self.worker.returned.connect(lambda res: self._show(image, *res))
        self.worker.errored.connect(self._error)
        self.worker.finished.connect(self._finished)
        self.worker.start()

    def _error(self, err) -> None:
        self.status.value = ""
        L.notify_error(str(err) if isinstance(err, SparseSegError) else f"Suggesting failed: {err}")

    def _finished(self) -> None:
        self.worker = None
        self.button.enabled = True

    def _layer(self, name, data, add):
        # layers this panel made are updated in place; any other layer of that name is left alone
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        if layer is not None and layer.metadata.get("sparseseg") == "suggest":
            layer.data = data
            return layer
        layer = add(data)
        layer.metadata["sparseseg"] = "suggest"
        return layer

    def _show(self, image, u, seg, suggestions) -> None:
        self.suggestions = suggestions
        scale, translate = image.scale[-u.ndim:], image.translate[-u.ndim:]
        self._layer(f"{image.name} uncertainty", u, lambda d: self.viewer.add_image(
            d, name=f"{image.name} uncertainty", colormap="magma", blending="additive", opacity=0.5,
            contrast_limits=(0.0, max(float(np.percentile(d, 99.5)), 1e-3)), scale=scale, translate=translate))
        points = np.array([s.centroid for s in suggestions], float).reshape(-1, u.ndim)
        ranks = {"rank": np.arange(1, len(points) + 1)}
        name = f"{image.name} label next"
        layer = self._layer(name, points, lambda d: self.viewer.add_points(
            d, name=name, features=ranks, size=12, face_color="transparent", border_color="yellow", scale=scale,
            translate=translate,
            text={"string": "{rank}", "color": "yellow", "anchor": "upper_left"}))
        layer.features = ranks
        if self.annotate.labels.value is not None:
            self.viewer.layers.selection.active = self.annotate.labels.value  # back to painting
        if not suggestions:
            self.status.value = "No unannotated object predicted: paint more objects or train longer."
            return
        where = "; ".join(f"{i + 1}: ({', '.join(f'{c:.0f}' for c in s.centroid)})"
                          + (" background?" if s.kind == "background" else "") for i, s in enumerate(suggestions))
        scores = [s.score for s in suggestions]
        dropped = sum(s.kind == "background" for s in suggestions)
        note = ("" if not dropped else
                " 'background?': the model calls it background, yet it stands out like the painted objects: "
                "paint it if it is an object, so that the model learns it." if dropped == 1 else
                " 'background?': the model calls them background, yet they stand out like the painted objects: "
                "paint them if they are objects, so that the model learns them.")
        self.status.value = (f"Paint these predicted objects next, uncertain objects of the painted size first — "
                             f"{where}. Uncertainty {min(scores):.2f}–{max(scores):.2f}; "
                             f"{int(seg.max())} objects predicted.{note}")
