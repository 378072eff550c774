import numpy as np
import pytest
from scipy import ndimage

from napari_sparseseg.core.annotation import annotation_statistics, border_statistics, check_annotations, speck_ids


def test_counts_and_warnings():
    lab = np.zeros((50, 50), int)
    lab[10:20, 10:20] = 1
    lab[30:40, 10:20] = 2
    lab[30:40, 30:40] = 2  # one id, two pieces
    lab[45, 45] = 3  # speck
    lab[0:10, 25:35] = 4  # touches the border
    lab[20:25, 40:45] = 9  # background id
    r = check_annotations(lab, background_id=9)
    assert r.n_objects == 4 and r.ids == [1, 2, 3, 4]
    text = " ".join(r.warnings)
    assert "Label(s) 2 consist of separate pieces" in text
    assert "Label(s) 3 have no interior pixel: too thin or small to learn from (stray brush strokes?)" in text
    assert "Label(s) 4 touch the image border" in text
    assert len(r.warnings) == 3  # object 1 and the background raise nothing


def test_specks_are_objects_without_an_in_plane_interior_pixel():
    lab = np.zeros((3, 30, 30), int)
    lab[1, 2:5, 2:5] = 1  # 3 x 3 on one slice: one interior pixel, kept
    lab[:, 10, 10:20] = 2  # a line, 1 px wide through all slices: a speck
    lab[0, 20:22, 20:22] = 3  # 2 x 2: a speck
    lab[:, 0:2, 25:30] = 4  # 2 px thick, but cut by the border: its edge row counts as inside, kept
    lab[2, 25:28, 0] = 5  # one column at the border: a speck whatever lies beyond the border
    assert speck_ids(lab).tolist() == [2, 3, 5]
    assert speck_ids(lab[1]).tolist() == [2]  # 2D: the slice's own objects
    lab[1, 26, 11] = 7  # as an object, a single pixel is a speck; as the background id it is not
    assert 7 in speck_ids(lab).tolist() and 7 not in speck_ids(lab, background_id=7).tolist()


def test_empty():
    r = check_annotations(np.zeros((10, 10), int))
    assert r.n_objects == 0 and "No objects annotated yet" in r.summary() and not r.warnings


def test_3d():
    lab = np.zeros((8, 20, 20), int)
    lab[2:5, 5:10, 5:10] = 1
    assert check_annotations(lab).summary() == "1 object annotated"


# annotation_statistics: dense tissue or objects on a background, from the annotation alone

def _discs(shape=(128, 128), polarity=1.0, seed=0):
    """Discs (radius 9) on a flat background, intensity 0.5 +- 0.4, with noise; labels of all discs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    lab = np.zeros(shape, np.int32)
    for i, (y, x) in enumerate([(25, 25), (25, 90), (90, 30), (95, 95)], start=1):
        lab[(yy - y) ** 2 + (xx - x) ** 2 < 81] = i
    img = 0.5 + polarity * 0.4 * np.where(lab > 0, 1.0, -1.0) + rng.normal(0, 0.1, shape)
    return img.astype(np.float32)[None], lab


def _tissue(shape=(128, 128), seed=0):
    """Voronoi cells (about 20 px across) with bright 1 px membranes and textured interiors of one
    intensity; labels of all cells."""
    from skimage.segmentation import find_boundaries

    rng = np.random.default_rng(seed)
    pts = rng.uniform(0, shape[0], (40, 2))
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    lab = np.argmin(((yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2), -1).astype(np.int32) + 1
    img = 0.4 + ndimage.gaussian_filter(rng.normal(0, 0.3, shape), 1.5)
    img[find_boundaries(lab)] = 1.0
    return img.astype(np.float32)[None], lab


def _keep(lab, ids):
    return np.where(np.isin(lab, ids), lab, 0)


def _stats(images, labels, valid=None):
    s = annotation_statistics(images, labels, valid)
    return s["ring_contrast"], s["interior_share"]


def test_annotation_statistics_tell_objects_on_a_background_from_dense_tissue():
    img, lab = _discs()
    contrast, share = _stats([img], [_keep(lab, [1, 2])])
    assert contrast > 0.95
    assert 0.01 < share < 0.1  # the two unpainted discs (3 % of the unannotated pixels)
    img, lab = _tissue()
    ids = [i for i in np.unique(lab) if 0 < i][::10][:3]  # a few cells painted, their neighbours not
    contrast, share = _stats([img], [_keep(lab, ids)])
    assert 0.5 <= contrast < 0.7
    assert share > 0.8  # all but the membranes


def test_crowded_objects_on_a_background_look_like_tissue_up_close_but_not_as_a_whole():
    from napari_sparseseg.core.samples import synthetic_cells
    from napari_sparseseg.core.sparsify import sparsify

    img, gt = synthetic_cells((256, 256), seed=0)  # colonies of touching cells (the demo's data)
    contrast, share = _stats([img[None].astype(np.float32)], [sparsify(gt, 0.3, np.random.default_rng(0))])
    assert contrast < 0.85 and share < 0.4


def test_annotation_statistics_take_each_images_own_polarity_and_colour():
    bright, lab = _discs(polarity=1.0)
    dark, _ = _discs(polarity=-1.0, seed=1)
    # one direction for both would find no contrast; each image's own finds it
    assert _stats([bright, dark], [lab, lab])[0] > 0.95
    # objects that differ from the background in hue, not brightness (stained sections)
    rgb = np.concatenate([bright, dark, np.full_like(bright, 0.5)])
    assert _stats([rgb], [lab])[0] > 0.95
    assert _stats([bright[0][None]], [lab]) == pytest.approx(_stats([bright], [lab]))


def test_annotation_statistics_are_none_without_a_ring_or_objects():
    img, lab = _tissue()
    assert _stats([img], [lab]) == (None, None)  # every pixel annotated: nothing around the objects
    assert _stats([img], [np.zeros_like(lab)]) == (None, None)
    disc, lab = _discs()
    assert _stats([disc], [lab], [lab > 0]) == (None, None)  # the ring lies in the ignore mask


def test_annotation_statistics_in_3d_and_with_many_objects(monkeypatch):
    from napari_sparseseg.core import annotation

    zz, yy, xx = np.mgrid[:24, :48, :48]
    lab = np.zeros((24, 48, 48), np.int32)
    for i, (z, y, x) in enumerate([(12, 12, 12), (12, 34, 30), (10, 14, 36)], start=1):
        lab[(zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 < 36] = i
    img = (np.where(lab > 0, 0.8, 0.2) + np.random.default_rng(0).normal(0, 0.1, lab.shape)).astype(np.float32)
    assert _stats([img[None]], [lab])[0] > 0.95
    # objects beyond RING_OBJECTS are left out: the same answer from a subset
    monkeypatch.setattr(annotation, "RING_OBJECTS", 1)
    assert _stats([img[None]], [lab])[0] > 0.95


def test_border_statistics_find_the_membranes_and_their_polarity():
    img, lab = _tissue()
    ids = [i for i in np.unique(lab) if 0 < i][::10][:3]
    sparse = _keep(lab, ids)
    w, auc = border_statistics([img], [sparse])
    assert w == [1.0] and auc > 0.9  # bright membranes: the painted cells' borders are bright
    w, auc_dark = border_statistics([1.0 - img], [sparse])
    assert w == [-1.0] and auc_dark == pytest.approx(auc)  # dark membranes (EM): the same contrast
    # colour: the membranes are in one channel, the other is noise; the weights find the first
    rng = np.random.default_rng(1)
    rgb = np.concatenate([img, rng.uniform(0, 1, img.shape).astype(np.float32)])
    w, auc_rgb = border_statistics([rgb], [sparse])
    assert abs(w[0]) > 0.8 and w[0] > 0 and sum(abs(x) for x in w) == pytest.approx(1.0) and auc_rgb > 0.85
    assert annotation_statistics([img], [sparse])["border_contrast"] == pytest.approx(auc)


def test_border_statistics_see_no_border_in_objects_without_one():
    disc, lab = _discs()  # uniform discs: their outermost pixels look like their interiors
    w, auc = border_statistics([disc], [lab])
    assert 0.4 < auc < 0.6
    assert border_statistics([disc], [np.zeros_like(lab)]) == (None, None)
    # the ignore mask leaves nothing painted
    assert border_statistics([disc], [lab], [np.zeros(lab.shape, bool)]) == (None, None)
    s = annotation_statistics([disc], [np.zeros_like(lab)])
    assert s["border_direction"] is None and s["border_contrast"] is None
