"""'Where to label next': the uncertainty of each method and the ranking of predicted objects."""

import numpy as np
import pytest
import torch

from napari_sparseseg import SparseSegError, TrainConfig, Trainer
from napari_sparseseg.core.checkpoint import Model
from napari_sparseseg.core.clustering import cosine_affinities
from napari_sparseseg.core.prediction import Prediction
from napari_sparseseg.core.segment import Embedded
from napari_sparseseg.core.suggest import (Suggestion, _overlap, interleave, missed_objects, pair_inside, suggest,
                                          suggest_for_image, uncertainty)

OFFSETS = [[-1, 0], [0, -1], [-3, 0], [0, -3]]


def _segmentation():
    seg = np.zeros((20, 30), np.int32)
    seg[2:8, 2:8], seg[2:8, 12:18], seg[12:18, 2:8], seg[12:18, 12:28] = 1, 2, 3, 4
    return seg


def test_suggest_ranks_unannotated_segments_by_mean_uncertainty():
    seg = _segmentation()
    u = np.zeros(seg.shape, np.float32)
    u[seg == 1], u[seg == 2], u[seg == 3], u[seg == 4] = 0.9, 0.5, 0.7, 0.1
    u[0, 0] = 1.0  # background pixels never make a suggestion
    annotation = np.zeros_like(seg)
    annotation[3:7, 3:7] = 5  # segment 1 (the most uncertain) is painted already
    got = suggest(u, seg, annotation, n=2)
    assert [s.label for s in got] == [3, 2]
    assert got[0].score == pytest.approx(0.7) and got[0].size == 36
    assert got[0].centroid == pytest.approx((14.5, 4.5)) and got[0].start == (12, 2) and got[0].stop == (18, 8)
    assert [s.label for s in suggest(u, seg, None, n=10)] == [1, 3, 2, 4]
    assert suggest(u, np.zeros_like(seg)) == []


def test_suggest_leaves_out_fragments_and_spreads_out():
    seg = _segmentation()
    seg[9, 20] = 5  # a one-pixel fragment, the most uncertain segment of all
    seg[2:8, 20:26] = 6  # beside nothing: a box of its own
    u = np.zeros(seg.shape, np.float32)
    u[seg == 5], u[seg == 1], u[seg == 4], u[seg == 6], u[seg == 2], u[seg == 3] = 1.0, 0.9, 0.8, 0.6, 0.5, 0.4
    seg[8, 2:28], seg[2:8, 9:11] = 7, 7  # a thin segment whose box covers segments 1, 2 and 6
    u[seg == 7] = 0.85
    got = [s.label for s in suggest(u, seg, None, n=6)]
    assert 5 not in got  # smaller than a quarter of the median segment
    # 4 (0.8, 96 px) is 2.7 times the median segment (36 px): ranked as 0.8 * 36 / 96 = 0.3;
    # 7 (0.85) overlaps 1's box: listed after the spread-out ones
    assert got == [1, 6, 2, 3, 4, 7]
    annotation = np.zeros_like(seg)
    annotation[12:18, 2:8] = 1  # a painted object of 36 px: fragments are now judged against it
    assert [s.label for s in suggest(u, seg, annotation, n=3)] == [1, 6, 2]


def test_suggest_ranks_typical_objects_before_clumps():
    seg = np.zeros((40, 40), np.int32)
    seg[2:8, 2:8], seg[2:8, 12:18], seg[12:18, 2:8] = 1, 2, 3  # 36 px each, the size painted
    seg[22:38, 22:38] = 4  # a clump of 256 px, 7 times a painted object
    u = np.zeros(seg.shape, np.float32)
    u[seg == 4], u[seg == 2], u[seg == 3] = 0.9, 0.5, 0.2
    annotation = np.zeros_like(seg)
    annotation[2:8, 2:8] = 1
    got = suggest(u, seg, annotation, n=3)
    # mean uncertainty times min(size, painted) / max(size, painted): 0.5, 0.2, 0.9 * 36 / 256 = 0.13
    assert [s.label for s in got] == [2, 3, 4]
    assert got[2].score == pytest.approx(0.9)  # the score shown stays the mean uncertainty


def test_suggest_checks_shapes():
    seg = _segmentation()
    with pytest.raises(SparseSegError, match=r"uncertainty: shape \(20, 29\) does not match"):
        suggest(np.zeros((20, 29)), seg)
    with pytest.raises(SparseSegError, match=r"annotation: shape \(2, 2\) does not match the image's \(20, 30\)"):
        suggest(np.zeros(seg.shape), seg, np.zeros((2, 2)))


def _crac_prediction(aff):
    emb = np.random.default_rng(0).normal(size=(4, 20, 30)).astype(np.float32)
    return emb, Prediction(emb, None, 1.0, (20, 30), aff(emb))


def test_crac_uncertainty_is_the_disagreement_of_implicit_and_explicit_affinities():
    model = Model(net=None, config={"offsets": OFFSETS})
    emb, agree = _crac_prediction(lambda e: cosine_affinities(e, OFFSETS))
    u, _ = uncertainty(model, None, embedded=Embedded(agree))
    assert u.shape == (20, 30) and np.allclose(u, 0.0)
    _, opposite = _crac_prediction(lambda e: 1.0 - cosine_affinities(e, OFFSETS))
    u, _ = uncertainty(model, None, embedded=Embedded(opposite))
    inside = pair_inside(OFFSETS, (20, 30))
    expected = (np.abs(1.0 - 2.0 * cosine_affinities(emb, OFFSETS)) * inside).sum(0) / np.maximum(inside.sum(0), 1)
    assert np.allclose(u, expected, atol=1e-6) and u.max() > 0.5


def test_pairs_leaving_the_image_do_not_count():
    """The explicit map calls edges that leave the image 1 by convention; whatever the head says
    there is no disagreement (it made every suggestion an object on the image border)."""
    model = Model(net=None, config={"offsets": OFFSETS})
    emb, pred = _crac_prediction(lambda e: np.where(pair_inside(OFFSETS, (20, 30)), cosine_affinities(e, OFFSETS), 0.0))
    u, _ = uncertainty(model, None, embedded=Embedded(pred))
    assert np.allclose(u, 0.0)
    assert pair_inside([[0, -3]], (2, 5)).tolist() == [[[False, False, False, True, True]] * 2]


def test_a_model_with_nothing_to_compare_is_refused():
    emb = np.zeros((4, 20, 30), np.float32)
    with pytest.raises(SparseSegError, match="neither an EMA network nor an affinity head"):
        uncertainty(Model(net=None, config={}), None, embedded=Embedded(Prediction(emb, None, 1.0, (20, 30))))


@pytest.fixture(scope="module")
def spoco_model(cells2d, tmp_path_factory):
    img, gt = cells2d[0]
    sparse = np.where(np.isin(gt, np.unique(gt)[1:4]), gt, 0)
    cfg = TrainConfig(method="spoco", iterations=6, batch_size=1, patch_shape=(64, 64), base_channels=8, depth=3,
                      checkpoint_every=1e9, seed=0)
    trainer = Trainer([img], [sparse], cfg, out=tmp_path_factory.mktemp("m"))
    for _ in trainer.run():
        pass
    return trainer.model, img, sparse


def test_spoco_uncertainty_is_zero_when_f_and_g_agree_and_grows_as_they_part(spoco_model):
    model, img, sparse = spoco_model
    model.ema.load_state_dict(model.net.state_dict())
    u, embedded = uncertainty(model, img, device="cpu")
    assert embedded.g is not None and u.shape == img.shape and np.allclose(u, 0.0, atol=1e-6)
    with torch.no_grad():
        for p in model.ema.parameters():
            p.add_(0.05 * torch.randn_like(p))
    u, _ = uncertainty(model, img, device="cpu")
    assert 0.0 < u.mean() <= 1.0


def test_suggest_for_image_returns_map_segmentation_and_unpainted_objects(spoco_model):
    model, img, sparse = spoco_model
    u, seg, got = suggest_for_image(model, img, sparse, n=3, device="cpu")
    assert u.shape == seg.shape == img.shape and len(got) <= 3
    for s in got:
        box = tuple(slice(a, b) for a, b in zip(s.start, s.stop))
        assert s.mask.shape == seg[box].shape and s.mask.sum() == s.size
        assert np.mean(sparse[box][s.mask] > 0) < 0.2
        if s.kind == "uncertain":
            assert np.array_equal(s.mask, seg[box] == s.label)
        else:  # a segment the foreground head dropped (the segmentation may keep it: core.rescue)
            assert s.kind == "background"
    with pytest.raises(SparseSegError, match=r"annotation: shape \(5, \d+\) does not match the image's"):
        suggest_for_image(model, img, sparse[:5], n=3, device="cpu")
    got = [s for s in got if s.kind == "uncertain"]
    spread = [s for i, s in enumerate(got) if not any(_overlap(s, t) for t in got[:i])]
    assert got[:len(spread)] == spread  # crowded ones come last
    assert [s.score for s in spread] == sorted((s.score for s in spread), reverse=True)


def _disc(shape, centre, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= r * r


def test_missed_objects_are_dropped_segments_that_stand_out_like_the_painted_ones():
    shape = (80, 100)
    img = np.full(shape, 0.1, np.float32)
    annotation, segmentation, candidates = (np.zeros(shape, np.int32) for _ in range(3))
    for k, c in enumerate([(15, 15), (15, 45)], start=1):  # two painted objects, dim
        img[_disc(shape, c, 7)] = 0.4
        annotation[_disc(shape, c, 7)] = k
        segmentation[_disc(shape, c, 7)] = candidates[_disc(shape, c, 7)] = k
    img[_disc(shape, (50, 20), 7)] = 0.9  # a bright object the head dropped: suggested
    candidates[_disc(shape, (50, 20), 7)] = 3
    img[_disc(shape, (50, 60), 7)] = 0.12  # a background piece of the same size, hardly standing out: not
    candidates[_disc(shape, (50, 60), 7)] = 4
    img[_disc(shape, (70, 50), 7)] = 0.6  # dropped, brighter, but not twice as contrasted (1.7x): not
    candidates[_disc(shape, (70, 50), 7)] = 7
    img[70:72, 90:92] = 1.0  # a bright speck: a fragment, not
    candidates[70:72, 90:92] = 5
    img[_disc(shape, (30, 80), 7)] = 0.9  # bright, but the segmentation has it: not
    segmentation[_disc(shape, (30, 80), 7)] = candidates[_disc(shape, (30, 80), 7)] = 6
    got = missed_objects(img, candidates, segmentation, annotation, n=5)
    assert [(s.label, s.kind) for s in got] == [(3, "background")]
    assert got[0].centroid == pytest.approx((50, 20), abs=0.5) and got[0].size == int(_disc(shape, (50, 20), 7).sum())
    assert np.array_equal(got[0].mask, candidates[got[0].start[0]:got[0].stop[0], got[0].start[1]:got[0].stop[1]] == 3)
    # channels last work the same; nothing painted: no reference, nothing suggested
    assert [s.label for s in missed_objects(np.stack([img, img], -1), candidates, segmentation, annotation, 5)] == [3]
    assert missed_objects(img, candidates, segmentation, np.zeros(shape, np.int32), 5) == []
    with pytest.raises(SparseSegError, match=r"image: shape \(3, 3\) does not match the segmentation's \(80, 100\)"):
        missed_objects(np.zeros((3, 3)), candidates, segmentation, annotation, 5)


def test_interleave_puts_one_dropped_segment_in_each_five_places():
    def mk(label, kind):
        return Suggestion(label, 0.5, (0.0, 0.0), (0, 0), (1, 1), 1, kind=kind)

    missed = [mk(10, "background"), mk(11, "background")]
    uncertain = [mk(i, "uncertain") for i in range(1, 7)]
    assert [s.label for s in interleave(missed, uncertain, 5)] == [10, 1, 2, 3, 4]
    assert [s.label for s in interleave(missed, uncertain, 20)] == [10, 1, 2, 3, 4, 11, 5, 6]
    assert [s.label for s in interleave(missed, [], 5)] == [10, 11]
    assert [s.label for s in interleave([], uncertain, 3)] == [1, 2, 3]


def test_a_dropped_segment_the_segmentation_keeps_is_listed_once(monkeypatch):
    import napari_sparseseg.core.suggest as S

    shape = (40, 60)
    seg = np.zeros(shape, np.int64)
    seg[5:15, 5:15], seg[20:30, 30:40], seg[5:15, 40:50] = 1, 2, 3  # 2: kept by the rescue
    u = np.full(shape, 0.1, np.float32)
    u[20:30, 30:40] = 0.9  # the rescued one is also the most uncertain segment
    pred = type("P", (), {"foreground": np.ones(shape, np.float32)})()
    monkeypatch.setattr(S, "uncertainty", lambda *a, **k: (u, S.Embedded(pred)))
    monkeypatch.setattr(S, "cluster", lambda *a, **k: seg)
    monkeypatch.setattr(S, "resolve_background", lambda config: "foreground")
    monkeypatch.setattr(S, "dense_reason", lambda *a, **k: "")
    mask = np.ones((10, 10), bool)
    dropped = S.Suggestion(7, 0.9, (24.5, 34.5), (20, 30), (30, 40), 100, kind="background", mask=mask)
    monkeypatch.setattr(S, "missed_objects", lambda *a, **k: [dropped])
    model = Model(net=None, config={})
    _, _, got = S.suggest_for_image(model, np.zeros(shape, np.float32), np.zeros(shape, np.int32), n=5)
    assert [(s.label, s.kind) for s in got] == [(7, "background"), (1, "uncertain"), (3, "uncertain")]
