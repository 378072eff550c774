"""Training on large stacks: the regions around the labeled objects (core/regions.py)."""

import json

import numpy as np
import pytest
import tifffile
import zarr

from napari_sparseseg import SparseSegError
from napari_sparseseg.cli import main
from napari_sparseseg.core import regions as R
from napari_sparseseg.core.samples import synthetic_cells


class CountingArray:
    """A chunked array that counts the voxels read through it."""

    def __init__(self, a, chunks):
        self.a, self.chunks, self.shape, self.read = a, chunks, a.shape, 0

    def __getitem__(self, key):
        out = self.a[key]
        self.read += out.size
        return out


def test_object_boxes_span_chunks_and_regions_hold_whole_objects(monkeypatch):
    lab = np.zeros((20, 100, 100), np.int32)
    lab[2:6, 10:30, 10:30] = 1  # crosses the chunk borders at 16 (y, x) and 4 (z)
    lab[3:5, 34:40, 34:40] = 2  # near 1: their grown boxes overlap -> one region
    lab[10:14, 80:90, 70:85] = 7  # far away: its own region
    monkeypatch.setattr(R, "SCAN_VOXELS", 4 * 16 * 16)  # one chunk per scan block
    arr = CountingArray(lab, (4, 16, 16))
    boxes = R.object_boxes(arr)
    assert arr.read == lab.size  # every voxel read once, block by block
    assert {k: (tuple(a), tuple(b)) for k, (a, b) in boxes.items()} == {
        1: ((2, 10, 10), (6, 30, 30)), 2: ((3, 34, 34), (5, 40, 40)), 7: ((10, 80, 70), (14, 90, 85))}
    found = R.labeled_regions(arr, margin=(1, 5, 5))
    assert found.objects == 3 and len(found.regions) == 2
    assert found.regions[0] == (slice(1, 7), slice(5, 45), slice(5, 45))
    assert found.regions[1] == (slice(9, 15), slice(75, 95), slice(65, 90))
    for r in found.regions:  # no object is cut by a region's border
        inside = lab[r]
        for i in np.unique(inside[inside > 0]):
            assert (inside == i).sum() == (lab == i).sum()
    assert found.fraction == pytest.approx((6 * 40 * 40 + 6 * 20 * 25) / lab.size)
    # default margin: two median object extents per axis, clipped to the stack
    wide = R.labeled_regions(lab)
    assert all(s.start >= 0 and s.stop <= n for r in wide.regions for s, n in zip(r, lab.shape))
    with pytest.raises(SparseSegError, match="no labeled object in the label stack"):
        R.labeled_regions(np.zeros((4, 8, 8), np.int32))


def test_object_boxes_in_blocks_without_background(monkeypatch):
    monkeypatch.setattr(R, "SCAN_VOXELS", 4 * 8 * 4)  # two blocks, the first all object 1
    lab = np.ones((4, 8, 8), np.int32)  # one object fills the first block entirely
    lab[:, :, 4:] = 0
    lab[1, 1, 6] = 3
    boxes = R.object_boxes(CountingArray(lab, (4, 8, 4)))
    assert {k: (tuple(a), tuple(b)) for k, (a, b) in boxes.items()} == {1: ((0, 0, 0), (4, 8, 4)), 3: ((1, 1, 6), (2, 2, 7))}


def test_merge_boxes_merges_chains():
    boxes = [((0, 0), (2, 2)), ((5, 5), (7, 7)), ((1, 1), (6, 6))]
    assert [(tuple(a), tuple(b)) for a, b in R.merge_boxes(boxes)] == [((0, 0), (7, 7))]


def test_open_image_like_finds_the_channel_axis(tmp_path):
    for i, (shape, channels) in enumerate((((8, 16, 16), 1), ((8, 16, 16, 3), 3), ((2, 8, 16, 16), 2),
                                           ((1, 1, 8, 16, 16), 1))):
        path = tmp_path / f"a{i}.zarr"
        zarr.save_array(str(path), np.zeros(shape, np.uint8))
        vol = R.open_image_like(path, (8, 16, 16))
        assert vol.channels == channels and vol.read((slice(0, 2), slice(0, 4), slice(0, 4))).shape == (channels, 2, 4, 4)
    with pytest.raises(SparseSegError, match=r"image shape \(1, 1, 8, 16, 16\) does not match its labels' shape \(8, 16, 17\)"):
        R.open_image_like(path, (8, 16, 17))


def test_cli_trains_a_zarr_stack_on_the_regions_around_its_labels(tmp_path, capsys):
    img, gt = synthetic_cells((16, 160, 160), radius=(6.0, 9.0), seed=1)
    sparse = np.zeros_like(gt)
    ids = np.unique(gt[:, :60, :60])
    for i in ids[ids > 0][:2]:  # two objects in one corner
        sparse[gt == i] = i
    z = zarr.create_array(str(tmp_path / "img.zarr"), shape=img.shape, chunks=(8, 64, 64), dtype=img.dtype)
    z[:] = img
    tifffile.imwrite(tmp_path / "lab.tif", sparse)
    assert main(["train", "--images", str(tmp_path / "img.zarr"), "--labels", str(tmp_path / "lab.tif"),
                 "--out", str(tmp_path / "m"), "--iterations", "1", "--method", "spoco", "--batch-size", "1",
                 "--patch-shape", "8,32,32", "--base-channels", "4", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "2 labeled object(s); training reads 1 region(s) around them" in out
    frac = float(out.split("region(s) around them, ")[1].split("%")[0])
    assert 0 < frac < 50  # not the whole stack
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["training"]["iteration"] == 1
    got = R.read_regions(tmp_path / "img.zarr", tmp_path / "lab.tif")
    # one normalisation for the whole stack, not the region's own percentiles
    from napari_sparseseg.core.io import percentile_bounds

    assert got.bounds == pytest.approx(percentile_bounds(img[None].astype(np.float32)), rel=0.05)


def test_read_regions_from_open_arrays_reads_only_regions_and_a_sample(tmp_path, monkeypatch):
    """A napari layer's lazy array trains like a file: the same regions, the same bounds, and the
    image is read only in the regions and the normalisation sample."""
    import dask.array as da

    img, gt = synthetic_cells((16, 160, 160), radius=(6.0, 9.0), seed=1)
    sparse = np.zeros_like(gt)
    ids = np.unique(gt[:, :60, :60])
    for i in ids[ids > 0][:2]:
        sparse[gt == i] = i
    zarr.save_array(str(tmp_path / "img.zarr"), img)
    tifffile.imwrite(tmp_path / "lab.tif", sparse)
    from_files = R.read_regions(tmp_path / "img.zarr", tmp_path / "lab.tif")
    monkeypatch.setattr("napari_sparseseg.core.blocks.sample_bounds.__defaults__", (1.0, 99.8, 1000, 0))
    counted = CountingArray(img, (8, 64, 64))
    got = R.read_regions(counted, da.from_array(sparse, chunks=(8, 64, 64)), name="image 'cells'")
    assert [r for r in got.found.regions] == from_files.found.regions
    for a, b in zip(got.images, from_files.images):
        np.testing.assert_array_equal(a, b)
    region_voxels = sum(int(np.prod([s.stop - s.start for s in r])) for r in got.found.regions)
    assert region_voxels < counted.read <= region_voxels + 64 * 1000 + 64 * 160  # regions + the sample only
    assert got.names[0].startswith("image 'cells' [")
    with pytest.raises(SparseSegError, match=r"image: image shape \(16, 160\) does not match its labels' shape"):
        R.read_regions(np.zeros((16, 160)), sparse)
