"""Segment tab: prediction + clustering into a new Labels layer; the knobs re-cluster the cached
prediction without calling the network again."""

from __future__ import annotations

from pathlib import Path

import napari
import numpy as np
from magicgui.widgets import CheckBox, ComboBox, FloatSpinBox, Label, PushButton
from napari.qt.threading import create_worker
from qtpy.QtWidgets import QVBoxLayout, QWidget

from ..core import checkpoint
from ..core.agglomeration import image_share, image_share_note
from ..core.clustering import GRAPH_METHODS
from ..core.errors import SparseSegError
from ..core.prediction import to_image_shape
from ..core.scale import diameter_note
from ..core.segment import (
    AFFINITY_SOURCES, AGREEMENT, BACKGROUNDS, CLUSTERINGS, CRAC_AFFINITY_SOURCE, DENSE_BACKGROUND, default_bias,
    default_min_size, faint_fraction, foreground_threshold, needs_g, rescue_factor, split_ratio,
    PredictionCache, dense_reason, resolve, resolved_clustering,
)
from . import layers as L
from . import stack_job, workers
from .session import Session


class SegmentPanel(QWidget):
    def __init__(self, viewer: napari.Viewer, session: Session):
        super().__init__()
        self.viewer, self.session = viewer, session
        self.image = ComboBox(choices=L.layer_choices(viewer, napari.layers.Image))
        self.region = ComboBox(choices=L.layer_choices(viewer, napari.layers.Shapes), nullable=True,
                               tooltip="optional: segment only inside the bounding box of this Shapes layer's "
                                       "shapes (a quick look at a large stack); empty: the whole image")
        self.method = ComboBox(choices=list(CLUSTERINGS), value="auto",
                               tooltip="auto: multicut on superpixels where the image is mostly foreground (dense "
                                       "tissue), mutex watershed (mws) for objects on a background")
        self.bias = FloatSpinBox(value=-1.0, min=-1.0, max=0.49, step=0.01,
                                 tooltip="> 0 splits more, < 0 merges more (mws and multicut); -1: auto, each "
                                         "clustering's default (with clustering auto: mws / multicut)")
        self.min_size = L.count_box(value=-1, min=-1, max=10**9, tooltip="-1: from the model (1/4 of the median object)")
        self.max_size = L.count_box(value=0, min=0, max=10**12, tooltip="larger segments are background; 0: no limit")
        self.background = ComboBox(choices=list(BACKGROUNDS), value="auto",
                                   tooltip="auto: none on an image auto clustering calls dense tissue, else "
                                           "the model's foreground head if it has one, else largest; "
                                           "foreground: what the foreground head calls background is 0; "
                                           "largest: the largest segment is background; none: dense tissue")
        self.fg_threshold = FloatSpinBox(value=-1.0, min=-1.0, max=1.0, step=0.01,
                                         tooltip="foreground probability threshold; -1: from the model")
        # a model's threshold can be a few thousandths (a head whose mean on objects is low)
        self.fg_threshold.native.setDecimals(4)
        self.agreement = FloatSpinBox(value=-1.0, min=-1.0, max=1.0, step=0.05,
                                      tooltip="mutex watershed: keep the segments that the EMA network reproduces "
                                              f"with at least this IoU (drops cut-up background); 0: off; -1: auto "
                                              f"({AGREEMENT} with background 'largest', off with 'foreground')")
        self.diameter = FloatSpinBox(value=0.0, min=0.0, max=10_000.0, step=1.0,
                                     tooltip="typical object diameter in this image, in pixels; auto: the model's "
                                             "(estimated per image for a model trained on objects of mixed sizes)")
        self.diameter.native.setSpecialValueText("auto")
        self.affinities = ComboBox(choices=["auto", *AFFINITY_SOURCES], value="auto",
                                   tooltip="CRAC models: the affinity map the mutex watershed reads: eam (from the "
                                           f"embeddings), iam (predicted directly) or mean; auto: {CRAC_AFFINITY_SOURCE}")
        self.split_ratio = FloatSpinBox(value=-1.0, min=-1.0, max=10.0, step=0.05,
                                        tooltip="mutex watershed on CRAC models: segments more than this many median "
                                                "annotated diameters across are clustered again where either "
                                                "affinity map sees a border; 0: off; -1: auto")
        self.rescue = FloatSpinBox(value=-1.0, min=-1.0, max=100.0, step=0.5,
                                   tooltip="background 'auto' by the foreground head: keep the segments it drops that "
                                           "stand out from their surroundings at least this many times as much as "
                                           "the painted objects (objects much brighter or darker than any painted "
                                           "one); 0: off; -1: auto")
        self.min_contrast = FloatSpinBox(value=-1.0, min=-1.0, max=10.0, step=0.05,
                                         tooltip="background 'auto' by the foreground head: drop the segments it keeps "
                                                 "that stand out from their surroundings less than this fraction of "
                                                 "the painted objects' contrast (background texture, pieces of an "
                                                 "object); 0: off; -1: auto")
        self.pca = CheckBox(value=False, text="show embeddings (PCA as RGB)")
        self.run_btn = PushButton(text="Segment")
        self.view_btn = PushButton(text="Segment what is in view",
                                   tooltip="a quick look: only the part of the image shown in the canvas is read and "
                                           "segmented (on a stack, 8 slices on each side of the current one)")
        self.stack_btn = PushButton(text="Segment whole stack (block by block)",
                                    tooltip="3D stacks opened from a zarr / OME-Zarr / TIFF file, of any size: the "
                                            "stack is read and segmented block by block in the background into a "
                                            "zarr on disk, shown as a new (lazy) Labels layer")
        self.status = Label(value="")
        self.status.native.setWordWrap(True)
        # room for a wrapped message: the form does not always grow a wrapping label's row
        self.status.native.setMinimumHeight(6 * self.status.native.fontMetrics().lineSpacing())
        lay = QVBoxLayout(self)
        lay.addWidget(L.form(("image", self.image), ("only inside", self.region), ("object diameter", self.diameter), ("clustering", self.method),
                             ("bias", self.bias),
                            ("min size", self.min_size), ("max size", self.max_size),
                            ("background", self.background), ("fg threshold", self.fg_threshold),
                            ("agreement", self.agreement), ("affinities (CRAC)", self.affinities),
                             ("split large (CRAC)", self.split_ratio), ("keep dropped objects", self.rescue),
                             ("drop faint segments", self.min_contrast),
                             (None, self.pca), (None, self.run_btn), (None, self.view_btn),
                            (None, self.stack_btn), (None, self.status)))
        lay.addStretch()
        self.run_btn.changed.connect(self.run)
        self.view_btn.changed.connect(lambda *_: self.run(in_view=True))
        self.stack_btn.changed.connect(self.segment_stack)
        for knob in (self.bias, self.min_size, self.max_size, self.background, self.fg_threshold, self.agreement,
                     self.method, self.affinities, self.split_ratio, self.rescue, self.min_contrast):
            knob.changed.connect(self.recluster)
        self.diameter.changed.connect(self._diameter_changed)
        self.region.changed.connect(self._diameter_changed)  # another region: predict again
        # the sentinels (-1: auto, 0: no limit) are the spin boxes' minimum, where Qt shows a text instead
        self.max_size.native.setSpecialValueText("no limit")
        self.method.changed.connect(self.show_auto_values)
        self.background.changed.connect(self.show_auto_values)
        self.show_auto_values()
        self.worker = None
        self.cache = PredictionCache()  # the last prediction; knobs re-cluster it
        self.outputs: dict[str, napari.layers.Labels] = {}
        self._pending = None

    def auto_values(self) -> dict[str, str]:
        """What "auto" means for min size, fg threshold and agreement with the current model, method
        and background choice, as the engine resolves it (core.segment); plain "auto" without a model."""
        texts = {"min_size": "auto", "fg_threshold": "auto", "agreement": "auto", "bias": "auto", "split_ratio": "auto",
                 "rescue": "auto", "min_contrast": "auto"}
        model = self.session.model
        if model is None:
            return texts
        texts["bias"] = self.bias_text(model.config)
        try:
            background, opts = resolve(model.config, self.method.value, background=self.background.value)
        except SparseSegError:  # e.g. background 'foreground' for a model without a foreground head
            return texts
        threshold = foreground_threshold(model.config)
        texts["min_size"] = f"auto ({default_min_size(model.config)})"
        texts["fg_threshold"] = (f"auto ({threshold:.2g})" if background == "foreground" and threshold is not None
                                 else "auto (not used)")
        texts["agreement"] = f"auto ({opts['agreement']:.2f})" if opts.get("agreement") else "auto (off)"
        methods = GRAPH_METHODS if self.method.value == "auto" else (self.method.value,)
        ratio = max(split_ratio(model.config, m) for m in methods)
        texts["split_ratio"] = f"auto ({ratio:.2f}, mws)" if ratio else "auto (off)"
        by_head = self.background.value == "auto" and background == "foreground"
        factor = rescue_factor(model.config) if by_head else 0
        texts["rescue"] = f"auto ({factor:g}x)" if factor else "auto (off)"
        faint = faint_fraction(model.config) if by_head else 0
        texts["min_contrast"] = f"auto ({faint:g}x)" if faint else "auto (off)"
        return texts

    def bias_text(self, config: dict) -> str:
        """The bias "auto" stands for with this model ``config`` and the current clustering choice
        (core.segment.default_bias)."""
        method = self.method.value
        if method == "auto":
            return "auto (" + " / ".join(f"{default_bias(config, m):+.2f}" for m in GRAPH_METHODS) + ")"
        return f"auto ({default_bias(config, method):+.2f})" if method in GRAPH_METHODS else "auto (not used)"

    def show_auto_values(self, *_) -> None:
        """Show each knob left at -1 as "auto (the value the model will use)"."""
        for name, text in self.auto_values().items():
            getattr(self, name).native.setSpecialValueText(text)

    def _overrides(self) -> dict:
        return dict(bias=None if self.bias.value <= -1 else float(self.bias.value),
                    min_size=None if self.min_size.value < 0 else int(self.min_size.value),
                    max_size=int(self.max_size.value) or None,
                    background=self.background.value,
                    fg_threshold=None if self.fg_threshold.value < 0 else float(self.fg_threshold.value),
                    agreement=float(self.agreement.value) if self.method.value in ("auto", *GRAPH_METHODS) and self.agreement.value >= 0
                    else None,
                    affinity_source=None if self.affinities.value == "auto" else self.affinities.value,
                    split_ratio=None if self.split_ratio.value < 0 else float(self.split_ratio.value),
                    rescue=None if self.rescue.value < 0 else float(self.rescue.value),
                    min_contrast=None if self.min_contrast.value < 0 else float(self.min_contrast.value))

    def _key(self, image, region=None):
        m = self.session.model
        box = None if region is None else tuple((r.start, r.stop) for r in region)
        return (id(image), id(m), m.config.get("training", {}).get("iteration") if m else None,
                float(self.diameter.value), box, L.voxel_size(image))

    @property
    def diameter_value(self) -> float | None:
        return float(self.diameter.value) or None

    def run(self, *_, in_view: bool = False) -> None:
        """Segment the image, or only the bounding box of the chosen Shapes layer, or (``in_view``)
        only what the canvas shows."""
        image, model = self.image.value, self.session.model
        if image is None:
            L.notify_error("Select an image to segment.")
            return
        if model is None:
            L.notify_error("There is no model yet: train one or load a model folder or bioimage.io package (Train tab).")
            return
        try:
            ndim = len(L.spatial_shape(image))
            chans = 3 if getattr(image, "rgb", False) else 1
            checkpoint.check_compatible(model.config, ndim, chans, f"image '{image.name}'")
            if in_view:
                region = L.view_region(self.viewer, image)
            else:
                region = None if self.region.value is None else L.box_region(self.region.value, image)
        except SparseSegError as err:
            L.notify_error(str(err))
            return
        method, overrides = self.method.value, self._overrides()
        need_g = self._needs_g(method, model, overrides)
        if need_g is None:
            return
        key = self._key(image, region)
        if self.cache.get(key, need_g) is not None:
            self.recluster()
            return
        diameter, voxel = self.diameter_value, L.voxel_size(image)
        img = L.image_region(image, region)

        def work():
            embedded = workers.embed(model, img, need_g, device="auto", diameter=diameter, voxel_size=voxel)
            return embedded, workers.cluster(model, embedded, method, **overrides)

        self.status.value = "Predicting…"
        self._start(work, lambda res: self._done(image, key, region, *res))

    @staticmethod
    def _needs_g(method, model, overrides) -> bool | None:
        """Whether the choices need the EMA network; None (after telling the user) when the model
        cannot take them (e.g. HDBSCAN for a CRAC model)."""
        try:
            return needs_g(method, model.config, **overrides)
        except SparseSegError as err:
            L.notify_error(str(err))
            return None

    def _diameter_changed(self, *_) -> None:
        # another object diameter is another zoom: what is shown is predicted again
        if self.cache.embedded is not None:
            self.run()

    def recluster(self, *_) -> None:
        """Re-run clustering only, on the cached embeddings (no network call)."""
        image = self.image.value
        if image is None or self.cache.embedded is None:
            return
        embedded = self.cache.get(self._key(image, self.cache.extra))
        if embedded is None:
            return
        model, method, overrides = self.session.model, self.method.value, self._overrides()
        need_g = self._needs_g(method, model, overrides)
        if need_g is None:
            return
        if embedded.g is None and need_g:
            self.status.value = "This choice needs the EMA network's embeddings too: press Segment."
            return
        self._start(lambda: workers.cluster(model, embedded, method, **overrides),
                    lambda seg: self._show(image, seg))

    def segment_stack(self, *_) -> None:
        """The whole stack, block by block (core/blockwise.py) from the layer's file, into a lazy layer."""
        image, model, folder = self.image.value, self.session.model, self.session.folder
        if image is None:
            L.notify_error("Select an image to segment.")
            return
        if model is None or folder is None:
            L.notify_error("There is no model yet: train one or load a model folder or bioimage.io package (Train tab).")
            return
        if not (Path(folder) / "config.json").exists():
            L.notify_error(f"Whole-stack segmentation reads the model from a model folder; {folder} is not one: "
                           "save the model to a folder first (Train tab: Save model)")
            return
        if self.worker is not None:
            L.notify_error("A segmentation is running: wait for it to finish.")
            return
        try:
            path = stack_job.stack_path(image)
            stack_job.check_method(self.method.value)
            checkpoint.check_compatible(model.config, 3, 1, f"image '{image.name}'")
        except SparseSegError as err:
            L.notify_error(str(err))
            return
        out = stack_job.new_output(image.name)
        overrides = {k: v for k, v in self._overrides().items() if v is not None}
        self.worker = create_worker(stack_job.events, folder, path, out, self.method.value,
                                    voxel_size=L.voxel_size(image), diameter=self.diameter_value, **overrides)
        self.worker.yielded.connect(lambda p: setattr(self.status, "value", f"Whole stack: {p[0]} {p[1]}/{p[2]} blocks"))
        self.worker.returned.connect(lambda res: self._show_stack(image, res))
        self.worker.errored.connect(lambda err: L.notify_error(
            str(err) if isinstance(err, SparseSegError) else f"Segmentation failed: {err}"))
        self.worker.finished.connect(self._finished)
        self.status.value = f"Whole stack: starting, writing {out}"
        self.worker.start()

    def _show_stack(self, image, res) -> None:
        import zarr

        # a new layer over a zarr array: napari reads what it shows, block by block
        layer = self.viewer.add_labels(zarr.open_array(str(res.out), mode="r"), name=f"{image.name} segmentation (stack)",
                                       scale=image.scale[-3:], translate=image.translate[-3:])
        self.outputs[layer.name] = layer
        self.status.value = f"{res.objects} objects in the whole stack ({res.blocks} blocks, {res.method}) -> {res.out}"

    def _start(self, func, on_result) -> None:
        if self.worker is not None:
            self._pending = (func, on_result)
            return
        self._pending = None
        self.worker = create_worker(func)
        self.worker.returned.connect(on_result)
        self.worker.errored.connect(lambda err: L.notify_error(
            str(err) if isinstance(err, SparseSegError) else f"Segmentation failed: {err}"))
        self.worker.finished.connect(self._finished)
        self.worker.start()

    def _finished(self) -> None:
        self.worker = None
        pending = self._pending
        if pending is not None:
            self._start(*pending)

    def _done(self, image, key, region, embedded, seg) -> None:
        self.cache.put(key, embedded, extra=region)
        self._show(image, seg)
        if self.pca.value:
            from elf.segmentation.embeddings import embedding_pca

            rgb = embedding_pca(to_image_shape(embedded.f.embeddings, embedded.f.shape))
            rgb = (rgb - rgb.min()) / max(float(rgb.max() - rgb.min()), 1e-9)
            rgb = np.moveaxis(rgb, 0, -1)
            name = f"{image.name} embeddings (PCA)"
            if name in self.viewer.layers:
                self.viewer.layers[name].data = rgb
            else:
                scale, translate = self._placement(image, rgb.ndim - 1)
                self.viewer.add_image(rgb, name=name, rgb=True, visible=False, scale=scale, translate=translate)

    def _placement(self, image, ndim: int):
        """Scale and translate that put a result for the cached region (or the whole image) over the image."""
        region = self.cache.extra
        scale = np.asarray(image.scale[-ndim:])
        start = np.zeros(ndim) if region is None else np.array([r.start for r in region], float)
        return scale, np.asarray(image.translate[-ndim:]) + start * scale

    def _show(self, image, seg) -> None:
        # a layer this widget created is reused; a user's layer is never written to
        region = self.cache.extra
        name = f"{image.name} segmentation" + ("" if region is None else " (box)")
        scale, translate = self._placement(image, seg.ndim)
        layer = self.outputs.get(name)
        if layer is not None and layer in self.viewer.layers:
            layer.data, layer.translate = seg, translate
        else:
            layer = self.viewer.add_labels(seg, name=name, scale=scale, translate=translate)
            self.outputs[name] = layer
        where = "" if region is None else " in the box " + " x ".join(f"{r.start}:{r.stop}" for r in region)
        self.status.value = f"{int(seg.max())} objects{where}" + self._clustering_note() + self._diameter_note()

    def _diameter_note(self) -> str:
        """The object diameter the image was seen at, e.g. "; object diameter 46 px, estimated from the image"."""
        model, embedded = self.session.model, self.cache.embedded
        if model is None or embedded is None:
            return ""
        return "; " + diameter_note(model.config, model.ndim, embedded.zoom, self.diameter_value)

    def _clustering_note(self) -> str:
        """What "auto" chose for the shown image, e.g. " (auto: multicut, dense tissue)"."""
        if self.method.value != "auto" or self.cache.embedded is None or self.session.model is None:
            return ""
        try:
            chosen = resolved_clustering(self.session.model, self.cache.embedded, "auto", **self._overrides())
        except SparseSegError:
            return ""
        if chosen != "multicut":
            return f" (auto: {chosen}, objects on a background)"
        kept = self.background.value == "auto" and DENSE_BACKGROUND == "none"
        reason = dense_reason(self.session.model, self.cache.embedded, **self._overrides())
        by = " by the annotation" if reason == "the annotation" else ""
        own = image_share_note(image_share(self.session.model.config.get("annotation")))
        return f" (auto: {chosen}, dense tissue{by}{', no background' if kept else ''}{own})"


