"""Heads start at the frequency of their targets (network.set_head_priors, losses.target_priors)."""

import numpy as np
import pytest
import torch

from napari_sparseseg import TrainConfig, Trainer
from napari_sparseseg.core.losses import affinity_targets, target_priors
from napari_sparseseg.core.network import TwinNet, UNet, set_head_priors
from napari_sparseseg.core.samples import synthetic_cells
from napari_sparseseg.core.sparsify import sparsify

FAST = dict(base_channels=4, depth=2, patch_shape=(64, 64), batch_size=1, seed=0)


def test_target_priors_by_hand():
    lab = torch.zeros((1, 4, 4), dtype=torch.int64)
    lab[0, :2, :2] = 1  # a 2x2 object: 4 of 16 pixels
    valid = torch.ones_like(lab, dtype=torch.bool)
    held = torch.zeros_like(valid)
    fg, aff = target_priors(lab, valid, held, [[0, 1], [0, 3]])
    assert fg == pytest.approx(4 / 16)
    # offset (0, 1): pairs touching the object: (r, 0)-(r, 1) same, (r, 1)-(r, 2) not, for rows 0-1
    assert aff[0] == pytest.approx(2 / 4)
    # offset (0, 3): (r, 0)-(r, 3) and (r, 1)-(r, 4 out of the crop): one annotated pair per row, not same
    assert aff[1] == pytest.approx(0.0)
    target, mask = affinity_targets(lab, valid, [[0, 1]])
    assert int(mask.sum()) == 4 and int(target.sum()) == 2
    # held-out pixels leave the foreground share (as they leave its loss); invalid ones too
    held[0, 0, :2] = True
    assert target_priors(lab, valid, held, [[0, 1]])[0] == pytest.approx(2 / 14)
    # an offset no pair of which is annotated says nothing: 1/2
    assert target_priors(torch.zeros_like(lab), valid, held, [[0, 1]])[1] == [0.5]


@pytest.mark.parametrize("kind", ["unet", "twin"])
def test_set_head_priors_moves_only_the_bias_of_each_head(kind):
    torch.manual_seed(0)
    if kind == "unet":
        net = UNet(2, 1, 16, base_channels=4, depth=2, foreground=True, affinities=3)
    else:
        net = TwinNet(2, 1, 16, 3, base_channels=4, depth=2, foreground=True)
    net.eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        before = net(x)
        set_head_priors(net, 0.02, [0.9, 0.5, 0.1])
        out = net(x)
    fg, aff = out[:, 16], out[:, 17:20]
    # with the weights untouched, the change of each logit is exactly the new bias minus the old
    delta = (out - before).mean((0, 2, 3))
    assert torch.allclose(out[:, :16], before[:, :16])  # embeddings untouched
    head = net.head if kind == "unet" else net.iam.head
    fg_index = 16 if kind == "unet" else 3
    assert float(head.bias[fg_index]) == pytest.approx(np.log(0.02 / 0.98), abs=1e-5)
    aff_bias = head.bias[17:20] if kind == "unet" else head.bias[:3]
    assert torch.allclose(torch.sigmoid(aff_bias.detach()), torch.tensor([0.9, 0.5, 0.1]), atol=1e-5)
    assert float(delta[16]) != 0 and fg.shape == (1, 32, 32) and aff.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="2 affinity priors for 3 affinity channels"):
        set_head_priors(net, None, [0.5, 0.5])


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
    child = Trainer([img], [sparsify(gt, 0.5)], TrainConfig(iterations=1, **FAST), init=parent.model)
    assert torch.allclose(child.net.iam.head.bias, bias + 0.5)
