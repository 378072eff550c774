"""Stitching per-block fragments into global objects (core/stitching.py) on hand-made face bands:
two 2D blocks side by side (grid 1 x 2) share the face along axis 1."""

import numpy as np

from napari_sparseseg.core.stitching import stitch


def write_blocks(folder, left: np.ndarray, right: np.ndarray) -> None:
    """Block 0's band of its upper face along axis 1 and block 1's band of its lower face (the same
    pixels, as each block's clustering labelled them)."""
    np.savez(folder / "0.npz", sizes=np.ones(3, np.int64), upper1=left)
    np.savez(folder / "1.npz", sizes=np.ones(2, np.int64), lower1=right)


def band(rows: list[int]) -> np.ndarray:
    """A 6 x 8 band whose row r holds the id rows[r]."""
    return np.repeat(np.asarray(rows, np.uint32)[:, None], 8, axis=1)


def test_fragments_that_share_their_band_merge_and_others_stay_apart(tmp_path):
    # block 0: fragments 1, 2, 3 (and 4, met only in its halo); block 1: fragments 1, 2
    left = band([1, 1, 2, 2, 3, 4])
    right = band([1, 1, 2, 2, 2, 2])
    write_blocks(tmp_path, left, right)
    labels = stitch(tmp_path, (1, 2), [3, 2])
    # global ids: block 0's fragments 1-3, block 1's 4-5; 0 the background
    assert labels.shape == (6,) and labels[0] == 0
    assert labels[1] == labels[4], "block 0's 1 lies wholly on block 1's 1"
    assert labels[2] == labels[3] == labels[5], "an object one block split in two, the other saw whole"
    assert labels[1] != labels[2]
    assert len(set(labels[1:].tolist())) == 2


def test_a_small_overlap_does_not_merge(tmp_path):
    # block 0's 1 has a third of its band on block 1's 1, which has a quarter of its own on it
    left = band([1, 1, 1, 0, 0, 0])
    right = band([0, 0, 1, 1, 1, 1])
    write_blocks(tmp_path, left, right)
    labels = stitch(tmp_path, (1, 2), [3, 2])
    assert labels[1] != labels[4] and labels[1] > 0 and labels[4] > 0


def test_fragments_with_a_common_partner_split_where_one_barely_touches_it(tmp_path):
    # block 1's 2 lies wholly on block 0's 2; block 0's 3 has 1 of its 3 band rows on it: the
    # pair (2, 3) of block 0 is repulsive (a common partner, no overlap of their own) and wins
    left = band([1, 2, 2, 3, 3, 3])
    right = band([1, 2, 2, 2, 1, 1])
    write_blocks(tmp_path, left, right)
    labels = stitch(tmp_path, (1, 2), [3, 2])
    assert labels[2] == labels[5]
    assert labels[3] != labels[2]


def test_no_faces_no_merges(tmp_path):
    np.savez(tmp_path / "0.npz", sizes=np.ones(2, np.int64))
    assert stitch(tmp_path, (1,), [2]).tolist() == [0, 1, 2]
