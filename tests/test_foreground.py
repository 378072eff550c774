"""The foreground head's threshold, calibrated on labeled objects held out of its loss."""

import json

import numpy as np
import pytest
import torch

from napari_sparseseg import SparseSegError, TrainConfig, Trainer
from napari_sparseseg.cli import main
from napari_sparseseg.core.losses import foreground_term, spoco_loss
from napari_sparseseg.core.methods.base import ForegroundConstant
from napari_sparseseg.core.samples import synthetic_cells
from napari_sparseseg.core.segment import foreground_threshold
from napari_sparseseg.core.sparsify import sparsify

FAST = dict(batch_size=2, patch_shape=(64, 64), base_channels=4, depth=2, checkpoint_every=1e9)


def test_constant_keeps_trained_and_held_out_means_apart():
    logits = torch.logit(torch.tensor([[0.9, 0.8, 0.2, 0.1, 0.5]]))
    labels = torch.tensor([[1, 1, 2, 0, 3]])
    valid = torch.tensor([[True, True, True, True, False]])
    held = torch.tensor([[False, False, True, False, True]])
    fg = ForegroundConstant()
    fg.update(logits, labels, valid, held)
    # trained: object 1 (0.9, 0.8); held out: object 2 (0.2; pixel 5 is not valid); unlabeled: neither
    assert fg.trained == pytest.approx(0.85) and fg.heldout == pytest.approx(0.2)
    assert fg.c == pytest.approx(0.2)  # the held-out mean calibrates the threshold
    fg.update(logits, labels, valid, held)
    assert fg.trained == pytest.approx(0.85) and fg.heldout == pytest.approx(0.2)
    fg.update(torch.logit(torch.full((1, 5), 0.6)), labels, valid, held)  # a running mean
    assert fg.heldout == pytest.approx(0.98 * 0.2 + 0.02 * 0.6)
    # without held-out objects c is the trained mean, as before
    plain = ForegroundConstant()
    plain.update(logits, labels, valid)
    assert plain.heldout is None and plain.c == pytest.approx((0.9 + 0.8 + 0.2) / 3)
    # config round trip; a model written before held-out calibration has only "c"
    again = ForegroundConstant.from_config({"foreground": fg.to_config()})
    assert (again.trained, again.heldout, again.c) == (fg.trained, fg.heldout, fg.c)
    old = ForegroundConstant.from_config({"foreground": {"c": 0.4}})
    assert old.trained == 0.4 and old.heldout is None and old.c == 0.4


def test_spoco_foreground_term_leaves_held_out_objects_out_of_value_and_gradient():
    logits = torch.tensor([[[0.0, 2.0, -1.0, 5.0]]], requires_grad=True)
    labels = torch.tensor([[[1, 3, 0, 2]]])
    valid = torch.ones(1, 1, 4, dtype=torch.bool)
    held = torch.tensor([[[False, False, False, True]]])  # object 2 held out
    emb = torch.zeros(1, 2, 1, 4)
    out = spoco_loss(emb, None, labels, valid, fg_logits=logits, fg_valid=valid & ~held)
    expected = foreground_term(logits.detach().reshape(1, 4), labels.reshape(1, 4), (valid & ~held).reshape(1, 4))
    assert out["foreground"].item() == pytest.approx(expected.item(), rel=1e-6)
    sp = torch.nn.functional.softplus
    assert expected.item() == pytest.approx(((sp(torch.tensor(0.0)) + sp(torch.tensor(-2.0)) + sp(torch.tensor(-1.0))) / 3).item())
    out["foreground"].backward()
    assert logits.grad[0, 0, 3] == 0 and (logits.grad[0, 0, :3] != 0).all()


@pytest.mark.parametrize("name", ["spoco", "crac"])
def test_methods_train_the_head_without_held_out_pixels(name):
    img, gt = synthetic_cells((64, 64), seed=0)
    trainer = Trainer([img], [sparsify(gt, 1.0)], TrainConfig(method=name, iterations=1, **FAST))
    method = trainer.method
    torch.manual_seed(0)
    image = torch.rand(1, 1, 64, 64)
    labels = torch.from_numpy(gt[:64, :64].astype(np.int64))[None]
    valid = torch.ones_like(labels, dtype=torch.bool)
    held = labels == labels[labels > 0].min()
    assert held.any()

    def foreground_gradient(heldout):
        """The foreground term's gradient on the network's output, per pixel."""
        captured = {}
        hook = method.net.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
        try:
            terms = method.losses(image, labels, valid, torch.Generator().manual_seed(0), 0.0, heldout=heldout)
        finally:
            hook.remove()
        return torch.autograd.grad(terms["foreground"], captured["out"])[0].abs().sum(1)[0]

    grad = foreground_gradient(held)
    assert float(grad[held[0]].max()) == 0 and float(grad[~held[0]].max()) > 0
    assert method.fg.heldout is not None
    assert float(foreground_gradient(None)[held[0]].max()) > 0  # the test can fail


def test_trainer_holds_objects_out_and_the_model_keeps_both_constants(tmp_path):
    img, gt = synthetic_cells((96, 96), seed=1)
    labels = sparsify(gt, 1.0)
    n = len(np.unique(labels)) - 1
    assert n >= 5
    trainer = Trainer([img], [labels], TrainConfig(method="crac", iterations=30, **FAST), out=tmp_path / "m")
    assert trainer.heldout == max(1, int(np.floor(0.2 * n + 0.5)))
    list(trainer.run())
    fg = json.loads((tmp_path / "m" / "config.json").read_text())["foreground"]
    assert fg["c_heldout"] is not None and fg["c"] == fg["c_heldout"] and 0 < fg["c_trained"] < 1
    assert foreground_threshold({"method": "crac", "foreground": fg}) == pytest.approx(
        0.25 * max(fg["c_heldout"], fg["c_trained"]))
    # off: nothing held out, c is the trained mean
    off = Trainer([img], [labels], TrainConfig(method="crac", iterations=2, foreground_holdout=0.0, **FAST))
    list(off.run())
    assert off.heldout == 0 and off.method.fg.heldout is None and off.method.fg.c == off.method.fg.trained
    # and without a foreground head there is nothing to calibrate
    assert Trainer([img], [labels], TrainConfig(method="crac", iterations=1, foreground=False, **FAST)).heldout == 0


def test_holdout_errors_and_cli(tmp_path, capsys):
    with pytest.raises(SparseSegError, match=r"foreground holdout must be a fraction in \[0, 1\), got 1.5"):
        TrainConfig(foreground_holdout=1.5)
    import tifffile

    img, gt = synthetic_cells((96, 96), seed=2)
    tifffile.imwrite(tmp_path / "img.tif", img)
    tifffile.imwrite(tmp_path / "lab.tif", sparsify(gt, 1.0))
    args = ["train", "--images", str(tmp_path / "img.tif"), "--labels", str(tmp_path / "lab.tif"), "--iterations", "1",
            "--patch-shape", "64,64", "--quiet", "--base-channels", "4"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "object(s) held out of the foreground loss to calibrate its threshold" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "b"), "--foreground-holdout", "0"]) == 0
    assert "held out" not in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "c"), "--foreground-holdout", "1"]) == 2
    assert "foreground holdout must be a fraction in [0, 1), got 1.0" in capsys.readouterr().err


def test_fine_tuning_without_held_out_objects_drops_the_parents_held_out_constant(tmp_path):
    img, gt = synthetic_cells((96, 96), seed=1)
    parent = Trainer([img], [sparsify(gt, 1.0)], TrainConfig(method="crac", iterations=5, **FAST), out=tmp_path / "p")
    list(parent.run())
    assert parent.method.fg.heldout is not None
    two = np.where(np.isin(gt, np.unique(gt[gt > 0])[:2]), gt, 0)  # two objects: none can be held out
    child = Trainer([img], [two], TrainConfig(iterations=3, finetune="always", **FAST), init=parent.model)
    assert child.heldout == 0
    list(child.run())
    # c is measured on this run's objects, not the parent's held-out ones
    assert child.method.fg.heldout is None and child.method.fg.c == child.method.fg.trained


def test_resuming_after_painting_more_keeps_the_held_out_objects(tmp_path):
    img, gt = synthetic_cells((192, 192), seed=0)
    ids = np.unique(gt[gt > 0])
    assert len(ids) >= 12
    first = np.where(np.isin(gt, ids[:6]), gt, 0)  # six objects painted, then six more
    t1 = Trainer([img], [first], TrainConfig(method="crac", iterations=2, **FAST), out=tmp_path / "m", names=["cells"])
    list(t1.run())
    held = json.loads((tmp_path / "m" / "config.json").read_text())["heldout_objects"]
    assert list(held) == ["cells"] and len(held["cells"]) == 1 and held["cells"][0] in ids[:6]
    more = np.where(np.isin(gt, ids[:12]), gt, 0)
    t2 = Trainer([img], [more], TrainConfig(method="crac", iterations=1, **FAST), init=t1.model, resume=True,
                 names=["cells"])
    assert t2.model_config["heldout_objects"] == held  # the same object, and no object trained on before
    # a new run on the same labels draws its own (the seeded draw over twelve objects: two)
    fresh = Trainer([img], [more], TrainConfig(method="crac", iterations=1, **FAST), names=["cells"])
    assert len(fresh.model_config["heldout_objects"]["cells"]) == 2


@pytest.mark.parametrize("field, flag, on, other, bad, message", [
    ("object_gain", "--object-contrast", "OBJECT_GAIN_ON", 2.0, 0.5, "object contrast must be a factor >= 1 (1: off)"),
    ("object_dim", "--object-dim", "OBJECT_DIM_ON", 0.5, 2.0, "object dimming must be a factor in (0, 1] (1: off)"),
])
def test_object_contrast_options_are_opt_in_from_the_api_and_the_cli(tmp_path, capsys, field, flag, on, other, bad,
                                                                     message):
    import re

    from napari_sparseseg.core import training

    on = getattr(training, on)
    with pytest.raises(SparseSegError, match=re.escape(f"{message}, got {bad}")):
        TrainConfig(**{field: bad})
    img, gt = synthetic_cells((96, 96), seed=2)
    labels = sparsify(gt, 1.0)
    assert getattr(TrainConfig(), field) == 1.0  # off by default
    # the trainer's crops get it: with it on, a labeled object's contrast changes, off it does not
    plain = Trainer([img], [labels], TrainConfig(method="crac", iterations=1, **FAST)).sampler
    plain.p_object, plain.elastic = 1.0, False
    plain_crops = [plain.crop()[0] for _ in range(6)]
    for value, changed in ((1.0, False), (on, True)):
        t = Trainer([img], [labels], TrainConfig(method="crac", iterations=1, **{field: value}, **FAST))
        assert getattr(t.sampler, field) == value
        t.sampler.p_object, t.sampler.elastic = 1.0, False
        assert any(not np.allclose(t.sampler.crop()[0], c) for c in plain_crops) == changed
    import tifffile

    tifffile.imwrite(tmp_path / "img.tif", img)
    tifffile.imwrite(tmp_path / "lab.tif", labels)
    args = ["train", "--images", str(tmp_path / "img.tif"), "--labels", str(tmp_path / "lab.tif"), "--iterations", "1",
            "--patch-shape", "64,64", "--quiet", "--base-channels", "4"]
    import json

    def used(folder):
        return json.loads((tmp_path / folder / "config.json").read_text())["training"]["train_config"][field]

    assert main([*args, "--out", str(tmp_path / "a")]) == 0 and used("a") == 1.0
    assert main([*args, "--out", str(tmp_path / "b"), flag]) == 0 and used("b") == pytest.approx(on)
    assert main([*args, "--out", str(tmp_path / "c"), flag, str(other)]) == 0 and used("c") == other
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "d"), flag, str(bad)]) == 2
    assert f"{message}, got {bad}" in capsys.readouterr().err


def test_threshold_never_falls_below_the_trained_mean(monkeypatch):
    """c is the held-out mean, floored at HELDOUT_MIN_RATIO times the trained one: a head that
    learned to reject the objects it was not shown must not lower the threshold into the background."""
    from napari_sparseseg.core import segment

    def thr(**fg):
        c = fg["c_heldout"] if fg["c_heldout"] is not None else fg["c_trained"]  # as ForegroundConstant.c
        return foreground_threshold({"method": "spoco", "foreground": {"c": c, **fg}})

    assert segment.HELDOUT_MIN_RATIO == 1.0
    assert thr(c_trained=0.4, c_heldout=0.04) == pytest.approx(0.5 * 0.4)  # floored
    assert thr(c_trained=0.2, c_heldout=0.3) == pytest.approx(0.5 * 0.3)  # a higher held-out mean is kept
    assert thr(c_trained=0.4, c_heldout=None) == pytest.approx(0.5 * 0.4)  # nothing held out
    assert foreground_threshold({"method": "spoco", "foreground": {"c": 0.1}}) == pytest.approx(0.05)  # older models
    monkeypatch.setattr(segment, "HELDOUT_MIN_RATIO", 0.0)
    assert thr(c_trained=0.4, c_heldout=0.04) == pytest.approx(0.5 * 0.04)
