import pytest
import numpy as np
import torch

from napari_sparseseg.core.checkpoint import Model
from napari_sparseseg.core.network import UNet
from napari_sparseseg.core.prediction import _tiles, predict


def _model(ndim, scale=1.0):
    torch.manual_seed(0)
    net = UNet(ndim=ndim, in_channels=1, base_channels=4, depth=3)
    return Model(net=net, config={"network": net.config, "normalization": {"low": 1, "high": 99.8}, "scale": scale})


def test_tiles_cover_every_pixel_once():
    cover = np.zeros((100, 77), int)
    for inner, outer in _tiles((100, 77), (40, 40), (8, 8)):
        cover[inner] += 1
        assert all(o.start <= i.start and o.stop >= i.stop for i, o in zip(inner, outer))
        assert all(o.stop - o.start <= 40 for o in outer)
    assert np.all(cover == 1)


def test_prediction_shape_scale_and_tiling():
    img = np.random.default_rng(0).random((70, 90)).astype(np.float32)
    whole = predict(_model(2), img, device="cpu")
    assert whole.shape == (16, 70, 90)
    tiled = predict(_model(2), img, device="cpu", tile_shape=(48, 48), halo=(8, 8))
    assert np.corrcoef(whole.ravel(), tiled.ravel())[0, 1] > 0.9
    half = predict(_model(2, scale=0.5), img, device="cpu")
    assert half.shape == (16, 70, 90)


def test_prediction_3d_with_ema():
    m = _model(3)
    m.ema = UNet(**m.net.config)
    img = np.random.default_rng(0).random((10, 30, 30)).astype(np.float32)
    f = predict(m, img, device="cpu")
    g = predict(m, img, device="cpu", use_ema=True)
    assert f.shape == g.shape == (16, 10, 30, 30) and not np.allclose(f, g)


def test_tiles_get_global_coordinates():
    torch.manual_seed(0)
    net = UNet(ndim=2, in_channels=1, base_channels=4, depth=3, coord_scale=0.1)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
    m = Model(net=net, config={"network": net.config, "normalization": {"low": 1, "high": 99.8}, "scale": 1.0})
    img = np.random.default_rng(0).random((70, 90)).astype(np.float32)
    whole = predict(m, img, device="cpu")
    tiled = predict(m, img, device="cpu", tile_shape=(32, 32), halo=(4, 4))
    np.testing.assert_allclose(whole[:2], tiled[:2], atol=1e-5)  # coordinates continue across tiles
    assert whole[0, 1, 0] - whole[0, 0, 0] == pytest.approx(0.1, abs=1e-5)
