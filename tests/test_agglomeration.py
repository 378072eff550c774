"""Multicut on superpixels of the learned weights (core.agglomeration) and its place in clustering."""

import numpy as np
import pytest
from scipy import ndimage
from skimage.segmentation import find_boundaries

from napari_sparseseg.core import agglomeration as A
from napari_sparseseg.core.clustering import mutex_watershed, segment_embeddings
from napari_sparseseg.core.errors import SparseSegError
from napari_sparseseg.core.metrics import evaluate
from napari_sparseseg.core.offsets import default_offsets
from napari_sparseseg.core.segment import DENSE_CONTRAST, DENSE_FRACTION, DENSE_INTERIOR, choose_clustering, is_dense


def _weights(lab: np.ndarray, offsets, noise: float = 0.0, seed: int = 0, flips: float = 0.0) -> np.ndarray:
    """Disaffinities from a label image (1 across a label change), plus Gaussian noise and a
    fraction ``flips`` of the long-range weights set to 1 (spurious repulsion)."""
    w = np.zeros((len(offsets),) + lab.shape, np.float32)
    for c, off in enumerate(offsets):
        if any(abs(o) >= s for o, s in zip(off, lab.shape)):
            continue
        src = tuple(slice(max(0, -o), s - max(0, o)) for o, s in zip(off, lab.shape))
        dst = tuple(slice(max(0, o), s - max(0, -o)) for o, s in zip(off, lab.shape))
        w[(c,) + src] = lab[src] != lab[dst]
    rng = np.random.default_rng(seed)
    if noise:
        w += rng.normal(0, noise, w.shape).astype(np.float32)
    if flips:
        nd = lab.ndim
        w[nd:][rng.random(w[nd:].shape) < flips] = 1
    return np.clip(w, 0, 1)


def _blocks(shape=(64, 64), n=4) -> np.ndarray:
    lab = np.zeros(shape, np.int64)
    step = shape[0] // n
    for i in range(n):
        for j in range(n):
            lab[i * step:(i + 1) * step, j * step:(j + 1) * step] = i * n + j + 1
    return lab


def test_boundary_map_marks_both_sides_of_a_boundary():
    lab = np.zeros((5, 6), np.int64)
    lab[:, 3:] = 1
    offsets = default_offsets(2)
    b = A.boundary_map(_weights(lab, offsets), offsets)
    expect = np.zeros((5, 6), np.float32)
    expect[:, 2:4] = 1  # the pixel left of the cut sees it through its right neighbour
    np.testing.assert_array_equal(b, expect)


def test_boundary_map_3d_z_boundary():
    lab = np.zeros((4, 3, 3), np.int64)
    lab[2:] = 1
    offsets = default_offsets(3)
    b = A.boundary_map(_weights(lab, offsets), offsets)
    assert b[1].min() == 1 and b[2].min() == 1 and b[0].max() == 0 and b[3].max() == 0


@pytest.mark.parametrize("shape", [(64, 64), (16, 48, 48)])
def test_multicut_recovers_objects_from_noisy_weights(shape):
    lab = _blocks(shape[-2:], 4)
    if len(shape) == 3:
        lab = np.repeat(lab[None], shape[0], axis=0)
    offsets = default_offsets(len(shape))
    w = _weights(lab, offsets, noise=0.2, flips=0.02)
    seg = A.multicut_segmentation(w, offsets)
    s = evaluate(seg, lab)
    assert s["arand"] < 0.05, s
    assert abs(len(np.unique(seg)) - 16) <= 1
    # a few spurious long-range repulsions cut the mutex watershed's objects into pieces
    emb = np.zeros((2,) + shape, np.float32)
    mws = mutex_watershed(emb, offsets, affinities=1 - w, affinity_mix=1.0)
    assert len(np.unique(mws)) > 2 * 16


def test_multicut_bias_splits_more():
    lab = _blocks()
    offsets = default_offsets(2)
    w = _weights(lab, offsets, noise=0.35, seed=1)
    n = [len(np.unique(A.multicut_segmentation(w, offsets, bias))) for bias in (-0.2, 0.0, 0.2)]
    assert n[0] <= n[1] <= n[2] and n[0] < n[2]


def test_multicut_mask_never_bridges_objects():
    # two halves that the weights call one object, separated by a masked-out strip
    lab = np.ones((32, 32), np.int64)
    offsets = default_offsets(2)
    w = _weights(lab, offsets)
    mask = np.ones((32, 32), bool)
    mask[:, 14:18] = False
    seg = A.multicut_segmentation(w, offsets, mask=mask)
    assert (seg[~mask] == 0).all()
    left, right = np.unique(seg[:, :14]), np.unique(seg[:, 18:])
    assert len(left) == 1 and len(right) == 1 and left[0] != right[0] and 0 not in (left[0], right[0])
    assert not A.multicut_segmentation(w, offsets, mask=np.zeros((32, 32), bool)).any()


def test_multicut_errors_name_the_input():
    offsets = default_offsets(2)
    with pytest.raises(SparseSegError, match=r"weights: expected one channel per offset \(8, \*S\), got \(3, 8, 8\)"):
        A.multicut_segmentation(np.zeros((3, 8, 8), np.float32), offsets)
    with pytest.raises(SparseSegError, match=r"bias: expected a value in \(-0.5, 0.5\) for the multicut, got 0.7"):
        A.multicut_segmentation(np.zeros((8, 8, 8), np.float32), offsets, bias=0.7)


def test_segment_embeddings_multicut_with_background_rule():
    lab = _blocks()
    lab[lab == 6] = 0  # a background region the foreground says is background
    offsets = default_offsets(2)
    emb = np.zeros((2, 64, 64), np.float32)
    fg = (lab > 0).astype(np.float32)
    seg = segment_embeddings(emb, "multicut", offsets=offsets, affinities=1 - _weights(lab, offsets),
                             affinity_mix=1.0, attractive_mix=1.0, background="foreground", foreground=fg,
                             fg_threshold=0.5)
    assert (seg[lab == 0] == 0).all()
    assert evaluate(seg, lab)["arand"] < 0.02


def test_auto_clustering_follows_the_foreground_fraction():
    fg = np.zeros((10, 10), np.float32)
    fg[:, : int(10 * DENSE_FRACTION)] = 0.9  # exactly the dense fraction is foreground
    assert choose_clustering("auto", fg, 0.5) == "multicut"
    fg[0, 0] = 0.1
    assert choose_clustering("auto", fg, 0.5) == "mws"  # objects on a background
    assert choose_clustering("auto", None, None) == "mws"  # no foreground head
    assert choose_clustering("hdbscan", fg, 0.5) == "hdbscan"  # a named method is kept
    with pytest.raises(SparseSegError, match="clustering method 'waterz': expected one of auto, mws, multicut"):
        choose_clustering("waterz", fg, 0.5)


def test_auto_clustering_calls_an_annotation_that_looks_like_dense_tissue_dense():
    """A head that rejects the cells it was not shown leaves little foreground; an annotation whose
    objects look like their surroundings, in an image that mostly looks like their interiors, still
    marks the image as dense tissue. Either sign alone does not (crowded objects on a background)."""
    fg = np.zeros((10, 10), np.float32)
    fg[:3] = 0.9  # 30 % foreground
    tissue = {"ring_contrast": DENSE_CONTRAST - 0.01, "interior_share": DENSE_INTERIOR}
    assert choose_clustering("auto", fg, 0.5) == "mws"
    assert choose_clustering("auto", fg, 0.5, {"ring_contrast": None, "interior_share": None}) == "mws"
    assert choose_clustering("auto", fg, 0.5, tissue) == "multicut"
    assert choose_clustering("auto", fg, 0.5, dict(tissue, ring_contrast=DENSE_CONTRAST)) == "mws"
    assert choose_clustering("auto", fg, 0.5, dict(tissue, interior_share=DENSE_INTERIOR - 0.01)) == "mws"
    assert is_dense(DENSE_FRACTION, {"ring_contrast": 0.99, "interior_share": 0.1})  # the head's word still counts
    assert not is_dense(DENSE_FRACTION - 0.01, {"ring_contrast": 0.99, "interior_share": 0.1})
    assert choose_clustering("auto", None, None, tissue) == "mws"  # no foreground head: no background rule either


def test_cluster_auto_takes_multicut_on_dense_images():
    from napari_sparseseg import TrainConfig, Trainer
    from napari_sparseseg.core.samples import synthetic_cells
    from napari_sparseseg.core.segment import cluster, dense_reason, embed
    from napari_sparseseg.core.sparsify import sparsify

    img, gt = synthetic_cells((96, 96), seed=0)
    model = Trainer([img], [sparsify(gt, 0.5)], TrainConfig(iterations=1, patch_shape=(64, 64), base_channels=8,
                                                            depth=3, checkpoint_every=1e9)).model
    model.config["foreground"] = {"c": 0.5}  # as a trained foreground head reports it (threshold c/2)
    e = embed(model, img, device="cpu")
    e.f.foreground[:] = 1.0  # all foreground: dense tissue (and no background rule: DENSE_BACKGROUND)
    assert np.array_equal(cluster(model, e), cluster(model, e, "multicut", background="none"))
    assert dense_reason(model, e) == "the foreground head"
    assert dense_reason(model, e, background="none") == "background none"
    e.f.foreground[:] = 0.0
    e.f.foreground[:20, :20] = 1.0  # a few objects on a background
    assert model.config["annotation"]["interior_share"] < 0.5  # the cells are not most of the image
    assert np.array_equal(cluster(model, e), cluster(model, e, "mws"))
    assert dense_reason(model, e) == ""
    model.config["annotation"] = {"ring_contrast": 0.6, "interior_share": 0.9}  # as dense tissue's annotation
    assert np.array_equal(cluster(model, e), cluster(model, e, "multicut", background="none"))
    assert dense_reason(model, e) == "the annotation"


def test_dense_images_take_the_dense_background_rule(monkeypatch):
    """On an image "auto" calls dense tissue, background "auto" means DENSE_BACKGROUND; a rule the
    user names, a named clustering and images of objects on a background keep their own."""
    from napari_sparseseg import TrainConfig, Trainer
    from napari_sparseseg.core import segment as seg_mod
    from napari_sparseseg.core.samples import synthetic_cells
    from napari_sparseseg.core.segment import cluster, embed
    from napari_sparseseg.core.sparsify import sparsify

    img, gt = synthetic_cells((96, 96), seed=0)
    model = Trainer([img], [sparsify(gt, 0.5)], TrainConfig(iterations=1, patch_shape=(64, 64), base_channels=8,
                                                            depth=3, checkpoint_every=1e9)).model
    model.config["foreground"] = {"c": 0.5}
    e = embed(model, img, device="cpu")
    e.f.foreground[:] = 1.0
    e.f.foreground[:, :30] = 0.0  # 70 % foreground: dense; a band the head calls background
    monkeypatch.setattr(seg_mod, "DENSE_BACKGROUND", "none")
    # the untrained model's one large segment stands out little from the band: the faint-segment rule
    # (tests/test_rescue.py) would empty "auto"; this test is about which background rule applies
    monkeypatch.setattr(seg_mod, "FAINT_CONTRAST", 0.0)
    dense = cluster(model, e)
    assert (dense > 0).all()  # nothing removed
    assert np.array_equal(dense, cluster(model, e, "multicut", background="none"))
    named = cluster(model, e, "multicut", background="foreground")
    assert (named == 0).mean() > 0.1  # the band (at the model's scale) is background under a named rule
    assert np.array_equal(cluster(model, e, background="foreground"), named)
    assert np.array_equal(cluster(model, e, "multicut"), named)  # a named clustering keeps "auto" as it was
    monkeypatch.setattr(seg_mod, "DENSE_BACKGROUND", "foreground")
    assert np.array_equal(cluster(model, e), named)
    e.f.foreground[:] = 0.0
    e.f.foreground[:20, :20] = 1.0  # objects on a background: the foreground rule either way
    monkeypatch.setattr(seg_mod, "DENSE_BACKGROUND", "none")
    assert np.array_equal(cluster(model, e), cluster(model, e, "mws", background="foreground"))


def test_each_clustering_takes_its_own_default_bias(monkeypatch):
    """bias None: the mutex watershed and the multicut each take their own default (segment.BIAS,
    per method), also when "auto" chooses between them; a bias the user names is kept for either."""
    from napari_sparseseg import TrainConfig, Trainer
    from napari_sparseseg.core import segment as seg_mod
    from napari_sparseseg.core.samples import synthetic_cells
    from napari_sparseseg.core.segment import cluster, clustering_options, embed
    from napari_sparseseg.core.sparsify import sparsify

    monkeypatch.setattr(seg_mod, "BIAS", {"crac": {"mws": 0.07, "multicut": -0.03}, "spoco": {"mws": 0.01}})
    crac = {"method": "crac"}
    assert clustering_options(crac, "mws")["bias"] == 0.07
    assert clustering_options(crac, "multicut")["bias"] == -0.03
    assert clustering_options(crac, "multicut", bias=0.2)["bias"] == 0.2
    assert clustering_options({"method": "spoco"}, "mws")["bias"] == 0.01  # each method its own
    assert clustering_options({"method": "spoco"}, "multicut")["bias"] == 0.0
    seen = []
    real = seg_mod.segment_embeddings
    monkeypatch.setattr(seg_mod, "segment_embeddings",
                        lambda emb, method, **kw: seen.append((method, kw["bias"])) or real(emb, method, **kw))
    img, gt = synthetic_cells((96, 96), seed=0)
    model = Trainer([img], [sparsify(gt, 0.5)], TrainConfig(iterations=1, patch_shape=(64, 64), base_channels=8,
                                                            depth=3, checkpoint_every=1e9)).model
    model.config["foreground"] = {"c": 0.5}
    # one clustering per call: no second one for dropped objects (core.rescue), which takes the same bias
    model.config["annotation"]["object_contrast"] = None
    assert model.config["method"] == "crac"
    e = embed(model, img, device="cpu")
    e.f.foreground[:] = 1.0  # dense tissue: "auto" is the multicut
    cluster(model, e)
    cluster(model, e, bias=0.2)
    e.f.foreground[:] = 0.0
    e.f.foreground[:20, :20] = 1.0  # objects on a background: "auto" is the mutex watershed
    cluster(model, e)
    cluster(model, e, "mws", bias=-0.1)
    assert seen == [("multicut", -0.03), ("multicut", 0.2), ("mws", 0.07), ("mws", -0.1)]


def test_image_boundaries_follow_the_border_direction():
    img = np.full((1, 16, 16), 0.2, np.float32)
    img[0, :, 8] = 1.0  # a bright membrane
    bright = A.image_boundaries(img, [1.0])
    assert bright.shape == (16, 16) and bright[:, 8].min() > bright[:, 2].max()
    dark = A.image_boundaries(1.0 - img, [-1.0])  # a dark one (EM), as its annotation says
    np.testing.assert_allclose(dark, bright, atol=1e-6)
    # two channels, the membrane in the first: the weights pick it
    two = np.concatenate([img, np.full_like(img, 0.5)])
    np.testing.assert_allclose(A.image_boundaries(two, [1.0, 0.0]), bright, atol=1e-6)
    with pytest.raises(SparseSegError, match=r"border direction: expected one weight per channel \(2\), got \(1,\)"):
        A.image_boundaries(two, [1.0])


def test_image_share_grows_with_the_border_contrast(monkeypatch):
    monkeypatch.setattr(A, "IMAGE_WEIGHT", 0.8)  # the rule, whatever the constant
    assert A.image_share(None) == 0.0 and A.image_share({}) == 0.0  # models from before the statistic
    assert A.image_share({"border_direction": [1.0], "border_contrast": 1.0}) == pytest.approx(0.8)
    assert A.image_share({"border_direction": [1.0], "border_contrast": 0.75}) == pytest.approx(0.4)
    assert A.image_share({"border_direction": [1.0], "border_contrast": 0.5}) == 0.0  # borders look like interiors
    assert A.image_share({"border_direction": [1.0], "border_contrast": 0.3}) == 0.0
    assert A.image_share({"border_direction": None, "border_contrast": 0.9}) == 0.0


def test_image_boundaries_split_a_superpixel_the_network_map_misses():
    """Two cells side by side: the network's nearest-neighbour weights miss the wall between them
    (one superpixel, one object), its long-range weights see it. A membrane in the image splits the
    superpixel, and the network's own weights across the new boundary cut it."""
    lab = np.ones((32, 32), np.int64)
    lab[:, 16:] = 2
    offsets = default_offsets(2)
    w = _weights(lab, offsets)
    w[:2] = 0.0  # the nearest-neighbour channels: no boundary anywhere
    image = np.zeros((32, 32), np.float32)
    image[:, 15:17] = 1.0
    alone = A.multicut_segmentation(w, offsets)
    assert len(np.unique(alone)) == 1
    both = A.multicut_segmentation(w, offsets, image_boundaries=image, image_weight=0.75)
    assert evaluate(both, lab)["arand"] < 0.05 and len(np.unique(both)) == 2
    # the image alone decides nothing: where the network's weights see no wall, the superpixels merge
    same = _weights(np.ones_like(lab), offsets)
    assert len(np.unique(A.multicut_segmentation(same, offsets, image_boundaries=image, image_weight=0.75))) == 1
    msg = r"image boundaries: shape \(8, 8\) does not match the weights' \(32, 32\)"
    with pytest.raises(SparseSegError, match=msg):
        A.multicut_segmentation(w, offsets, image_boundaries=np.zeros((8, 8), np.float32), image_weight=0.5)


def test_cluster_gives_the_multicut_the_image_boundaries_of_a_model_with_border_statistics(monkeypatch):
    from napari_sparseseg import TrainConfig, Trainer
    from napari_sparseseg.core import segment as seg_mod
    from napari_sparseseg.core.samples import synthetic_cells
    from napari_sparseseg.core.segment import cluster, embed
    from napari_sparseseg.core.sparsify import sparsify

    img, gt = synthetic_cells((96, 96), seed=0)
    model = Trainer([img], [sparsify(gt, 0.5)], TrainConfig(iterations=1, patch_shape=(64, 64), base_channels=8,
                                                            depth=3, checkpoint_every=1e9)).model
    ann = model.config["annotation"]
    assert ann["border_direction"] in ([1.0], [-1.0]) and 0.0 <= ann["border_contrast"] <= 1.0
    seen = []
    real = seg_mod.segment_embeddings
    monkeypatch.setattr(seg_mod, "segment_embeddings",
                        lambda emb, method, **kw: seen.append((method, kw.get("image_boundaries"),
                                                               kw.get("image_weight"))) or real(emb, method, **kw))
    e = embed(model, img, device="cpu")
    ann.update(border_direction=[1.0], border_contrast=0.9)
    cluster(model, e, "multicut", background="none")
    method, bmap, weight = seen[-1]
    assert bmap.shape == e.f.embeddings.shape[1:] and weight == pytest.approx(A.image_share(ann))
    cluster(model, e, "mws", background="none")
    assert seen[-1][1:] == (None, None)  # the mutex watershed has no superpixels
    ann.update(border_direction=None, border_contrast=None)  # a model from before the statistic
    cluster(model, e, "multicut", background="none")
    assert seen[-1][1:] == (None, None)


def test_rank_match_puts_values_on_the_reference_scale():
    ref = np.array([0.9, 0.1, 0.5, 0.3])
    np.testing.assert_allclose(A.rank_match(np.array([10.0, 40.0, 20.0, 30.0]), ref), [0.1, 0.9, 0.3, 0.5])
    # ties share the mean of their reference values; the order of the reference does not matter
    np.testing.assert_allclose(A.rank_match(np.array([1.0, 1.0, 2.0, 0.0]), ref), [0.4, 0.4, 0.9, 0.1])
    assert A.rank_match(np.zeros(0), np.zeros(0)).shape == (0,)
    with pytest.raises(SparseSegError, match=r"rank match: expected two 1D arrays of one length, got \(3,\) and \(4,\)"):
        A.rank_match(np.zeros(3), ref)


def test_image_borders_in_the_costs_cut_a_wall_the_network_misses(monkeypatch):
    """Sixteen cells; the network's weights see every wall but one (cells 1 and 2 look like one).
    The image shows every wall: its superpixels split the pair, and with the image in the edge
    costs (IMAGE_COST_WEIGHT) the multicut keeps them apart; with the costs the network's alone it
    joins them. Where the network sees no wall anywhere, the image's signal, put on the network's
    scale by rank, still cuts nothing."""
    lab = _blocks()
    seen = lab.copy()
    seen[seen == 2] = 1
    offsets = default_offsets(2)
    w = _weights(seen, offsets)
    walls = find_boundaries(lab, mode="thick")  # two pixels wide, one on each side
    image = A.image_boundaries(np.stack([ndimage.binary_dilation(walls).astype(np.float32)]), [1.0])
    monkeypatch.setattr(A, "IMAGE_COST_WEIGHT", 0.0)
    alone = A.multicut_segmentation(w, offsets, image_boundaries=image, image_weight=0.75)
    assert len(np.unique(alone)) == 15
    monkeypatch.setattr(A, "IMAGE_COST_WEIGHT", 1.0)
    both = A.multicut_segmentation(w, offsets, image_boundaries=image, image_weight=0.75)
    assert len(np.unique(both)) == 16 and evaluate(both, lab)["arand"] < 0.05
    blank = _weights(np.ones_like(lab), offsets)
    assert len(np.unique(A.multicut_segmentation(blank, offsets, image_boundaries=image, image_weight=0.75))) == 1


def test_image_share_note_says_what_the_image_decides(monkeypatch):
    assert A.image_share_note(0.0) == ""
    monkeypatch.setattr(A, "IMAGE_COST_WEIGHT", 1.0)
    assert A.image_share_note(0.78) == ", superpixels and edge costs 78% from the image's own borders"
    monkeypatch.setattr(A, "IMAGE_COST_WEIGHT", 0.5)
    assert A.image_share_note(0.78) == ", superpixels 78% and edge costs 39% from the image's own borders"
    monkeypatch.setattr(A, "IMAGE_COST_WEIGHT", 0.0)
    assert A.image_share_note(0.78) == ", superpixels 78% from the image's own borders"
