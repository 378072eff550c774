import pytest
import torch

from napari_sparseseg.core.network import UNet, build_network, ema_update, make_ema, split_output


@pytest.mark.parametrize("ndim,shape", [(2, (1, 3, 32, 48)), (3, (1, 1, 16, 16, 32))])
def test_unet_shapes_and_rebuild(ndim, shape):
    net = UNet(ndim=ndim, in_channels=shape[1], out_channels=16, base_channels=4, depth=3)
    out = net(torch.randn(shape))
    assert out.shape == (1, 16) + shape[2:]
    clone = build_network(net.config)
    clone.load_state_dict(net.state_dict())
    assert torch.allclose(clone(torch.ones(shape)), net(torch.ones(shape)))
    assert net.divisor == (4,) * ndim


def test_replicate_padding_is_recorded_rebuilt_and_works_on_tiny_inputs():
    net = UNet(ndim=2, in_channels=1, base_channels=4, depth=2, padding_mode="replicate")
    assert net.config["padding_mode"] == "replicate"
    assert all(m.padding_mode == "replicate" for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.padding != (0, 0))
    clone = build_network(net.config)
    clone.load_state_dict(net.state_dict())
    x = torch.randn(1, 1, 16, 16)
    assert torch.allclose(clone(x), net(x))
    # a constant image gives constant embeddings: replicate padding tells the network nothing about borders
    out = net(torch.ones(1, 1, 16, 16))
    assert torch.allclose(out, out[..., :1, :1].expand_as(out), atol=1e-5)
    zeros = UNet(ndim=2, in_channels=1, base_channels=4, depth=2)
    zeros.load_state_dict(net.state_dict())
    out = zeros(torch.ones(1, 1, 16, 16))
    assert not torch.allclose(out, out[..., :1, :1].expand_as(out), atol=1e-5)
    # the deepest level of a 3D U-Net sees 1 voxel here: reflect padding would fail, replicate works
    tiny = UNet(ndim=3, in_channels=1, base_channels=4, depth=4, padding_mode="replicate")
    assert tiny(torch.randn(1, 1, 8, 8, 8)).shape == (1, 16, 8, 8, 8)


def test_unet_rejects_bad_ndim():
    with pytest.raises(ValueError, match="ndim must be 2 or 3"):
        UNet(ndim=4)


def test_ema_update_rule():
    net = torch.nn.Linear(2, 1)
    ema = make_ema(net)
    assert all(not p.requires_grad for p in ema.parameters())
    with torch.no_grad():
        for p in ema.parameters():
            p.fill_(1.0)
        for p in net.parameters():
            p.fill_(3.0)
    ema_update(ema, net, momentum=0.9)
    # theta_g <- 0.9 * 1 + 0.1 * 3 = 1.2
    for p in ema.parameters():
        assert torch.allclose(p, torch.full_like(p, 1.2))
    for p in net.parameters():  # f is untouched
        assert torch.allclose(p, torch.full_like(p, 3.0))
    ema_update(ema, net, momentum=0.0)
    assert all(torch.allclose(pg, pf) for pg, pf in zip(ema.parameters(), net.parameters()))


def test_coordinate_channels_are_added_and_centred():
    net = UNet(ndim=2, in_channels=1, base_channels=4, depth=2, coord_scale=0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    out = net(torch.randn(1, 1, 4, 6))
    # channel 0 is y, channel 1 is x, counted from the crop centre, times 0.5
    assert out[0, 0, :, 0].tolist() == [-1.0, -0.5, 0.0, 0.5]
    assert out[0, 1, 0, :].tolist() == [-1.5, -1.0, -0.5, 0.0, 0.5, 1.0]
    assert torch.all(out[0, 2:] == 0)
    shifted = net(torch.randn(1, 1, 4, 6), origin=[10, 0])
    assert shifted[0, 0, 0, 0].item() == 5.0


def test_slice_conv3d_matches_conv3d_and_loads_its_weights():
    from napari_sparseseg.core.network import SliceConv3d

    torch.manual_seed(0)
    for padding_mode, kernel, bias in (("replicate", 3, False), ("zeros", 3, True), ("zeros", (1, 3, 3), True),
                                       ("zeros", 1, True)):
        pad = 0 if kernel == 1 else (1 if kernel == 3 else (0, 1, 1))
        ref = torch.nn.Conv3d(3, 5, kernel, padding=pad, padding_mode=padding_mode, bias=bias)
        fast = SliceConv3d(3, 5, kernel, padding=pad, padding_mode=padding_mode, bias=bias)
        fast.load_state_dict(ref.state_dict())  # same parameters: old checkpoints load unchanged
        x = torch.randn(2, 3, 6, 9, 7, requires_grad=True)
        y_ref, y = ref(x), fast(x)
        assert y.shape == y_ref.shape and torch.allclose(y, y_ref, atol=1e-5)
        g_ref = torch.autograd.grad(y_ref.square().sum(), [x, ref.weight])
        g = torch.autograd.grad(y.square().sum(), [x, fast.weight])
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(g, g_ref))


@pytest.mark.parametrize("config, parts", [
    ({"out_channels": 4, "foreground": True, "affinities": 3}, (4, 1, 3)),
    ({"out_channels": 4, "affinities": 3}, (4, 0, 3)),
    ({"out_channels": 4, "foreground": True}, (4, 1, 0)),
    ({"out_channels": 4}, (4, 0, 0)),
])
def test_split_output_parts_and_their_gradients(config, parts):
    d, f, k = parts
    out = torch.randn(2, d + f + k, 5, 6, requires_grad=True)
    emb, fg, aff = split_output(out, config)
    assert emb.shape == (2, d, 5, 6) and torch.equal(emb, out[:, :d])
    assert (fg is None) == (f == 0) and (aff is None) == (k == 0)
    loss = emb.sum()
    if f:
        assert fg.shape == (2, 5, 6) and torch.equal(fg, out[:, d])
        loss = loss + 2 * fg.sum()
    if k:
        assert torch.equal(aff, out[:, d + f:])
        loss = loss + 3 * aff.sum()
    loss.backward()
    assert out.grad[0, :, 0, 0].tolist() == [1.0] * d + [2.0] * f + [3.0] * k
