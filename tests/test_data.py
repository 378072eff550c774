import numpy as np
import pytest
import torch

from napari_sparseseg import SparseSegError
from napari_sparseseg.core.data import CropSampler, photometric, prepare, relabel_consecutive


def test_relabel_keeps_zero_even_without_zero_pixels():
    assert relabel_consecutive(np.array([[5, 5], [9, 9]])).tolist() == [[1, 1], [2, 2]]
    assert relabel_consecutive(np.array([[0, 7], [3, 3]])).tolist() == [[0, 2], [1, 1]]


def _one(shape=(64, 64)):
    img = np.random.default_rng(0).random((1,) + shape).astype(np.float32)
    lab = np.zeros(shape, int)
    lab[40:50, 40:50] = 7
    return img, lab


def test_prepare_background_id_is_unlabeled_not_an_object():
    img, lab = _one()
    lab[:10] = 3  # painted background
    (s,) = prepare([img], [lab], background_id=3)
    assert s.labels.max() == 1 and (s.labels[:10] == 0).all()  # background counts as unlabeled
    assert len(s.objects) == 1


def test_prepare_zooms_each_image_by_its_own_factor_and_applies_ignore_mask():
    img, lab = _one()
    ignore = np.zeros(lab.shape, bool)
    ignore[40:45] = True  # half of the object is ignored
    a, b = prepare([img, img], [lab, lab], zooms=[1.0, 0.5], ignore=[None, ignore])
    assert a.labels.shape == (64, 64) and b.labels.shape == (32, 32) and b.zoom == 0.5
    assert a.valid.all() and not b.valid[20:22].any()
    assert (b.labels[~b.valid] == 0).all() and b.labels.max() == 1
    with pytest.raises(SparseSegError, match=r"b.tif: ignore mask has shape \(8, 8\) but the labels have shape"):
        prepare([img], [lab], ignore=[np.zeros((8, 8), bool)], names=["b.tif"])


def test_prepare_errors():
    img, lab = _one()
    with pytest.raises(SparseSegError, match="no labeled object in any label image"):
        prepare([img], [np.zeros_like(lab)])
    with pytest.raises(SparseSegError, match=r"a.tif: image has spatial shape \(64, 64\) but its labels have shape \(32, 32\)"):
        prepare([img], [lab[:32, :32]], names=["a.tif"])


def test_crops_are_centred_on_objects_and_pad_small_images():
    img, lab = _one()
    (s,) = prepare([img], [lab])
    sampler = CropSampler([s], (32, 32), seed=0, p_object=1.0, elastic=False)
    for _ in range(10):
        im, lb, val, _ = sampler.crop()
        assert im.shape == (1, 32, 32) and lb.shape == (32, 32)
        assert lb.max() == 1  # the object is in the crop, relabelled to 1
    sampler = CropSampler([s], (96, 96), seed=0)
    im, lb, val, _ = sampler.crop()
    assert im.shape == (1, 96, 96) and (~val).sum() == 96 * 96 - 64 * 64  # padding is ignored


def test_object_lands_anywhere_in_the_crop_not_only_near_its_centre():
    # a network with zero padding knows where in a crop it is; if the labeled object always sat in
    # the middle it could learn "the middle object is the labeled one" (seen on CVPPP@0.1)
    img = np.zeros((1, 400, 400), np.float32)
    lab = np.zeros((400, 400), np.int32)
    lab[198:202, 198:202] = 1
    (s,) = prepare([img], [lab])
    sampler = CropSampler([s], (64, 64), seed=0, p_object=1.0, elastic=False)
    sampler._geometric = lambda i, lb, v: (i, lb, v)  # positions before flips/rotations
    rows = []
    for _ in range(300):
        _, lb, _, _ = sampler.crop()
        ys, _ = np.nonzero(lb)
        rows.append(ys.mean())
    rows = np.array(rows)
    assert rows.min() < 8 and rows.max() > 56  # near both edges of the crop
    assert 0.15 < np.mean(rows < 16) < 0.35  # about uniform: a quarter in the first quarter


def test_geometric_augmentation_keeps_image_and_labels_aligned():
    img = np.zeros((1, 64, 64), np.float32)
    lab = np.zeros((64, 64), int)
    lab[10:30, 20:25] = 1
    img[0][lab == 1] = 1.0
    (s,) = prepare([img], [lab])
    sampler = CropSampler([s], (64, 64), seed=1, elastic=True)
    for _ in range(10):
        im, lb, _, _ = sampler.crop()
        inside = im[0][lb == 1].mean()
        outside = im[0][lb == 0].mean()
        assert inside > 0.8 and outside < 0.2


def test_photometric_views_differ_but_keep_geometry():
    x = torch.zeros(2, 3, 32, 32)
    x[:, :, 8:16, 8:16] = 1.0
    g = torch.Generator().manual_seed(0)
    a, b = photometric(x, g), photometric(x, g)
    assert not torch.allclose(a, b)
    for v in (a, b):
        assert (v[:, :, 9:15, 9:15].mean() - v[:, :, 20:, 20:].mean()) > 0.4




def test_zoom_jitter_resizes_crops_and_keeps_them_aligned():
    img = np.zeros((1, 200, 200), np.float32)
    lab = np.zeros((200, 200), int)
    lab[80:120, 80:120] = 1  # a 40x40 square
    img[0][lab == 1] = 1.0
    (s,) = prepare([img], [lab])
    sampler = CropSampler([s], (64, 64), seed=0, p_object=1.0, elastic=False, zoom_jitter=1.5)
    sizes = []
    for _ in range(40):
        im, lb, val, _ = sampler.crop()
        assert im.shape == (1, 64, 64) and lb.shape == (64, 64) and val.all()
        # aligned after resizing: only pixels on the square's edge may disagree
        assert ((im[0] > 0.5) != (lb == 1)).mean() < 0.02
        rows = np.flatnonzero((lb == 1).any(1))
        if rows.size and rows[0] > 0 and rows[-1] < 63:  # the whole square is in the crop
            sizes.append(rows.size)
    assert min(sizes) < 36 and max(sizes) > 44  # zoomed both ways around 40
    assert all(40 / 1.5 - 1 <= v <= 40 * 1.5 + 1 for v in sizes)
