import numpy as np
import pytest

from napari_sparseseg.core.metrics import KEYS, evaluate, mean_scores


def test_perfect_prediction():
    gt = np.zeros((20, 20), int)
    gt[2:8, 2:8] = 1
    gt[10:18, 10:18] = 2
    pred = np.where(gt > 0, gt + 10, 0)  # ids need not match
    s = evaluate(pred, gt)
    for k in ("sbd", "ap50", "map", "f1", "aji", "pq"):
        assert s[k] == pytest.approx(1.0)
    assert s["abs_dic"] == 0 and s["arand"] == pytest.approx(0.0, abs=1e-9)
    assert s["voi_split"] == pytest.approx(0.0, abs=1e-9) and s["voi_merge"] == pytest.approx(0.0, abs=1e-9)


def test_hand_made_case():
    gt = np.zeros((10, 10), int)
    gt[0:4, 0:5] = 1  # 20 px
    gt[6:10, 0:5] = 2  # 20 px
    pred = np.zeros((10, 10), int)
    pred[0:4, 0:4] = 1  # 16 px inside gt 1: IoU 0.8, Dice 32/36
    pred[6:10, 0:2] = 2  # 8 px inside gt 2: IoU 0.4
    pred[0:2, 7:10] = 3  # 6 px on background: false positive
    s = evaluate(pred, gt)
    # best Dice gt->pred: (32/36 + 16/28) / 2 ; pred->gt: (32/36 + 16/28 + 0) / 3
    bd_gt = (32 / 36 + 16 / 28) / 2
    bd_pred = (32 / 36 + 16 / 28 + 0) / 3
    assert s["sbd"] == pytest.approx(min(bd_gt, bd_pred))
    assert s["abs_dic"] == 1
    # one match at IoU > 0.5: TP 1, FP 2, FN 1
    assert s["ap50"] == pytest.approx(1 / 4)
    assert s["f1"] == pytest.approx(2 / (2 + 2 + 1))
    assert s["pq"] == pytest.approx(0.8 / (1 + 1 + 0.5))
    # AJI: (16 + 8) / (20 + 20 + 6)
    assert s["aji"] == pytest.approx(24 / 46)
    # mAP: matched at 0.5..0.75 (IoU 0.8 > t), not from 0.8 on
    assert s["map"] == pytest.approx(6 * 0.25 / 10)


def test_background_is_never_an_object_and_gt_zero_ignored_for_rand():
    gt = np.zeros((10, 10), int)
    gt[:5] = 1
    pred = np.zeros((10, 10), int)
    pred[:5] = 1
    pred[5:] = 2  # covers gt background only: a false positive for AP, ignored by Rand/VOI
    s = evaluate(pred, gt)
    assert s["ap50"] == pytest.approx(0.5)
    assert s["arand"] == pytest.approx(0.0, abs=1e-9)


def test_split_and_merge_directions():
    gt = np.zeros((10, 10), int)
    gt[:, :5] = 1
    gt[:, 5:] = 2
    merged = np.ones((10, 10), int)
    split = np.arange(100).reshape(10, 10) // 25 + 1
    assert evaluate(merged, gt)["voi_merge"] > 0.5
    assert evaluate(merged, gt)["voi_split"] == pytest.approx(0.0, abs=1e-9)
    assert evaluate(split, gt)["voi_split"] > 0.5


def test_shape_mismatch_message():
    with pytest.raises(ValueError, match=r"prediction shape \(4, 4\) does not match ground-truth shape \(5, 5\)"):
        evaluate(np.zeros((4, 4), int), np.zeros((5, 5), int))


def test_mean_scores_keys():
    gt = np.zeros((5, 5), int)
    gt[1:3, 1:3] = 1
    m = mean_scores([evaluate(gt, gt), evaluate(np.zeros_like(gt), gt)])
    assert set(m) == set(KEYS)
    assert m["sbd"] == pytest.approx(0.5)


def test_aji_unmatched_ground_truth_adds_only_its_own_area():
    """Kumar et al. 2017: a true object that no prediction overlaps adds its own area to the
    union and uses no prediction; unused predictions are added once at the end."""
    gt = np.zeros((10, 10), int)
    gt[0:4, 0:5] = 1  # 20 px
    gt[6:10, 0:5] = 2  # 20 px, no prediction overlaps it
    pred = np.zeros((10, 10), int)
    pred[0:4, 0:4] = 1  # 16 px inside gt 1
    pred[0:2, 7:10] = 2  # 6 px on background: unused, added once
    # intersection 16; union |G1 u P1| = 20, |G2| = 20, unused P2 = 6
    assert evaluate(pred, gt)["aji"] == pytest.approx(16 / 46)
    # swapping the prediction ids must not change the score
    swapped = np.where(pred == 1, 2, np.where(pred == 2, 1, 0))
    assert evaluate(swapped, gt)["aji"] == pytest.approx(16 / 46)


def test_aji_does_not_depend_on_prediction_ids():
    gt = np.zeros((12, 12), int)
    gt[0:3, 0:3] = 1  # 9 px, overlapped by pred a
    gt[5:8, 5:8] = 2  # 9 px, no overlap
    gt[9:12, 0:4] = 3  # 12 px, no overlap
    pred = np.zeros((12, 12), int)
    pred[0:3, 0:2] = 1  # a: 6 px inside gt 1
    pred[0:2, 9:12] = 2  # b: 6 px on background
    pred[9:12, 9:12] = 3  # c: 9 px on background
    expected = 6 / (9 + 9 + 12 + 6 + 9)
    for perm in ([1, 2, 3], [2, 1, 3], [3, 2, 1], [2, 3, 1], [3, 1, 2], [1, 3, 2]):
        relabeled = np.zeros_like(pred)
        for old, new in zip((1, 2, 3), perm):
            relabeled[pred == old] = new * 7  # non-consecutive ids too
        assert evaluate(relabeled, gt)["aji"] == pytest.approx(expected), perm


def test_aji_prediction_matching_nothing_is_not_counted_twice():
    gt = np.zeros((10, 10), int)
    gt[0:5, 0:5] = 1  # 25 px
    gt[6:10, 6:10] = 2  # 16 px, no overlap
    pred = np.zeros((10, 10), int)
    pred[0:5, 0:5] = 1  # equals gt 1
    # 25 / (25 + 16): the matched prediction enters the union once, through gt 1 only
    assert evaluate(pred, gt)["aji"] == pytest.approx(25 / 41)
