"""Segments larger than the annotated objects, clustered again with either map's repulsion."""

import numpy as np
import pytest

from napari_sparseseg.core.clustering import mutex_watershed
from napari_sparseseg.core.errors import SparseSegError
from napari_sparseseg.core.resplit import split_area, split_large
from napari_sparseseg.core.segment import SPLIT_RATIO, split_ratio

OFFSETS = [[-1, 0], [0, -1], [-3, 0], [0, -3], [0, -9]]
CRAC_WEIGHTS = dict(embedding_metric="cosine", affinity_mix=0.0, attractive_mix=0.0)


def two_touching_objects():
    """One segment over two objects side by side (x < 20, x >= 20): the embeddings see the border
    only faintly (cosine 0.9 across it), the affinity head sees it clearly (0 across it)."""
    seg = np.zeros((20, 40), np.int64)
    seg[5:15, 5:35] = 1
    emb = np.zeros((2, 20, 40), np.float32)
    emb[0, :, :20] = 1.0
    emb[:, :, 20:] = np.array([0.9, np.sqrt(1 - 0.81)], np.float32)[:, None, None]
    aff = np.ones((len(OFFSETS), 20, 40), np.float32)
    x = np.arange(40)
    for k, (_, dx) in enumerate(OFFSETS):
        crosses = (x < 20) != (x + dx < 20)
        aff[k][:, crosses] = 0.0
    return seg, emb, aff


def test_the_embeddings_alone_merge_the_two_objects():
    seg, emb, aff = two_touching_objects()
    out = mutex_watershed(emb, OFFSETS, mask=seg > 0, affinities=aff, **CRAC_WEIGHTS)
    assert len(np.unique(out[seg > 0])) == 1


def test_a_segment_over_the_size_limit_is_split_where_the_head_sees_a_border():
    seg, emb, aff = two_touching_objects()
    out = split_large(seg, emb, aff, OFFSETS, max_area=299, min_piece=50, **CRAC_WEIGHTS)
    left, right = out[5:15, 5:20], out[5:15, 20:35]
    assert len(np.unique(left)) == 1 and len(np.unique(right)) == 1 and left[0, 0] != right[0, 0]
    assert left[0, 0] > 0 and right[0, 0] > 0 and (out[seg == 0] == 0).all()
    assert seg.max() == 1  # the input is not changed


def test_segments_within_the_limit_and_small_pieces_are_kept():
    seg, emb, aff = two_touching_objects()
    assert np.array_equal(split_large(seg, emb, aff, OFFSETS, max_area=300, min_piece=50, **CRAC_WEIGHTS), seg)
    # pieces of 150 pixels under a min_piece of 151 stay with the largest piece
    assert np.array_equal(split_large(seg, emb, aff, OFFSETS, max_area=299, min_piece=151, **CRAC_WEIGHTS), seg)


def test_the_split_size_is_a_ratio_of_diameters():
    assert split_area(2 ** 0.5, 100, 2) == pytest.approx(200)
    assert split_area(2, 100, 3) == pytest.approx(800)


def test_split_ratio_defaults_overrides_and_errors():
    crac = {"method": "crac", "network": {"affinities": 10}}
    assert split_ratio(crac, "mws") == SPLIT_RATIO["crac"] > 1
    assert split_ratio(crac, "mws", 2.0) == 2.0 and split_ratio(crac, "mws", 0) == 0
    assert split_ratio(crac, "multicut") == 0  # dense tissue: the multicut is left as it is
    assert split_ratio({"method": "spoco", "network": {"affinities": 10}}, "mws") == 0
    assert split_ratio({"method": "crac", "network": {}}, "mws") == 0  # no affinity head
    with pytest.raises(SparseSegError, match=r"split ratio -1: expected 0 \(off\) or a ratio of diameters"):
        split_ratio(crac, "mws", -1)
