import math

import pytest
import torch

from napari_sparseseg.core.losses import (
    SpocoLossConfig,
    affinity_targets,
    affinity_term,
    consistency_term,
    dice_loss,
    foreground_term,
    instance_means,
    object_term,
    pull_term,
    push_term,
    reg_term,
    sample_in_objects,
    spoco_loss,
    unlabeled_push_term,
)

CFG = SpocoLossConfig()


def emb_of(*points):
    """(D, N) embedding tensor from a list of points."""
    return torch.tensor(points, dtype=torch.float32).t().contiguous()


def test_kernel_width_matches_threshold():
    cfg = SpocoLossConfig(delta_var=0.5, kernel_threshold=0.9)
    assert math.exp(-(0.5**2) / (2 * cfg.sigma2)) == pytest.approx(0.9)


def test_means_and_pull_push_reg_by_hand():
    emb = emb_of((0, 0), (2, 0), (3, 0), (3, 0))
    lab = torch.tensor([1, 1, 2, 2])
    mu, counts = instance_means(emb, lab, 2)
    assert mu.tolist() == [[1, 0], [3, 0]]
    assert counts.tolist() == [2, 2]
    # object 1: both pixels at distance 1 -> (1 - 0.5)^2; object 2: 0
    assert pull_term(emb, lab, mu, counts, 0.5).item() == pytest.approx(0.125)
    # means 2 apart: (2 * 2 - 2)^2 = 4 for both ordered pairs, / (C (C - 1))
    assert push_term(mu, 2.0).item() == pytest.approx(4.0, rel=1e-4)
    assert push_term(mu[:1], 2.0).item() == 0
    assert reg_term(mu).item() == pytest.approx(2.0)


def test_push_is_zero_beyond_margin():
    mu = torch.tensor([[0.0, 0.0], [4.5, 0.0]])
    assert push_term(mu, 2.0).item() == 0


def test_dice_per_row():
    s = torch.tensor([[1.0, 1.0, 0.0], [0.9, 0.9, 0.9]])
    i = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    d = dice_loss(s, i)
    assert d[0].item() == pytest.approx(0.0, abs=1e-6)
    assert d[1].item() == pytest.approx(1 - 2 * 2.7 / (3 * 0.81 + 3), rel=1e-5)


def test_object_term_by_hand():
    # object 1 pixels sit exactly on their anchor, object 2 pixels far away: perfect selection
    emb = emb_of((0, 0), (0, 0), (10, 0), (10, 0))
    lab = torch.tensor([1, 1, 2, 2])
    valid = torch.ones(4, dtype=torch.bool)
    mu, _ = instance_means(emb, lab, 2)
    cfg = SpocoLossConfig(anchor="mean")
    assert object_term(emb, lab, valid, mu, 2, cfg).item() == pytest.approx(0.0, abs=1e-6)
    # pixels at exactly dv from the mean anchor get kernel value t = 0.9
    emb = emb_of((0.5, 0), (-0.5, 0), (10, 0), (10, 0))
    mu, _ = instance_means(emb, lab, 2)
    expected_obj1 = 1 - 2 * 1.8 / (2 * 0.81 + 2)
    val = object_term(emb, lab, valid, mu, 2, cfg).item()
    assert val == pytest.approx(expected_obj1 / 2, rel=1e-4)


def test_anchor_sampled_inside_each_object():
    lab = torch.tensor([0, 1, 1, 2, 0, 2, 3])
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        idx = sample_in_objects(lab, 3, g)
        assert lab[idx].tolist() == [1, 2, 3]


def test_unlabeled_push_by_hand():
    emb = emb_of((0, 0), (1, 0), (5, 0))
    mu = torch.tensor([[0.0, 0.0]])
    unl = torch.tensor([False, True, True])
    # pixel at distance 1: (2 - 1)^2 = 1; pixel at 5: 0; mean over U = 0.5
    assert unlabeled_push_term(emb, unl, mu, 2.0).item() == pytest.approx(0.5, rel=1e-4)


def test_consistency_by_hand():
    ef = emb_of((0, 0), (0, 0))
    eg = emb_of((0, 0), (9, 0))
    unl = torch.ones(2, dtype=torch.bool)
    # one anchor covers both pixels in f; S^f = [1, 1], S^g = one-hot -> Dice loss 1 - 2/3
    assert consistency_term(ef, eg, unl, unl, CFG).item() == pytest.approx(1 / 3, rel=1e-4)
    assert consistency_term(ef, ef.clone(), unl, unl, CFG).item() == pytest.approx(0.0, abs=1e-6)


def test_consistency_covers_unlabeled_region():
    # four well separated clusters in U: sampling must stop after covering all four
    pts = [(0, 0)] * 5 + [(5, 0)] * 5 + [(0, 5)] * 5 + [(5, 5)] * 5
    ef = emb_of(*pts)
    eg = ef + 0.3
    unl = torch.ones(20, dtype=torch.bool)
    calls = []
    cfg = SpocoLossConfig(max_anchors=20)
    import napari_sparseseg.core.losses as L

    orig = L.kernel

    def spy(emb, anchors, s2):
        calls.append(anchors.shape[0])
        return orig(emb, anchors, s2)

    L.kernel = spy
    try:
        consistency_term(ef, eg, unl, unl, cfg, torch.Generator().manual_seed(0))
    finally:
        L.kernel = orig
    assert calls == [4, 4]


def test_spoco_loss_relabels_missing_ids_and_keeps_zero_unlabeled():
    emb = torch.randn(1, 4, 6, 6)
    lab = torch.zeros(1, 6, 6, dtype=torch.long)
    lab[0, :3] = 2  # id 1 missing from the crop
    lab[0, 4:] = 5
    out = spoco_loss(emb, emb.clone(), lab, None, CFG)
    assert set(out) == {"pull", "push", "reg", "obj", "unlabeled_push", "consistency", "foreground", "affinity",
                        "loss"}
    assert all(torch.isfinite(v) for v in out.values())
    # full supervision: nothing unlabeled -> no unlabeled terms
    lab[0, 3] = 7
    out = spoco_loss(emb, emb.clone(), lab, None, CFG)
    assert out["unlabeled_push"].item() == 0 and out["consistency"].item() == 0


def test_foreground_term_by_hand():
    # BCE with logits: annotated pixels are positives, unlabeled ones negatives, invalid ones ignored
    logits = torch.tensor([[0.0, 2.0, -1.0, 5.0]])
    labels = torch.tensor([[1, 3, 0, 0]])
    valid = torch.tensor([[True, True, True, False]])
    sp = torch.nn.functional.softplus
    expected = (sp(torch.tensor(-0.0)) + sp(torch.tensor(-2.0)) + sp(torch.tensor(-1.0))) / 3
    assert foreground_term(logits, labels, valid).item() == pytest.approx(expected.item(), rel=1e-6)
    # in spoco_loss it is a weighted term of its own, and absent without logits
    emb = torch.zeros(1, 2, 1, 4)
    cfg = SpocoLossConfig(w_foreground=2.0, w_consistency=0.0)
    out = spoco_loss(emb, None, labels.reshape(1, 1, 4), valid.reshape(1, 1, 4), cfg, fg_logits=logits.reshape(1, 1, 4))
    assert out["foreground"].item() == pytest.approx(expected.item(), rel=1e-6)
    rest = sum(out[t] for t in ("pull", "push", "obj", "unlabeled_push")) + 0.001 * out["reg"]
    assert out["loss"].item() == pytest.approx((rest + 2 * out["foreground"]).item(), rel=1e-5)
    assert spoco_loss(emb, None, labels.reshape(1, 1, 4), None, cfg)["foreground"].item() == 0


def test_total_is_weighted_sum():
    torch.manual_seed(0)
    emb = torch.randn(2, 4, 8, 8)
    lab = torch.zeros(2, 8, 8, dtype=torch.long)
    lab[:, :4, :4] = 1
    lab[:, 4:, 4:] = 2
    cfg = SpocoLossConfig(w_pull=2.0, w_push=0.5, w_reg=0.1, w_obj=3.0, w_unlabeled_push=0.25, w_consistency=0.0)
    out = spoco_loss(emb, emb + 0.1, lab, None, cfg, torch.Generator().manual_seed(0))
    expected = 2 * out["pull"] + 0.5 * out["push"] + 0.1 * out["reg"] + 3 * out["obj"] + 0.25 * out["unlabeled_push"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["consistency"].item() == 0  # weight 0 -> not computed


# -- gradient tests: every term reaches the network and one step of its gradient lowers it ---------


def _setup(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)
    )
    x = torch.randn(1, 1, 16, 16)
    lab = torch.zeros(16, 16, dtype=torch.long)
    lab[2:7, 2:7] = 1
    lab[9:14, 2:7] = 2
    lab[2:7, 9:14] = 3
    x[0, 0][lab == 1] += 1.0
    x[0, 0][lab == 2] -= 1.0
    return net, x, lab.flatten()


def _term_value(name, net, x, lab, g_net=None):
    emb = net(x)[0].reshape(4, -1) * 3
    valid = torch.ones_like(lab, dtype=torch.bool)
    n = int(lab.max())
    mu, counts = instance_means(emb, lab, n)
    gen = torch.Generator().manual_seed(1)
    if name == "pull":
        return pull_term(emb, lab, mu, counts, 0.1)
    if name == "push":
        return push_term(mu, 2.0)
    if name == "reg":
        return reg_term(mu)
    if name == "obj":
        return object_term(emb, lab, valid, mu, n, SpocoLossConfig(), gen)
    if name == "unlabeled_push":
        return unlabeled_push_term(emb, lab == 0, mu, 2.0)
    if name == "consistency":  # g's graph is kept: only the loss's own stop-gradient may cut it
        eg = g_net(x)[0].reshape(4, -1) * 3
        return consistency_term(emb, eg, lab == 0, valid, SpocoLossConfig(), gen)
    if name == "foreground":  # the last channel as the foreground logit
        return foreground_term(emb[-1][None], lab[None], valid[None])
    if name == "affinity":  # the channels as logits of offsets (-1, 0), (0, -1), (-3, 0), (0, -3)
        offsets = [[-1, 0], [0, -1], [-3, 0], [0, -3]]
        lab2, val2 = lab.reshape(1, 16, 16), valid.reshape(1, 16, 16)
        return affinity_term(emb.reshape(1, 4, 16, 16), *affinity_targets(lab2, val2, offsets))
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["pull", "push", "reg", "obj", "unlabeled_push", "consistency", "foreground",
                                  "affinity"])
def test_gradient_reaches_network_and_lowers_term(name):
    net, x, lab = _setup()
    g_net = None
    if name == "consistency":
        import copy

        g_net = copy.deepcopy(net)
        with torch.no_grad():
            for p in g_net.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        # g keeps requires_grad (deepcopy of f): the test must not cut its graph itself, so that
        # "g receives nothing" checks the stop-gradient inside the consistency term
        assert all(p.requires_grad for p in g_net.parameters())
    before = _term_value(name, net, x, lab, g_net)
    assert before.item() > 0, f"{name} is already 0 on this case"
    before.backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    if g_net is not None:  # stop-gradient: the EMA network receives nothing
        assert all(p.grad is None for p in g_net.parameters())
        g_net.requires_grad_(False)  # the descent below only measures f
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    for _ in range(5):
        opt.zero_grad()
        _term_value(name, net, x, lab, g_net).backward()
        opt.step()
    after = _term_value(name, net, x, lab, g_net)
    assert after.item() < before.item()


def test_spoco_loss_stops_the_gradient_to_the_ema_view():
    torch.manual_seed(0)
    emb_f = torch.randn(1, 4, 12, 12, requires_grad=True)
    emb_g = (emb_f.detach() + 0.3 * torch.randn(1, 4, 12, 12)).requires_grad_(True)
    lab = torch.zeros(1, 12, 12, dtype=torch.long)
    lab[:, :4, :4] = 1
    lab[:, 6:10, 6:10] = 2
    out = spoco_loss(emb_f, emb_g, lab, None, SpocoLossConfig(), torch.Generator().manual_seed(0))
    assert out["consistency"].item() > 0
    out["loss"].backward()
    assert emb_f.grad is not None and emb_f.grad.abs().sum() > 0
    assert emb_g.grad is None  # stopgrad(S^g): nothing flows into the EMA network's output


# -- affinities from sparse labels -------------------------------------------------------------------


def test_affinity_targets_2d_by_hand():
    # one labeled object (1) in the middle row; 0 unlabeled; the last pixel is ignored
    lab = torch.tensor([[[0, 0, 0, 0],
                         [0, 1, 1, 0],
                         [0, 0, 0, 0]]])
    valid = torch.ones_like(lab, dtype=torch.bool)
    valid[0, 2, 3] = False
    target, mask = affinity_targets(lab, valid, [[0, -1], [-1, 0], [0, -3]])
    # offset (0, -1): pair (i, i + (0, -1)), stored at i; leaves the image at x = 0
    assert mask[0, 0].tolist() == [[False, False, False, False],
                                   [False, True, True, True],
                                   [False, False, False, False]]
    assert target[0, 0][1].tolist() == [0, 0, 1, 0]  # inside the object only between its two pixels
    # offset (-1, 0): row 1 pairs with row 0, row 2 with row 1; both unlabeled -> not annotated
    assert mask[0, 1].tolist() == [[False] * 4, [False, True, True, False], [False, True, True, False]]
    assert target[0, 1].sum() == 0
    # long offset (0, -3): x = 3 pairs with x = 0; (1, 3)-(1, 0) is unlabeled-unlabeled
    assert mask[0, 2].sum() == 0
    lab[0, 1, 3] = 1  # a wider object: now (1, 3)-(1, 0) is object-unlabeled: annotated, target 0
    target, mask = affinity_targets(lab, valid, [[0, -3]])
    assert mask[0, 0, 1, 3] and target[0, 0, 1, 3] == 0
    # ignored pixels take no part: (2, 3) pairs with (1, 3) under (-1, 0)
    _, mask = affinity_targets(lab, valid, [[-1, 0]])
    assert not mask[0, 0, 2, 3] and mask[0, 0, 2, 1]


def test_affinity_targets_3d_long_z_offset_uses_its_length():
    lab = torch.zeros(1, 5, 2, 2, dtype=torch.long)
    lab[0, 0:3] = 1  # an object 3 slices deep; slices 3 and 4 unlabeled
    valid = torch.ones_like(lab, dtype=torch.bool)
    target, mask = affinity_targets(lab, valid, [[-2, 0, 0], [-1, 0, 0]])
    # z offset -2: slice z pairs with z - 2 (not z - 1)
    assert mask[0, 0, 2].all() and target[0, 0, 2].all()  # 2 -> 0: inside the object
    assert mask[0, 0, 3].all() and not target[0, 0, 3].any()  # 3 -> 1: unlabeled vs object
    assert mask[0, 0, 4].all() and not target[0, 0, 4].any()  # 4 -> 2: unlabeled vs object
    assert not mask[0, 0, :2].any()  # leaves the stack
    assert mask[0, 1, 3].all() and not mask[0, 1, 4].any()  # 4 -> 3: both unlabeled


def test_affinity_term_by_hand():
    logits = torch.zeros(1, 2, 1, 3)  # p = 0.5 everywhere: BCE = ln 2 on every annotated pair
    target = torch.tensor([[[[1.0, 0.0, 1.0]], [[0.0, 0.0, 0.0]]]])
    mask = torch.tensor([[[[True, True, False]], [[False, False, False]]]])
    assert affinity_term(logits, target, mask).item() == pytest.approx(math.log(2))
    logits[0, 0, 0, 0] = 10.0  # confident and right on one pair, p = 0.5 on the other
    expected = (math.log1p(math.exp(-10)) + math.log(2)) / 2
    assert affinity_term(logits, target, mask).item() == pytest.approx(expected, rel=1e-5)
    assert affinity_term(logits, target, torch.zeros_like(mask)).item() == 0
