import numpy as np
import pytest
import torch

from napari_sparseseg import SparseSegError
from napari_sparseseg.core.data import CropSampler, hold_out, intensity_field, photometric, prepare, relabel_consecutive


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




def test_intensity_field_is_a_smooth_gain_shared_by_channels():
    x = torch.ones(2, 3, 64, 64)
    g = torch.Generator().manual_seed(0)
    sigma = torch.tensor([0.0, 0.35]).reshape(2, 1, 1, 1)
    y = intensity_field(x, sigma, g)
    assert torch.allclose(y[0], x[0])  # sigma 0: untouched
    gain = y[1]
    assert torch.allclose(gain[0], gain[1]) and torch.allclose(gain[0], gain[2])
    assert (gain > 0).all()
    # objects far apart in one crop get different brightness ...
    assert gain[0].max() / gain[0].min() > 1.2
    # ... while neighbouring pixels barely differ (a field, not noise)
    assert (gain[0, 1:] / gain[0, :-1]).sub(1).abs().max() < 0.1
    # 3D, and a zero stays zero (it is a gain)
    z = intensity_field(torch.zeros(1, 1, 8, 16, 16), torch.full((1, 1, 1, 1, 1), 0.3), g)
    assert z.shape == (1, 1, 8, 16, 16) and (z == 0).all()


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


def _blobs(n, shape=(96, 96)):
    img = np.random.default_rng(0).random((1,) + shape).astype(np.float32)
    lab = np.zeros(shape, int)
    for k in range(n):
        y, x = divmod(k, 6)
        lab[2 + 15 * y:12 + 15 * y, 2 + 15 * x:12 + 15 * x] = k + 1
    return img, lab


@pytest.mark.parametrize("n, fraction, expected", [(1, 0.2, 0), (2, 0.5, 0), (3, 0.2, 1), (7, 0.2, 1),
                                                   (10, 0.2, 2), (10, 0.25, 3), (4, 0.9, 3), (10, 0.0, 0)])
def test_hold_out_counts(n, fraction, expected):
    # at least one from three objects, half up, never all of them, none below three
    samples = prepare(*[[a] for a in _blobs(n)])
    assert hold_out(samples, fraction, seed=0) == expected
    assert len(samples[0].heldout) == expected
    assert set(samples[0].heldout) <= set(range(1, n + 1))


def test_hold_out_spans_images_and_follows_the_seed():
    (img, lab), (img2, lab2) = _blobs(6), _blobs(4)
    picks = set()
    for seed in range(6):
        samples = prepare([img, img2], [lab, lab2])
        assert hold_out(samples, 0.2, seed) == 2  # 20 % of 10 objects over both images
        assert sum(len(s.heldout) for s in samples) == 2
        picks.add(tuple(tuple(s.heldout) for s in samples))
        again = prepare([img, img2], [lab, lab2])
        hold_out(again, 0.2, seed)
        assert [list(s.heldout) for s in again] == [list(s.heldout) for s in samples]
    assert len(picks) > 1


def test_crops_mark_the_held_out_objects():
    img, lab = _blobs(12)
    (s,) = prepare([img], [lab])
    hold_out([s], 0.25, seed=1)
    sampler = CropSampler([s], (32, 32), seed=0, p_object=1.0)
    seen = 0
    for _ in range(40):
        im, lb, val, held = sampler.crop()
        assert held.shape == lb.shape and held.dtype == bool
        assert not held[lb == 0].any()  # only object pixels
        for j in np.unique(lb[lb > 0]):  # an object is held out whole or not at all
            assert held[lb == j].all() or not held[lb == j].any()
        seen += int(held.any())
    assert 0 < seen < 40
    img_b, lab_b, val_b, held_b = sampler.batch(3)
    assert held_b.shape == lab_b.shape and held_b.dtype == torch.bool


def test_object_contrast_fades_around_labeled_objects_without_an_edge():
    from napari_sparseseg.core.data import object_contrast

    img = np.full((1, 60, 60), 0.1, np.float32)
    lab = np.zeros((60, 60), np.int64)
    lab[5:15, 5:15], lab[40:50, 40:50] = 1, 2
    img[0][lab > 0] = 0.5
    out = object_contrast(img, lab, np.random.default_rng(0), gain=3.0, p=1.0)
    assert out.shape == img.shape and out.dtype == np.float32
    # each object's contrast to the median (0.1) is raised by its own factor within [1, 3]
    g1, g2 = (out[0, 10, 10] - 0.1) / 0.4, (out[0, 45, 45] - 0.1) / 0.4
    assert 1 <= g1 <= 3 and 1 <= g2 <= 3 and abs(g1 - g2) > 1e-3
    # an unlabeled object beside a labeled one gets a share of its factor: no edge at the label
    img2 = np.full((1, 40, 40), 0.1, np.float32)
    img2[0, 5:15, 5:25] = 0.5
    lab2 = np.zeros((40, 40), np.int64)
    lab2[5:15, 5:15] = 1
    out2 = object_contrast(img2, lab2, np.random.default_rng(1), gain=3.0, p=1.0)
    step = abs(out2[0, 10, 14] - out2[0, 10, 15])
    assert step < 0.25 * abs(out2[0, 10, 10] - 0.5)
    # p = 0 leaves the crop as it was; the input is never modified
    assert np.array_equal(object_contrast(img, lab, np.random.default_rng(0), 3.0, p=0.0), img)
    assert np.allclose(img[0][lab > 0], 0.5)


def test_object_contrast_dims_down_to_its_lower_bound_and_leaves_held_out_objects_alone():
    from napari_sparseseg.core.data import object_contrast

    img = np.full((1, 80, 80), 0.1, np.float32)
    lab = np.zeros((80, 80), np.int64)
    lab[5:15, 5:15], lab[60:70, 60:70], lab[5:15, 60:70] = 1, 2, 3
    img[0][lab > 0] = 0.5
    factors = []
    for seed in range(20):
        out = object_contrast(img, lab, np.random.default_rng(seed), gain=1.0, p=1.0, low=1 / 3, skip=np.array([3]))
        factors += [(out[0, 10, 10] - 0.1) / 0.4, (out[0, 65, 65] - 0.1) / 0.4]
        # the held-out object keeps its contrast (up to the tails of its neighbours' bumps, which are far)
        assert abs(out[0, 10, 65] - 0.5) < 0.01
    factors = np.array(factors)
    # dimmed only, never below a third: the objects stay apart from the background
    assert factors.min() >= 1 / 3 - 1e-6 and factors.max() <= 1 + 1e-6
    assert factors.min() < 0.5 and np.median(factors) < 0.8
    # both ways at once: log-uniform in [low, gain]
    both = [(object_contrast(img, lab, np.random.default_rng(s), 3.0, p=1.0, low=1 / 3)[0, 10, 10] - 0.1) / 0.4
            for s in range(30)]
    assert min(both) < 1 < max(both) and 1 / 3 - 1e-6 <= min(both) and max(both) <= 3 + 1e-6
