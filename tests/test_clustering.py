import numpy as np
import pytest

from napari_sparseseg import SparseSegError, segment_embeddings
from napari_sparseseg.core.clustering import (
    agreement_filter,
    best_iou,
    default_offsets,
    embeddings_to_affinities,
    mutex_watershed,
    postprocess,
)


def _blocks(shape=(40, 40), d=16, seed=0, noise=0.05):
    """Embeddings of a known partition: background plus three objects, one constant vector each."""
    rng = np.random.default_rng(seed)
    gt = np.zeros(shape, int)
    gt[5:20, 5:20] = 1
    gt[5:20, 20:35] = 2  # touches object 1
    gt[25:35, 10:30] = 3
    centres = 3.0 * np.eye(d)[:4]  # 4.2 apart: more than 2 dd
    emb = centres[gt].transpose(2, 0, 1) + rng.normal(0, noise, (d,) + shape)
    return emb.astype(np.float32), gt


def _same_partition(a, b):
    from napari_sparseseg.core.metrics import evaluate

    return evaluate(a, b)["ap50"] == 1.0


def test_offsets():
    assert default_offsets(2) == [[-1, 0], [0, -1], [-3, 0], [0, -3], [-9, 0], [0, -9], [-27, 0], [0, -27]]
    assert len(default_offsets(3)) == 12


def test_affinity_formula_and_sign():
    emb = np.zeros((2, 1, 3), np.float32)
    emb[0, 0, 1] = 1.0  # distance 1 to both neighbours
    emb[0, 0, 2] = 5.0  # distance 4 = 2 dd to the middle one
    w = embeddings_to_affinities(emb, [[0, -1]], delta_dist=2.0)
    # w = 1 - max((4 - d) / 4, 0)^2 ; pixel 0 has no left neighbour -> 0
    assert w[0, 0].tolist() == pytest.approx([0.0, 1 - (3 / 4) ** 2, 1.0])


def test_mws_recovers_partition_2d():
    emb, gt = _blocks()
    seg = segment_embeddings(emb, "mws")
    assert seg[0, 0] == 0  # the largest segment (background) is 0
    assert _same_partition(seg, gt)


def test_mws_3d():
    emb, gt = _blocks()
    emb3, gt3 = np.stack([emb] * 4, axis=1), np.stack([gt] * 4)
    seg = segment_embeddings(emb3, "mws")
    assert seg.shape == gt3.shape and _same_partition(seg, gt3)


def test_bias_trades_split_against_merge():
    rng = np.random.default_rng(1)
    emb = np.zeros((16, 30, 30), np.float32)
    emb[0, :, 15:] = 3.0  # two halves 3 apart: repulsion 0.94, attraction 0.06 across
    emb += rng.normal(0, 0.02, emb.shape).astype(np.float32)
    assert segment_embeddings(emb, "mws", background="none").max() == 2
    assert segment_embeddings(emb, "mws", bias=-0.6, background="none").max() == 1
    emb[0, :, 15:] = 1.0  # close: merged by default, split with a positive bias
    assert segment_embeddings(emb, "mws", background="none").max() == 1
    assert segment_embeddings(emb, "mws", bias=0.3, background="none").max() == 2


def test_background_none_keeps_all_and_min_size():
    emb, gt = _blocks()
    seg = segment_embeddings(emb, "mws", background="none")
    assert seg.min() == 1 and seg.max() == 4
    small = np.zeros((10, 10), int)
    small[:5] = 1
    small[5:] = 2
    small[0, 0] = 3
    out = postprocess(small, min_size=2, background="none")
    assert out.max() == 2 and out[0, 0] == 1  # speck filled from its neighbour
    out = postprocess(small, min_size=2, background="largest")
    assert out[0, 0] == 0 and out.max() == 1


def _bridged(d=16, seed=0):
    """Two objects with the same embedding joined by a thin bridge that has it too."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((30, 40), int)
    lab[10:20, 5:15] = 1
    lab[10:20, 25:35] = 2
    lab[14:16, 15:25] = 3  # the bridge
    centres = np.zeros((4, d))
    centres[1:, 1] = 3.0  # objects and bridge alike, 3 away from the background
    emb = centres[lab].transpose(2, 0, 1) + rng.normal(0, 0.05, (d,) + lab.shape)
    return emb.astype(np.float32), lab


def test_foreground_mask():
    emb, gt = _blocks()
    mask = gt != 3
    seg = segment_embeddings(emb, "mws", mask=mask, background="none")
    assert np.all(seg[~mask] == 0)


def test_foreground_mask_reaches_the_mutex_watershed():
    emb, lab = _bridged()
    mask = lab != 3
    # elf's mutex watershed itself leaves masked pixels 0 and cuts the graph there
    seg = mutex_watershed(emb, mask=mask)
    assert np.all(seg[~mask] == 0) and np.all(seg[mask] > 0)
    a, b = np.unique(seg[lab == 1]), np.unique(seg[lab == 2])
    assert a.size == 1 and b.size == 1 and a[0] != b[0]
    # without the mask the bridge joins both objects into one segment
    joined = mutex_watershed(emb)
    assert np.unique(joined[(lab == 1) | (lab == 2) | (lab == 3)]).size == 1
    # through segment_embeddings: two objects, not one object in two pieces (which is what
    # masking only in the post-processing would give)
    for background in ("none", "largest"):
        seg = segment_embeddings(emb, "mws", mask=mask, background=background)
        a, b = np.unique(seg[lab == 1]), np.unique(seg[lab == 2])
        assert np.all(seg[~mask] == 0)
        assert a.size == 1 and b.size == 1 and a[0] > 0 and b[0] > 0 and a[0] != b[0], background


def test_hdbscan_and_meanshift_and_consistency():
    emb, gt = _blocks((40, 40), noise=0.02)
    sub = (slice(None), slice(None, None, 2), slice(None, None, 2))
    e, g = emb[sub], gt[::2, ::2]
    assert _same_partition(segment_embeddings(e, "hdbscan", min_size=10), g)
    assert _same_partition(segment_embeddings(e, "meanshift"), g)
    # consistency: identical g keeps every cluster; a g that scatters object 3 drops it
    assert _same_partition(segment_embeddings(e, "consistency", embeddings_g=e), g)
    eg = e.copy()
    eg[:, g == 3] += np.random.default_rng(0).normal(0, 3, (e.shape[0], int((g == 3).sum())))
    seg = segment_embeddings(e, "consistency", embeddings_g=eg)
    assert np.all(seg[g == 3] == 0) and np.all(seg[g == 1] > 0)


def test_best_iou_and_agreement_filter_on_hand_made_segmentations():
    f = np.array([[1, 1, 2, 2],
                  [1, 1, 2, 2],
                  [3, 3, 3, 3]])
    g = np.array([[1, 1, 2, 2],
                  [1, 1, 2, 5],
                  [4, 4, 6, 6]])
    best = best_iou(f, g)
    assert best[1] == 1.0 and best[2] == pytest.approx(3 / 4) and best[3] == pytest.approx(2 / 4)
    out = agreement_filter(f, g, 0.7)
    assert np.array_equal(out, np.where(f == 3, 0, f))  # the segment g cuts in two is dropped
    assert np.array_equal(agreement_filter(f, g, 0.0), f)


def test_mws_agreement_drops_segments_the_ema_network_cuts_differently():
    emb, gt = _blocks()
    # identical g: every object kept
    assert _same_partition(segment_embeddings(emb, "mws", embeddings_g=emb, agreement=0.7), gt)
    # a g that splits object 3 into two halves: object 3 is dropped, the others stay
    eg = emb.copy()
    half = (gt == 3) & (np.arange(40)[None, :] >= 20)
    eg[:, half] += 6.0 * np.eye(emb.shape[0])[5][:, None]
    seg = segment_embeddings(emb, "mws", embeddings_g=eg, agreement=0.7)
    assert np.all(seg[gt == 3] == 0)
    assert all(len(np.unique(seg[gt == k])) == 1 and seg[gt == k][0] > 0 for k in (1, 2))
    # off: f alone
    assert _same_partition(segment_embeddings(emb, "mws", embeddings_g=eg, agreement=0), gt)


def test_errors_name_the_input():
    with pytest.raises(SparseSegError, match=r"embeddings: expected a float array shaped \(D, Y, X\)"):
        segment_embeddings(np.zeros((4, 4), np.float32))
    with pytest.raises(SparseSegError, match="clustering method 'kmeans'"):
        segment_embeddings(np.zeros((2, 4, 4), np.float32), "kmeans")
    with pytest.raises(SparseSegError, match="consistency clustering needs embeddings_g"):
        segment_embeddings(np.zeros((2, 4, 4), np.float32), "consistency")
    with pytest.raises(SparseSegError, match="agreement filtering needs embeddings_g"):
        segment_embeddings(np.zeros((2, 4, 4), np.float32), agreement=0.7)
    with pytest.raises(SparseSegError, match=r"embeddings_g: shape \(2, 3, 3\) does not match"):
        segment_embeddings(np.zeros((2, 4, 4), np.float32), embeddings_g=np.zeros((2, 3, 3), np.float32), agreement=0.7)
    with pytest.raises(SparseSegError, match=r"agreement: expected an IoU threshold in \[0, 1\], got 1.5"):
        segment_embeddings(np.zeros((2, 4, 4), np.float32), embeddings_g=np.zeros((2, 4, 4), np.float32), agreement=1.5)
    with pytest.raises(SparseSegError, match="mask: shape"):
        segment_embeddings(np.zeros((2, 4, 4), np.float32), mask=np.ones((3, 3), bool))


def test_offsets_longer_than_the_image_are_skipped():
    emb, gt = _blocks((20, 40))  # 27 > 20 rows
    seg = segment_embeddings(emb, "mws")
    assert seg.shape == (20, 40)
    w = embeddings_to_affinities(emb, default_offsets(2))
    assert np.all(w[6] == 0)  # the (-27, 0) channel has no edges


def test_agreement_filter_runs_after_the_background_rule():
    # g cuts the background (the largest segment) in two, so the filter drops f's background. Were
    # the largest-segment rule applied after the filter, it would then delete a real object.
    emb, gt = _blocks()
    emb_g = emb.copy()
    half = (gt == 0) & (np.arange(40)[None, :] >= 20)
    emb_g[:, half] += 3.0 * np.eye(16)[5][:, None]  # g's background: two halves, IoU with f's about 1/2
    seg = segment_embeddings(emb, "mws", embeddings_g=emb_g, agreement=0.8, background="largest")
    assert seg.max() == 3 and _same_partition(seg, gt)


def test_foreground_rule_decides_per_segment():
    emb, gt = _blocks()
    prob = np.where(gt > 0, 0.6, 0.05)
    prob[5:20, 5:8] = 0.05  # a third of object 1 looks like background: its mean is still high
    seg = segment_embeddings(emb, "mws", background="foreground", foreground=prob, fg_threshold=0.3)
    assert _same_partition(seg, gt) and (seg[5:20, 5:8] > 0).all()
    prob[25:35, 10:30] = 0.2  # object 3 as a whole is below the threshold
    seg = segment_embeddings(emb, "mws", background="foreground", foreground=prob, fg_threshold=0.3)
    assert seg.max() == 2 and (seg[25:35, 10:30] == 0).all()
    with pytest.raises(SparseSegError, match="background 'foreground' needs the foreground probability"):
        segment_embeddings(emb, "mws", background="foreground")


def test_prediction_cache_serves_the_same_key_and_never_lacks_g():
    from napari_sparseseg.core.prediction import Prediction
    from napari_sparseseg.core.segment import Embedded, PredictionCache

    pred = Prediction(np.zeros((2, 4, 4), np.float32), None, 1.0, (4, 4))
    cache = PredictionCache()
    assert cache.get("a") is None
    f_only = Embedded(pred)
    cache.put(("img", 1, 30.0), f_only, extra="box")
    assert cache.get(("img", 1, 30.0)) is f_only and cache.extra == "box"
    assert cache.get(("img", 1, 30.0), need_g=True) is None  # a choice that needs g is predicted again
    assert cache.get(("img", 2, 30.0)) is None  # another model iteration / diameter / image
    both = Embedded(pred, pred)
    cache.put(("img", 1, 30.0), both)
    assert cache.get(("img", 1, 30.0), need_g=True) is both and cache.get(("img", 1, 30.0)) is both
    cache.clear()
    assert cache.get(("img", 1, 30.0)) is None and cache.extra is None


def test_mws_on_weights_leaves_the_callers_weights_as_they_were():
    # elf's mutex watershed flips the attractive channels of its input in place; a caller that
    # clusters one weight array twice (a knob changed) must get the same segmentation twice
    from napari_sparseseg.core.clustering import mws_on_weights

    w = np.random.default_rng(0).random((4, 24, 24)).astype(np.float32)
    before = w.copy()
    offsets = [[-1, 0], [0, -1], [-3, 0], [0, -3]]
    first = mws_on_weights(w, offsets, 0.0)
    np.testing.assert_array_equal(w, before)
    np.testing.assert_array_equal(mws_on_weights(w, offsets, 0.0), first)
