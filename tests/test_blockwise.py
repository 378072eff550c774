"""Blockwise segmentation of stacks larger than memory (core/blockwise.py, blocks.py, stitching.py,
resample.py) and its command line."""

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from skimage.metrics import adapted_rand_error

from napari_sparseseg.cli import main
from napari_sparseseg.core import blocks as B
from napari_sparseseg.core import io
from napari_sparseseg.core.blockwise import segment_blockwise
from napari_sparseseg.core.checkpoint import FORMAT, Model
from napari_sparseseg.core.errors import SparseSegError
from napari_sparseseg.core.offsets import default_offsets
from napari_sparseseg.core.prediction import Prediction
from napari_sparseseg.core.samples import synthetic_cells
from napari_sparseseg.core.segment import Embedded, cluster

SHAPE = (24, 64, 64)
D = 6


class OraclePredictor:
    """A predictor that ignores the image and returns precomputed outputs (embeddings, foreground
    logit) of the whole volume, sliced by the block's position; counts its calls in a file."""

    config = {"out_channels": D, "foreground": True, "affinities": 0, "coord_scale": 0.0, "ndim": 3}

    def __init__(self, outputs: Path, calls: Path | None = None, fail_after: int | None = None):
        self.outputs, self.calls, self.fail_after = str(outputs), calls, fail_after

    def __call__(self, x, offset, full_shape):
        n = 0
        if self.calls is not None:
            n = int(self.calls.read_text()) + 1 if self.calls.exists() else 1
            self.calls.write_text(str(n))
        if self.fail_after is not None and n > self.fail_after:
            raise RuntimeError("simulated crash")
        region = tuple(slice(o, o + s) for o, s in zip(offset, x.shape[1:]))
        return np.array(np.load(self.outputs, mmap_mode="r")[(slice(None),) + region])


def oracle_outputs(labels: np.ndarray, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """Embeddings constant per object (random vectors far apart) plus ``noise``, and a foreground
    logit of +6 inside objects, -6 outside."""
    rng = np.random.default_rng(seed)
    table = rng.normal(0, 4.0, (int(labels.max()) + 1, D)).astype(np.float32)
    emb = np.moveaxis(table[labels], -1, 0) + rng.normal(0, noise, (D,) + labels.shape).astype(np.float32)
    fg = np.where(labels > 0, 6.0, -6.0).astype(np.float32)[None]
    return np.concatenate([emb, fg])


def oracle_stack(root: Path, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A config-only model folder ``root/model`` and synthetic cells ``root/img.zarr``; their labels."""
    img, lab = synthetic_cells(shape, radius=(6, 10), seed=seed)
    config = {"format": FORMAT, "version": 1, "method": "spoco", "offsets": default_offsets(3),
              "loss": {"delta_var": 0.5, "delta_dist": 2.0}, "object_area_median": 40, "foreground": {"c": 1.0},
              "normalization": {"low": 1.0, "high": 99.8}, "scale": {"zoom": 1.0},
              "network": {**OraclePredictor.config, "in_channels": 1}}
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text(json.dumps(config))
    zarr.create_array(str(root / "img.zarr"), shape=shape, chunks=(8, 32, 32), dtype=img.dtype)[:] = img
    return lab


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """(root, labels): a config-only model folder ``root/model``, the image ``root/img.zarr``."""
    root = tmp_path_factory.mktemp("oracle")
    lab = oracle_stack(root, SHAPE, seed=1)
    return root, lab


def whole_volume(root: Path, outputs: np.ndarray) -> np.ndarray:
    """The whole-image path's clustering of the same outputs."""
    config = json.loads((root / "model" / "config.json").read_text())
    pred = Prediction(outputs[:D], 1 / (1 + np.exp(-outputs[D])), 1.0, SHAPE, None)
    return cluster(Model(net=None, config=config), Embedded(pred), "mws")


def run(root, outputs, out, **kw):
    np.save(root / "outputs.npy", outputs)
    kw.setdefault("predictor", OraclePredictor(root / "outputs.npy"))
    return segment_blockwise(root / "model", root / "img.zarr", out, method="mws", block_shape=(12, 32, 32), **kw)


def test_stitching_keeps_objects_whole_across_block_borders(oracle, tmp_path):
    root, lab = oracle
    res = run(root, oracle_outputs(lab), tmp_path / "seg.zarr")
    seg = zarr.open_array(str(tmp_path / "seg.zarr"))[:]
    assert res.blocks == 8 and seg.shape == SHAPE
    crossing = 0
    for k in np.unique(lab[lab > 0]):
        ids = np.unique(seg[lab == k])
        assert ids.size == 1 and ids[0] > 0, f"object {k} came out as ids {ids}"
        zz, yy, xx = np.nonzero(lab == k)
        crossing += len({(z // 12, y // 32, x // 32) for z, y, x in zip(zz, yy, xx)}) > 1
    assert crossing >= 3, "the test needs objects that cross block borders"
    # one id per object, ids consecutive from 1, background 0
    assert np.array_equal(np.unique(seg), np.arange(len(np.unique(lab))))
    assert np.array_equal(seg > 0, lab > 0)


def test_blockwise_agrees_with_whole_volume(oracle, tmp_path):
    root, lab = oracle
    outputs = oracle_outputs(lab, noise=0.3, seed=3)
    whole = whole_volume(root, outputs)
    run(root, outputs, tmp_path / "seg.zarr")
    seg = zarr.open_array(str(tmp_path / "seg.zarr"))[:]
    err = adapted_rand_error(whole, seg)[0]
    assert err <= 0.02, err
    # the noise makes the clustering imperfect (so agreement is not trivial) ...
    assert adapted_rand_error(lab, whole)[0] > 0.1
    # ... and the size limit (1/4 of object_area_median 40) applies to whole objects, not pieces
    assert np.bincount(seg.ravel())[1:].min() >= 10


def test_resume_skips_finished_blocks(oracle, tmp_path):
    root, lab = oracle
    outputs = oracle_outputs(lab)
    calls, work, out = tmp_path / "calls", tmp_path / "work", tmp_path / "seg.zarr"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(root, outputs, out, work=work, predictor=OraclePredictor(root / "outputs.npy", calls, fail_after=5))
    assert len(list((work / "done" / "predict").glob("*.json"))) == 5
    calls.unlink()
    seen = []
    run(root, outputs, out, work=work, predictor=OraclePredictor(root / "outputs.npy", calls),
        progress=lambda step, done, total: seen.append((step, done, total)))
    assert int(calls.read_text()) == 3, "the 5 finished blocks were predicted again"
    assert not work.exists(), "the work folder is removed after a successful run"
    assert ("predict", 8, 8) in seen and ("cluster", 8, 8) in seen and ("write", 8, 8) in seen
    seg = zarr.open_array(str(out))[:]
    assert adapted_rand_error(lab, seg)[0] == 0.0


def test_resume_refuses_other_settings(oracle, tmp_path):
    root, lab = oracle
    work = tmp_path / "work"
    with pytest.raises(RuntimeError):
        run(root, oracle_outputs(lab), tmp_path / "s.zarr", work=work,
            predictor=OraclePredictor(root / "outputs.npy", tmp_path / "c", fail_after=1))
    with pytest.raises(SparseSegError, match="holds an unfinished run with other settings"):
        segment_blockwise(root / "model", root / "img.zarr", tmp_path / "s.zarr", method="mws", block_shape=(8, 32, 32),
                          work=work, predictor=OraclePredictor(root / "outputs.npy"))


def test_an_output_that_cannot_be_written_is_refused_before_any_block_is_predicted(oracle, tmp_path):
    root, lab = oracle
    calls = tmp_path / "calls"
    kw = dict(predictor=OraclePredictor(root / "outputs.npy", calls))
    # img.zarr is a plain array, not an OME-Zarr image: it has no labels group to write into
    with pytest.raises(SparseSegError, match=r"img.zarr/labels/seg: .*img.zarr is not an OME-Zarr image, so it has "
                                             r"no labels group"):
        run(root, oracle_outputs(lab), root / "img.zarr" / "labels" / "seg", work=tmp_path / "w1", **kw)
    with pytest.raises(SparseSegError, match=r"other.zarr/labels/seg: a labels image belongs to the image it labels; "
                                             r"the input is .*img.zarr"):
        run(root, oracle_outputs(lab), tmp_path / "other.zarr" / "labels" / "seg", work=tmp_path / "w2", **kw)
    assert not calls.exists()  # refused up front, not after predicting and clustering every block
    assert not (root / "img.zarr" / "labels").exists()


def test_a_work_folder_on_a_disk_too_small_is_refused_before_any_block_and_a_resume_counts_what_is_left(
        oracle, tmp_path, monkeypatch):
    import napari_sparseseg.core.blockwise as BW

    root, lab = oracle
    outputs = oracle_outputs(lab)
    calls, work, out = tmp_path / "calls", tmp_path / "work", tmp_path / "seg.zarr"
    asked = []
    # the oracle's store: 6 embeddings + foreground, float16, 24 x 64 x 64 voxels in 8 blocks
    need_all = 24 * 64 * 64 * 7 * 2 * BW.STORE_KEPT
    monkeypatch.setattr(BW, "free_bytes", lambda path: asked.append(Path(path)) or int(0.6 * need_all))
    with pytest.raises(SparseSegError, match=r"work: the prediction store needs about 1\.1 MiB more \(7 float16 "
                                             r"channels per voxel at the model's scale, 0\.1 M voxels left\), but only "
                                             r"0\.6 MiB are free there; free space, give a work folder on a larger disk "
                                             r"\(--work DIR"):
        run(root, outputs, out, work=work, predictor=OraclePredictor(root / "outputs.npy", calls))
    assert not calls.exists() and asked == [work]
    # 5 of 8 blocks predicted before a crash: the 3 left need 3/8 of the store, which fits
    monkeypatch.setattr(BW, "free_bytes", lambda path: 10 * need_all)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(root, outputs, out, work=work, predictor=OraclePredictor(root / "outputs.npy", calls, fail_after=5))
    monkeypatch.setattr(BW, "free_bytes", lambda path: int(0.6 * need_all))
    run(root, outputs, out, work=work, predictor=OraclePredictor(root / "outputs.npy", calls))
    assert adapted_rand_error(lab, zarr.open_array(str(out))[:])[0] == 0.0


def test_local_cluster_gives_the_same_labels(oracle, tmp_path):
    root, lab = oracle
    outputs = oracle_outputs(lab, noise=0.3, seed=3)
    run(root, outputs, tmp_path / "a.zarr")
    run(root, outputs, tmp_path / "b.zarr", workers=2)
    a, b = (zarr.open_array(str(tmp_path / n))[:] for n in ("a.zarr", "b.zarr"))
    assert np.array_equal(a, b)


def test_the_prediction_stores_inner_chunks_tile_the_block_at_about_a_quarter_of_it():
    assert B.inner_chunks((48, 128, 128)) == (12, 32, 32)
    assert B.inner_chunks((1024, 1024)) == (64, 64)  # at most 64
    assert B.inner_chunks((50, 100, 100)) == (25, 25, 25)  # divisors: the chunks tile the block
    assert B.inner_chunks((7, 1, 3)) == (7, 1, 1)  # a prime length: the whole block


# -- lazy input ------------------------------------------------------------------------------------
def write_ome(path: Path, image: np.ndarray, zarr_format: int = 2) -> None:
    """A two-level OME-Zarr image (NGFF 0.4 on zarr v2, 0.5 on v3), axes z, y, x."""
    g = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    levels = [image, image[:, ::2, ::2]]
    for i, lev in enumerate(levels):
        a = g.create_array(str(i), shape=lev.shape, chunks=(8, 32, 32), dtype=lev.dtype)
        a[:] = lev
    ms = [{"axes": [{"name": n, "type": "space"} for n in "zyx"],
           "datasets": [{"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [1.0, 2.0**i, 2.0**i]}]}
                        for i in range(2)]}]
    if zarr_format == 2:
        g.attrs["multiscales"] = [{"version": "0.4", **ms[0]}]
    else:
        g.attrs["ome"] = {"version": "0.5", "multiscales": ms}


def test_open_lazy_reads_nothing_until_indexed(tmp_path):
    img = np.arange(np.prod(SHAPE), dtype=np.uint16).reshape(SHAPE)
    tifffile.imwrite(tmp_path / "s.tif", img)
    write_ome(tmp_path / "ome.zarr", img)
    write_ome(tmp_path / "ome5.zarr", img, zarr_format=3)
    for path, level, shape in [(tmp_path / "s.tif", 0, SHAPE), (tmp_path / "ome.zarr", 0, SHAPE),
                               (tmp_path / "ome.zarr", 1, (24, 32, 32)), (tmp_path / "ome5.zarr", 1, (24, 32, 32))]:
        arr = io.open_lazy(path, level)
        assert not isinstance(arr, np.ndarray) and isinstance(arr, zarr.Array), (path, type(arr))
        assert arr.shape == shape
        step = 2**level
        assert np.array_equal(arr[3:5, 4:9, 10:12], img[3:5, ::step, ::step][:, 4:9, 10:12])
    with pytest.raises(SparseSegError, match=r"ome.zarr: OME-Zarr image has 2 resolution level\(s\) \(0 to 1\), got level 2"):
        io.open_lazy(tmp_path / "ome.zarr", 2)
    assert isinstance(io.read(tmp_path / "ome.zarr" / "0"), np.ndarray)  # io.read stays eager


def test_global_normalisation_not_per_block(tmp_path):
    """Blocks are normalised with the stack's percentiles: a dark block stays dark."""
    img = np.zeros(SHAPE, np.float32)
    img[:, :, 32:] = 100.0
    img += np.random.default_rng(0).normal(0, 1, SHAPE).astype(np.float32)
    z = zarr.create_array(str(tmp_path / "v.zarr"), shape=SHAPE, chunks=(8, 32, 32), dtype="float32")
    z[:] = img
    vol = B.open_volume(tmp_path / "v.zarr", 3, 1)
    bounds = B.sample_bounds(vol)
    assert np.allclose(bounds, io.percentile_bounds(img[None]))  # small: the whole stack
    sub = B.sample_bounds(vol, max_voxels=4096)  # large: a sample of regions all over it
    assert abs(sub[0, 0] - bounds[0, 0]) < 1.0 and abs(sub[0, 1] - bounds[0, 1]) < 1.0
    dark = io.normalize(vol.read((slice(0, 8), slice(0, 32), slice(0, 32))), bounds=bounds)
    assert abs(float(dark.mean())) < 0.05  # per-block normalisation would stretch the noise to [0, 1]


# -- a real (tiny, barely trained) model -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(root, image): a 3D SPOCO model (spatial embeddings, foreground head) trained for a few
    steps, the image as ``root/img.zarr`` and as an OME-Zarr ``root/ome.zarr``."""
    from napari_sparseseg import TrainConfig, Trainer
    from napari_sparseseg.core.sparsify import sparsify

    root = tmp_path_factory.mktemp("tiny")
    img, lab = synthetic_cells(SHAPE, radius=(6, 10), seed=2)
    trainer = Trainer([img], [sparsify(lab, 0.5, np.random.default_rng(0))],
                      TrainConfig(iterations=2, method="spoco", patch_shape=(16, 32, 32), base_channels=4, depth=2,
                                  diameter=16), out=root / "model")
    for _ in trainer.run():
        pass
    assert json.loads((root / "model" / "config.json").read_text())["foreground"]["c"] is not None
    z = zarr.create_array(str(root / "img.zarr"), shape=SHAPE, chunks=(8, 32, 32), dtype=img.dtype)
    z[:] = img
    write_ome(root / "ome.zarr", img)
    return root, img


@pytest.mark.parametrize("diameter, block, tol, voxel", [
    (None, (64, 128, 128), 0.002, None), (12.0, (64, 128, 128), 0.002, None),  # one block: exact
    (24.0, (64, 128, 128), 0.002, None),
    (None, (12, 32, 32), 0.05, None),  # small blocks: GroupNorm sees less of the image
    (None, (64, 128, 128), 0.002, (2.0, 1.0, 1.0)),  # z enlarged 2x (linear)
    (24.0, (64, 128, 128), 0.002, (0.5, 1.0, 1.0)),  # z shrunk to 1/3 (area)
])  # zoom 1, 4/3 (bilinear) and 2/3 (area)
def test_blockwise_prediction_matches_whole_image(tiny, tmp_path, diameter, block, tol, voxel):
    """The prediction store (coordinates added back, zoomed grid) holds what the whole-image path
    predicts: up to float16 when one block covers the stack; with small blocks the network's
    GroupNorm (statistics over what it sees) makes blocks differ slightly from the whole image."""
    from napari_sparseseg.core.checkpoint import load
    from napari_sparseseg.core.prediction import predict_scaled

    root, img = tiny
    work = tmp_path / "work"
    res = segment_blockwise(root / "model", root / "img.zarr", tmp_path / "s.zarr", block_shape=block,
                            diameter=diameter, voxel_size=voxel, work=work, keep_work=True)
    model = load(root / "model")
    whole = predict_scaled(model, img, device="cpu", diameter=diameter, voxel_size=voxel)
    assert res.zoom == pytest.approx(whole.zoom)
    if voxel is not None:
        assert whole.z_zoom == pytest.approx(whole.zoom * voxel[0])
    job = B.Job(B.open_volume(root / "img.zarr", 3, 1), str(work), B.ModelPredictor(str(root / "model")), [], res.zoom,
                tuple(min(b, s) for b, s in zip(block, whole.embeddings.shape[1:])), model.config,
                z_zoom=whole.z_zoom)
    assert job.scaled == whole.embeddings.shape[1:]
    pred = B.read_prediction(job, tuple(slice(0, s) for s in job.scaled))
    scale = float(np.abs(whole.embeddings).max())
    assert scale > 1.0  # coordinate channels: large values, stored without their coordinates in float16
    diff = np.abs(pred.embeddings - whole.embeddings)
    assert np.percentile(diff, 99) < tol * scale, np.percentile(diff, [50, 99])
    assert np.abs(pred.foreground - whole.foreground).max() < 5 * tol
    seg = zarr.open_array(str(tmp_path / "s.zarr"))[:]
    assert seg.shape == SHAPE and seg.dtype == np.uint32


# -- command line ----------------------------------------------------------------------------------
def _err(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_cli_blockwise_zarr_tiff_and_ome_labels(tiny, tmp_path, capsys):
    root, img = tiny
    base = ["segment", "--model", str(root / "model"), "--block-shape", "12", "64", "64", "--clustering", "mws"]
    # zarr input -> blockwise, on a LocalCluster of one worker process
    assert main(base + ["--images", str(root / "img.zarr"), "--out", str(tmp_path / "seg.zarr"), "--workers", "1"]) == 0
    report = capsys.readouterr().out
    assert "blockwise: 2 blocks" in report and "voxels/s" in report
    seg = zarr.open_array(str(tmp_path / "seg.zarr"))[:]
    assert seg.shape == SHAPE and seg.max() >= 1
    # TIFF output (and a TIFF input made blockwise by --block-shape) gives the same labels
    tifffile.imwrite(tmp_path / "img.tif", img)
    assert main(base + ["--images", str(tmp_path / "img.tif"), "--out", str(tmp_path / "seg.tif"), "--workers", "0"]) == 0
    assert np.array_equal(tifffile.imread(tmp_path / "seg.tif"), seg)
    # a folder as --out: <stem>.zarr inside it
    assert main(base + ["--images", str(root / "img.zarr"), "--out", str(tmp_path / "f"), "--workers", "0"]) == 0
    assert np.array_equal(zarr.open_array(str(tmp_path / "f" / "img.zarr"))[:], seg)
    # OME-Zarr input, labels written into the image's labels group (NGFF 0.4 metadata)
    ome = root / "ome.zarr"
    assert main(base + ["--images", str(ome), "--out", str(ome / "labels" / "cells"), "--workers", "0"]) == 0
    assert np.array_equal(zarr.open_array(str(ome / "labels" / "cells" / "0"))[:], seg)
    assert zarr.open_group(str(ome / "labels")).attrs["labels"] == ["cells"]
    attrs = dict(zarr.open_group(str(ome / "labels" / "cells")).attrs)
    assert attrs["image-label"]["source"]["image"] == "../../"
    assert [a["name"] for a in attrs["multiscales"][0]["axes"]] == ["z", "y", "x"]
    # level 1 of the pyramid: half the size in y and x
    assert main(base + ["--images", str(ome), "--out", str(tmp_path / "l1.zarr"), "--workers", "0", "--level", "1"]) == 0
    assert zarr.open_array(str(tmp_path / "l1.zarr")).shape == (24, 32, 32)
    assert not list(tmp_path.glob(".*sparseseg-work")) and not list(root.glob(".*sparseseg-work"))


def test_cli_blockwise_errors(tiny, tmp_path, capsys):
    root, img = tiny
    zin = str(root / "img.zarr")
    base = ["segment", "--model", str(root / "model"), "--workers", "0"]
    out = ["--out", str(tmp_path / "o.zarr")]
    assert f"{zin}: block shape (12, 32): expected 3 sizes (one per spatial axis of a 3D model)" in _err(
        capsys, base + ["--images", zin, *out, "--block-shape", "12", "32"])
    assert "block shape (0, 32, 32): every size must be a positive number of pixels" in _err(
        capsys, base + ["--images", zin, *out, "--block-shape", "0", "32", "32"])
    assert "OME-Zarr image has 2 resolution level(s) (0 to 1), got level 5" in _err(
        capsys, base + ["--images", str(root / "ome.zarr"), *out, "--level", "5"])
    assert "blockwise segmentation supports auto, mws, multicut" in _err(
        capsys, base + ["--images", zin, *out, "--clustering", "hdbscan"])
    assert "agreement filtering is not available blockwise" in _err(
        capsys, base + ["--images", zin, *out, "--agreement", "0.5"])
    assert "background 'largest': blockwise segmentation cannot" in _err(
        capsys, base + ["--images", zin, *out, "--background", "largest"])
    assert "--workers -1: expected 0 (this process) or a positive number" in _err(
        capsys, base[:-2] + ["--workers", "-1", "--images", zin, *out])
    flat = tmp_path / "flat.zarr"
    zarr.create_array(str(flat), shape=(64, 64), chunks=(32, 32), dtype="uint8")
    assert f"{flat}: shape (64, 64) does not fit the model (expected 3 spatial axes" in _err(
        capsys, base + ["--images", str(flat), *out])
    two = tmp_path / "two"
    two.mkdir()
    for n in ("a.tif", "b.tif"):
        tifffile.imwrite(two / n, img)
    assert "--out x.tif: names one output but --images matched 2 files" in _err(
        capsys, base + ["--images", str(two / "*.tif"), "--out", "x.tif", "--block-shape", "12", "32", "32"])
    zarr.create_array(str(tmp_path / "old.zarr"), shape=(5, 5, 5), chunks=(5, 5, 5), dtype="uint32")
    assert f"{tmp_path / 'old.zarr'}: exists with shape (5, 5, 5), the labels of {zin} have shape (24, 64, 64)" in _err(
        capsys, base + ["--images", zin, "--out", str(tmp_path / "old.zarr")])
    assert "a labels image belongs to the image it labels" in _err(
        capsys, base + ["--images", zin, "--out", str(root / "ome.zarr" / "labels" / "x")])


def test_cli_work_puts_the_intermediate_results_in_a_folder_inside_the_one_given(tiny, tmp_path, capsys,
                                                                                 monkeypatch):
    import napari_sparseseg.core.blockwise as BW

    root, _ = tiny
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "keep.txt").write_text("the user's")
    asked = []
    monkeypatch.setattr(BW, "free_bytes", lambda path: asked.append(Path(path)) or 0)
    base = ["segment", "--model", str(root / "model"), "--images", str(root / "img.zarr"), "--workers", "0",
            "--block-shape", "12", "32", "32", "--out", str(tmp_path / "o.zarr"), "--work", str(scratch)]
    err = _err(capsys, base)
    assert f"{scratch / '.o.zarr.sparseseg-work'}: the prediction store needs about" in err and "are free there" in err
    assert asked == [scratch / ".o.zarr.sparseseg-work"]
    monkeypatch.setattr(BW, "free_bytes", lambda path: 2**40)
    assert main(base) == 0
    assert zarr.open_array(str(tmp_path / "o.zarr")).shape == SHAPE
    # the work folder inside it is removed after the run, the folder given and its files are not
    assert [p.name for p in scratch.iterdir()] == ["keep.txt"]
    assert not list(tmp_path.glob(".*sparseseg-work"))
    (tmp_path / "afile").write_text("")
    assert f"--work {tmp_path / 'afile'}: expected a folder" in _err(capsys, base[:-1] + [str(tmp_path / "afile")])


def test_cli_ctrl_c_then_same_command_resumes(tiny, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    root, _ = tiny
    out = tmp_path / "r.zarr"
    cmd = [sys.executable, "-m", "napari_sparseseg", "segment", "--model", str(root / "model"), "--images",
           str(root / "img.zarr"), "--out", str(out), "--block-shape", "12", "32", "32", "--workers", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = tmp_path / ".r.zarr.sparseseg-work" / "done" / "predict"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (done.is_dir() and len(list(done.iterdir())) >= 2) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout
    assert "run the same command again to resume" in stdout
    kept = {p.name for p in done.iterdir()}
    assert 2 <= len(kept) < 8
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "blockwise: 8 blocks" in res.stdout
    assert zarr.open_array(str(out)).shape == SHAPE
    assert not done.exists()  # finished: the work folder is gone (skipping is counted in test_resume_...)


def test_open_volume_channel_axes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3)).astype(np.uint8)
    first = np.moveaxis(rgb, -1, 0)[:2]
    cases = [("rgb.zarr", rgb, 3, 3), ("cf.zarr", first, 2, 0), ("t.zarr", first[None, :1], 1, 0)]  # t=1 dropped
    for name, arr, channels, axis in cases:
        z = zarr.create_array(str(tmp_path / name), shape=arr.shape, chunks=arr.shape, dtype=arr.dtype)
        z[:] = arr
        vol = B.open_volume(tmp_path / name, 3, channels)
        assert vol.shape == (4, 16, 16) and vol.channel_axis == axis
        region = (slice(1, 3), slice(2, 9), slice(0, 5))
        expect = np.moveaxis(rgb, -1, 0)[:channels][(slice(None),) + region]
        assert np.array_equal(vol.read(region), expect.astype(np.float32)), name
    msg = r"rgb.zarr: shape \(4, 16, 16, 3\) does not fit the model \(expected 3 spatial axes, with 2 channel"
    with pytest.raises(SparseSegError, match=msg):
        B.open_volume(tmp_path / "rgb.zarr", 3, 2)


def test_auto_on_a_dense_stack_keeps_every_voxel_unless_a_rule_is_named(oracle, tmp_path):
    """As the whole-image path: "auto" on a stack the foreground head calls dense tissue takes the
    multicut and segment.DENSE_BACKGROUND ("none"); a background rule the user names is kept."""
    root, lab = oracle
    outputs = oracle_outputs(lab)
    outputs[D] = 6.0
    outputs[D, :, :, :8] = -6.0  # a slab the head calls background: the stack is still 7/8 foreground
    np.save(root / "outputs.npy", outputs)
    kw = dict(predictor=OraclePredictor(root / "outputs.npy"), method="auto", block_shape=(12, 32, 32))
    segment_blockwise(root / "model", root / "img.zarr", tmp_path / "auto.zarr", **kw)
    assert (zarr.open_array(str(tmp_path / "auto.zarr"))[:] > 0).all()
    segment_blockwise(root / "model", root / "img.zarr", tmp_path / "fg.zarr", background="foreground", **kw)
    assert (zarr.open_array(str(tmp_path / "fg.zarr"))[:][:, :, :8] == 0).all()


def test_auto_on_a_stack_whose_annotation_looks_like_tissue_takes_the_dense_rule(oracle, tmp_path):
    """As the whole-image path (segment.is_dense): a model whose annotation looks like dense tissue
    is segmented as such even where its foreground head leaves most of the stack background."""
    root, lab = oracle
    assert (lab > 0).mean() < 0.5
    np.save(root / "outputs.npy", oracle_outputs(lab))
    config = json.loads((root / "model" / "config.json").read_text())
    kw = dict(predictor=OraclePredictor(root / "outputs.npy"), method="auto", block_shape=(12, 32, 32))
    for contrast, dense in ((0.95, False), (0.6, True)):
        model = tmp_path / f"model-{contrast}"
        model.mkdir()
        stats = {"ring_contrast": contrast, "interior_share": 0.9}
        (model / "config.json").write_text(json.dumps(dict(config, annotation=stats)))
        out = tmp_path / f"auto-{contrast}.zarr"
        segment_blockwise(model, root / "img.zarr", out, **kw)
        assert bool((zarr.open_array(str(out))[:] > 0).all()) is dense


def test_blockwise_multicut_follows_the_image_borders_as_the_whole_volume_does(oracle, tmp_path, monkeypatch):
    """A model whose annotation found the borders in the image (agglomeration.image_boundaries): each
    block's superpixels read the block's image, normalised by the whole stack's percentiles, so the
    stitched result agrees with the whole-volume multicut that reads the whole image. The edge
    costs read it too, ranked against the block's own network edges (agglomeration.rank_match):
    they change the blocks' result, which then follows the blocks' ranks, not the whole volume's."""
    from napari_sparseseg.core import agglomeration
    from napari_sparseseg.core.agglomeration import image_share

    root, lab = oracle
    outputs = oracle_outputs(lab, noise=0.3, seed=3)
    config = json.loads((root / "model" / "config.json").read_text())
    config["annotation"] = {"border_direction": [-1.0], "border_contrast": 0.9}
    assert image_share(config["annotation"]) > 0
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    np.save(root / "outputs.npy", outputs)
    image = io.normalize(zarr.open_array(str(root / "img.zarr"))[:][None])
    pred = Prediction(outputs[:D], 1 / (1 + np.exp(-outputs[D])), 1.0, SHAPE, None, image=image)

    def blockwise(name):
        segment_blockwise(model, root / "img.zarr", tmp_path / name, method="multicut", block_shape=(12, 32, 32),
                          predictor=OraclePredictor(root / "outputs.npy"))
        return zarr.open_array(str(tmp_path / name))[:]

    with_costs = blockwise("costs.zarr")
    monkeypatch.setattr(agglomeration, "IMAGE_COST_WEIGHT", 0.0)  # the superpixels alone read the image
    whole = cluster(Model(net=None, config=config), Embedded(pred), "multicut")
    without = cluster(Model(net=None, config=dict(config, annotation={})), Embedded(pred), "multicut")
    assert adapted_rand_error(whole, without)[0] > 0.001, "the image must change the whole-volume result"
    seg = blockwise("seg.zarr")
    assert adapted_rand_error(whole, seg)[0] <= 0.02
    assert adapted_rand_error(seg, with_costs)[0] > 0.001, "the image must reach the blocks' edge costs"
