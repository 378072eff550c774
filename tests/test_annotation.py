import numpy as np

from napari_sparseseg.core.annotation import check_annotations


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
    assert "Label(s) 3 have fewer than 20 pixels" in text
    assert "Label(s) 4 touch the image border" in text
    assert len(r.warnings) == 3  # object 1 and the background raise nothing


def test_empty():
    r = check_annotations(np.zeros((10, 10), int))
    assert r.n_objects == 0 and "No objects annotated yet" in r.summary() and not r.warnings


def test_3d():
    lab = np.zeros((8, 20, 20), int)
    lab[2:5, 5:10, 5:10] = 1
    assert check_annotations(lab).summary() == "1 object annotated"
