import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile

from napari_sparseseg.cli import main
from napari_sparseseg.core.samples import synthetic_cells

# SPOCO explicitly: these tests exercise its EMA network and clustering choices (CRAC: test_crac.py)
FAST = ["--method", "spoco", "--batch-size", "1", "--patch-shape", "64,64", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three images with dense ground truth and 30 % sparse labels, as files."""
    root = tmp_path_factory.mktemp("data")
    for d in ("img", "gt"):
        (root / d).mkdir()
    for i in range(3):
        img, lab = synthetic_cells((96, 96), seed=i)
        tifffile.imwrite(root / "img" / f"c{i}.tif", img)
        tifffile.imwrite(root / "gt" / f"c{i}_gt.tif", lab)
    assert main(["sparsify", "--labels", str(root / "gt" / "*.tif"), "--fraction", "0.3", "--out", str(root / "sparse")]) == 0
    return root


@pytest.fixture(scope="module")
def model(data):
    out = data / "model"
    assert main(["train", "--images", str(data / "img" / "*.tif"), "--labels", str(data / "sparse" / "*.tif"),
                 "--out", str(out), "--iterations", "3", *FAST]) == 0
    return out


def _err(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_sparsify_writes_stems_and_reports(data, capsys):
    main(["sparsify", "--labels", str(data / "gt" / "*.tif"), "--fraction", "0.5", "--seed", "1",
          "--out", str(data / "sp2")])
    out = capsys.readouterr().out
    assert "kept" in out and "in 3 image(s)" in out
    names = sorted(p.name for p in (data / "sp2").iterdir())
    assert names == ["c0_gt.tif", "c1_gt.tif", "c2_gt.tif"]
    gt = tifffile.imread(data / "gt" / "c0_gt.tif")
    sp = tifffile.imread(data / "sp2" / "c0_gt.tif")
    assert len(np.unique(sp[sp > 0])) == int(0.5 * len(np.unique(gt[gt > 0])) + 0.5)  # round half up


def test_train_writes_loadable_model(model, capsys):
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["training"]["iteration"] == 3 and cfg["method"] == "spoco"
    assert cfg["network"]["in_channels"] == 1
    # sparse labels: spatial embeddings and a foreground head with its learned constant c
    assert cfg["network"]["coord_scale"] == 0.125 and cfg["network"]["foreground"]
    assert 0 < cfg["foreground"]["c"] < 1


def test_train_resume_and_refusal_to_overwrite(data, model, capsys):
    argv = ["train", "--images", str(data / "img" / "*.tif"), "--labels", str(data / "sparse" / "*.tif"),
            "--out", str(model), "--iterations", "2", *FAST]
    assert "already holds a model; pass --resume" in _err(capsys, argv)
    assert main(argv + ["--resume"]) == 0
    assert json.loads((model / "config.json").read_text())["training"]["iteration"] == 5


def test_train_from_other_model(data, model, capsys):
    out = data / "tuned"
    assert main(["train", "--images", str(data / "img" / "*.tif"), "--labels", str(data / "sparse" / "*.tif"),
                 "--out", str(out), "--iterations", "1", "--from", str(model), "--finetune", "always", *FAST]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["parent"] == str(model) and cfg["training"]["train_config"]["lr"] == pytest.approx(1e-3)
    assert "fine_tune" not in cfg and cfg["training"]["train_config"]["finetune"] == "always"
    # auto (the default): the model's own segmentation of the painted objects decides, and says so
    capsys.readouterr()
    assert main(["train", "--images", str(data / "img" / "*.tif"), "--labels", str(data / "sparse" / "*.tif"),
                 "--out", str(data / "auto"), "--iterations", "1", "--from", str(model), *FAST]) == 0
    cfg = json.loads((data / "auto" / "config.json").read_text())
    decision = cfg["fine_tune"]
    assert decision["parent"] == str(model) and decision["kept"] == (decision["recovery"] >= 0.2)
    assert ("parent" in cfg) == decision["kept"]
    said = "it already finds the painted objects" if decision["kept"] else "does not find the painted objects"
    assert f"{said} (mean best IoU {decision['recovery']:.2f}" in capsys.readouterr().out


def test_train_errors(data, tmp_path, capsys):
    img = str(data / "img" / "*.tif")
    empty = tmp_path / "empty"
    empty.mkdir()
    for i in range(3):
        tifffile.imwrite(empty / f"e{i}.tif", np.zeros((96, 96), np.uint16))
    base = ["train", "--images", img, "--out", str(tmp_path / "m"), "--iterations", "1", *FAST]
    assert "no labeled object in any label image" in _err(capsys, base + ["--labels", str(empty / "*.tif")])
    assert "--images matched 3 file(s) but --labels matched 1" in _err(
        capsys, base + ["--labels", str(data / "sparse" / "c0_gt.tif")])
    assert "no image file matches" in _err(capsys, base + ["--labels", str(tmp_path / "nothing*.tif")])
    small = tmp_path / "small"
    small.mkdir()
    for i in range(3):
        tifffile.imwrite(small / f"s{i}.tif", np.ones((50, 50), np.uint16))
    assert "image has spatial shape (96, 96) but its labels have shape (50, 50)" in _err(
        capsys, base + ["--labels", str(small / "*.tif")])
    assert "holds no model to resume" in _err(capsys, base + ["--labels", str(data / "sparse" / "*.tif"), "--resume"])


def test_segment_and_evaluate(data, model, capsys):
    assert main(["segment", "--model", str(model), "--images", str(data / "img" / "*.tif"),
                 "--out", str(data / "seg"), "--min-size", "10"]) == 0
    assert sorted(p.name for p in (data / "seg").iterdir()) == ["c0.tif", "c1.tif", "c2.tif"]
    seg = tifffile.imread(data / "seg" / "c0.tif")
    assert seg.shape == (96, 96) and seg.dtype == np.uint16
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(data / "seg" / "*.tif"), "--gt", str(data / "gt" / "*.tif"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    keys = {"sbd", "abs_dic", "ap50", "map", "f1", "aji", "pq", "arand", "voi_split", "voi_merge"}
    assert [r["name"] for r in res["images"]] == ["c0.tif", "c1.tif", "c2.tif"]
    assert set(res["images"][0]) == keys | {"name"} and set(res["mean"]) == keys
    assert res["mean"]["sbd"] == pytest.approx(np.mean([r["sbd"] for r in res["images"]]))
    # a perfect prediction scores 1
    main(["evaluate", "--pred", str(data / "gt" / "*.tif"), "--gt", str(data / "gt" / "*.tif"), "--json"])
    assert json.loads(capsys.readouterr().out)["mean"]["sbd"] == 1.0
    main(["evaluate", "--pred", str(data / "seg" / "*.tif"), "--gt", str(data / "gt" / "*.tif")])
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["name", "sbd", "abs_dic"] and "mean" in table


def test_segment_clustering_choices(data, model, capsys):
    from napari_sparseseg.core.agglomeration import image_share, image_share_note

    image = tifffile.imread(data / "img" / "c0.tif")
    for method in ("hdbscan", "consistency", "multicut"):
        out = data / f"seg_{method}"
        capsys.readouterr()
        assert main(["segment", "--model", str(model), "--images", str(data / "img" / "c0.tif"), "--out", str(out),
                     "--clustering", method, "--min-size", "10"]) == 0
        seg = tifffile.imread(out / "c0.tif")
        assert seg.shape == image.shape and seg.dtype == np.uint16, method
        ids = np.unique(seg)
        if method != "multicut":  # this 3-step model's foreground head may call the whole image dense tissue
            assert ids[0] == 0, f"{method}: no background 0 in {ids}"
        assert np.array_equal(ids, np.arange(ids[0], ids[0] + ids.size)), f"{method}: ids not consecutive: {ids}"
        assert np.all(np.bincount(seg.ravel())[1:] >= 10), f"{method}: an object under --min-size 10"
        report = capsys.readouterr().out
        share = image_share(json.loads((model / "config.json").read_text())["annotation"])
        own = image_share_note(share) if method == "multicut" else ""
        assert f": {ids.max()} objects in" in report and f"s ({method}{own}; object diameter " in report
        assert report.rstrip().endswith(" px, the training scale)"), report
        if method in ("hdbscan", "multicut"):
            assert ids.size >= 2, f"{method}: no object"
        # consistency clustering keeps only clusters g reproduces; this 3-iteration model has none
        # (SPOCO Algorithm 1 needs trained, compact clusters), so no object count is required


def test_segment_background_choices(data, model, tmp_path, capsys):
    img = str(data / "img" / "c0.tif")

    def run(*extra):
        out = tmp_path / "s"
        assert main(["segment", "--model", str(model), "--images", img, "--out", str(out), *extra]) == 0
        return tifffile.imread(out / "c0.tif")

    # the foreground threshold decides which pixels may be objects: 0 keeps all, above 1 none
    assert run("--fg-threshold", "1.01").max() == 0
    assert run("--fg-threshold", "0", "--min-size", "0").min() > 0  # no pixel is background
    assert run("--background", "largest", "--agreement", "0.5").shape == (96, 96)
    # a model without a foreground head (one written by an older version) cannot use it
    from napari_sparseseg import TrainConfig, Trainer

    full = tmp_path / "full"
    Trainer([tifffile.imread(data / "img" / "c0.tif")], [tifffile.imread(data / "gt" / "c0_gt.tif")],
            TrainConfig(iterations=1, foreground=False, patch_shape=(32, 32), base_channels=4, depth=2),
            out=full).save()
    assert "this model has no foreground head" in _err(
        capsys, ["segment", "--model", str(full), "--images", img, "--out", str(tmp_path / "o"), "--background", "foreground"])


def test_segment_errors(data, model, tmp_path, capsys):
    img = str(data / "img" / "c0.tif")
    assert "model folder" in _err(capsys, ["segment", "--model", str(tmp_path / "none"), "--images", img, "--out", str(tmp_path)])
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((12, 40, 40), np.uint8))
    assert "is 3D but the model was trained on 2D images" in _err(
        capsys, ["segment", "--model", str(model), "--images", str(stack), "--out", str(tmp_path / "o")])
    assert "split ratio -1: expected 0 (off) or a ratio of diameters" in _err(
        capsys, ["segment", "--model", str(model), "--images", img, "--out", str(tmp_path / "o"), "--split-ratio", "-1"])
    tampered = tmp_path / "tampered"
    import shutil

    shutil.copytree(model, tampered)
    w = next(tampered.glob("weights-*.safetensors"))
    w.write_bytes(w.read_bytes()[:-8] + b"\0" * 8)
    assert "does not match the checksum" in _err(
        capsys, ["segment", "--model", str(tampered), "--images", img, "--out", str(tmp_path / "o")])
    assert "does not match the ground truth" in _err(
        capsys, ["evaluate", "--pred", str(stack), "--gt", str(data / "gt" / "c0_gt.tif")])


def _score_table(out: str) -> dict[str, dict[str, float]]:
    """The rows of the table 'sparseseg evaluate' prints, by name."""
    from napari_sparseseg.core.metrics import KEYS

    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:1] == ["name"])
    assert lines[head].split() == ["name", *KEYS]
    rows = {}
    for line in lines[head + 1 :]:  # the name column is 28 characters wide
        name, values = line[:28].strip(), line[28:].split()
        assert len(values) == len(KEYS), line
        rows[name] = dict(zip(KEYS, map(float, values)))
    return rows


def test_demo_runs_and_scores(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--time-limit", "4", "--n-train", "2"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "demo" / "model" / "config.json").exists()
    segs = sorted(p.name for p in (tmp_path / "demo" / "seg").glob("*.tif"))
    assert len(segs) == 2
    rows = _score_table(out)
    assert list(rows) == segs + ["mean"]  # one row per test image, then the mean
    for name, r in rows.items():
        for k in ("sbd", "ap50", "map", "f1", "aji", "pq", "arand"):
            assert 0.0 <= r[k] <= 1.0, (name, k, r[k])
        for k in ("abs_dic", "voi_split", "voi_merge"):
            assert r[k] >= 0.0, (name, k, r[k])
        assert r["map"] <= r["ap50"] + 1e-3, name  # AP falls with the IoU threshold
    for name in segs:
        assert rows[name]["abs_dic"] == int(rows[name]["abs_dic"])  # a count difference per image
    for k in rows["mean"]:  # printed with 3 decimals
        assert rows["mean"][k] == pytest.approx(np.mean([rows[n][k] for n in segs]), abs=1.5e-3), k


def _restore_sigint():
    # A shell starts background jobs with SIGINT ignored and children inherit that (Python then installs
    # no KeyboardInterrupt handler): give the child the disposition it has when started from a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig, reason", [(signal.SIGINT, "interrupted (Ctrl-C)"), (signal.SIGTERM, ": stopped;")])
def test_ctrl_c_and_sigterm_stop_cleanly_and_keep_model(data, tmp_path, sig, reason):
    out = tmp_path / "m"
    cmd = [sys.executable, "-m", "napari_sparseseg", "train", "--images", str(data / "img" / "*.tif"),
           "--labels", str(data / "sparse" / "*.tif"), "--out", str(out), "--iterations", "100000",
           "--checkpoint-every", "0.5", *FAST]
    # one thread: the child must not fight the test process's own torch threads for the cores
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=_restore_sigint)
    deadline = time.time() + 120
    while not (out / "config.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(sig)
    try:
        stdout, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stdout
    assert reason in stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["training"]["iteration"] > 0
    from napari_sparseseg import load_model

    load_model(out)


def test_train_ignore_mask_and_diameter(data, tmp_path, capsys):
    masks = tmp_path / "masks"
    masks.mkdir()
    for i in range(3):
        m = np.zeros((96, 96), np.uint8)
        m[:, :48] = 1  # the left half takes no part in training
        tifffile.imwrite(masks / f"c{i}.tif", m)
    base = ["train", "--images", str(data / "img" / "*.tif"), "--labels", str(data / "sparse" / "*.tif"),
            "--iterations", "1", *FAST]
    out = tmp_path / "m"
    assert main(base + ["--out", str(out), "--ignore-mask", str(masks / "*.tif"), "--diameter", "24"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["scale"]["diameter"] == 24 and cfg["scale"]["zoom"] == pytest.approx(32 / 24)
    assert "--ignore-mask matched 1 file(s) but --images matched 3" in _err(
        capsys, base + ["--out", str(tmp_path / "m2"), "--ignore-mask", str(masks / "c0.tif")])
    assert "diameter must be a positive number of pixels, got -5" in _err(
        capsys, base + ["--out", str(tmp_path / "m3"), "--diameter", "-5"])
    seg_out = tmp_path / "seg"
    assert main(["segment", "--model", str(out), "--images", str(data / "img" / "c0.tif"), "--out", str(seg_out),
                 "--diameter", "12"]) == 0
    assert tifffile.imread(seg_out / "c0.tif").shape == (96, 96)
    # 12 px is under half the 2D target (32 px): the note says what the model really saw
    note = "object diameter 12 px, given; zoomed as for 16 px: objects are enlarged at most 2x)"
    assert note in capsys.readouterr().out


def test_voxel_size_from_the_command_line_and_from_tiff_metadata(tmp_path, capsys):
    img, lab = synthetic_cells((10, 48, 48), radius=(5.0, 8.0), seed=4)
    for d in ("img", "lab"):
        (tmp_path / d).mkdir()
    # the stack states its voxel size (ImageJ TIFF): 0.4 um deep, 0.2 um wide
    tifffile.imwrite(tmp_path / "img" / "s.tif", img, imagej=True, resolution=(5.0, 5.0),
                     metadata={"spacing": 0.4, "unit": "um", "axes": "ZYX"})
    tifffile.imwrite(tmp_path / "lab" / "s.tif", lab)
    base = ["train", "--images", str(tmp_path / "img" / "*.tif"), "--labels", str(tmp_path / "lab" / "*.tif"),
            "--iterations", "1", "--method", "spoco", "--batch-size", "1", "--patch-shape", "8,32,32",
            "--base-channels", "4", "--quiet", "--diameter", "16"]
    assert main(base + ["--out", str(tmp_path / "m")]) == 0
    assert "voxel 0.4 x 0.2 x 0.2, z zoom 2," in capsys.readouterr().out
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["scale"]["voxel_size"] == pytest.approx([0.4, 0.2, 0.2])
    # --voxel-size overrides the file's
    assert main(base + ["--out", str(tmp_path / "m2"), "--voxel-size", "0.2", "0.2", "0.2"]) == 0
    assert "z zoom 1," in capsys.readouterr().out
    assert "--voxel-size: expected three positive numbers (z y x), got [0.0, 0.2, 0.2]" in _err(
        capsys, base + ["--out", str(tmp_path / "m3"), "--voxel-size", "0", "0.2", "0.2"])
    # segmentation: labels of the stack's own shape, whether z was zoomed (file / model) or not
    for extra in ([], ["--voxel-size", "0.2", "0.2", "0.2"]):
        assert main(["segment", "--model", str(tmp_path / "m"), "--images", str(tmp_path / "img" / "*.tif"),
                     "--out", str(tmp_path / "seg"), *extra]) == 0
        assert tifffile.imread(tmp_path / "seg" / "s.tif").shape == (10, 48, 48)


def test_voxel_size_for_2d_images_is_an_error(data, tmp_path, capsys):
    assert "voxel_size (1.0, 1.0, 1.0): the images are 2D; a voxel size applies to 3D stacks only" in _err(
        capsys, ["train", "--images", str(data / "img" / "*.tif"), "--labels", str(data / "sparse" / "*.tif"),
                 "--out", str(tmp_path / "m"), "--iterations", "1", "--voxel-size", "1", "1", "1", *FAST])


def test_segment_auto_on_dense_tissue_keeps_every_pixel(data, model, tmp_path, monkeypatch):
    """`segment` with the defaults applies the engine's dense-tissue rule (segment.DENSE_BACKGROUND):
    an image the foreground head calls mostly foreground gets the multicut and no background."""
    from napari_sparseseg.core import segment as seg_mod

    real = seg_mod.embed

    def dense_embed(*a, **k):
        e = real(*a, **k)
        e.f.foreground[:] = 1.0
        e.f.foreground[:, : e.f.foreground.shape[1] // 4] = 0.0  # 3/4 foreground: dense tissue
        return e

    monkeypatch.setattr(seg_mod, "embed", dense_embed)
    img = str(data / "img" / "c0.tif")

    def run(*extra):
        out = tmp_path / "s"
        assert main(["segment", "--model", str(model), "--images", img, "--out", str(out), *extra]) == 0
        return tifffile.imread(out / "c0.tif")

    assert run().min() > 0
    assert (run("--background", "foreground") == 0).mean() > 0.15  # a named rule keeps the head's band


def test_segment_says_how_much_of_the_superpixels_come_from_the_image(data, model, tmp_path, capsys):
    """The multicut's superpixels and edge costs follow the image's own borders as much as the
    annotation showed them (agglomeration.image_share); the line that reports an image says so."""
    from napari_sparseseg.core.agglomeration import image_share, image_share_note

    w = image_share(json.loads((model / "config.json").read_text())["annotation"])
    assert w > 0  # the sample's painted cells have borders the image shows
    out = tmp_path / "s"
    argv = ["segment", "--model", str(model), "--images", str(data / "img" / "c0.tif"), "--out", str(out)]
    assert main(argv + ["--clustering", "multicut"]) == 0
    note = image_share_note(w)  # its words: test_agglomeration
    assert "edge costs" in note and f"(multicut{note};" in capsys.readouterr().out
    assert main(argv + ["--clustering", "mws"]) == 0
    assert "superpixels" not in capsys.readouterr().out


def test_sample_writes_image_at_its_voxel_size_painted_objects_and_ground_truth(tmp_path, monkeypatch, capsys):
    from napari_sparseseg.core import io, real_samples

    stack = np.random.default_rng(0).integers(0, 255, (4, 16, 16), dtype=np.uint8)
    gt = np.zeros((4, 16, 16), np.int32)
    gt[:, :8], gt[:, 8:] = 1, 2
    painted = np.where(gt == 2, 2, 0).astype(np.int32)
    sample = real_samples.REAL_SAMPLES["ovule"]
    monkeypatch.setattr(real_samples, "load_real_sample", lambda name: (stack, painted, gt, sample))
    assert main(["sample", "ovule", "--out", str(tmp_path / "s")]) == 0
    assert io.voxel_size(tmp_path / "s" / "images" / "ovule.tif") == pytest.approx((0.235, 0.15, 0.15))
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "s" / "labels" / "ovule.tif"), painted)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "s" / "gt" / "ovule.tif"), gt)
    out = capsys.readouterr().out
    assert "1 of 2 objects painted" in out and "MIT licence" in out


def test_sample_without_network_says_what_to_copy_where(tmp_path, monkeypatch, capsys):
    import pooch

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(pooch, "retrieve", offline)
    monkeypatch.setenv("SPARSESEG_CACHE", str(tmp_path / "cache"))
    err = _err(capsys, ["sample", "fibsem", "--out", str(tmp_path / "s")])
    assert "could not download https://raw.githubusercontent.com/jni/gala/" in err
    assert str(tmp_path / "cache" / "gala-975ed783-train-image.h5") in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("blockwise", [False, True])
def test_segment_precision_reaches_every_prediction(data, model, tmp_path, monkeypatch, blockwise):
    """--precision picks the autocast of segmentation's network passes, f and g, whole image or blockwise."""
    import torch

    from napari_sparseseg.core import prediction

    seen = []
    real = prediction.predict_normalized

    def spy(net, xs, device, dtype=None, *args, **kwargs):
        seen.append(dtype)
        return real(net, xs, device, dtype, *args, **kwargs)

    monkeypatch.setattr(prediction, "predict_normalized", spy)
    extra = ["--block-shape", "64", "64", "--workers", "0"] if blockwise else []
    for precision, dtype in (("bfloat16", torch.bfloat16), ("float32", None)):
        seen.clear()
        assert main(["segment", "--model", str(model), "--images", str(data / "img" / "c0.tif"),
                     "--out", str(tmp_path / precision), "--precision", precision, "--clustering", "mws",
                     # the agreement filter predicts g too (whole image); blockwise: one pass per block
                     *(extra if blockwise else ["--agreement", "0.5"])]) == 0
        assert (len(seen) >= 1 if blockwise else len(seen) == 2) and all(d == dtype for d in seen), (precision, seen)
