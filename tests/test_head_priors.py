"""The foreground head starts at the annotated share (network.set_foreground_prior, losses.foreground_prior)."""

import numpy as np
import pytest
import torch

from napari_sparseseg import TrainConfig, Trainer
from napari_sparseseg.core.losses import foreground_prior
from napari_sparseseg.core.network import TwinNet, UNet, set_foreground_prior
from napari_sparseseg.core.samples import synthetic_cells
from napari_sparseseg.core.sparsify import sparsify

FAST = dict(base_channels=4, depth=2, patch_shape=(64, 64), batch_size=1, seed=0)


def test_foreground_prior_by_hand():
    lab = torch.zeros((1, 4, 4), dtype=torch.int64)
    lab[0, :2, :2] = 1  # a 2x2 object: 4 of 16 pixels
    valid = torch.ones_like(lab, dtype=torch.bool)
    held = torch.zeros_like(valid)
    assert foreground_prior(lab, valid, held) == pytest.approx(4 / 16)
    # held-out pixels leave the share (as they leave the foreground loss); invalid ones too
    held[0, 0, :2] = True
    assert foreground_prior(lab, valid, held) == pytest.approx(2 / 14)
    valid[0, 3] = False
    assert foreground_prior(lab, valid, held) == pytest.approx(2 / 10)


@pytest.mark.parametrize("kind", ["unet", "twin"])
def test_set_foreground_prior_moves_only_the_foreground_bias(kind):
    torch.manual_seed(0)
    if kind == "unet":
        net = UNet(2, 1, 16, base_channels=4, depth=2, foreground=True, affinities=3)
    else:
        net = TwinNet(2, 1, 16, 3, base_channels=4, depth=2, foreground=True)
    net.eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        before = net(x)
        set_foreground_prior(net, 0.02)
        out = net(x)
    # output: 16 embeddings, the foreground logit, 3 affinity logits; only the foreground moved,
    # by exactly the change of its bias (the weights are untouched)
    assert torch.allclose(out[:, :16], before[:, :16]) and torch.allclose(out[:, 17:], before[:, 17:])
    head = net.head if kind == "unet" else net.iam.head
    bias = float(head.bias[16 if kind == "unet" else 3].detach())
    assert bias == pytest.approx(np.log(0.02 / 0.98), abs=1e-5)
    assert not torch.allclose(out[:, 16], before[:, 16])
    # a network without a foreground head is left as it is
    plain = UNet(2, 1, 16, base_channels=4, depth=2)
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    set_foreground_prior(plain, 0.02)
    assert all(torch.equal(state[k], v) for k, v in plain.state_dict().items())


@pytest.mark.parametrize("method", ["crac", "spoco"])
def test_a_fresh_trainer_starts_its_foreground_head_at_the_annotated_share(method):
    img, gt = synthetic_cells((128, 128), seed=3)
    labels = sparsify(gt, 0.3)
    trainer = Trainer([img], [labels], TrainConfig(method=method, iterations=1, **FAST))
    # the head's mean probability on a training crop is near the annotated share, not 1/2
    _, lab, val, held = trainer.sampler.batch(4)
    share = float(((lab > 0) & val & ~held).sum()) / float((val & ~held).sum())
    with torch.no_grad():
        x = torch.from_numpy(np.stack([trainer.samples[0].image[:, :64, :64]] * 1))
        fg_index = 16
        p = torch.sigmoid(trainer.net(x)[:, fg_index]).mean()
    assert 0 < share < 0.5
    assert abs(float(p) - share) < 0.2 and float(p) < 0.4
    # SPOCO's EMA network starts equal to f, biases included
    if method == "spoco":
        for a, b in zip(trainer.net.parameters(), trainer.ema.parameters()):
            assert torch.equal(a, b)


def test_fine_tuning_keeps_the_parents_heads():
    img, gt = synthetic_cells((96, 96), seed=1)
    parent = Trainer([img], [sparsify(gt, 1.0)], TrainConfig(method="crac", iterations=1, **FAST))
    bias = parent.net.iam.head.bias.detach().clone()
    with torch.no_grad():
        parent.net.iam.head.bias.add_(0.5)  # a trained head, away from any prior
    child = Trainer([img], [sparsify(gt, 0.5)], TrainConfig(iterations=1, finetune="always", **FAST), init=parent.model)
    assert torch.allclose(child.net.iam.head.bias, bias + 0.5)
