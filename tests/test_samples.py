"""The sample data: the real histology image and its painted nuclei."""

import numpy as np
from scipy import ndimage
from skimage.color import rgb2hed

from napari_sparseseg.core.samples import HISTOLOGY_POINTS, histology_nuclei
from napari_sparseseg.core.scale import object_diameters


def test_histology_sample_paints_one_nucleus_under_each_point():
    rgb, sparse = histology_nuclei()
    assert rgb.shape == (512, 512, 3) and rgb.dtype == np.uint8
    assert sparse.shape == (512, 512) and sparse.dtype == np.int32
    for i, p in enumerate(HISTOLOGY_POINTS, start=1):
        assert sparse[p] == i
        assert ndimage.label(sparse == i)[1] == 1  # one piece each
    # nucleus-sized (8-25 px across), most of the image left unlabeled
    d = object_diameters(sparse)
    assert len(d) == len(HISTOLOGY_POINTS) and 8 < d.min() and d.max() < 25
    assert (sparse > 0).mean() < 0.02
    # painted where the hematoxylin (nuclear) stain is: brighter inside than in the rest of the image
    h = rgb2hed(rgb)[..., 0]
    assert h[sparse > 0].mean() > h[sparse == 0].mean() + 2 * h[sparse == 0].std() / np.sqrt(len(d))
