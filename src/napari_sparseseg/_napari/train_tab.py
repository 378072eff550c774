"""Train tab: training in a child process (watched by a thread worker) with progress, loss curve, preview and Stop; load and
save model folders."""

from __future__ import annotations

import tempfile
from pathlib import Path

import napari
import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FloatSpinBox, Label, PushButton, SpinBox
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_info
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QFileDialog, QPushButton, QVBoxLayout, QWidget
from superqt import QCollapsible

from ..core import checkpoint
from ..core.errors import SparseSegError
from ..core.losses import SpocoLossConfig
from ..core.methods import METHOD_NAMES, describe_default
from ..core.training import FINE_TUNE_LR, OBJECT_DIM_ON, OBJECT_GAIN_ON, TrainConfig, default_lr_text
from . import layers as L
from . import workers
from .annotate_tab import AnnotatePanel
from .loss_plot import LossPlot
from .train_data import training_inputs
from .session import Session

PRESETS = {"Quick (2 min)": 120.0, "Standard (10 min)": 600.0, "Long (30 min)": 1800.0, "Fixed iterations": None}
PREVIEW_LAYER = "sparseseg preview"


class TrainPanel(QWidget):
    #: the session's model was replaced (training finished, or a model was loaded)
    model_changed = Signal()

    def __init__(self, viewer: napari.Viewer, annotate: AnnotatePanel, session: Session):
        super().__init__()
        self.viewer, self.annotate, self.session = viewer, annotate, session
        auto = describe_default().upper().replace(" IN ", " in ")
        self.method = ComboBox(choices=[(f"auto ({auto})", "auto")] + [(n.upper(), n) for n in METHOD_NAMES],
                               value="auto", tooltip="training method; a loaded model keeps its own")
        self.preset = ComboBox(choices=list(PRESETS), value="Quick (2 min)")
        self.iterations = SpinBox(value=500, min=1, max=10_000_000, tooltip="used with 'Fixed iterations'")
        self.device = ComboBox(choices=["auto", "cpu", "cuda"], value="auto")
        self.lr = FloatSpinBox(value=0.0, min=0.0, max=1.0, step=1e-4,
                               tooltip=f"0: automatic ({default_lr_text('when fine-tuning a loaded model')})")
        self.lr.native.setSpecialValueText("auto")
        # a float spin box: superqt's integer one, magicgui's SpinBox, shows no special value text
        self.batch = FloatSpinBox(value=0, min=0, max=64, step=1, tooltip="crops per step; auto: 2 in 2D, 1 in 3D")
        self.batch.native.setDecimals(0)
        self.batch.native.setSpecialValueText("auto")
        self.consistency = FloatSpinBox(value=1.0, min=0.0, max=10.0, step=0.1)
        self.anchor = ComboBox(choices=["pixel", "mean"], value="pixel")
        self.seed = SpinBox(value=0, min=0, max=2**31 - 1)
        self.preview_every = FloatSpinBox(value=15.0, min=0.0, max=3600.0, tooltip="seconds; 0: no preview")
        self.diameter = FloatSpinBox(value=0.0, min=0.0, max=10_000.0, step=1.0,
                                     tooltip="typical object diameter in pixels; auto: measured on the painted objects")
        self.diameter.native.setSpecialValueText("auto")
        self.object_contrast = CheckBox(value=False, text="brighter objects than the painted ones",
                                        tooltip=f"raise the contrast of half the painted objects of each crop by up "
                                                f"to {OBJECT_GAIN_ON:g}x, so that much brighter objects are not called "
                                                "background: for objects on a background (nuclei); on the benchmark "
                                                "suite it cost CVPPP leaves and ovule cells")
        self.object_dim = CheckBox(value=False, text="dimmer objects than the painted ones",
                                   tooltip=f"lower the contrast of half the painted objects of each crop down to "
                                           f"{OBJECT_DIM_ON:.2g}x, so that much dimmer objects are not called "
                                           "background: for nuclei; on the benchmark suite it cost CVPPP leaves "
                                           "and mitochondria")
        self.start_btn = PushButton(text="Train")
        self.stop_btn = PushButton(text="Stop", enabled=False)
        self.load_btn = QPushButton("Load model…")
        self.load_zip_btn = QPushButton("Load bioimage.io package…")
        self.load_zip_btn.setToolTip("a .zip written by 'sparseseg export'")
        self.save_btn = QPushButton("Save model…")
        self.status = Label(value="No model yet.")
        self.status.native.setWordWrap(True)
        self.status.native.setMinimumHeight(40)
        self.plot = LossPlot()
        advanced = QCollapsible("Advanced settings")
        advanced.addWidget(L.form(("learning rate", self.lr), ("batch size", self.batch),
                                 ("consistency weight", self.consistency), ("anchor", self.anchor),
                                  ("seed", self.seed), ("preview every (s)", self.preview_every),
                                  ("object diameter", self.diameter), ("object contrast", self.object_contrast),
                                  ("", self.object_dim)))
        lay = QVBoxLayout(self)
        lay.addWidget(L.form(("method", self.method), ("budget", self.preset), ("iterations", self.iterations), ("device", self.device)))
        lay.addWidget(advanced)
        lay.addWidget(L.form((None, self.start_btn), (None, self.stop_btn)))
        lay.addWidget(self.plot)
        lay.addWidget(L.form((None, self.status), (None, self.load_btn), (None, self.load_zip_btn),
                             (None, self.save_btn)))
        lay.addStretch()
        self.start_btn.changed.connect(self.start)
        self.stop_btn.changed.connect(self.stop)
        self.load_btn.clicked.connect(lambda: self._pick_folder(self.load_model))
        self.load_zip_btn.clicked.connect(self._pick_package)
        self.save_btn.clicked.connect(lambda: self._pick_folder(self.save_model))
        self.job: workers.TrainJob | None = None
        self.process: workers.TrainingProcess | None = None
        self.worker = None
        self._pbar = None
        self.first_preview_seconds: float | None = None

    # -- model files ---------------------------------------------------------------------------
    def _pick_folder(self, action) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Model folder")
        if folder:
            action(folder)

    def _pick_package(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "bioimage.io model package", "", "bioimage.io package (*.zip)")
        if path:
            self.load_model(path)

    def load_model(self, folder) -> None:
        """Load a model folder or a bioimage.io package written by ``sparseseg export``."""
        try:
            model = checkpoint.load(folder)
        except SparseSegError as err:
            L.notify_error(str(err))
            return
        self.session.model, self.session.origin, self.session.folder = model, "loaded", Path(folder)
        self._describe()
        self.model_changed.emit()
        show_info(f"Loaded model from {folder}; training now fine-tunes it (learning rate {FINE_TUNE_LR:g}) "
                  "if it already finds your painted objects, else trains a fresh network.")

    def save_model(self, folder) -> None:
        if self.session.model is None:
            L.notify_error("There is no model to save yet: train one or load one first.")
            return
        checkpoint.save(folder, self.session.model)
        show_info(f"Model saved to {folder}")

    def _describe(self) -> None:
        m = self.session.model
        if m is None:
            self.status.value = "No model yet."
            return
        t = m.config.get("training", {})
        self.status.value = (f"Model: {m.ndim}D, {m.in_channels} channel(s), {t.get('iteration', 0)} iterations "
                             f"({self.session.origin}{', ' + str(self.session.folder) if self.session.folder else ''})")

    # -- training ------------------------------------------------------------------------------
    def _config(self) -> TrainConfig:
        budget = PRESETS[self.preset.value]
        return TrainConfig(
            iterations=int(self.iterations.value) if budget is None else None,
            time_limit=budget,
            batch_size=int(self.batch.value) or None,
            lr=self.lr.value or None,  # the engine's rule: LR, or FINE_TUNE_LR for a loaded model
            method=self.method.value,
            seed=int(self.seed.value),
            device=self.device.value,
            background_id=self.annotate.background_id,
            diameter=float(self.diameter.value) or None,
            object_gain=OBJECT_GAIN_ON if self.object_contrast.value else 1.0,
            object_dim=OBJECT_DIM_ON if self.object_dim.value else 1.0,
            loss=SpocoLossConfig(anchor=self.anchor.value, w_consistency=float(self.consistency.value)),
            checkpoint_every=30.0,
        )

    def start(self) -> None:
        if self.worker is not None:
            return
        image, labels = self.annotate.image.value, self.annotate.labels.value
        if image is None:
            L.notify_error("Select an image to train on (Annotate tab).")
            return
        if labels is None:
            L.notify_error("Select or create an annotation (Labels) layer in the Annotate tab and paint a few objects.")
            return
        try:
            z = int(self.viewer.dims.current_step[0]) if len(L.spatial_shape(image)) == 3 else 0
            inputs = training_inputs(image, labels, self.annotate.ignore.value, self.annotate.background_id, z)
            model = self.session.model
            resume = model is not None and self.session.origin == "trained"
            folder = self.session.folder if resume else Path(tempfile.mkdtemp(prefix="sparseseg-model-"))
            self.job = workers.TrainJob(
                config=self._config(), out=folder, init=None if model is None else self.session.folder,
                resume=resume, preview_every=float(self.preview_every.value), **inputs)
            self.job.check()
        except SparseSegError as err:
            L.notify_error(str(err))
            return
        self.session.folder = folder
        # a child process: Stop within one step, a crash cannot take the viewer down, memory is given back
        self.process = workers.TrainingProcess(self.job)
        self.worker = create_worker(self.process.events)
        self.worker.yielded.connect(self._on_event)
        self.worker.errored.connect(self._on_error)
        self.worker.finished.connect(self._on_finished)
        self._pbar = progress(total=100, desc="SparseSeg training")
        self._pbar_pos = 0
        self.plot.clear()
        self.first_preview_seconds = None
        self.start_btn.enabled, self.stop_btn.enabled = False, True
        self.status.value = "Training…"
        self.worker.start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()  # takes effect after the current step; the child then saves

    def _on_event(self, ev) -> None:
        if isinstance(ev, workers.Preview):
            if self.first_preview_seconds is None:
                self.first_preview_seconds = ev.seconds
            self._show_preview(ev)
            return
        if ev.done:
            return
        if ev.note:
            show_info(ev.note)
            self.status.value = ev.note
        self.plot.add(ev.losses.get("loss", float("nan")))
        pos = int(100 * ev.progress)
        if self._pbar is not None and pos > self._pbar_pos:
            self._pbar.update(pos - self._pbar_pos)
            self._pbar_pos = pos
        if ev.iteration % 5 == 0:
            self.status.value = f"iteration {ev.iteration}, loss {ev.losses['loss']:.3f}, {ev.seconds:.0f} s"

    def _show_preview(self, ev) -> None:
        image = self.annotate.image.value
        shape = L.spatial_shape(image) if image is not None else ev.labels.shape
        data = ev.labels
        origin = None if self.job is None else self.job.preview_origin
        if origin is not None and image is not None:
            # a region of a stack too large to hold: a small layer placed where the region lies
            self._show_region_preview(image, data, origin, ev.z_start)
            return
        if len(shape) == 3 and data.shape != shape:
            full = np.zeros(shape, np.int32)
            full[ev.z_start : ev.z_start + data.shape[0]] = data
            data = full
        # on the image: its voxel size and position (a region preview, if one came first, moved the layer)
        nd = data.ndim
        if image is None:
            self._set_preview(data, np.ones(nd), np.zeros(nd))
        else:
            self._set_preview(data, np.asarray(image.scale[-nd:], float), np.asarray(image.translate[-nd:], float))

    def _show_region_preview(self, image, data: np.ndarray, origin: tuple[int, ...], z_start: int) -> None:
        offset = np.array(origin, float)
        if data.ndim == 3:
            offset[0] += z_start
        nd = data.ndim
        scale = np.asarray(image.scale[-nd:], float)
        self._set_preview(data, scale, np.asarray(image.translate[-nd:], float) + offset * scale)

    def _set_preview(self, data: np.ndarray, scale: np.ndarray, translate: np.ndarray) -> None:
        if PREVIEW_LAYER in self.viewer.layers:
            layer = self.viewer.layers[PREVIEW_LAYER]
            layer.data, layer.scale, layer.translate = data, scale, translate
        else:
            layer = self.viewer.add_labels(data, name=PREVIEW_LAYER, opacity=0.5, scale=scale, translate=translate)
            layer.editable = False

    def _on_error(self, err) -> None:
        msg = str(err) if isinstance(err, SparseSegError) else f"Training failed: {err}"
        L.notify_error(msg if "checkpoint" in msg else msg + " The last good checkpoint is kept.")

    def _on_finished(self) -> None:
        self.plot.flush()
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        trained = self.process is not None and self.process.last is not None
        if trained:
            try:
                self.session.model, self.session.origin = self.process.model(), "trained"
            except SparseSegError as err:  # the child died before its first checkpoint
                L.notify_error(str(err))
                trained = False
        self.worker = self.process = None
        self.start_btn.enabled, self.stop_btn.enabled = True, False
        self._describe()
        if trained:
            self.model_changed.emit()


