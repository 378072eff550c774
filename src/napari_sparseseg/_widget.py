"""The SparseSeg dock widget: Annotate -> Train -> Segment, in three tabs.

The widget translates layers into engine calls and shows what comes back; all method logic lives
in ``napari_sparseseg.core``. Long work runs in napari thread workers (``_workers``), so the viewer
stays responsive; every error a user can cause ends in a notification, never a traceback.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import napari
import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FloatSlider, FloatSpinBox, Label, PushButton, SpinBox
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import QFileDialog, QFormLayout, QPushButton, QTabWidget, QVBoxLayout, QWidget
from superqt import QCollapsible

from . import _workers
from ._loss_plot import LossPlot
from .core import checkpoint
from .core.annotation import check_annotations
from .core.errors import SparseSegError
from .core.losses import SpocoLossConfig
from .core.segment import AGREEMENT, BACKGROUNDS, BIAS, needs_g
from .core.training import TrainConfig, Trainer

PRESETS = {"Quick (2 min)": 120.0, "Standard (10 min)": 600.0, "Long (30 min)": 1800.0, "Fixed iterations": None}
PREVIEW_LAYER = "sparseseg preview"


def notify_error(message: str) -> None:
    show_error(message)


@dataclass
class Session:
    """What the tabs share: the current model and where it came from."""

    model: checkpoint.Model | None = None
    origin: str = ""  # "trained" (continue with resume) or "loaded" (fine-tune)
    folder: Path | None = None


def _layer_choices(viewer, kind):
    def choices(_widget=None):
        return [(layer.name, layer) for layer in viewer.layers if isinstance(layer, kind)]

    return choices


def _image_array(layer) -> np.ndarray:
    data = layer.data[0] if layer.multiscale else layer.data
    return np.asarray(data)


def _spatial_shape(layer) -> tuple[int, ...]:
    """The layer's spatial shape, read from its metadata (no data is loaded)."""
    data = layer.data[0] if layer.multiscale else layer.data
    shape = tuple(data.shape)
    return shape[:-1] if getattr(layer, "rgb", False) else shape


def _form(*rows) -> QWidget:
    w = QWidget()
    form = QFormLayout(w)
    for label, widget in rows:
        native = widget.native if hasattr(widget, "native") else widget
        if label is None:
            form.addRow(native)
        else:
            form.addRow(label, native)
    return w


class AnnotatePanel(QWidget):
    def __init__(self, viewer: napari.Viewer):
        super().__init__()
        self.viewer = viewer
        self.image = ComboBox(choices=_layer_choices(viewer, napari.layers.Image))
        self.labels = ComboBox(choices=_layer_choices(viewer, napari.layers.Labels), nullable=True)
        self.new_labels = PushButton(text="New annotation layer")
        self.background = SpinBox(value=-1, min=-1, max=2**31 - 1,
                                  tooltip="a label id painted on background (full supervision); -1: none")
        self.status = Label(value="")
        self.status.native.setWordWrap(True)
        self.status.native.setMinimumHeight(90)
        self.check = PushButton(text="Check annotations")
        lay = QVBoxLayout(self)
        lay.addWidget(_form(("image", self.image), ("annotations", self.labels), (None, self.new_labels),
                            ("background label", self.background), (None, self.check), (None, self.status)))
        lay.addStretch()
        self.new_labels.changed.connect(self.add_labels_layer)
        self.check.changed.connect(self.refresh)
        self.labels.changed.connect(self._watch)
        self.background.changed.connect(self.refresh)
        self._watched = None

    @property
    def background_id(self) -> int | None:
        return None if self.background.value < 0 else int(self.background.value)

    def add_labels_layer(self) -> None:
        img = self.image.value
        if img is None:
            notify_error("Open or select an image first; the annotation layer takes its shape.")
            return
        layer = self.viewer.add_labels(np.zeros(_spatial_shape(img), np.int32), name=f"{img.name} annotations",
                                       scale=img.scale[-len(_spatial_shape(img)):])
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

    def refresh(self, *_) -> None:
        layer = self.labels.value
        if layer is None:
            self.status.value = "Pick an annotation (Labels) layer or create one, then paint a few complete objects."
            return
        report = check_annotations(np.asarray(layer.data), self.background_id)
        self.status.value = "\n".join([report.summary()] + [f"⚠ {w}" for w in report.warnings])


class TrainPanel(QWidget):
    def __init__(self, viewer: napari.Viewer, annotate: AnnotatePanel, session: Session):
        super().__init__()
        self.viewer, self.annotate, self.session = viewer, annotate, session
        self.method = ComboBox(choices=["SPOCO"], value="SPOCO", tooltip="training method (CRAC is planned)")
        self.preset = ComboBox(choices=list(PRESETS), value="Quick (2 min)")
        self.iterations = SpinBox(value=500, min=1, max=10_000_000, tooltip="used with 'Fixed iterations'")
        self.device = ComboBox(choices=["auto", "cpu", "cuda"], value="auto")
        self.lr = FloatSpinBox(value=0.0, min=0.0, max=1.0, step=1e-4,
                               tooltip="0: automatic (1e-3; 1e-4 when fine-tuning a loaded model)")
        self.batch = SpinBox(value=2, min=1, max=64)
        self.consistency = FloatSpinBox(value=1.0, min=0.0, max=10.0, step=0.1)
        self.anchor = ComboBox(choices=["pixel", "mean"], value="pixel")
        self.seed = SpinBox(value=0, min=0, max=2**31 - 1)
        self.preview_every = FloatSpinBox(value=15.0, min=0.0, max=3600.0, tooltip="seconds; 0: no preview")
        self.start_btn = PushButton(text="Train")
        self.stop_btn = PushButton(text="Stop", enabled=False)
        self.load_btn = QPushButton("Load model…")
        self.save_btn = QPushButton("Save model…")
        self.status = Label(value="No model yet.")
        self.status.native.setWordWrap(True)
        self.status.native.setMinimumHeight(40)
        self.plot = LossPlot()
        advanced = QCollapsible("Advanced settings")
        advanced.addWidget(_form(("learning rate", self.lr), ("batch size", self.batch),
                                 ("consistency weight", self.consistency), ("anchor", self.anchor),
                                 ("seed", self.seed), ("preview every (s)", self.preview_every)))
        lay = QVBoxLayout(self)
        lay.addWidget(_form(("method", self.method), ("budget", self.preset), ("iterations", self.iterations), ("device", self.device)))
        lay.addWidget(advanced)
        lay.addWidget(_form((None, self.start_btn), (None, self.stop_btn)))
        lay.addWidget(self.plot)
        lay.addWidget(_form((None, self.status), (None, self.load_btn), (None, self.save_btn)))
        lay.addStretch()
        self.start_btn.changed.connect(self.start)
        self.stop_btn.changed.connect(self.stop)
        self.load_btn.clicked.connect(lambda: self._pick_folder(self.load_model))
        self.save_btn.clicked.connect(lambda: self._pick_folder(self.save_model))
        self.trainer: Trainer | None = None
        self.worker = None
        self._pbar = None
        self.first_preview_seconds: float | None = None

    # -- model files ---------------------------------------------------------------------------
    def _pick_folder(self, action) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Model folder")
        if folder:
            action(folder)

    def load_model(self, folder) -> None:
        try:
            model = checkpoint.load(folder)
        except SparseSegError as err:
            notify_error(str(err))
            return
        self.session.model, self.session.origin, self.session.folder = model, "loaded", Path(folder)
        self._describe()
        show_info(f"Loaded model from {folder}; training now fine-tunes it (learning rate 1e-4).")

    def save_model(self, folder) -> None:
        if self.session.model is None:
            notify_error("There is no model to save yet: train one or load one first.")
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
    def _config(self, fine_tune: bool) -> TrainConfig:
        budget = PRESETS[self.preset.value]
        lr = self.lr.value or (1e-4 if fine_tune else 1e-3)
        return TrainConfig(
            iterations=int(self.iterations.value) if budget is None else None,
            time_limit=budget,
            batch_size=int(self.batch.value),
            lr=lr,
            seed=int(self.seed.value),
            device=self.device.value,
            background_id=self.annotate.background_id,
            loss=SpocoLossConfig(anchor=self.anchor.value, w_consistency=float(self.consistency.value)),
            checkpoint_every=30.0,
        )

    def start(self) -> None:
        if self.worker is not None:
            return
        image, labels = self.annotate.image.value, self.annotate.labels.value
        if image is None:
            notify_error("Select an image to train on (Annotate tab).")
            return
        if labels is None:
            notify_error("Select or create an annotation (Labels) layer in the Annotate tab and paint a few objects.")
            return
        try:
            img = _image_array(image)
            lab = np.asarray(labels.data)
            if _spatial_shape(image) != lab.shape:
                raise SparseSegError(
                    f"annotation layer '{labels.name}' has shape {lab.shape} but image '{image.name}' has "
                    f"{_spatial_shape(image)}; annotate on a layer of the image's shape"
                )
            model = self.session.model
            resume = model is not None and self.session.origin == "trained"
            fine_tune = model is not None and self.session.origin == "loaded"
            folder = self.session.folder if resume else Path(tempfile.mkdtemp(prefix="sparseseg-model-"))
            self.trainer = Trainer([img], [lab], self._config(fine_tune), out=folder, init=model, resume=resume,
                                   names=[f"image '{image.name}'"])
        except SparseSegError as err:
            notify_error(str(err))
            return
        self.session.folder = folder
        z = int(self.viewer.dims.current_step[0]) if lab.ndim == 3 else 0
        preview = img if self.preview_every.value > 0 else None
        self.worker = create_worker(
            _workers.train_steps, self.trainer, preview_image=preview,
            preview_every=float(self.preview_every.value), z=z,
        )
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
        if self.trainer is not None:
            self.trainer.stop()  # takes effect after the current step; the worker then saves

    def _on_event(self, ev) -> None:
        if isinstance(ev, _workers.Preview):
            if self.first_preview_seconds is None and self.trainer is not None:
                self.first_preview_seconds = self.trainer.seconds
            self._show_preview(ev)
            return
        if ev.done:
            return
        self.plot.add(ev.losses.get("loss", float("nan")))
        pos = int(100 * ev.progress)
        if self._pbar is not None and pos > self._pbar_pos:
            self._pbar.update(pos - self._pbar_pos)
            self._pbar_pos = pos
        if ev.iteration % 5 == 0:
            self.status.value = f"iteration {ev.iteration}, loss {ev.losses['loss']:.3f}, {ev.seconds:.0f} s"

    def _show_preview(self, ev) -> None:
        image = self.annotate.image.value
        shape = _spatial_shape(image) if image is not None else ev.labels.shape
        data = ev.labels
        if len(shape) == 3 and data.shape != shape:
            full = np.zeros(shape, np.int32)
            full[ev.z_start : ev.z_start + data.shape[0]] = data
            data = full
        if PREVIEW_LAYER in self.viewer.layers:
            self.viewer.layers[PREVIEW_LAYER].data = data
        else:
            layer = self.viewer.add_labels(data, name=PREVIEW_LAYER, opacity=0.5)
            layer.editable = False

    def _on_error(self, err) -> None:
        msg = str(err) if isinstance(err, SparseSegError) else f"Training failed: {err}"
        notify_error(msg + " The last good checkpoint is kept.")

    def _on_finished(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        if self.trainer is not None:
            self.session.model, self.session.origin = self.trainer.model, "trained"
        self.worker = None
        self.start_btn.enabled, self.stop_btn.enabled = True, False
        self._describe()


class SegmentPanel(QWidget):
    def __init__(self, viewer: napari.Viewer, session: Session):
        super().__init__()
        self.viewer, self.session = viewer, session
        self.image = ComboBox(choices=_layer_choices(viewer, napari.layers.Image))
        self.method = ComboBox(choices=["mws", "hdbscan", "meanshift", "consistency"], value="mws")
        self.bias = FloatSlider(value=BIAS, min=-0.5, max=0.5, step=0.01,
                                tooltip="> 0 splits more, < 0 merges more (mutex watershed)")
        self.min_size = SpinBox(value=-1, min=-1, max=10**9, tooltip="-1: from the model (1/4 of the median object)")
        self.max_size = SpinBox(value=0, min=0, max=10**12, tooltip="larger segments are background; 0: no limit")
        self.background = ComboBox(choices=list(BACKGROUNDS), value="auto",
                                   tooltip="auto: the model's foreground head if it has one, else largest; "
                                           "foreground: what the foreground head calls background is 0; "
                                           "largest: the largest segment is background; none: dense tissue")
        self.fg_threshold = FloatSpinBox(value=-1.0, min=-1.0, max=1.0, step=0.01,
                                         tooltip="foreground probability threshold; -1: from the model")
        self.agreement = FloatSpinBox(value=-1.0, min=-1.0, max=1.0, step=0.05,
                                      tooltip="mutex watershed: keep the segments that the EMA network reproduces "
                                              f"with at least this IoU (drops cut-up background); 0: off; -1: auto "
                                              f"({AGREEMENT} with background 'largest', off with 'foreground')")
        self.pca = CheckBox(value=False, text="show embeddings (PCA as RGB)")
        self.run_btn = PushButton(text="Segment")
        self.status = Label(value="")
        self.status.native.setWordWrap(True)
        lay = QVBoxLayout(self)
        lay.addWidget(_form(("image", self.image), ("clustering", self.method), ("bias", self.bias),
                            ("min size", self.min_size), ("max size", self.max_size),
                            ("background", self.background), ("fg threshold", self.fg_threshold),
                            ("agreement", self.agreement), (None, self.pca), (None, self.run_btn),
                            (None, self.status)))
        lay.addStretch()
        self.run_btn.changed.connect(self.run)
        for knob in (self.bias, self.min_size, self.max_size, self.background, self.fg_threshold, self.agreement,
                     self.method):
            knob.changed.connect(self.recluster)
        self.worker = None
        self._cache: dict | None = None
        self.outputs: dict[str, napari.layers.Labels] = {}
        self._pending = None

    def _overrides(self) -> dict:
        return dict(bias=float(self.bias.value),
                    min_size=None if self.min_size.value < 0 else int(self.min_size.value),
                    max_size=int(self.max_size.value) or None,
                    background=self.background.value,
                    fg_threshold=None if self.fg_threshold.value < 0 else float(self.fg_threshold.value),
                    agreement=float(self.agreement.value) if self.method.value == "mws" and self.agreement.value >= 0
                    else None)

    def _key(self, image):
        m = self.session.model
        return (id(image), id(m), m.config.get("training", {}).get("iteration") if m else None)

    def run(self) -> None:
        image, model = self.image.value, self.session.model
        if image is None:
            notify_error("Select an image to segment.")
            return
        if model is None:
            notify_error("There is no model yet: train one (Train tab) or load a saved model folder.")
            return
        img = _image_array(image)
        try:
            ndim = len(_spatial_shape(image))
            chans = 3 if getattr(image, "rgb", False) else 1
            checkpoint.check_compatible(model.config, ndim, chans, f"image '{image.name}'")
        except SparseSegError as err:
            notify_error(str(err))
            return
        method, overrides = self.method.value, self._overrides()
        need_g = needs_g(method, model.config, **overrides)
        key = self._key(image)
        if self._cache is not None and self._cache["key"] == key and (self._cache["emb_g"] is not None or not need_g):
            self.recluster()
            return

        def work():
            emb, emb_g, fg = _workers.embed(model, img, need_g, device="auto")
            return emb, emb_g, fg, _workers.cluster(model, emb, emb_g, method, fg=fg, **overrides)

        self.status.value = "Predicting…"
        self._start(work, lambda res: self._done(image, key, *res))

    def recluster(self, *_) -> None:
        """Re-run clustering only, on the cached embeddings (no network call)."""
        image = self.image.value
        if self._cache is None or image is None or self._cache["key"] != self._key(image):
            return
        model, method, overrides = self.session.model, self.method.value, self._overrides()
        emb, emb_g, fg = self._cache["emb"], self._cache["emb_g"], self._cache["fg"]
        if emb_g is None and needs_g(method, model.config, **overrides):
            self.status.value = "This choice needs the EMA network's embeddings too: press Segment."
            return
        self._start(lambda: _workers.cluster(model, emb, emb_g, method, fg=fg, **overrides),
                    lambda seg: self._show(image, seg))

    def _start(self, func, on_result) -> None:
        if self.worker is not None:
            self._pending = (func, on_result)
            return
        self._pending = None
        self.worker = create_worker(func)
        self.worker.returned.connect(on_result)
        self.worker.errored.connect(lambda err: notify_error(
            str(err) if isinstance(err, SparseSegError) else f"Segmentation failed: {err}"))
        self.worker.finished.connect(self._finished)
        self.worker.start()

    def _finished(self) -> None:
        self.worker = None
        pending = self._pending
        if pending is not None:
            self._start(*pending)

    def _done(self, image, key, emb, emb_g, fg, seg) -> None:
        self._cache = {"key": key, "emb": emb, "emb_g": emb_g, "fg": fg}
        self._show(image, seg)
        if self.pca.value:
            from elf.segmentation.embeddings import embedding_pca

            rgb = embedding_pca(emb)
            rgb = (rgb - rgb.min()) / max(float(rgb.max() - rgb.min()), 1e-9)
            rgb = np.moveaxis(rgb, 0, -1)
            name = f"{image.name} embeddings (PCA)"
            if name in self.viewer.layers:
                self.viewer.layers[name].data = rgb
            else:
                self.viewer.add_image(rgb, name=name, rgb=True, visible=False)

    def _show(self, image, seg) -> None:
        # a layer this widget created is reused; a user's layer is never written to
        layer = self.outputs.get(image.name)
        if layer is not None and layer in self.viewer.layers:
            layer.data = seg
        else:
            layer = self.viewer.add_labels(seg, name=f"{image.name} segmentation",
                                           scale=image.scale[-seg.ndim:])
            self.outputs[image.name] = layer
        self.status.value = f"{int(seg.max())} objects"


class SparseSegWidget(QWidget):
    """Annotate a few objects, train SPOCO on them, segment every object."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session = Session()
        self.annotate = AnnotatePanel(napari_viewer)
        self.train = TrainPanel(napari_viewer, self.annotate, self.session)
        self.segment = SegmentPanel(napari_viewer, self.session)
        tabs = QTabWidget()
        tabs.addTab(self.annotate, "1 Annotate")
        tabs.addTab(self.train, "2 Train")
        tabs.addTab(self.segment, "3 Segment")
        self.tabs = tabs
        lay = QVBoxLayout(self)
        lay.addWidget(tabs)
        combos = (self.annotate.image, self.annotate.labels, self.segment.image)
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

