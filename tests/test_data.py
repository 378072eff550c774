import numpy as np
import pytest
import torch

from napari_sparseseg import SparseSegError
from napari_sparseseg.core.data import CropSampler, auto_scale, photometric, prepare, relabel_consecutive


def test_relabel_keeps_zero_even_without_zero_pixels():
    assert relabel_consecutive(np.array([[5, 5], [9, 9]])).tolist() == [[1, 1], [2, 2]]
    assert relabel_consecutive(np.array([[0, 7], [3, 3]])).tolist() == [[0, 2], [1, 1]]


def _one(shape=(64, 64)):
    img = np.random.default_rng(0).random((1,) + shape).astype(np.float32)
    lab = np.zeros(shape, int)
    lab[40:50, 40:50] = 7
    return img, lab


def test_prepare_background_id_is_an_object_not_a_crop_centre():
    img, lab = _one()
    (s,) = prepare([img], [lab], background_id=0)
    assert s.labels.min() == 1 and s.labels.max() == 2  # background became object 2: nothing unlabeled
    assert len(s.objects) == 1


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
        im, lb, val = sampler.crop()
        assert im.shape == (1, 32, 32) and lb.shape == (32, 32)
        assert lb.max() == 1  # the object is in the crop, relabelled to 1
    sampler = CropSampler([s], (96, 96), seed=0)
    im, lb, val = sampler.crop()
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
        _, lb, _ = sampler.crop()
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
        im, lb, _ = sampler.crop()
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


def test_auto_scale_from_object_size():
    lab = np.zeros((400, 400), int)
    lab[:100, :100] = 1  # equivalent diameter ~113 px
    assert auto_scale([lab]) == 0.25
    small = np.zeros((100, 100), int)
    small[:20, :20] = 1
    assert auto_scale([small]) == 1.0


def test_object_diameter_in_plane_for_stacks():
    from napari_sparseseg.core.data import object_diameters

    lab = np.zeros((10, 40, 40), int)
    lab[2:6, 10:30, 10:30] = 1  # 4 slices of a 20x20 square
    assert object_diameters(lab)[0] == pytest.approx(2 * np.sqrt(400 / np.pi))
