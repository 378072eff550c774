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


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """(root, labels): a config-only model folder ``root/model``, the image ``root/img.zarr``."""
    root = tmp_path_factory.mktemp("oracle")
    img, lab = synthetic_cells(SHAPE, radius=(6, 10), seed=1)
    config = {"format": FORMAT, "version": 1, "method": "spoco", "offsets": default_offsets(3),
              "loss": {"delta_var": 0.5, "delta_dist": 2.0}, "object_area_median": 40, "foreground": {"c": 1.0},
              "normalization": {"low": 1.0, "high": 99.8}, "scale": {"zoom": 1.0},
              "network": {**OraclePredictor.config, "in_channels": 1}}
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text(json.dumps(config))
    z = zarr.create_array(str(root / "img.zarr"), shape=SHAPE, chunks=(8, 32, 32), dtype=img.dtype)
    z[:] = img
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


def test_local_cluster_gives_the_same_labels(oracle, tmp_path):
    root, lab = oracle
    outputs = oracle_outputs(lab, noise=0.3, seed=3)
    run(root, outputs, tmp_path / "a.zarr")
    run(root, outputs, tmp_path / "b.zarr", workers=2)
    a, b = (zarr.open_array(str(tmp_path / n))[:] for n in ("a.zarr", "b.zarr"))
    assert np.array_equal(a, b)
