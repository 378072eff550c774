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
