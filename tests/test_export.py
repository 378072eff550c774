"""bioimage.io export (core/export.py) and reading packages back (core/package.py, checkpoint.load)."""

import io
import json
import sys
import zipfile

import numpy as np
import pytest
import tifffile
import torch

from napari_sparseseg import SparseSegError
from napari_sparseseg.cli import main
from napari_sparseseg.core import checkpoint
from napari_sparseseg.core.export import channel_names, export_bioimageio
from napari_sparseseg.core.package import PACKAGE_CONFIG, TORCHSCRIPT, WEIGHTS
from napari_sparseseg.core.prediction import predict
from napari_sparseseg.core.samples import synthetic_cells

TINY = ["--batch-size", "1", "--patch-shape", "64,64", "--base-channels", "4", "--iterations", "2", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two training images with all objects labeled, and one test image, as files."""
    root = tmp_path_factory.mktemp("data")
    for d in ("img", "lab", "test"):
        (root / d).mkdir()
    for i in range(2):
        img, lab = synthetic_cells((96, 96), seed=i)
        tifffile.imwrite(root / "img" / f"c{i}.tif", img)
        tifffile.imwrite(root / "lab" / f"c{i}.tif", lab)
    tifffile.imwrite(root / "test" / "t.tif", synthetic_cells((80, 104), seed=7)[0])
    return root


def _train(data, method):
    out = data / f"model-{method}"
    assert main(["train", "--images", str(data / "img" / "*.tif"), "--labels", str(data / "lab" / "*.tif"),
                 "--out", str(out), "--method", method, *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def spoco(data):
    return _train(data, "spoco")


@pytest.fixture(scope="module")
def spoco_zip(spoco, tmp_path_factory):
    return export_bioimageio(spoco, tmp_path_factory.mktemp("pkg") / "spoco.zip", authors=["Test Author"])


def test_bioimageio_core_test_passes(spoco_zip):
    from bioimageio.core import test_model

    summary = test_model(spoco_zip)
    failed = [(d.name, [e.msg for e in d.errors]) for d in summary.details if d.status != "passed"]
    assert summary.status == "passed", failed
    names = " ".join(d.name for d in summary.details)
    # both weight formats reproduced the test output
    assert "Reproduce test outputs from test inputs (pytorch_state_dict)" in names
    assert "Reproduce test outputs from test inputs (torchscript)" in names


def test_package_describes_the_model(spoco, spoco_zip):
    from bioimageio.spec import load_model_description

    native = checkpoint.load(spoco)
    descr = load_model_description(spoco_zip, perform_io_checks=False)
    assert descr.format_version.startswith("0.5")
    assert descr.weights.pytorch_state_dict.architecture.callable == "UNet"
    assert descr.weights.pytorch_state_dict.architecture.kwargs == native.net.config
    assert descr.weights.torchscript.parent == "pytorch_state_dict"
    prep = [p for p in descr.inputs[0].preprocessing if p.id == "scale_range"]
    assert len(prep) == 1
    norm = native.config["normalization"]
    assert (prep[0].kwargs.min_percentile, prep[0].kwargs.max_percentile) == (norm["low"], norm["high"])
    out_names = descr.outputs[0].axes[1].channel_names
    assert out_names == channel_names(native.net.config)
    assert "foreground_logit" in out_names and len(out_names) == native.net.head.out_channels
    with zipfile.ZipFile(spoco_zip) as zf:
        readme = zf.read("README.md").decode()
        cfg = json.loads(zf.read(PACKAGE_CONFIG))
        y = np.load(io.BytesIO(zf.read("test_output.npy")))
    assert "sparseseg segment --model" in readme and "## Validation" in readme
    assert cfg["method"] == "spoco" and cfg["network"] == native.net.config
    assert set(cfg["files"]) == {"weights", "ema"}
    assert y.shape[1] == len(out_names)


def test_roundtrip_embeddings_equal_native(data, spoco, spoco_zip):
    native, loaded = checkpoint.load(spoco), checkpoint.load(spoco_zip)
    assert loaded.path == spoco_zip and loaded.ema is not None
    assert {k: v for k, v in loaded.config.items() if k != "files"} == {
        k: v for k, v in native.config.items() if k != "files"}
    image = tifffile.imread(data / "test" / "t.tif")
    for use_ema in (False, True):
        a = predict(native, image, device="cpu", use_ema=use_ema)
        b = predict(loaded, image, device="cpu", use_ema=use_ema)
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-5


def test_torchscript_weights_match_state_dict(spoco_zip):
    loaded = checkpoint.load(spoco_zip)
    with zipfile.ZipFile(spoco_zip) as zf:
        scripted = torch.jit.load(io.BytesIO(zf.read(TORCHSCRIPT)))
    torch.manual_seed(0)
    x = torch.randn(1, 1, 40, 72)  # not the shape it was traced with
    with torch.no_grad():
        assert (scripted(x) - loaded.net(x)).abs().max() < 1e-5


def test_crac_package_roundtrip(data, tmp_path):
    folder = _train(data, "crac")
    pkg = export_bioimageio(folder, tmp_path / "crac.zip", name="crac test")
    native, loaded = checkpoint.load(folder), checkpoint.load(pkg)
    assert loaded.ema is None and loaded.config["method"] == "crac"
    with zipfile.ZipFile(pkg) as zf:
        names = zf.namelist()
    assert "ema.safetensors" not in names and WEIGHTS in names
    k = len(native.config["offsets"])
    assert channel_names(native.net.config)[-k:] == [f"affinity_logit{i}" for i in range(k)]
    image = tifffile.imread(data / "test" / "t.tif")
    a, fa = predict(native, image, device="cpu", foreground=True)
    b, fb = predict(loaded, image, device="cpu", foreground=True)
    assert np.abs(a - b).max() < 1e-5 and np.abs(fa - fb).max() < 1e-5


def test_cli_export_then_segment_and_finetune_from_package(data, spoco, tmp_path, capsys):
    pkg = tmp_path / "m.zip"
    assert main(["export", "--model", str(spoco), "--out", str(pkg), "--name", "cli test",
                 "--authors", "Jane Doe", "John Roe"]) == 0
    out = capsys.readouterr().out
    assert "bioimage.io model package, SPOCO 2D" in out and " MB" in out
    from bioimageio.spec import load_model_description

    descr = load_model_description(pkg, perform_io_checks=False)
    assert descr.name == "cli test" and [a.name for a in descr.authors] == ["Jane Doe", "John Roe"]
    images = str(data / "test" / "*.tif")
    assert main(["segment", "--model", str(pkg), "--images", images, "--out", str(tmp_path / "seg_pkg"), "--device", "cpu"]) == 0
    assert main(["segment", "--model", str(spoco), "--images", images, "--out", str(tmp_path / "seg_dir"), "--device", "cpu"]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "seg_pkg" / "t.tif"), tifffile.imread(tmp_path / "seg_dir" / "t.tif"))
    tuned = tmp_path / "tuned"
    assert main(["train", "--images", str(data / "img" / "*.tif"), "--labels", str(data / "lab" / "*.tif"),
                 "--out", str(tuned), "--from", str(pkg), "--finetune", "always", *TINY]) == 0
    cfg = json.loads((tuned / "config.json").read_text())
    assert cfg["parent"] == str(pkg) and cfg["method"] == "spoco"
    # a package exports again (from the zip) to the same network
    assert main(["export", "--model", str(pkg), "--out", str(tmp_path / "again.zip")]) == 0
    again = checkpoint.load(tmp_path / "again.zip")
    with torch.no_grad():
        x = torch.rand(1, 1, 32, 32)
        assert torch.equal(again.net(x), checkpoint.load(spoco).net(x))


def _err(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_errors_name_the_file_and_what_was_expected(spoco, spoco_zip, tmp_path, capsys, monkeypatch):
    err = _err(capsys, ["export", "--model", str(tmp_path / "nothere"), "--out", str(tmp_path / "x.zip")])
    assert "model folder" in err and "nothere: not found" in err
    assert "expected a file name ending in .zip" in _err(
        capsys, ["export", "--model", str(spoco), "--out", str(tmp_path / "x.tar")])
    err = _err(capsys, ["export", "--model", str(spoco), "--out", str(tmp_path / "x.zip"), "--license", "NOPE"])
    assert "--license 'NOPE': not an SPDX licence identifier" in err and not list(tmp_path.glob("*.zip"))
    # a bioimage.io package of another tool
    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(foreign, "w") as zf:
        zf.writestr("rdf.yaml", "type: model\nformat_version: 0.5.4\n")
        zf.writestr("weights.pt", b"not ours")
    with pytest.raises(SparseSegError, match=r"foreign.zip: a bioimage.io package from another tool without "
                                             r"sparseseg_config.json; expected .*'sparseseg export'"):
        checkpoint.load(foreign)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    tifffile.imwrite(imgs / "a.tif", np.zeros((32, 32), np.uint8))
    err = _err(capsys, ["segment", "--model", str(foreign), "--images", str(imgs), "--out", str(tmp_path / "s")])
    assert "foreign.zip" in err and "sparseseg_config.json" in err
    plain = tmp_path / "notes.txt"
    plain.write_text("hello")
    with pytest.raises(SparseSegError, match="notes.txt: is a file but not a zip archive"):
        checkpoint.load(plain)
    # weights changed inside the package are refused by their checksum
    tampered = tmp_path / "tampered.zip"
    with zipfile.ZipFile(spoco_zip) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == WEIGHTS:
                data = data[:-1] + bytes([data[-1] ^ 0xFF])
            dst.writestr(item, data)
    with pytest.raises(SparseSegError, match=r"tampered.zip: weights.pt does not match the checksum"):
        checkpoint.load(tampered)
    # without the extra, export says how to get it (reading a package needs no extra)
    monkeypatch.setitem(sys.modules, "bioimageio.spec", None)
    with pytest.raises(SparseSegError, match=r"pip install 'napari-sparseseg\[bioimageio\]'"):
        export_bioimageio(spoco, tmp_path / "y.zip")
    assert checkpoint.load(spoco_zip).config["method"] == "spoco"
