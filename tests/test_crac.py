"""CRAC: explicit affinities, the loss terms (values, gradients, schedule, stop-gradient), the
method in the training loop, and the CLI paths."""

import json
import math

import numpy as np
import pytest
import torch

from napari_sparseseg import SparseSegError, TrainConfig, Trainer, load_model
from napari_sparseseg.cli import main
from napari_sparseseg.core.crac_loss import (
    CracLossConfig, alpha_schedule, confident, cross_term, crac_loss, entropy, explicit_affinities, pair_valid,
    supervised_term,
)
from napari_sparseseg.core.clustering import cosine_affinities
from napari_sparseseg.core.losses import affinity_targets
from napari_sparseseg.core.metrics import evaluate
from napari_sparseseg.core.network import TwinNet, build_network
from napari_sparseseg.core.offsets import crac_offsets
from napari_sparseseg.core.samples import synthetic_cells
from napari_sparseseg.core.segment import segment
from napari_sparseseg.core.sparsify import sparsify

FAST = dict(patch_shape=(64, 64), base_channels=8, depth=3, checkpoint_every=1e9)


def test_crac_offsets_nearest_first_and_real_z_lengths():
    o2, o3 = crac_offsets(2), crac_offsets(3)
    assert o2[:2] == [[-1, 0], [0, -1]] and len(o2) == 10 and [-27, 0] in o2
    assert o3[:3] == [[-1, 0, 0], [0, -1, 0], [0, 0, -1]] and len(o3) == 12
    assert [[-2, 0, 0], [-3, 0, 0], [-4, 0, 0]] == [o for o in o3 if o[0] < -1]


def test_explicit_affinities_by_hand():
    # 1 x 3 pixels, 2-d embeddings: (1, 0), (1, 0), (0, 1), and a pixel pointing away (-1, 0)
    emb = torch.tensor([[[[1.0, 1.0, 0.0, -1.0]], [[0.0, 0.0, 1.0, 0.0]]]])
    a = explicit_affinities(emb, [[0, -1], [0, -3]])
    # pair (i, i - 1) stored at i; x = 0 has no partner -> 0
    assert a[0, 0, 0].tolist() == pytest.approx([0.0, 1.0, 0.0, 0.0])  # cos -1 is clamped to 0
    assert a[0, 1, 0].tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0])  # (3) vs (0): cos -1 -> 0
    # the numpy version the mutex watershed reads agrees where pairs exist (1 where none)
    np_a = cosine_affinities(emb[0].numpy(), [[0, -1], [0, -3]])
    assert np_a[0, 0].tolist() == pytest.approx([1.0, 1.0, 0.0, 0.0])


def _explicit_affinities_by_slices(embeddings, offsets):
    """The definition, written with autograd's own slicing (what the custom backward replaces)."""
    from napari_sparseseg.core.losses import _pair_slices

    b, _, *spatial = embeddings.shape
    out = embeddings.new_zeros((b, len(offsets), *spatial))
    unit = torch.nn.functional.normalize(embeddings, dim=1, eps=1e-8)
    for k, off in enumerate(offsets):
        if any(abs(o) >= s for o, s in zip(off, spatial)):
            continue
        a, c = _pair_slices(off, spatial)
        cos = (unit[(slice(None), slice(None)) + a] * unit[(slice(None), slice(None)) + c]).sum(1)
        out[(slice(None), k) + a] = cos.clamp(0.0, 1.0)
    return out


@pytest.mark.parametrize("shape, offsets", [
    ((2, 4, 9, 11), [[0, 1], [1, 0], [-3, 2], [0, 20]]),  # the last leaves the block
    ((1, 3, 5, 6, 7), [[1, 0, 0], [0, -2, 1], [2, 3, 3]]),
])
def test_explicit_affinities_value_and_gradient_match_the_definition(shape, offsets):
    torch.manual_seed(0)
    emb = torch.randn(shape, dtype=torch.double, requires_grad=True)
    weights = torch.randn((shape[0], len(offsets)) + shape[2:], dtype=torch.double)
    fast = explicit_affinities(emb, offsets)
    ref = _explicit_affinities_by_slices(emb, offsets)
    assert torch.allclose(fast, ref)
    (g_fast,) = torch.autograd.grad((fast * weights).sum(), emb)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), emb)
    assert torch.allclose(g_fast, g_ref, atol=1e-12)
    assert g_fast.abs().sum() > 0
    assert torch.autograd.gradcheck(lambda e: explicit_affinities(e, offsets), (emb,))


def test_explicit_affinities_pass_no_gradient_where_clamped():
    # antiparallel neighbours: cos -1, clamped to 0, so moving them changes nothing
    emb = torch.tensor([[[[1.0, -1.0]], [[0.0, 0.0]]]], requires_grad=True)
    explicit_affinities(emb + torch.tensor([0.0, 0.1]).reshape(1, 2, 1, 1), [[0, -1]]).sum().backward()
    assert emb.grad.abs().sum() == 0


def test_pair_valid_marks_pairs_inside_and_not_ignored():
    valid = torch.ones(1, 2, 4, dtype=torch.bool)
    valid[0, 1, 3] = False
    pv = pair_valid(valid, [[0, -1], [-1, 0]])
    assert pv[0, 0].tolist() == [[False, True, True, True], [False, True, True, False]]
    assert pv[0, 1].tolist() == [[False] * 4, [True, True, True, False]]


def test_supervised_term_value_and_gradient():
    a = torch.tensor([[[[0.2, 0.9, 0.5]]]], requires_grad=True)
    target = torch.tensor([[[[0.0, 1.0, 1.0]]]])
    annotated = torch.tensor([[[[True, True, False]]]])
    loss = supervised_term(a, target, annotated)
    assert loss.item() == pytest.approx((0.04 + 0.01) / 2)
    loss.backward()
    assert a.grad[0, 0, 0].tolist() == pytest.approx([0.2, -0.1, 0.0])  # 2 (a - t) / 2 on annotated


def test_alpha_schedule_and_confident_quantile():
    assert alpha_schedule(0.0) == pytest.approx(0.05)
    assert alpha_schedule(0.5) == pytest.approx(0.05 * 0.5**1.5)
    assert alpha_schedule(1.0) == 0.0 and alpha_schedule(2.0) == 0.0
    # 100 affinities, entropy rising with distance from 0/1: the 10 % least confident are dropped at alpha 0.1
    a = torch.linspace(0.0, 0.49, 100)
    region = torch.ones(100, dtype=torch.bool)
    kept = confident(a, region, 0.1)
    assert kept[:89].all() and not kept[-10:].any()
    assert confident(a, region, 0.0).all()
    assert entropy(torch.tensor([0.5])).item() == pytest.approx(math.log(2), rel=1e-5)
    # only pairs of the region count, and the quantile is taken over them
    region[50:] = False
    kept = confident(a, region, 0.5)
    assert not kept[50:].any() and kept[:25].all() and not kept[26:50].any()


def test_confident_keeps_the_pairs_below_the_entropy_quantile():
    # the paper's definition (entropy below its (1 - alpha) quantile over the region), computed in full
    g = torch.Generator().manual_seed(3)
    a = torch.rand((2, 3, 40, 40), generator=g)
    region = torch.rand(a.shape, generator=g) > 0.4
    h = entropy(a)
    for alpha in (0.05, 0.3):
        expected = region & (h <= torch.quantile(h[region], 1 - alpha))
        assert torch.equal(confident(a, region, alpha), expected)
    # a batch larger than the quantile's sample: the share kept is still 1 - alpha of the region
    big = torch.rand((1, 12, 32, 64, 64), generator=g)
    region = torch.rand(big.shape, generator=g) > 0.3
    kept = confident(big, region, 0.05)
    assert not (kept & ~region).any()
    assert float(kept.sum() / region.sum()) == pytest.approx(0.95, abs=0.005)


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 100_001])
def test_quantile_by_selection_equals_torch_quantile(n):
    from napari_sparseseg.core.crac_loss import quantile

    v = torch.rand(n, generator=torch.Generator().manual_seed(n)) ** 3  # skewed, like entropies
    for q in (0.0, 0.05, 0.5, 0.95, 0.999, 1.0):
        assert quantile(v, q).item() == pytest.approx(torch.quantile(v, q).item(), rel=1e-6, abs=1e-9)


def test_cross_term_value_and_no_gradient_into_pseudo_targets():
    a_iam = torch.tensor([0.1, 0.9, 0.6, 0.5], requires_grad=True)
    a_eam = torch.tensor([0.0, 0.5, 0.9, 0.5], requires_grad=True)
    region = torch.tensor([True, True, True, False])
    loss = cross_term(a_iam, a_eam, region, 0.0)  # alpha 0: every pair of the region is confident
    d = torch.tensor([0.1, 0.4, -0.3])
    assert loss.item() == pytest.approx(2 * float((d**2).mean()))
    loss.backward()
    # each map is pulled towards the other, which is a constant target: d/d a_iam = 2 (a_iam - a_eam) / 3 only
    assert a_iam.grad[:3].tolist() == pytest.approx((2 * d / 3).tolist())
    assert a_eam.grad[:3].tolist() == pytest.approx((-2 * d / 3).tolist())
    assert a_iam.grad[3] == 0 and a_eam.grad[3] == 0
    # without the stop-gradient the gradient would be twice as large: check that the target is detached
    a2 = a_eam.detach().clone().requires_grad_(True)
    cross_term(a_iam.detach(), a2, region, 0.0).backward()
    assert a2.grad[:3].tolist() == pytest.approx((-2 * d / 3).tolist())


def _batch(seed=0):
    img, gt = synthetic_cells((64, 64), seed=seed)
    lab = torch.from_numpy(sparsify(gt, 0.5, seed).astype(np.int64))[None]
    valid = torch.ones_like(lab, dtype=torch.bool)
    x = torch.from_numpy(img.astype(np.float32) / 255)[None, None]
    return x, lab, valid


@pytest.mark.parametrize("which", ["iam", "eam"])
def test_crac_loss_gradient_reaches_the_right_network_and_lowers_the_term(which):
    torch.manual_seed(0)
    offsets = crac_offsets(2)
    net = TwinNet(2, 1, 16, len(offsets), base_channels=4, depth=2)
    x, lab, valid = _batch()
    target, annotated = affinity_targets(lab, valid, offsets)
    term = f"supervised_{which}"
    other = net.eam if which == "iam" else net.iam

    def terms():
        out = net(x)
        return crac_loss(out[:, len(offsets) + 6:] if False else out[:, 16:], out[:, :16], target, annotated,
                         pair_valid(valid, offsets), offsets, CracLossConfig(), 0.0)

    t0 = terms()
    net.zero_grad()
    t0[term].backward()
    own = net.iam if which == "iam" else net.eam
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in own.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in other.parameters())
    opt = torch.optim.SGD(own.parameters(), lr=0.5)
    opt.step()
    assert terms()[term].item() < t0[term].item()


def test_twin_network_round_trips_through_its_config():
    net = TwinNet(3, 2, 16, 12, base_channels=4, depth=2)
    again = build_network(json.loads(json.dumps(net.config)))
    assert isinstance(again, TwinNet) and again.config == net.config
    again.load_state_dict(net.state_dict())
    x = torch.randn(1, 2, 8, 16, 16)
    assert torch.equal(again(x), net(x)) and net(x).shape == (1, 28, 8, 16, 16)


def test_crac_training_beats_the_untrained_network(tmp_path):
    cells = [synthetic_cells((128, 128), seed=s) for s in range(4)]
    imgs = [c[0] for c in cells[:3]]
    sparse = [sparsify(c[1], 0.3, i) for i, c in enumerate(cells[:3])]
    test_img, test_gt = cells[3]
    trainer = Trainer(imgs, sparse, TrainConfig(method="crac", iterations=150, lr=3e-3, **FAST), out=tmp_path / "m")

    def score(model, source):
        # the affinities themselves, with the true foreground given: what the loss trains
        seg = segment(model, test_img, device="cpu", mask=test_gt > 0, affinity_source=source)
        return evaluate(seg, test_gt)["sbd"]

    untrained = {s: score(trainer.model, s) for s in ("eam", "iam")}
    events = list(trainer.run())
    assert events[-1].done
    assert set(events[0].losses) == {"supervised_iam", "supervised_eam", "cross", "foreground", "loss"}
    first = np.mean([e.losses["loss"] for e in events[:10]])
    last = np.mean([e.losses["loss"] for e in events[-11:-1]])
    assert last < first
    model = load_model(tmp_path / "m")
    assert model.config["method"] == "crac" and model.ema is None and model.config["offsets"] == crac_offsets(2)
    assert 0 < model.config["foreground"]["c"] < 1
    trained = {s: score(model, s) for s in ("eam", "iam")}
    assert trained["eam"] > untrained["eam"] + 0.1 and trained["iam"] > untrained["iam"] + 0.3, (untrained, trained)
    # and the whole default pipeline (foreground head included) produces objects
    assert segment(model, test_img, device="cpu").max() > 0


def test_crac_3d_trains_and_segments(tmp_path):
    stack, gt = synthetic_cells((16, 48, 48), radius=(5, 8), seed=0)
    trainer = Trainer([stack], [sparsify(gt, 0.3)], TrainConfig(method="crac", iterations=3, patch_shape=(16, 32, 32),
                                                                 depth=2, checkpoint_every=1e9), out=tmp_path / "m")
    list(trainer.run())
    model = load_model(tmp_path / "m")
    seg = segment(model, stack, device="cpu")
    assert seg.shape == stack.shape and model.config["network"]["ndim"] == 3


def test_crac_segmentation_options_and_errors(tmp_path):
    img, gt = synthetic_cells((64, 64), seed=0)
    crac = Trainer([img], [sparsify(gt, 0.5)], TrainConfig(method="crac", iterations=1, **FAST)).model
    spoco = Trainer([img], [sparsify(gt, 0.5)], TrainConfig(method="spoco", iterations=1, **FAST)).model
    for source in ("eam", "iam", "mean"):
        assert segment(crac, img, device="cpu", affinity_source=source).shape == img.shape
    for ratio in (0, 1.0):
        assert segment(crac, img, "mws", device="cpu", split_ratio=ratio).shape == img.shape
    with pytest.raises(SparseSegError, match=r"split ratio -2: expected 0 \(off\)"):
        segment(crac, img, device="cpu", split_ratio=-2)
    with pytest.raises(SparseSegError, match="affinity source 'both': expected one of eam, iam, mean"):
        segment(crac, img, device="cpu", affinity_source="both")
    with pytest.raises(SparseSegError, match="only CRAC models have a choice of affinity maps"):
        segment(spoco, img, device="cpu", affinity_source="iam")
    with pytest.raises(SparseSegError, match="a CRAC model's affinities are segmented with 'mws' or 'multicut' only"):
        segment(crac, img, "hdbscan", device="cpu")
    with pytest.raises(SparseSegError, match="agreement filtering needs an EMA network; a CRAC model has none"):
        segment(crac, img, device="cpu", agreement=0.8)


def test_crac_cli_train_segment_resume_and_fine_tune(tmp_path, capsys):
    import tifffile

    for d in ("img", "gt"):
        (tmp_path / d).mkdir()
    for i in range(2):
        img, lab = synthetic_cells((96, 96), seed=i)
        tifffile.imwrite(tmp_path / "img" / f"c{i}.tif", img)
        tifffile.imwrite(tmp_path / "gt" / f"c{i}.tif", sparsify(lab, 0.3, i))
    fast = ["--patch-shape", "64,64", "--quiet", "--base-channels", "4"]
    common = ["--images", str(tmp_path / "img" / "*.tif"), "--labels", str(tmp_path / "gt" / "*.tif")]
    # without --quiet the progress bar reads the loss terms: CRAC's are not SPOCO's (this was a KeyError)
    assert main(["train", *common, "--out", str(tmp_path / "m"), "--iterations", "5", "--method", "crac",
                 *fast[:2], *fast[3:]]) == 0
    assert "training CRAC on 2 image(s)" in capsys.readouterr().out
    # resume and fine-tune keep the model's method without being told
    assert main(["train", *common, "--out", str(tmp_path / "m"), "--iterations", "1", "--resume", *fast]) == 0
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["method"] == "crac" and cfg["training"]["iteration"] == 6
    assert main(["train", *common, "--out", str(tmp_path / "t"), "--iterations", "1", "--from", str(tmp_path / "m"),
                 "--finetune", "always", *fast]) == 0
    assert json.loads((tmp_path / "t" / "config.json").read_text())["method"] == "crac"
    capsys.readouterr()
    assert main(["segment", "--model", str(tmp_path / "m"), "--images", str(tmp_path / "img" / "c0.tif"),
                 "--out", str(tmp_path / "seg"), "--affinities", "mean"]) == 0
    assert (tmp_path / "seg" / "c0.tif").exists() and "objects in" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", *common, "--out", str(tmp_path / "x"), "--method", "crack", *fast])
    assert "argument --method: invalid choice: 'crack'" in capsys.readouterr().err


def test_large_segments_are_split_again_only_by_the_mutex_watershed_on_objects_on_a_background(monkeypatch):
    from napari_sparseseg.core import segment as seg_mod

    img, gt = synthetic_cells((64, 64), seed=0)
    crac = Trainer([img], [sparsify(gt, 0.5)], TrainConfig(method="crac", iterations=1, **FAST)).model
    calls = []
    monkeypatch.setattr(seg_mod, "split_large", lambda seg, *a, **k: calls.append(a[3:5]) or seg)
    median = crac.config["object_area_median"]
    segment(crac, img, "mws", device="cpu", background="largest")
    assert calls == [(pytest.approx(2 * median), pytest.approx(seg_mod.SPLIT_MIN_PIECE * median))]
    segment(crac, img, "mws", device="cpu", background="largest", split_ratio=3)
    assert calls[-1][0] == pytest.approx(9 * median)
    n = len(calls)
    segment(crac, img, "mws", device="cpu", background="none")  # dense tissue: left as it is
    segment(crac, img, "multicut", device="cpu")
    segment(crac, img, "mws", device="cpu", split_ratio=0)
    assert len(calls) == n
