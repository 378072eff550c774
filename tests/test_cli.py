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

FAST = ["--batch-size", "1", "--patch-shape", "64,64", "--quiet"]


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
    assert len(np.unique(sp[sp > 0])) == round(0.5 * len(np.unique(gt[gt > 0])))


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


def test_train_from_other_model(data, model):
    out = data / "tuned"
    assert main(["train", "--images", str(data / "img" / "*.tif"), "--labels", str(data / "sparse" / "*.tif"),
                 "--out", str(out), "--iterations", "1", "--from", str(model), *FAST]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["parent"] == str(model) and cfg["training"]["train_config"]["lr"] == pytest.approx(1e-4)


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


def test_segment_clustering_choices(data, model):
    for method in ("hdbscan", "consistency"):
        out = data / f"seg_{method}"
        assert main(["segment", "--model", str(model), "--images", str(data / "img" / "c0.tif"), "--out", str(out),
                     "--clustering", method, "--min-size", "10"]) == 0
        assert (out / "c0.tif").exists()


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
    # a model trained with a background label has no foreground head
    full = tmp_path / "full"
    assert main(["train", "--images", str(data / "img" / "*.tif"), "--labels", str(data / "gt" / "*.tif"),
                 "--background-id", "0", "--out", str(full), "--iterations", "2", *FAST]) == 0
    assert "this model has no foreground head" in _err(
        capsys, ["segment", "--model", str(full), "--images", img, "--out", str(tmp_path / "o"), "--background", "foreground"])


def test_segment_errors(data, model, tmp_path, capsys):
    img = str(data / "img" / "c0.tif")
    assert "model folder" in _err(capsys, ["segment", "--model", str(tmp_path / "none"), "--images", img, "--out", str(tmp_path)])
    stack = tmp_path / "stack.tif"
    tifffile.imwrite(stack, np.zeros((12, 40, 40), np.uint8))
    assert "is 3D but the model was trained on 2D images" in _err(
        capsys, ["segment", "--model", str(model), "--images", str(stack), "--out", str(tmp_path / "o")])
    tampered = tmp_path / "tampered"
    import shutil

    shutil.copytree(model, tampered)
    w = next(tampered.glob("weights-*.safetensors"))
    w.write_bytes(w.read_bytes()[:-8] + b"\0" * 8)
    assert "does not match the checksum" in _err(
        capsys, ["segment", "--model", str(tampered), "--images", img, "--out", str(tmp_path / "o")])
    assert "does not match the ground truth" in _err(
        capsys, ["evaluate", "--pred", str(stack), "--gt", str(data / "gt" / "c0_gt.tif")])


def test_demo_runs_and_scores(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--time-limit", "4", "--n-train", "2"]) == 0
    out = capsys.readouterr().out
    assert "mean" in out and (tmp_path / "demo" / "model" / "config.json").exists()
    assert len(list((tmp_path / "demo" / "seg").glob("*.tif"))) == 2


def test_ctrl_c_stops_cleanly_and_keeps_model(data, tmp_path):
    out = tmp_path / "m"
    cmd = [sys.executable, "-m", "napari_sparseseg", "train", "--images", str(data / "img" / "*.tif"),
           "--labels", str(data / "sparse" / "*.tif"), "--out", str(out), "--iterations", "100000",
           "--checkpoint-every", "0.5", *FAST]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (out / "config.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, stdout
    assert "interrupted (Ctrl-C)" in stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["training"]["iteration"] > 0
    from napari_sparseseg import load_model

    load_model(out)
