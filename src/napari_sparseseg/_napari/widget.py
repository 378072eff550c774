"""The SparseSeg dock widget: Annotate -> Train -> Segment, in three tabs.

The widget translates layers into engine calls and shows what comes back; all method logic lives
in ``napari_sparseseg.core``. Long work runs in napari thread workers (``workers``), training in a
child process that a worker watches, so the viewer stays responsive; every error a user can cause
ends in a notification (``layers.notify_error``), never a traceback.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import napari
from qtpy.QtWidgets import QTabWidget, QVBoxLayout, QWidget

from .annotate_tab import AnnotatePanel
from .segment_tab import SegmentPanel
from .session import Session
from .suggest_panel import SuggestPanel
from .train_tab import PREVIEW_LAYER, PRESETS, TrainPanel

__all__ = ["PREVIEW_LAYER", "PRESETS", "SparseSegWidget"]


class SparseSegWidget(QWidget):
    """Annotate a few objects, train SPOCO or CRAC on them, segment every object."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = Session()
        self.annotate = AnnotatePanel(napari_viewer)
        self.train = TrainPanel(napari_viewer, self.annotate, self.session)
        self.segment = SegmentPanel(napari_viewer, self.session)
        self.suggest = SuggestPanel(napari_viewer, self.annotate, self.session)
        self.annotate.layout().insertWidget(1, self.suggest)  # below the annotation choices
        self.train.model_changed.connect(self.segment.show_auto_values)
        tabs = QTabWidget()
        tabs.addTab(self.annotate, "1 Annotate")
        tabs.addTab(self.train, "2 Train")
        tabs.addTab(self.segment, "3 Segment")
        self.tabs = tabs
        lay = QVBoxLayout(self)
        lay.addWidget(tabs)
        combos = (self.annotate.image, self.annotate.labels, self.annotate.ignore, self.segment.image,
                  self.segment.region)
        for ev in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed,
                   napari_viewer.layers.events.reordered):
            for combo in combos:
                ev.connect(combo.reset_choices)
        for combo in combos:
            combo.reset_choices()
        self._pick_defaults()

    def _pick_defaults(self) -> None:
        """Select the sample's annotation layer if there is one."""
        for layer in self.viewer.layers:
            if isinstance(layer, napari.layers.Labels) and layer.name.endswith("annotations"):
                self.annotate.labels.value = layer
                stem = layer.name[: -len(" annotations")]
                if stem in self.viewer.layers and isinstance(self.viewer.layers[stem], napari.layers.Image):
                    self.annotate.image.value = self.viewer.layers[stem]
                    self.segment.image.value = self.viewer.layers[stem]
                break
        self.annotate.refresh()

    def cleanup_model_folder(self) -> None:
        """Remove a temporary model folder (only one this widget created)."""
        f = self.session.folder
        if f is not None and f.name.startswith("sparseseg-model-") and Path(tempfile.gettempdir()) in f.parents:
            shutil.rmtree(f, ignore_errors=True)


