import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_sparseseg import SparseSegError
from napari_sparseseg.core import io


def test_png_variants(tmp_path):
    grey = (np.arange(64).reshape(8, 8) * 3).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    assert np.array_equal(io.read(tmp_path / "g.png"), grey)
    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert io.read(tmp_path / "rgba.png").shape == (8, 8, 3)  # alpha dropped
    pal = Image.fromarray((grey % 5).astype(np.uint8), "P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 0] + [0] * 753)
    pal.save(tmp_path / "pal.png")
    assert np.array_equal(io.read_labels(tmp_path / "pal.png"), grey % 5)  # indices, not colours


def test_tif_npy_zarr(tmp_path):
    import zarr

    a = np.random.default_rng(0).integers(0, 1000, (3, 10, 12)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "a.tif", a, photometric="minisblack")
    np.save(tmp_path / "a.npy", a)
    z = zarr.open(str(tmp_path / "a.zarr"), mode="w", shape=a.shape, dtype=a.dtype)
    z[:] = a
    for name in ("a.tif", "a.npy", "a.zarr"):
        assert np.array_equal(io.read(tmp_path / name), a)


def test_write_is_atomic_and_roundtrips(tmp_path):
    lab = np.arange(20, dtype=np.uint16).reshape(4, 5)
    io.write(tmp_path / "sub" / "x.tif", lab)
    assert np.array_equal(tifffile.imread(tmp_path / "sub" / "x.tif"), lab)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.tif"]


def test_expand_and_pair(tmp_path):
    for n in ("b.tif", "a.tif", "c.txt"):
        (tmp_path / n).write_bytes(b"")
    files = io.expand(str(tmp_path / "*"))
    assert [f.name for f in files] == ["a.tif", "b.tif"]
    with pytest.raises(SparseSegError, match=r"--images '.*nope\*.png': no image file matches"):
        io.expand(str(tmp_path / "nope*.png"))
    with pytest.raises(SparseSegError, match="--images matched 2 file.s. but --labels matched 1"):
        io.pair(files, files[:1])


def test_read_errors(tmp_path):
    with pytest.raises(SparseSegError, match="missing.tif: file not found"):
        io.read(tmp_path / "missing.tif")
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    with pytest.raises(SparseSegError, match="bad.tif: could not be read as an image"):
        io.read(tmp_path / "bad.tif")
    np.save(tmp_path / "f.npy", np.full((4, 4), 0.5))
    with pytest.raises(SparseSegError, match="f.npy: label images must hold integer ids, got float64"):
        io.read_labels(tmp_path / "f.npy")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(SparseSegError, match="rgb.png: a colour .RGB. image, expected a label image"):
        io.read_labels(tmp_path / "rgb.png")


def test_channels_first():
    assert io.to_channels_first(np.zeros((10, 12)), 2).shape == (1, 10, 12)
    assert io.to_channels_first(np.zeros((10, 12, 3)), 2).shape == (3, 10, 12)
    assert io.to_channels_first(np.zeros((2, 10, 12)), 2).shape == (2, 10, 12)
    assert io.to_channels_first(np.zeros((5, 10, 12)), 3).shape == (1, 5, 10, 12)
    with pytest.raises(SparseSegError, match=r"img: shape \(10,\) does not fit a 2D image"):
        io.to_channels_first(np.zeros(10), 2, "img")


def test_normalize_per_channel():
    x = np.stack([np.linspace(0, 10, 100), np.linspace(100, 300, 100)]).reshape(2, 10, 10)
    n = io.normalize(x, 0, 100)
    assert np.allclose(n.min(axis=(1, 2)), 0) and np.allclose(n.max(axis=(1, 2)), 1)


def test_voxel_size_from_tiff_and_ome_zarr_metadata(tmp_path):
    import zarr

    a = np.zeros((4, 8, 8), np.uint8)
    tifffile.imwrite(tmp_path / "ij.tif", a, imagej=True, resolution=(1 / 0.15, 1 / 0.15),
                     metadata={"spacing": 0.235, "unit": "um", "axes": "ZYX"})
    assert io.voxel_size(tmp_path / "ij.tif") == pytest.approx((0.235, 0.15, 0.15))
    tifffile.imwrite(tmp_path / "s.ome.tif", a, ome=True,
                     metadata={"axes": "ZYX", "PhysicalSizeZ": 0.3, "PhysicalSizeY": 0.1, "PhysicalSizeX": 0.12})
    assert io.voxel_size(tmp_path / "s.ome.tif") == pytest.approx((0.3, 0.1, 0.12))
    tifffile.imwrite(tmp_path / "plain.tif", a, photometric="minisblack")
    assert io.voxel_size(tmp_path / "plain.tif") is None
    # OME-Zarr: per-level scale (level 1 is 2x coarser in y/x), axes named
    root = zarr.open_group(str(tmp_path / "img.zarr"), mode="w")
    root.create_array("0", data=a)
    root.create_array("1", data=a[:, ::2, ::2])
    root.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": n, "type": "space"} for n in "zyx"],
                                  "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [0.5, 0.2, 0.2]}]},
                                               {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [0.5, 0.4, 0.4]}]}]}]
    assert io.voxel_size(tmp_path / "img.zarr") == pytest.approx((0.5, 0.2, 0.2))
    assert io.voxel_size(tmp_path / "img.zarr", level=1) == pytest.approx((0.5, 0.4, 0.4))
    assert io.voxel_size(tmp_path / "nothing.zarr") is None


def test_write_states_a_stacks_voxel_size(tmp_path):
    a = np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8)
    io.write(tmp_path / "v.tif", a, voxel_size=(0.235, 0.15, 0.125))
    assert io.voxel_size(tmp_path / "v.tif") == pytest.approx((0.235, 0.15, 0.125))
    np.testing.assert_array_equal(io.read(tmp_path / "v.tif"), a)
    io.write(tmp_path / "plain.tif", a)
    assert io.voxel_size(tmp_path / "plain.tif") is None
