"""User-facing errors that no workflow test reaches: each names the input and what was expected.

(The errors of a workflow are tested beside it; these are the ones a coverage run of the suite
found raised by no test.)"""

import hashlib
import json
import zipfile
from io import BytesIO

import numpy as np
import pytest
import tifffile
import torch
import zarr
from test_checkpoint import _model

from napari_sparseseg import SparseSegError, TrainConfig, Trainer
from napari_sparseseg.cli import main
from napari_sparseseg.core import blocks, blockwise, checkpoint, clustering, io, schedule
from napari_sparseseg.core.methods import get_method
from napari_sparseseg.core.package import PACKAGE_CONFIG, read_package


# --- reading images and labels ------------------------------------------------------------------
def test_reading_errors_name_the_file(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SparseSegError, match=r"notes.txt: unsupported file type '.txt'; expected TIFF, PNG, .npy "
                                             r"or zarr"):
        io.read(tmp_path / "notes.txt")
    np.save(tmp_path / "neg.npy", np.array([[0, -3], [1, 2]]))
    with pytest.raises(SparseSegError, match=r"neg.npy: label ids must be >= 0 \(0 = unlabeled\), found -3"):
        io.read_labels(tmp_path / "neg.npy")
    group = zarr.open_group(str(tmp_path / "two.zarr"), mode="w")
    group.create_array("a", shape=(4, 4), dtype="uint8")
    group.create_array("b", shape=(4, 4), dtype="uint8")
    with pytest.raises(SparseSegError, match=r"two.zarr: zarr group holds arrays \['a', 'b'\]; expected exactly "
                                             r"one array \(or point to it: .*two.zarr/<name>\)"):
        io.read(tmp_path / "two.zarr")


def test_channel_count_that_does_not_fit_the_model():
    with pytest.raises(SparseSegError, match=r"grey.tif: has 1 channel\(s\), the model expects 2"):
        io.to_channels_first(np.zeros((8, 8)), 2, "grey.tif", channels=2)


def test_opening_a_stack_lazily(tmp_path):
    with pytest.raises(SparseSegError, match=r"nothere.zarr: file not found"):
        io.open_lazy(tmp_path / "nothere.zarr")
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    with pytest.raises(SparseSegError, match=r"bad.tif: could not be opened as zarr or TIFF \("):
        io.open_lazy(tmp_path / "bad.tif")
    zarr.create_array(str(tmp_path / "one.zarr"), shape=(4, 8, 8), dtype="uint8")
    with pytest.raises(SparseSegError, match=r"one.zarr: is a single-resolution array; level 1 does not exist "
                                             r"\(use 0\)"):
        io.open_lazy(tmp_path / "one.zarr", level=1)
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("raw", shape=(4, 8, 8), dtype="uint8")
    with pytest.raises(SparseSegError, match=r"g.zarr: is a single-resolution array; level 2 does not exist"):
        io.open_lazy(tmp_path / "g.zarr", level=2)
    pyramid = zarr.open_group(str(tmp_path / "p.zarr"), mode="w")  # levels 0 and 1, no OME metadata
    for k in "01":
        pyramid.create_array(k, shape=(4, 8, 8), dtype="uint8")
    with pytest.raises(SparseSegError, match=r"p.zarr: has 2 resolution level\(s\), got level 5"):
        io.open_lazy(tmp_path / "p.zarr", level=5)
    group.create_array("labels", shape=(4, 8, 8), dtype="uint8")
    with pytest.raises(SparseSegError, match=r"g.zarr: zarr group holds arrays \['labels', 'raw'\]; expected "
                                             r"exactly one array, an OME-Zarr image or a path to one array"):
        io.open_lazy(tmp_path / "g.zarr")


def test_a_stack_with_another_channel_count_than_the_model(tmp_path):
    zarr.create_array(str(tmp_path / "grey.zarr"), shape=(4, 8, 8), dtype="uint8")
    with pytest.raises(SparseSegError, match=r"grey.zarr: has 1 channel, the model expects 3"):
        blocks.open_volume(tmp_path / "grey.zarr", 3, 3)


def test_block_shape_sizes_must_be_positive():
    with pytest.raises(SparseSegError, match=r"--block-shape \(16, 0, 64\): every size must be a positive number "
                                             r"of pixels"):
        blocks.check_block_shape((16, 0, 64), 3, "--block-shape")


# --- training -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"iterations": 0}, "iterations must be >= 1, got 0"),
    ({"time_limit": 0}, r"time limit must be > 0 seconds, got 0"),
    ({"batch_size": 0}, "batch size must be >= 1, got 0"),
])
def test_training_settings_out_of_range(kwargs, message):
    with pytest.raises(SparseSegError, match=message):
        TrainConfig(**kwargs)


def test_training_inputs_that_do_not_pair_up():
    lab = np.zeros((32, 32), np.int32)
    lab[4:10, 4:10] = 1
    with pytest.raises(SparseSegError, match="no training image given"):
        Trainer([], [])
    with pytest.raises(SparseSegError, match=r"1 image\(s\) but 2 label image\(s\); they must pair up"):
        Trainer([np.zeros((32, 32))], [lab, lab])
    with pytest.raises(SparseSegError, match=r"a.tif: labels must be 2D or 3D, got shape \(32,\)"):
        Trainer([np.zeros(32)], [lab[0]], names=["a.tif"])
    with pytest.raises(SparseSegError, match=r"b.tif: labels are 3D but a.tif is 2D; mix no dimensionalities"):
        Trainer([np.zeros((32, 32)), np.zeros((4, 32, 32))], [lab, lab[None].repeat(4, 0)], names=["a.tif", "b.tif"])
    with pytest.raises(SparseSegError, match=r"b.tif: has 3 channel\(s\) but a.tif has 2"):
        Trainer([np.zeros((32, 32, 2)), np.zeros((32, 32, 3))], [lab, lab], names=["a.tif", "b.tif"])
    with pytest.raises(SparseSegError, match=r"patch shape \(30, 30\) must be a multiple of \(\d+, \d+\) per axis"):
        Trainer([np.zeros((32, 32))], [lab], TrainConfig(patch_shape=(30, 30), iterations=1))


def test_an_unknown_method_lists_the_choices():
    with pytest.raises(SparseSegError, match=r"method 'unet': expected one of spoco, crac"):
        get_method("unet")


def test_resume_and_from_together_are_refused(tmp_path, capsys):
    checkpoint.save(tmp_path / "out", _model())
    checkpoint.save(tmp_path / "other", _model())
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((32, 32), np.uint8))
    tifffile.imwrite(tmp_path / "a_labels.tif", np.ones((32, 32), np.uint8))
    code = main(["train", "--images", str(tmp_path / "a.tif"), "--labels", str(tmp_path / "a_labels.tif"),
                 "--out", str(tmp_path / "out"), "--resume", "--from", str(tmp_path / "other")])
    assert code == 2
    assert "--from and --resume cannot be combined: --resume continues the model in --out" in capsys.readouterr().err


# --- model files --------------------------------------------------------------------------------
def _config(tmp_path) -> dict:
    checkpoint.save(tmp_path / "m", _model())
    return json.loads((tmp_path / "m" / checkpoint.CONFIG).read_text())


def test_model_configs_that_are_not_ours_or_are_newer(tmp_path):
    cfg = _config(tmp_path)
    with pytest.raises(SparseSegError, match=r"here: config.json is not a napari-sparseseg model"):
        checkpoint.parse_config(json.dumps({"format": "other"}).encode(), "here", "config.json")
    newer = dict(cfg, version=cfg["version"] + 1)
    with pytest.raises(SparseSegError, match=rf"here: written by a newer napari-sparseseg \(format "
                                             rf"{cfg['version'] + 1}\); please upgrade"):
        checkpoint.parse_config(json.dumps(newer).encode(), "here", "config.json")


def test_a_model_folder_whose_config_names_no_weights(tmp_path):
    cfg = _config(tmp_path)
    del cfg["files"]["weights"]
    (tmp_path / "m" / checkpoint.CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(SparseSegError, match=r"model folder .*m: config.json names no weights file"):
        checkpoint.load(tmp_path / "m")


def test_weights_that_do_not_fit_the_described_network(tmp_path):
    cfg = _config(tmp_path)
    wide = dict(cfg, network=dict(cfg["network"], base_channels=8))
    (tmp_path / "m" / checkpoint.CONFIG).write_text(json.dumps(wide))
    with pytest.raises(SparseSegError, match=r"model folder .*m: weights-00000003.safetensors does not fit the "
                                             r"network \("):
        checkpoint.load(tmp_path / "m")
    broken = dict(cfg, network=dict(cfg["network"], depth="deep"))
    (tmp_path / "m" / checkpoint.CONFIG).write_text(json.dumps(broken))
    with pytest.raises(SparseSegError, match=r"model folder .*m: invalid network description in config.json \("):
        checkpoint.load(tmp_path / "m")


def _package(tmp_path, files: dict[str, bytes], entries: dict) -> str:
    cfg = dict(_config(tmp_path), files=entries)
    path = tmp_path / "pkg.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(PACKAGE_CONFIG, json.dumps(cfg))
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def test_package_files_that_are_missing_or_not_weights(tmp_path):
    with pytest.raises(SparseSegError, match=r"model package .*pkg.zip: sparseseg_config.json names no weights file"):
        read_package(_package(tmp_path, {}, {}))
    with pytest.raises(SparseSegError, match=r"model package .*pkg.zip: w.pt is missing"):
        read_package(_package(tmp_path, {}, {"weights": {"name": "w.pt", "sha256": "0"}}))
    junk = b"not a state dict at all"
    entry = {"weights": {"name": "w.pt", "sha256": hashlib.sha256(junk).hexdigest()}}
    with pytest.raises(SparseSegError, match=r"model package .*pkg.zip: w.pt could not be read as weights \("):
        read_package(_package(tmp_path, {"w.pt": junk}, entry))
    buf = BytesIO()
    torch.save({"step": 3}, buf)  # loads without running code, but holds no tensors
    data = buf.getvalue()
    entry = {"weights": {"name": "w.pt", "sha256": hashlib.sha256(data).hexdigest()}}
    with pytest.raises(SparseSegError, match=r"model package .*pkg.zip: w.pt is not a state dict \(name -> tensor\)"):
        read_package(_package(tmp_path, {"w.pt": data}, entry))


# --- clustering ---------------------------------------------------------------------------------
def test_clustering_inputs_that_do_not_fit():
    emb = np.zeros((4, 8, 8), np.float32)
    offsets = [[-1, 0], [0, -1]]
    with pytest.raises(SparseSegError, match=r"embedding metric 'manhattan': expected one of distance, cosine"):
        clustering.mws_weights(emb, offsets, embedding_metric="manhattan")
    with pytest.raises(SparseSegError, match=r"affinities: shape \(3, 8, 8\) does not fit the offsets, expected "
                                             r"\(2, 8, 8\)"):
        clustering.mws_weights(emb, offsets, affinities=np.zeros((3, 8, 8), np.float32))
    seg = np.ones((8, 8), np.int64)
    with pytest.raises(SparseSegError, match=r"background: expected one of .*largest.*, got 'biggest'"):
        clustering.remove_background(seg, background="biggest")
    with pytest.raises(SparseSegError, match=r"foreground: shape \(4, 4\) does not match the segmentation's \(8, 8\)"):
        clustering.remove_background(seg, background="foreground", foreground=np.ones((4, 4)),
                                     fg_threshold=0.5)


# --- blockwise ----------------------------------------------------------------------------------
def test_blockwise_work_array_of_another_shape_is_not_overwritten(tmp_path):
    zarr.create_array(str(tmp_path / "prediction.zarr"), shape=(2, 8, 8), dtype="float16")
    with pytest.raises(SparseSegError, match=r"prediction.zarr: exists with shape \(2, 8, 8\) and type float16, "
                                             r"expected \(2, 16, 16\) float16; delete it or write elsewhere"):
        blockwise._make_array(tmp_path / "prediction.zarr", (2, 16, 16), (2, 8, 8), "float16")


def test_an_unreachable_scheduler_is_named(monkeypatch):
    monkeypatch.setattr(schedule, "CONNECT_TIMEOUT", "1s")
    with pytest.raises(SparseSegError, match=r"scheduler 'tcp://127.0.0.1:9': could not connect \("):
        schedule.client(1, "tcp://127.0.0.1:9")


# --- napari layers into engine calls (layers, no viewer) ----------------------------------------
def test_layer_errors_name_the_layers(tmp_path):
    from napari.layers import Image, Labels, Shapes

    from napari_sparseseg._napari import stack_job
    from napari_sparseseg._napari.layers import box_region
    from napari_sparseseg._napari.train_data import training_inputs

    image = Image(np.zeros((64, 64), np.float32), name="cells")
    with pytest.raises(SparseSegError, match=r"Shapes layer 'box' holds no shape: draw a rectangle around the region"):
        box_region(Shapes(name="box"), image)
    far = Shapes([np.array([[200, 200], [200, 260], [260, 260], [260, 200]])], name="far")
    with pytest.raises(SparseSegError, match=r"the shapes of 'far' lie outside image 'cells' \(shape \(64, 64\)\)"):
        box_region(far, image)
    with pytest.raises(SparseSegError, match=r"annotation layer 'paint' has shape \(32, 32\) but image 'cells' has "
                                             r"\(64, 64\); annotate on a layer of the image's shape"):
        training_inputs(image, Labels(np.zeros((32, 32), np.int32), name="paint"))
    with pytest.raises(SparseSegError, match=r"ignore mask layer 'mask' has shape \(32, 32\) but the annotations have "
                                             r"shape \(64, 64\)"):
        training_inputs(image, Labels(np.zeros((64, 64), np.int32), name="paint"),
                        Labels(np.zeros((32, 32), np.int32), name="mask"))
    with pytest.raises(SparseSegError, match=r"image 'cells' was not opened from a file: segmenting a whole stack "
                                             r"block by block reads it from disk"):
        stack_job.stack_path(image)
    from napari.layers._source import Source

    image._source = Source(path=str(tmp_path / "cells.png"))
    with pytest.raises(SparseSegError, match=r"image 'cells': cells.png is not a zarr, OME-Zarr or TIFF file; "
                                             r"whole-stack segmentation reads those block by block"):
        stack_job.stack_path(image)
    image._source = Source(path=str(tmp_path / "cells.tif"))
    with pytest.raises(SparseSegError, match=r"image 'cells' is 2D: segment it with Segment"):
        stack_job.stack_path(image)
    with pytest.raises(SparseSegError, match=r"clustering 'hdbscan': block by block, the clustering is one of auto, "
                                             r"mws, multicut"):
        stack_job.check_method("hdbscan")


def test_missing_or_old_optional_libraries_say_what_to_install(tmp_path, monkeypatch):
    import sys

    from napari_sparseseg.core.export import check_package

    monkeypatch.setitem(sys.modules, "bioimageio.core", None)
    with pytest.raises(SparseSegError, match=r"checking a package needs bioimageio.core, which is not installed; "
                                             r"install the extra: pip install 'napari-sparseseg\[bioimageio\]'"):
        check_package(tmp_path / "model.zip")
    monkeypatch.setattr(zarr, "__version__", "2.18.2")
    with pytest.raises(SparseSegError, match=r"blockwise segmentation needs zarr >= 3 \(installed: 2.18.2\); "
                                             r"pip install -U 'zarr>=3'"):
        blockwise.segment_blockwise(tmp_path / "m", tmp_path / "stack.zarr", tmp_path / "seg.zarr")
