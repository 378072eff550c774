"""The dock widget on stacks: a 3D stack at its voxel size, a stack segmented block by block into
a lazy layer, a stack too large to hold annotated on disk and trained on its regions."""

import numpy as np
import pytest

napari = pytest.importorskip("napari")

import napari_sparseseg._napari.layers as L  # noqa: E402
import napari_sparseseg._napari.widget as W  # noqa: E402
from napari_sparseseg import load_model  # noqa: E402
from napari_sparseseg.core.errors import SparseSegError  # noqa: E402
from test_widget import TIMEOUT, _train  # noqa: E402


def test_3d_stack_trains_previews_a_slab_and_segments(qtbot, make_napari_viewer, errors):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-sparseseg", "cells_3d")
    _, w = viewer.window.add_plugin_dock_widget("napari-sparseseg", "SparseSeg")
    try:
        stack = viewer.layers["cells 3D"]
        assert w.annotate.image.value is stack
        # a stack at its voxel size, placed off the origin: every layer the plugin adds lies on it
        for layer in (stack, viewer.layers["cells 3D annotations"]):
            layer.scale, layer.translate = (0.5, 0.25, 0.25), (2.0, 0.0, 1.0)
        _train(qtbot, w, iterations=3, preview_every=0.01)
        assert not errors
        assert w.session.model.ndim == 3
        preview = viewer.layers[W.PREVIEW_LAYER]
        assert preview.data.shape == stack.data.shape  # a slab placed into a full-size layer
        np.testing.assert_allclose([preview.scale, preview.translate], [stack.scale, stack.translate])
        w.segment.run()
        qtbot.waitUntil(lambda: "cells 3D segmentation" in viewer.layers and w.segment.worker is None,
                        timeout=TIMEOUT)
        seg = viewer.layers["cells 3D segmentation"]
        assert seg.data.shape == stack.data.shape
        np.testing.assert_allclose([seg.scale, seg.translate], [stack.scale, stack.translate])
        # a quick look at what is in view: zoomed in on one slice -> that part, 8 slices on each side
        viewer.dims.set_point(0, 2.0 + 0.5 * 20)  # world z of slice 20
        viewer.camera.zoom, viewer.camera.center = 40.0, (0.0, 16.0, 12.0)
        viewer.window._qt_viewer.canvas.on_draw(None)  # what a shown canvas does when it redraws
        region = L.view_region(viewer, stack)
        assert (region[0].start, region[0].stop) == (12, 29)
        assert 0 < region[1].start < region[1].stop < stack.data.shape[1]  # a part of the slice, not all of it
        assert region[2].stop - region[2].start < stack.data.shape[2]
        w.segment.view_btn.clicked.emit()
        qtbot.waitUntil(lambda: "cells 3D segmentation (box)" in viewer.layers and w.segment.worker is None,
                        timeout=TIMEOUT)
        look = viewer.layers["cells 3D segmentation (box)"]
        assert look.data.shape == tuple(r.stop - r.start for r in region)
        np.testing.assert_allclose(look.translate, np.asarray(stack.translate)
                                   + np.array([r.start for r in region]) * stack.scale)
        assert not errors
    finally:
        w.cleanup_model_folder()


def test_view_region_of_a_2d_multiscale_image_and_of_one_out_of_view(make_napari_viewer):
    viewer = make_napari_viewer()
    base = np.zeros((256, 512), np.uint8)
    image = viewer.add_image([base, base[::2, ::2], base[::4, ::4]], name="pyramid", multiscale=True)
    image.corner_pixels = np.array([[10, 20], [40, 60]])  # what napari sets on a draw, at level 2
    image._data_level = 2
    assert L.view_region(viewer, image) == (slice(40, 164), slice(80, 244))  # in full-resolution pixels
    image.corner_pixels = np.array([[0, 0], [0, 0]])
    with pytest.raises(SparseSegError, match="image 'pyramid' is not in view: pan or zoom"):
        L.view_region(viewer, image)


def test_whole_stack_block_by_block_into_a_lazy_layer(qtbot, make_napari_viewer, tmp_path, errors, monkeypatch):
    import zarr

    from napari_sparseseg._napari import stack_job

    calls = []
    run_blockwise = stack_job.segment_blockwise
    monkeypatch.setattr(stack_job, "segment_blockwise", lambda *a, **kw: calls.append(kw) or run_blockwise(*a, **kw))

    from napari_sparseseg import TrainConfig, Trainer
    from napari_sparseseg.core.samples import synthetic_cells
    from napari_sparseseg.core.sparsify import sparsify

    img, lab = synthetic_cells((16, 96, 96), radius=(6.0, 9.0), seed=2)
    z = zarr.create_array(str(tmp_path / "stack.zarr"), shape=img.shape, chunks=(8, 48, 48), dtype=img.dtype)
    z[:] = img
    trainer = Trainer([img], [sparsify(lab, 0.5, np.random.default_rng(0))],
                      TrainConfig(iterations=2, patch_shape=(16, 32, 32), base_channels=4, depth=2, diameter=16),
                      out=tmp_path / "model")
    for _ in trainer.run():
        pass
    viewer = make_napari_viewer()
    w = W.SparseSegWidget(viewer)
    stack = viewer.open(str(tmp_path / "stack.zarr"), plugin="napari")[0]
    memory = viewer.add_image(img, name="in memory")
    w.session.model, w.session.origin, w.session.folder = load_model(tmp_path / "model"), "loaded", tmp_path / "model"
    seg = w.segment
    seg.image.value = memory  # not from a file: a clear message, nothing runs
    seg.segment_stack()
    assert errors and "image 'in memory' was not opened from a file" in errors[-1] and seg.worker is None
    seg.image.value = stack
    seg.method.value = "hdbscan"
    seg.segment_stack()
    assert "block by block, the clustering is one of auto, mws, multicut" in errors[-1]
    seg.method.value = "auto"
    seg.rescue.value = 3  # "keep dropped objects" reaches the blockwise run (off by default in 3D)
    n_errors = len(errors)
    seg.segment_stack()
    qtbot.waitUntil(lambda: seg.worker is None, timeout=TIMEOUT)
    assert len(errors) == n_errors, errors
    assert calls and calls[-1]["rescue"] == 3
    out = viewer.layers[f"{stack.name} segmentation (stack)"]
    assert isinstance(out.data, zarr.Array) and out.data.shape == img.shape  # lazy: read as shown
    assert "objects in the whole stack" in seg.status.value
    assert np.array_equal(np.asarray(stack.data), img)  # the user's layers are untouched


def test_a_stack_too_large_to_hold_is_annotated_on_disk_and_trained_on_its_regions(qtbot, make_napari_viewer, errors,
                                                                                     monkeypatch):
    """A dask-backed stack above regions.LAZY_VOXELS (lowered here) is never read whole: its new
    annotation layer is a zarr array on disk, training reads the regions around the painted
    objects, and the preview is a small layer placed on the first region."""
    import dask.array as da
    import zarr

    from napari_sparseseg.core import regions
    from napari_sparseseg.core.samples import synthetic_cells

    monkeypatch.setattr(regions, "LAZY_VOXELS", 10_000)
    img, gt = synthetic_cells((16, 192, 192), radius=(6.0, 9.0), seed=1)
    viewer = make_napari_viewer()
    stack = viewer.add_image(da.from_array(img, chunks=(8, 64, 64)), name="big", translate=(0, 5, 0))
    _, w = viewer.window.add_plugin_dock_widget("napari-sparseseg", "SparseSeg")
    try:
        w.annotate.image.value = stack
        w.annotate.add_labels_layer()
        labels = w.annotate.labels.value
        assert isinstance(labels.data, zarr.Array) and labels.data.shape == img.shape
        np.testing.assert_allclose(labels.translate, stack.translate)
        assert "press Check annotations" in w.annotate.status.value
        ids = np.unique(gt[:, :70, :70])
        for i in ids[ids > 0][:3]:  # three objects in one corner, painted into the zarr array
            labels.data[gt == i] = i
        w.annotate.check_now()
        assert "3 labeled object(s)" in w.annotate.status.value and "region(s) around them" in w.annotate.status.value
        _train(qtbot, w, iterations=2, preview_every=0.01)
        assert not errors
        job = w.train.job
        assert all(lab.shape != img.shape for lab in job.labels)  # regions, not the stack
        assert sum(lab.size for lab in job.labels) < img.size / 2
        assert job.bounds is not None and job.preview_origin is not None
        preview = viewer.layers[W.PREVIEW_LAYER]
        assert preview.data.shape[1:] == job.labels[0].shape[1:]  # a slab of the first region
        np.testing.assert_allclose(preview.translate[1:], np.asarray(stack.translate[1:]) + job.preview_origin[1:])
    finally:
        w.cleanup_model_folder()
