"""Objects the foreground head drops, kept by how much they stand out (core/rescue.py, and its use
in segment.cluster, the CLI and the annotation statistics)."""

import json

import numpy as np
import pytest

from napari_sparseseg.cli import main
from napari_sparseseg.core.annotation import annotation_statistics
from napari_sparseseg.core.checkpoint import FORMAT, Model
from napari_sparseseg.core.errors import SparseSegError
from napari_sparseseg.core.offsets import default_offsets
from napari_sparseseg.core.prediction import Prediction
from napari_sparseseg.core.rescue import FAINT_CONTRAST, RESCUE_CONTRAST, drop_faint, painted_contrast, rescue, ring_contrasts
from napari_sparseseg.core.segment import Embedded, cluster, faint_fraction, rescue_factor

SHAPE = (64, 96)
# centre, radius, intensity, foreground logit of each blob (label i + 1)
BLOBS = [((16, 16), 6, 0.3, 6.0),    # 1, 2: painted-like objects the head keeps
         ((16, 48), 6, 0.3, 6.0),
         ((44, 20), 6, 1.0, -6.0),   # 3: 3.3x the painted contrast, dropped by the head
         ((44, 50), 6, 0.3, -6.0),   # 4: as faint as the painted ones, dropped by the head
         ((40, 80), 14, 1.0, -6.0)]  # 5: bright but 5x the painted size, dropped by the head


def scene():
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    lab = np.zeros(SHAPE, np.int64)
    img = np.zeros(SHAPE, np.float32)
    logit = np.full(SHAPE, -6.0, np.float32)
    for i, ((cy, cx), r, value, fg) in enumerate(BLOBS, start=1):
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        lab[disk], img[disk], logit[disk] = i, value, fg
    return img, lab, logit


def model_and_prediction(object_contrast=0.3):
    img, lab, logit = scene()
    rng = np.random.default_rng(0)
    table = rng.normal(0, 4.0, (lab.max() + 1, 4)).astype(np.float32)
    emb = np.moveaxis(table[lab], -1, 0)
    config = {"format": FORMAT, "version": 1, "method": "spoco", "offsets": default_offsets(2),
              "loss": {"delta_var": 0.5, "delta_dist": 2.0}, "foreground": {"c": 1.0},
              "object_area_median": float(np.sum(lab == 1)),
              "annotation": {"ring_contrast": 0.95, "interior_share": 0.1, "object_contrast": object_contrast}}
    pred = Prediction(emb, 1 / (1 + np.exp(-logit)), 1.0, SHAPE, None, image=img[None])
    return Model(net=None, config=config), Embedded(pred), lab


def kept(seg, lab):
    """The true blobs (ids) that a segment of ``seg`` covers for the most part."""
    return sorted(i for i in range(1, lab.max() + 1) if np.mean(seg[lab == i] > 0) > 0.9)


def test_ring_contrast_is_the_mean_difference_over_the_spread():
    img, lab, _ = scene()
    c = ring_contrasts(img[None], np.array([2.0]), lab, [1, 3], 2)
    np.testing.assert_allclose(c, [0.3 / 2, 1.0 / 2], rtol=1e-5)
    # either polarity, and several channels add as a vector
    two = np.stack([img, -img])
    np.testing.assert_allclose(ring_contrasts(two, np.array([1.0, 1.0]), lab, [1], 2), [0.3 * np.sqrt(2)], rtol=1e-5)


def test_painted_contrast_is_the_median_over_the_painted_objects():
    img, lab, _ = scene()
    painted = np.where(np.isin(lab, [1, 2, 3]), lab, 0)  # 0.3, 0.3, 1.0 over a spread of 1
    assert painted_contrast([img[None]], [painted]) == pytest.approx(0.3)
    assert painted_contrast([img[None]], [np.zeros_like(lab)]) is None
    stats = annotation_statistics([img[None]], [painted])
    assert stats["object_contrast"] == pytest.approx(0.3)


def test_rescue_adds_only_dropped_segments_of_the_painted_size_that_stand_out():
    img, lab, _ = scene()
    seg = np.where(np.isin(lab, [1, 2]), lab, 0)
    out = rescue(img[None], seg, lab, float(np.sum(lab == 1)), painted=0.3, factor=2.0)
    assert kept(out, lab) == [1, 2, 3]
    np.testing.assert_array_equal(out[seg > 0], seg[seg > 0])  # what was segmented stays as it was
    assert len(np.unique(out[lab == 3])) == 1 and out[lab == 3][0] not in (1, 2)
    assert kept(rescue(img[None], seg, lab, float(np.sum(lab == 1)), painted=0.3, factor=4.0), lab) == [1, 2]
    assert rescue(img[None], seg, lab, float(np.sum(lab == 1)), painted=0.3, factor=0) is seg


def test_cluster_keeps_what_the_head_drops_only_under_background_auto():
    model, embedded, lab = model_and_prediction()
    assert kept(cluster(model, embedded), lab) == [1, 2, 3]
    assert kept(cluster(model, embedded, rescue=0), lab) == [1, 2]
    assert kept(cluster(model, embedded, rescue=5), lab) == [1, 2]
    assert kept(cluster(model, embedded, background="foreground"), lab) == [1, 2]  # the head alone
    # a user's mask bounds what comes back
    mask = np.ones(SHAPE, bool)
    mask[30:, :40] = False
    assert kept(cluster(model, embedded, mask=mask), lab) == [1, 2]


def test_drop_faint_removes_segments_fainter_than_a_fraction_of_the_painted_contrast():
    img, lab, _ = scene()
    img = img.copy()
    img[lab == 2] = 0.1  # a third of the painted contrast (0.3)

    def left(out):
        # the blobs of ``lab`` still there, each one segment of the same pixels, ids consecutive
        ids = sorted(i for i in range(1, lab.max() + 1) if np.all(out[lab == i] > 0))
        assert np.array_equal(out > 0, np.isin(lab, ids))
        assert np.array_equal(np.unique(out), np.arange(len(ids) + 1))
        assert all(np.unique(out[lab == i]).size == 1 for i in ids)
        return ids

    for fraction, expected in ((0.5, [1, 3, 4, 5]), (0.3, [1, 2, 3, 4, 5]), (0.0, [1, 2, 3, 4, 5])):
        assert left(drop_faint(img[None], lab, float(np.sum(lab == 1)), 0.3, fraction)) == expected, fraction
    # against a given spread (a block of a larger image): twice the spread, half the contrast
    assert left(drop_faint(img[None], lab, float(np.sum(lab == 1)), 0.3, 0.5, spread=np.array([2.0]))) == [3, 5]


def test_drop_faint_measures_a_segment_against_the_background_beside_it_not_its_neighbours():
    # a clump of three cells on a dark background: the middle one's whole ring (2 px: 40 pixels of
    # its bright neighbours, 44 of background) is as bright as it is, so against that ring it looked
    # faint; and a speck of texture (0.1) alone. Painted contrast 0.3, fraction 0.5: 0.15 is needed
    dim = 40 / 84
    img = np.zeros((40, 70), np.float32)
    lab = np.zeros((40, 70), np.int64)
    for i, (x0, value) in enumerate(((10, 1.0), (20, dim), (30, 1.0)), start=1):
        lab[15:25, x0 : x0 + 10], img[15:25, x0 : x0 + 10] = i, value
    lab[15:25, 52:62], img[15:25, 52:62] = 4, 0.1
    whole = ring_contrasts(img[None], np.array([1.0]), lab, [2, 4], 2)
    np.testing.assert_allclose(whole, [0.0, 0.1], atol=1e-5)
    background = ring_contrasts(img[None], np.array([1.0]), lab, [1, 2, 4], 2, background_only=True)
    np.testing.assert_allclose(background, [1.0, dim, 0.1], rtol=1e-5)
    out = drop_faint(img[None], lab, 100.0, 0.3, 0.5)
    assert [np.unique(out[lab == i]).tolist() for i in (1, 2, 3, 4)] == [[1], [2], [3], [0]]
    # a segment with no background around it (it fills the gaps between the others) is kept
    full = np.where(lab == 0, 5, lab)
    assert ring_contrasts(img[None], np.array([1.0]), full, [2], 2, background_only=True)[0] == np.inf
    assert np.array_equal(drop_faint(img[None], full, 100.0, 0.3, 0.5), full)


def test_cluster_drops_faint_segments_the_head_keeps_by_default_under_background_auto():
    model, embedded, lab = model_and_prediction()
    embedded.f.image[0][lab == 2] = 0.1
    assert kept(cluster(model, embedded), lab) == [1, 3]  # on by default, at half the painted contrast
    assert kept(cluster(model, embedded, min_contrast=0.5), lab) == [1, 3]
    assert kept(cluster(model, embedded, min_contrast=0), lab) == [1, 2, 3]  # off
    assert kept(cluster(model, embedded, min_contrast=0.3), lab) == [1, 2, 3]
    assert kept(cluster(model, embedded, background="foreground", min_contrast=0.5), lab) == [1, 2]  # the head alone
    with pytest.raises(SparseSegError, match=r"min contrast -1: expected 0 \(off\) or a fraction"):
        cluster(model, embedded, min_contrast=-1)
    assert faint_fraction(model.config) == FAINT_CONTRAST == 0.5
    assert faint_fraction(model.config, 0.5) == 0.5
    assert faint_fraction({"annotation": {}}, 0.5) == 0  # models from before the measure


def test_models_without_the_annotations_contrast_keep_the_heads_decision():
    model, embedded, lab = model_and_prediction(object_contrast=None)
    assert rescue_factor(model.config) == 0
    assert kept(cluster(model, embedded), lab) == [1, 2]
    model, embedded, lab = model_and_prediction()
    assert kept(cluster(model, Embedded(Prediction(*[getattr(embedded.f, k) for k in
                                                      ("embeddings", "foreground", "zoom", "shape")]))), lab) == [1, 2]


def test_a_negative_factor_is_an_error_naming_it():
    model, embedded, _ = model_and_prediction()
    with pytest.raises(SparseSegError, match=r"rescue -1: expected 0 \(off\) or a factor"):
        cluster(model, embedded, rescue=-1)
    with pytest.raises(SparseSegError, match=r"rescue -2: expected"):
        cluster(model, embedded, background="largest", rescue=-2)  # also where it would not be used


BIG = (96, 128)
# a grid of blobs of radius 6: (row, column) -> (intensity, foreground logit); the rest are painted-like
# (0.3, +6). Bright ones the head drops stand 3.3x out, faint ones as little as the painted ones; two
# bright ones cross block borders of the (48, 64) grid (y = 48, x = 64)
BIG_DROPPED = {(0, 2): (1.0, -6.0), (1, 2): (1.0, -6.0), (1, 4): (1.0, -6.0), (2, 0): (0.3, -6.0), (0, 4): (0.3, -6.0),
               (2, 4): (0.1, 6.0)}  # the last: kept by the head, a third of the painted contrast
BIG_FAINT = 15


def big_scene():
    yy, xx = np.mgrid[: BIG[0], : BIG[1]]
    lab = np.zeros(BIG, np.int64)
    img = np.zeros(BIG, np.float32)
    logit = np.full(BIG, -6.0, np.float32)
    bright, faint = [], []
    for r, cy in enumerate((16, 48, 80)):
        for c, cx in enumerate((16, 40, 64, 88, 112)):
            i = r * 5 + c + 1
            value, fg = BIG_DROPPED.get((r, c), (0.3, 6.0))
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= 36
            lab[disk], img[disk], logit[disk] = i, value, fg
            if fg < 0:
                (bright if value > 0.5 else faint).append(i)
    # a corner of one bright blob passes the head: a segment under the minimum size (25 of 28 px)
    # that the size limit drops, after which the blob counts as dropped (as on the whole image)
    logit[46:51, 110:115] = 6.0
    return img, lab, logit, bright, faint


class BlobPredictor:
    """A 2D predictor that returns precomputed outputs (embeddings constant per blob, foreground
    logit) of the whole image, sliced by the block's position."""

    config = {"out_channels": 4, "foreground": True, "affinities": 0, "coord_scale": 0.0, "ndim": 2}

    def __init__(self, outputs):
        self.outputs = str(outputs)

    def __call__(self, x, offset, full_shape):
        region = tuple(slice(o, o + s) for o, s in zip(offset, x.shape[1:]))
        return np.array(np.load(self.outputs, mmap_mode="r")[(slice(None),) + region])


@pytest.fixture
def big_model(tmp_path):
    """(folder, image path, labels, bright, faint, whole-image segmentation)."""
    zarr = pytest.importorskip("zarr")
    img, lab, logit, bright, faint = big_scene()
    table = np.random.default_rng(0).normal(0, 4.0, (lab.max() + 1, 4)).astype(np.float32)
    emb = np.moveaxis(table[lab], -1, 0)
    np.save(tmp_path / "outputs.npy", np.concatenate([emb, logit[None]]))
    config = {"format": FORMAT, "version": 1, "method": "spoco", "offsets": default_offsets(2),
              "loss": {"delta_var": 0.5, "delta_dist": 2.0}, "foreground": {"c": 1.0},
              "object_area_median": float(np.sum(lab == 1)), "normalization": {"low": 1.0, "high": 99.8},
              "scale": {"zoom": 1.0}, "network": {**BlobPredictor.config, "in_channels": 1},
              "annotation": {"ring_contrast": 0.95, "interior_share": 0.1, "object_contrast": 0.3}}
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    z = zarr.create_array(str(tmp_path / "img.zarr"), shape=BIG, chunks=(48, 64), dtype=np.float32)
    z[:] = img
    whole = cluster(Model(net=None, config=config),
                    Embedded(Prediction(emb, 1 / (1 + np.exp(-logit)), 1.0, BIG, None, image=img[None])), "mws",
                    min_contrast=0.5)
    return tmp_path, lab, bright, faint, whole


def test_blockwise_keeps_dropped_objects_as_the_whole_image_does(big_model):
    from skimage.metrics import adapted_rand_error
    import zarr

    from napari_sparseseg.core.blockwise import segment_blockwise

    root, lab, bright, faint, whole = big_model
    assert set(bright) <= set(kept(whole, lab)) and not set(faint) & set(kept(whole, lab))
    assert BIG_FAINT not in kept(whole, lab)  # fainter than half the painted contrast (min_contrast 0.5)
    kw = dict(method="mws", block_shape=(48, 64), predictor=BlobPredictor(root / "outputs.npy"), min_contrast=0.5)
    res = segment_blockwise(root / "model", root / "img.zarr", root / "seg.zarr", **kw)
    seg = zarr.open_array(str(root / "seg.zarr"))[:]
    assert res.blocks == 4
    assert kept(seg, lab) == kept(whole, lab)
    for i in bright:  # whole, one id each, also across block borders
        ids = np.unique(seg[lab == i])
        assert ids.size == 1 and ids[0] > 0, f"blob {i}: ids {ids}"
    assert adapted_rand_error(whole, seg)[0] <= 0.02
    # off on request, and with the head alone
    for extra in ({"rescue": 0}, {"background": "foreground"}):
        segment_blockwise(root / "model", root / "img.zarr", root / f"off{len(extra)}{list(extra)[0]}.zarr", **kw, **extra)
        off = zarr.open_array(str(root / f"off{len(extra)}{list(extra)[0]}.zarr"))[:]
        assert not set(bright) & set(kept(off, lab)), extra


def test_cli_min_contrast_error_names_the_option(big_model, capsys):
    root = big_model[0]
    rc = main(["segment", "--model", str(root / "model"), "--images", str(root / "img.zarr"),
               "--out", str(root / "seg.zarr"), "--min-contrast", "-1"])
    assert rc != 0
    assert "min contrast -1: expected 0 (off) or a fraction of the painted objects' contrast" in capsys.readouterr().err
    assert not (root / "seg.zarr").exists()


def test_blockwise_rescue_errors_name_the_factor(big_model):
    from napari_sparseseg.core.blockwise import segment_blockwise

    root = big_model[0]
    with pytest.raises(SparseSegError, match=r"rescue -1: expected 0 \(off\) or a factor"):
        segment_blockwise(root / "model", root / "img.zarr", root / "seg.zarr", method="mws", block_shape=(48, 64),
                          predictor=BlobPredictor(root / "outputs.npy"), rescue=-1)
    assert not (root / "seg.zarr").exists()


def test_on_by_default_in_2d_only_and_on_request_in_3d():
    config = {"annotation": {"object_contrast": 0.3}, "network": {"ndim": 3}}
    assert rescue_factor(config) == 0 and rescue_factor(config, 2.5) == 2.5
    config["network"]["ndim"] = 2
    assert rescue_factor(config) == RESCUE_CONTRAST and rescue_factor(config, 0) == 0
