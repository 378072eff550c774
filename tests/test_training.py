import numpy as np
import pytest
import torch

from napari_sparseseg import SparseSegError, TrainConfig, Trainer, load_model, predict, segment_embeddings
from napari_sparseseg.core.metrics import evaluate
from napari_sparseseg.core.segment import segment
from napari_sparseseg.core.samples import synthetic_cells
from napari_sparseseg.core.sparsify import sparsify

# SPOCO explicitly (its EMA network, coordinate channels and losses are tested here; CRAC: test_crac.py)
FAST = dict(method="spoco", batch_size=2, patch_shape=(64, 64), base_channels=8, depth=3, checkpoint_every=1e9)


def _score(model, img, gt, mask=None):
    return evaluate(segment(model, img, device="cpu", mask=mask), gt)["sbd"]


def test_training_beats_untrained_network(cells2d, tmp_path):
    imgs = [c[0] for c in cells2d[:3]]
    sparse = [sparsify(c[1], 0.3, i) for i, c in enumerate(cells2d[:3])]
    test_img, test_gt = cells2d[3]
    trainer = Trainer(imgs, sparse, TrainConfig(iterations=150, seed=0, lr=3e-3, **FAST), out=tmp_path / "m")
    untrained = _score(trainer.model, test_img, test_gt)
    # the embeddings themselves, with the true foreground given: what the loss trains
    untrained_emb = _score(trainer.model, test_img, test_gt, test_gt > 0)
    events = list(trainer.run())
    assert events[-1].done and events[-1].reason == "iterations"
    assert [e.iteration for e in events[:-1]] == list(range(1, 151))
    first = np.mean([e.losses["loss"] for e in events[:10]])
    last = np.mean([e.losses["loss"] for e in events[-11:-1]])
    assert last < first
    trained = _score(load_model(tmp_path / "m"), test_img, test_gt)
    # the whole pipeline (its foreground head is still poorly calibrated after 150 steps)
    assert trained > untrained + 0.05, (untrained, trained)
    trained_emb = _score(load_model(tmp_path / "m"), test_img, test_gt, test_gt > 0)
    assert trained_emb > untrained_emb + 0.3, (untrained_emb, trained_emb)


def test_segment_mask_is_given_at_image_resolution(cells2d):
    img, gt = cells2d[0]
    model = Trainer([img], [sparsify(gt, 0.3)], TrainConfig(iterations=1, **FAST)).model
    # the model zooms the image; the mask still has the image's shape, and nothing outside it is labeled
    inside = np.zeros(gt.shape, bool)
    inside[:64] = True
    seg = segment(model, img, device="cpu", mask=inside)
    assert seg.shape == gt.shape and not seg[~inside].any()
    with pytest.raises(SparseSegError, match=r"mask: shape \(64, 64\) does not match the image's \(128, 128\)"):
        segment(model, img, device="cpu", mask=np.ones((64, 64), bool))


def test_stop_takes_effect_at_next_step_and_leaves_a_model(cells2d, tmp_path):
    img, gt = cells2d[0]
    trainer = Trainer([img], [sparsify(gt, 0.3)], TrainConfig(iterations=1000, **FAST), out=tmp_path / "m")
    for ev in trainer.run():
        if ev.iteration == 3:
            trainer.stop()
        last = ev
    assert last.done and last.reason == "stopped" and last.iteration == 3
    m = load_model(tmp_path / "m", with_optimizer=True)
    assert m.config["training"]["iteration"] == 3
    # resume continues the counter and the optimiser state
    t2 = Trainer([img], [sparsify(gt, 0.3)], TrainConfig(iterations=2, **FAST), out=tmp_path / "m", init=m, resume=True)
    assert t2.iteration == 3
    list(t2.run())
    assert load_model(tmp_path / "m").config["training"]["iteration"] == 5


def test_time_limit_and_periodic_checkpoint(cells2d, tmp_path):
    img, gt = cells2d[0]
    cfg = TrainConfig(time_limit=3.0, **{**FAST, "checkpoint_every": 0.5})
    events = list(Trainer([img], [sparsify(gt, 0.5)], cfg, out=tmp_path / "m").run())
    assert events[-1].reason == "time limit" and 2.5 < events[-1].seconds < 10
    assert any(e.checkpoint is not None for e in events[:-1])


def test_crash_keeps_last_good_checkpoint(cells2d, tmp_path, monkeypatch):
    img, gt = cells2d[0]
    trainer = Trainer([img], [sparsify(gt, 0.5)], TrainConfig(iterations=100, **FAST), out=tmp_path / "m")
    real_step = trainer.step

    def step(progress=0.0):
        if trainer.iteration == 4:
            raise RuntimeError("out of memory")
        return real_step(progress)

    monkeypatch.setattr(trainer, "step", step)
    with pytest.raises(RuntimeError, match="out of memory"):
        list(trainer.run())
    assert load_model(tmp_path / "m").config["training"]["iteration"] == 4


def test_nan_losses_are_skipped_then_reported(cells2d, tmp_path, monkeypatch):
    img, gt = cells2d[0]
    trainer = Trainer([img], [sparsify(gt, 0.5)], TrainConfig(iterations=50, **FAST), out=tmp_path / "m")
    import napari_sparseseg.core.methods.spoco as S

    monkeypatch.setattr(S, "spoco_loss", lambda *a, **k: {"loss": torch.tensor(float("nan"), requires_grad=True)})
    with pytest.raises(SparseSegError, match="training diverged"):
        list(trainer.run())


def test_full_supervision_with_background_id_trains_as_dense_labels(cells2d):
    # a painted background is known background: it trains exactly like dense labels with
    # background 0 (so dense labels give at least what sparse labels give), with the same network
    img, gt = cells2d[0]
    painted = np.where(gt == 0, gt.max() + 1, gt)
    with_id = Trainer([img], [painted], TrainConfig(iterations=2, background_id=int(gt.max()) + 1, **FAST))
    plain = Trainer([img], [gt], TrainConfig(iterations=2, **FAST))
    assert np.array_equal(with_id.samples[0].labels, plain.samples[0].labels)
    assert with_id.samples[0].labels.min() == 0  # background is unlabeled, not an object
    assert with_id.model.config["network"] == plain.model.config["network"]
    assert with_id.model.config["network"]["foreground"] and with_id.model.config["network"]["coord_scale"] > 0
    ev = list(with_id.run())[-2]
    assert ev.losses["unlabeled_push"] > 0 and ev.losses["foreground"] > 0


def test_3d_training_and_segmentation(tmp_path):
    img, gt = synthetic_cells((16, 48, 48), radius=(6, 9), seed=1)
    cfg = TrainConfig(iterations=3, batch_size=1, patch_shape=(16, 32, 32), base_channels=4, depth=3, method="spoco")
    trainer = Trainer([img], [sparsify(gt, 0.3)], cfg, out=tmp_path / "m3")
    list(trainer.run())
    model = trainer.model
    assert model.config["network"]["ndim"] == 3 and len(model.config["offsets"]) == 12
    emb = predict(load_model(tmp_path / "m3"), img, device="cpu")
    assert emb.shape == (16,) + img.shape
    seg = segment_embeddings(emb)
    assert seg.shape == img.shape


def test_fine_tune_from_model_checks_dimensionality(cells2d, tmp_path):
    img, gt = cells2d[0]
    Trainer([img], [sparsify(gt, 0.3)], TrainConfig(iterations=1, **FAST), out=tmp_path / "m").save()
    base = load_model(tmp_path / "m")
    stack, sgt = synthetic_cells((8, 32, 32), radius=(5, 8), seed=0)
    with pytest.raises(SparseSegError, match="is 3D but the model was trained on 2D images"):
        Trainer([stack], [sgt], TrainConfig(iterations=1), init=base)
    rgb = np.stack([img] * 3, -1)
    with pytest.raises(SparseSegError, match="has 3 channel.s. but the model expects 1; convert it to greyscale first"):
        Trainer([rgb], [gt], TrainConfig(iterations=1), init=base)
    tuned = Trainer([img], [gt], TrainConfig(iterations=1, finetune="always", **FAST), init=base)
    # fine-tuning keeps the network; the new images get the zooms of their own objects
    assert tuned.iteration == 0 and tuned.model.config["network"] == base.config["network"]
    assert tuned.model_config["scale"]["target_diameter"] == base.config["scale"]["target_diameter"]


def test_fine_tuning_sets_aside_a_model_that_does_not_find_the_painted_objects(cells2d, tmp_path, monkeypatch):
    """``finetune="auto"``: a parent whose own segmentation misses the painted objects is dropped and
    the run is exactly a fresh one (same seed, same data); one that finds them is fine-tuned."""
    from napari_sparseseg.core import transfer

    img, gt = cells2d[0]
    sparse = sparsify(gt, 0.3)
    Trainer([img], [sparse], TrainConfig(iterations=1, **FAST), out=tmp_path / "p").save()
    parent = load_model(tmp_path / "p")
    seen = []

    def recovery(value):
        def fake(model, images, labels, diameters, voxel_sizes=None, background_id=None):
            seen.append((model, len(images), diameters))
            return value
        return fake

    monkeypatch.setattr(transfer, "painted_recovery", recovery(0.05))
    dropped = Trainer([img], [sparse], TrainConfig(iterations=3, seed=4, **FAST), init=parent)
    assert seen and seen[0][0] is parent and seen[0][2][0] == pytest.approx(float(dropped.scale_config["diameter"]))
    assert "parent" not in dropped.model_config
    assert dropped.model_config["fine_tune"] == {"parent": str(tmp_path / "p"), "recovery": 0.05,
                                                 "min_recovery": transfer.MIN_RECOVERY, "kept": False}
    events = list(dropped.run())
    assert "does not find the painted objects (mean best IoU 0.05, below 0.2)" in events[0].note
    assert "a fresh network is trained instead" in events[0].note and not events[1].note
    fresh = Trainer([img], [sparse], TrainConfig(iterations=3, seed=4, **FAST))
    list(fresh.run())
    for a, b in zip(dropped.net.state_dict().values(), fresh.net.state_dict().values()):
        torch.testing.assert_close(a, b)

    monkeypatch.setattr(transfer, "painted_recovery", recovery(0.6))
    kept = Trainer([img], [sparse], TrainConfig(iterations=1, **FAST), init=parent)
    assert kept.model_config["parent"] == str(tmp_path / "p") and kept.model_config["fine_tune"]["kept"]
    assert kept.note.startswith(f"fine-tuning {tmp_path / 'p'}: it already finds the painted objects (mean best IoU 0.60)")
    for a, b in zip(kept.net.state_dict().values(), parent.net.state_dict().values()):
        torch.testing.assert_close(a, b)  # starts from the parent's weights

    # "always" and resuming never ask
    monkeypatch.setattr(transfer, "painted_recovery", lambda *a, **k: pytest.fail("asked"))
    notes = [Trainer([img], [sparse], TrainConfig(iterations=1, finetune="always", **FAST), init=parent).note,
             Trainer([img], [sparse], TrainConfig(iterations=1, **FAST), init=load_model(tmp_path / "p"),
                     resume=True).note]
    assert not any("fine-tuning" in n or "mean best IoU" in n for n in notes)


def test_painted_recovery_matches_each_painted_object_with_its_best_segment(monkeypatch):
    from napari_sparseseg.core import segment as seg_mod, transfer

    lab = np.zeros((6, 6), int)
    lab[:2, :2] = 3   # 4 px, found exactly
    lab[3:, 3:] = 9   # 9 px; the segment covers 6 of them and 3 more: IoU 6 / 12
    seg = np.zeros((6, 6), int)
    seg[:2, :2] = 1
    seg[3:5, 3:] = 2
    seg[5, :3] = 2
    seg[5, 3:] = 0
    np.testing.assert_allclose(transfer.best_ious(seg, lab), [1.0, 0.5])
    np.testing.assert_allclose(transfer.best_ious(np.zeros_like(seg), lab), [0.0, 0.0])  # background is no match
    np.testing.assert_allclose(transfer.best_ious(seg, np.where(lab == 9, 9, 0), background_id=9), [])
    calls = []
    monkeypatch.setattr(seg_mod, "segment", lambda model, image, diameter, voxel_size, name: calls.append(
        (int(image[0, 0]), diameter)) or seg)
    empty = np.zeros_like(lab)
    images = [np.full((6, 6), i) for i in range(3)]
    # the images with the most painted objects first, at most max_images; unpainted ones never
    r = transfer.painted_recovery(None, images, [empty, np.where(lab == 3, 3, 0), lab], [5.0, 6.0, 7.0],
                                  max_images=1)
    assert calls == [(2, 7.0)] and r == pytest.approx(0.75)
    calls.clear()
    assert transfer.painted_recovery(None, images, [empty, np.where(lab == 3, 3, 0), lab], [5.0, 6.0, 7.0]) == \
        pytest.approx((1 + 0.5 + 1) / 3)
    assert calls == [(2, 7.0), (1, 6.0)]
    # only background painted (dense labels' background id): nothing to recover, no NaN
    assert transfer.painted_recovery(None, images[:1], [np.where(lab == 9, 9, 0)], [5.0], background_id=9) == 0.0


def test_user_errors():
    img = np.zeros((32, 32), np.uint8)
    with pytest.raises(SparseSegError, match="no labeled object in any label image"):
        Trainer([img], [np.zeros((32, 32), int)])
    with pytest.raises(SparseSegError, match="1 image.s. but 2 label image.s."):
        Trainer([img], [np.zeros((32, 32), int)] * 2)
    with pytest.raises(SparseSegError, match="time limit must be > 0"):
        TrainConfig(time_limit=0)
    with pytest.raises(SparseSegError, match="no CUDA GPU is available here"):
        lab = np.zeros((32, 32), int)
        lab[:5, :5] = 1
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        Trainer([img], [lab], TrainConfig(device="cuda"))


def test_coordinate_scale_with_crac_is_an_error_not_ignored():
    img, lab = np.zeros((32, 32), np.uint8), np.zeros((32, 32), int)
    lab[:5, :5] = 1
    with pytest.raises(SparseSegError, match=r"coord_scale 0.2: CRAC's networks have no coordinate channels; "
                                             r"it applies to SPOCO \(--method spoco\)"):
        Trainer([img], [lab], TrainConfig(method="crac", coord_scale=0.2, iterations=1))


def test_worker_generator_previews_periodically_and_at_the_end_but_not_after_stop(cells2d):
    from napari_sparseseg.core.training_process import Preview, train_steps

    img, gt = cells2d[0]
    trainer = Trainer([img], [sparsify(gt, 0.3)], TrainConfig(iterations=3, **FAST))
    out = list(train_steps(trainer, preview_image=img, preview_every=0.0, first_preview=0.0))
    kinds = ["P" if isinstance(o, Preview) else ("D" if o.done else "E") for o in out]
    assert kinds == ["E", "P", "E", "P", "E", "P", "D", "P"]  # a preview after each step, one for the final model
    assert out[-1].iteration == 3 and out[-1].labels.shape == img.shape

    # a long first delay: only the final preview; after Stop: none
    out = list(train_steps(trainer, preview_image=img, preview_every=100.0, first_preview=100.0))
    assert sum(isinstance(o, Preview) for o in out) == 1 and isinstance(out[-1], Preview)
    trainer.config.iterations = 1000
    gen = train_steps(trainer, preview_image=img, preview_every=100.0, first_preview=100.0)
    out = [next(gen)]
    trainer.stop()
    out += list(gen)
    assert out[-1].done and out[-1].reason == "stopped"
    assert not any(isinstance(o, Preview) for o in out)
    assert trainer.net.training


def test_segment_background_from_foreground_head_or_largest_segment_with_ema_agreement(cells2d, monkeypatch):
    import napari_sparseseg.core.segment as S

    img, gt = cells2d[0]
    trainer = Trainer([img], [sparsify(gt, 0.3)], TrainConfig(iterations=2, **FAST))
    assert trainer.model.config["foreground"]["c"] is None  # not measured before the first step
    list(trainer.run())
    model = trainer.model
    assert 0 < model.config["foreground"]["c"] < 1
    calls = []
    real = S.predict_scaled

    def spy(*args, **kwargs):
        calls.append(kwargs.get("use_ema", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(S, "predict_scaled", spy)
    # no foreground head (config {}): background by the largest segment, filtered by agreement with g
    assert S.needs_g("mws") and not S.needs_g("mws", agreement=0) and not S.needs_g("hdbscan")
    assert S.needs_g("hdbscan", agreement=0.5) and S.needs_g("consistency")
    # with a foreground head: the head finds background, g is not needed
    assert not S.needs_g("mws", model.config) and S.needs_g("mws", model.config, background="largest")
    S.segment(model, img, device="cpu")
    assert calls == [False]
    calls.clear()
    S.segment(model, img, device="cpu", background="largest")
    assert calls == [False, True]
    calls.clear()
    S.segment(model, img, device="cpu", background="largest", agreement=0)
    assert calls == [False]
    # the foreground threshold decides which segments are objects
    embedded = S.embed(model, img, device="cpu")
    everything = S.cluster(model, embedded, fg_threshold=0.0, min_size=0)
    nothing = S.cluster(model, embedded, fg_threshold=1.01)
    assert nothing.max() == 0 and everything.max() > 0
    # cached f embeddings without g: cluster() falls back to f alone instead of failing
    assert S.cluster(model, embedded, background="largest").shape == img.shape


def test_background_rule_errors_name_the_choice(cells2d):
    import napari_sparseseg.core.segment as S

    img, gt = cells2d[0]
    full = Trainer([img], [gt], TrainConfig(iterations=1, foreground=False, **FAST)).model
    assert "foreground" not in full.config and S.resolve_background(full.config) == "largest"
    sparse = Trainer([img], [sparsify(gt, 0.3)], TrainConfig(iterations=1, **FAST)).model
    # coordinate channels: 4 embedding units per target diameter (32 px in 2D)
    assert sparse.config["network"]["coord_scale"] == 0.125 and sparse.config["network"]["foreground"]
    with pytest.raises(SparseSegError, match="background 'foreground': this model has no foreground head"):
        S.segment(full, img, device="cpu", background="foreground")
    with pytest.raises(SparseSegError, match="background: expected one of auto, foreground, largest, none, got 'soil'"):
        S.resolve_background(full.config, "soil")


def _params(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("iteration", [0, 3, 100_000])
def test_ema_network_follows_f_after_each_optimizer_step(cells2d, iteration):
    """theta_g <- m theta_g + (1 - m) theta_f with theta_f *after* the optimizer step (SPEC 2), with
    the trainer's momentum: ramped up early on, the configured m once ramped."""
    img, gt = cells2d[0]
    trainer = Trainer([img], [sparsify(gt, 0.3)], TrainConfig(iterations=10, ema_momentum=0.9, **FAST))
    trainer.step()  # g and f differ from here on
    trainer.iteration = iteration
    m = trainer.method._momentum(trainer.iteration)
    assert 0 < m <= 0.9
    if iteration == 100_000:
        assert m == 0.9  # the configured momentum, once the ramp is over
    f0, g0 = _params(trainer.net), _params(trainer.ema)
    params = dict(trainer.net.named_parameters())
    assert any(not torch.equal(f0[k], g0[k]) for k in params)
    trainer.step()
    f1, g1 = _params(trainer.net), _params(trainer.ema)
    assert any(not torch.equal(f0[k], f1[k]) for k in params)  # the optimizer moved f
    moved_before = moved_after = 0.0
    for k in params:
        # the rule with f after the step (with f before it, g1 would be m g0 + (1 - m) f0)
        torch.testing.assert_close(g1[k], m * g0[k] + (1 - m) * f1[k], rtol=1e-6, atol=1e-7)
        moved_before += float((g0[k] - f1[k]).abs().sum())
        moved_after += float((g1[k] - f1[k]).abs().sum())
    assert moved_after < moved_before  # g moved towards f
    assert not any(p.requires_grad for p in trainer.ema.parameters())  # no gradient step on g
    for k in set(f1) - set(params):  # buffers are copied from f
        assert torch.equal(g1[k], f1[k]), k


def test_prediction_and_segmentation_never_change_either_network(cells2d):
    import napari_sparseseg.core.segment as S

    img, gt = cells2d[0]
    trainer = Trainer([img], [sparsify(gt, 0.3)], TrainConfig(iterations=2, **FAST))
    list(trainer.run())
    model = trainer.model
    f0, g0 = _params(model.net), _params(model.ema)
    assert any(not torch.equal(f0[k], g0[k]) for k in f0)

    def unchanged():
        f1, g1 = _params(model.net), _params(model.ema)
        return all(torch.equal(f0[k], f1[k]) for k in f0) and all(torch.equal(g0[k], g1[k]) for k in g0)

    predict(model, img, device="cpu")
    assert unchanged(), "predict(f) changed a network"
    predict(model, img, device="cpu", use_ema=True)
    assert unchanged(), "predict(use_ema=True) changed a network"
    segment(model, img, device="cpu")
    assert unchanged(), "segment() changed a network"
    S.segment(model, img, device="cpu", background="largest", agreement=0.5)  # predicts with f and g
    assert unchanged(), "segment() with the EMA network changed a network"


def test_ignore_mask_removes_pixels_from_training(cells2d):
    img, gt = cells2d[0]
    sparse = sparsify(gt, 0.5)
    ignore = np.zeros(gt.shape, bool)
    ignore[:, :64] = True
    trainer = Trainer([img], [sparse], TrainConfig(iterations=1, **FAST), ignore=[ignore])
    s = trainer.samples[0]
    z = s.zoom
    cut = int(round(64 * z))
    assert not s.valid[:, : cut - 1].any() and s.valid[:, cut + 1 :].all()
    assert (s.labels[:, : cut - 1] == 0).all()
    # objects only inside the ignored part do not count, nor centre crops
    left_only = [i for i in np.unique(sparse[:, :64]) if i and not (sparse[:, 64:] == i).any()]
    assert len(s.objects) == len(np.unique(sparse[sparse > 0])) - len(left_only)
    with pytest.raises(SparseSegError, match="1 ignore mask.s. for 2 label image.s."):
        Trainer([img, img], [sparse, sparse], TrainConfig(iterations=1, **FAST), ignore=[ignore])


def test_unknown_method_is_named_in_the_error():
    with pytest.raises(SparseSegError, match="method 'crack': expected auto or one of spoco, crac"):
        TrainConfig(method="crack")
    with pytest.raises(SparseSegError, match="finetune 'never': expected auto or always"):
        TrainConfig(finetune="never")


def test_learning_rate_rule_lives_in_the_engine(cells2d, tmp_path):
    from napari_sparseseg.core.training import FINE_TUNE_LR, LR

    img, gt = cells2d[0]
    first = Trainer([img], [sparsify(gt, 0.3)], TrainConfig(iterations=1, **FAST), out=tmp_path / "a")
    list(first.run())
    assert first.config.lr == LR
    tuned = Trainer([img], [sparsify(gt, 0.3)], TrainConfig(iterations=1, finetune="always", **FAST),
                    init=load_model(tmp_path / "a"))
    assert tuned.config.lr == FINE_TUNE_LR and tuned.optimizer.param_groups[0]["lr"] == FINE_TUNE_LR
    resumed = Trainer([img], [sparsify(gt, 0.3)], TrainConfig(iterations=1, **FAST), init=load_model(tmp_path / "a"),
                      resume=True)
    assert resumed.config.lr == LR


def test_the_loop_only_talks_to_the_method_interface(cells2d, monkeypatch):
    """A method registered beside SPOCO is trained by the same loop: its loss is minimised, its
    after_step hook runs once per optimizer step, its config lands in the model."""
    from napari_sparseseg.core import methods
    from napari_sparseseg.core.methods.base import Method

    class Mean(Method):
        name = "mean"

        def __init__(self, config, ndim, channels, offsets, device, autocast_dtype=None, init=None):
            super().__init__(config, ndim, channels, offsets, device, autocast_dtype, init)
            self.net = torch.nn.Conv2d(channels, 1, 1)
            self.net.divisor = (1, 1)
            self.steps = []

        @property
        def networks(self):
            return {"f": self.net}

        def losses(self, image, labels, valid, generator, progress, heldout=None):
            loss = ((self.net(image) - 1) ** 2).mean()
            return {"loss": loss, "fit": loss}

        def after_step(self, iteration):
            self.steps.append(iteration)

        def model_config(self):
            return {"method": self.name, "network": {"kind": "conv"}}

    monkeypatch.setitem(methods.METHODS, "mean", Mean)
    monkeypatch.setattr("napari_sparseseg.core.training.METHOD_NAMES", ("spoco", "mean"))
    img, gt = cells2d[0]
    trainer = Trainer([img], [sparsify(gt, 0.3)], TrainConfig(iterations=30, lr=0.05, **dict(FAST, method="mean")))
    events = list(trainer.run())
    assert trainer.method.steps == list(range(30))
    assert events[-2].losses["fit"] < events[0].losses["fit"] / 2
    model = trainer.model
    assert model.config["method"] == "mean" and model.net is trainer.method.net and model.ema is None


def test_auto_method_follows_the_dimensionality(cells2d):
    from napari_sparseseg.core.methods import DEFAULT_METHOD

    img, gt = cells2d[0]
    cfg2 = TrainConfig(iterations=1, **dict(FAST, method="auto"))
    assert Trainer([img], [sparsify(gt, 0.3)], cfg2).method.name == DEFAULT_METHOD[2] == cfg2.method
    stack, sgt = synthetic_cells((16, 32, 32), radius=(5, 8), seed=0)
    cfg = TrainConfig(iterations=1, patch_shape=(16, 32, 32), depth=3)
    assert Trainer([stack], [sparsify(sgt, 0.3)], cfg).method.name == DEFAULT_METHOD[3] == cfg.method


def test_grey_and_rgb_images_train_together_and_a_grey_image_fits_an_rgb_model(cells2d, tmp_path):
    from napari_sparseseg.core.prediction import predict_scaled

    (img, gt), (img2, gt2) = cells2d[0], cells2d[1]
    rgb = np.stack([img2, img2 // 2, img2], -1)
    mixed = Trainer([img, rgb], [sparsify(gt, 0.3), sparsify(gt2, 0.3)], TrainConfig(iterations=1, **FAST),
                    out=tmp_path / "m")
    assert mixed.model.in_channels == 3
    assert np.array_equal(mixed.samples[0].image[0], mixed.samples[0].image[2])  # the grey one, repeated
    mixed.save()
    model = load_model(tmp_path / "m")
    assert predict_scaled(model, img, device="cpu").shape == img.shape
    Trainer([img], [gt], TrainConfig(iterations=1, **FAST), init=model)  # fine-tuning it on a grey image


def test_a_diameter_from_a_few_painted_objects_is_reported_and_a_given_one_is_not():
    img = np.random.default_rng(0).random((200, 200)).astype(np.float32)
    lab = np.zeros((200, 200), int)
    lab[10:90, 10:90], lab[100:160, 100:160], lab[20:60, 120:160] = 1, 2, 3  # 90, 68, 45 px across
    note = Trainer([img], [lab], TrainConfig(iterations=1, **FAST)).note
    assert note.startswith("object diameter 68 px, from only 3 painted objects (45-90 px): it may be off by up to")
    assert note.endswith("set the object diameter if you know it")
    assert Trainer([img], [lab], TrainConfig(iterations=1, diameter=68, **FAST)).note == ""
