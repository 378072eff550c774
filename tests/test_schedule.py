"""The order and place the block tasks of blockwise segmentation run in (core/schedule.py): slab by
slab with the prediction of finished slabs deleted, on a LocalCluster or a running dask cluster."""

from pathlib import Path

import numpy as np
import pytest
import zarr
from skimage.metrics import adapted_rand_error
from test_blockwise import SHAPE, D, OraclePredictor, oracle_outputs, oracle_stack, run

from napari_sparseseg.core.blockwise import segment_blockwise
from napari_sparseseg.core.errors import SparseSegError


# -- the prediction store holds a few slabs ---------------------------------------------------------
@pytest.mark.parametrize("grid, block, halo, min_blocks", [
    ((1, 2, 7), (16, 32, 32), (4, 27, 27), 1), ((9, 3, 3), (8, 64, 64), (4, 27, 27), 1),
    ((12, 2, 2), (4, 64, 64), (6, 9, 9), 1), ((3, 20), (256, 64), (27, 27), 1),
    ((1, 2, 14), (16, 32, 32), (4, 27, 27), 4), ((2, 3, 31), (8, 16, 16), (4, 20, 20), 12)])
def test_slab_plan_clusters_a_block_only_after_its_halo_is_predicted_and_deletes_only_what_nothing_reads(
        grid, block, halo, min_blocks):
    from napari_sparseseg.core.schedule import slab_plan

    plan = slab_plan(grid, block, halo, min_blocks=min_blocks)
    n, ids = int(np.prod(grid)), np.arange(int(np.prod(grid))).reshape(grid)
    axis = int(np.argmax(grid))
    per_index = n // grid[axis]
    k = plan.thickness  # blocks along the axis per slab: enough blocks for min_blocks
    assert k * per_index >= min_blocks and (k - 1) * per_index < max(min_blocks, 1)
    reach = -(-halo[axis] // (k * block[axis]))
    slab_of = {int(i): int(np.unravel_index(i, grid)[axis]) // k for i in ids.ravel()}
    assert plan.rolling and plan.axis == axis
    assert len({wave_slab for wave_slab in slab_of.values()}) == -(-grid[axis] // k) > 2 * reach + 2
    predicted, clustered, freed, stored, peak = {}, {}, {}, set(), 0
    for w, wave in enumerate(plan.waves):
        for i in wave.cluster:  # every slab its halo reaches was predicted in an earlier wave, none deleted yet
            for j in range(n):
                if abs(slab_of[j] - slab_of[i]) <= reach:
                    assert predicted.get(j, w) < w and j not in freed
            clustered[i] = w
        assert len({slab_of[i] for i in wave.predict}) <= 1  # a slab per wave
        predicted.update(dict.fromkeys(wave.predict, w))
        stored |= set(wave.predict)
        peak = max(peak, len(stored))
        for i in wave.free:  # deleted only after every clustering that reads it
            readers = [j for j in range(n) if abs(slab_of[j] - slab_of[i]) <= reach]
            assert all(clustered.get(j, w + 1) <= w for j in readers)
            freed[i] = w
        stored -= set(wave.free)
    assert sorted(predicted) == sorted(clustered) == sorted(freed) == list(range(n))
    assert peak == plan.peak_blocks <= (2 * reach + 2) * k * per_index < n
    # everything first, nothing deleted: when kept, or when slabs would save nothing
    for keep, g in ((True, grid), (False, tuple(min(v, (2 * reach + 2) * k) for v in grid))):
        plan = slab_plan(g, block, halo, keep=keep, min_blocks=min_blocks)
        assert not plan.rolling and [len(w.free) for w in plan.waves] == [0, 0]
        assert plan.waves[0].predict == plan.waves[1].cluster == list(range(int(np.prod(g))))


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle")
    return root, oracle_stack(root, SHAPE, seed=1)


LONG = (16, 64, 224)  # 14 blocks of 16 x 32 x 32: 7 slabs along x, 2 blocks each


@pytest.fixture(scope="module")
def long_stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    lab = oracle_stack(root, LONG, seed=2)
    np.save(root / "outputs.npy", oracle_outputs(lab, noise=0.1, seed=4))
    return root, lab


def stored_blocks(work: Path) -> int:
    store = work / "prediction.zarr" / "c"
    return sum(1 for p in store.rglob("*") if p.is_file()) if store.exists() else 0


def test_the_prediction_store_holds_a_few_slabs_and_gives_the_labels_of_storing_everything(long_stack, tmp_path):
    root, lab = long_stack
    kw = dict(method="mws", block_shape=(16, 32, 32))
    calls, work = tmp_path / "calls", tmp_path / "work"
    ref = segment_blockwise(root / "model", root / "img.zarr", tmp_path / "ref.zarr", keep_work=True,
                            work=tmp_path / "kept", predictor=OraclePredictor(root / "outputs.npy"), **kw)
    assert ref.blocks == 14 and stored_blocks(tmp_path / "kept") == 14  # kept: the whole store
    store = zarr.open_array(str(tmp_path / "kept" / "prediction.zarr"))
    assert store.shards == (7, 16, 32, 32) and store.chunks == (7, 4, 8, 8)  # a file per block, read in parts
    assert "predict" in ref.seconds and "cluster" in ref.seconds
    peak, seen = [0], []

    def progress(step, done, total):
        seen.append((step, done, total))
        peak[0] = max(peak[0], stored_blocks(work))

    # a crash after 9 blocks: the slabs already clustered are deleted, and not predicted again
    with pytest.raises(RuntimeError, match="simulated crash"):
        segment_blockwise(root / "model", root / "img.zarr", tmp_path / "seg.zarr", work=work, progress=progress,
                          predictor=OraclePredictor(root / "outputs.npy", calls, fail_after=9), **kw)
    assert 0 < stored_blocks(work) <= 8 and len(list((work / "done" / "cluster").glob("*.json"))) >= 2
    calls.unlink()
    res = segment_blockwise(root / "model", root / "img.zarr", tmp_path / "seg.zarr", work=work, progress=progress,
                            predictor=OraclePredictor(root / "outputs.npy", calls), **kw)
    assert int(calls.read_text()) == 5, "blocks predicted before the crash were predicted again"
    assert peak[0] == 8, "4 slabs of 2 blocks at most: the one predicted and the three one clustering reads"
    assert "predict+cluster" in res.seconds and not work.exists()
    assert ("predict", 14, 14) in seen and ("cluster", 14, 14) in seen
    assert all(done <= total for _, done, total in seen)
    a, b = (zarr.open_array(str(tmp_path / n))[:] for n in ("ref.zarr", "seg.zarr"))
    assert np.array_equal(a, b)
    assert adapted_rand_error(lab, b)[0] < 0.2  # and the labels are the objects (noisy embeddings)


def test_the_free_space_check_counts_the_slabs_stored_at_once(long_stack, tmp_path, monkeypatch):
    import napari_sparseseg.core.blockwise as BW

    root, _ = long_stack
    # 8 of 14 blocks (4 slabs of 2; "mws" samples nothing) of 16 x 32 x 32 voxels, 7 float16 channels
    need = 8 * 16 * 32 * 32 * 7 * 2 * BW.STORE_KEPT
    monkeypatch.setattr(BW, "free_bytes", lambda path: int(0.9 * need))
    kw = dict(method="mws", block_shape=(16, 32, 32), predictor=OraclePredictor(root / "outputs.npy"))
    with pytest.raises(SparseSegError, match=r"needs about 1\.4 MiB more \(7 float16 channels per voxel at the model's "
                                             r"scale, 0\.1 M voxels stored at once, a few slabs of blocks\), but only 1\.3 "
                                             r"MiB are free there"):
        segment_blockwise(root / "model", root / "img.zarr", tmp_path / "seg.zarr", work=tmp_path / "w", **kw)
    monkeypatch.setattr(BW, "free_bytes", lambda path: int(1.01 * need))  # enough for 8 blocks, not for 14
    segment_blockwise(root / "model", root / "img.zarr", tmp_path / "seg.zarr", work=tmp_path / "w", **kw)


def test_a_resumed_run_counts_the_slabs_already_stored_as_space_it_holds(long_stack, tmp_path, monkeypatch):
    """A run stopped with a few slabs stored needs only the blocks beyond those: the 4 GiB benchmark,
    resumed with 32 GiB of its slabs on a disk of 37 GiB free, was refused for 43 GiB more."""
    import napari_sparseseg.core.blockwise as BW

    root, _ = long_stack
    block = 16 * 32 * 32 * 7 * 2 * BW.STORE_KEPT  # bytes per block: 7 float16 channels
    kw = dict(method="mws", block_shape=(16, 32, 32), work=tmp_path / "w")
    monkeypatch.setattr(BW, "free_bytes", lambda path: int(8.5 * block))  # 4 slabs of 2 blocks at most
    with pytest.raises(RuntimeError, match="simulated crash"):
        segment_blockwise(root / "model", root / "img.zarr", tmp_path / "seg.zarr",
                          predictor=OraclePredictor(root / "outputs.npy", tmp_path / "calls", fail_after=9), **kw)
    held = stored_blocks(tmp_path / "w")
    assert 4 <= held < 8, held
    # what the disk has free now, less than 8 blocks, more than the blocks still to be stored
    monkeypatch.setattr(BW, "free_bytes", lambda path: int((8.5 - held) * block))
    res = segment_blockwise(root / "model", root / "img.zarr", tmp_path / "seg.zarr",
                            predictor=OraclePredictor(root / "outputs.npy"), **kw)
    assert res.blocks == 14
    # and a disk that cannot take the blocks still to be stored is refused, naming both figures
    monkeypatch.setattr(BW, "free_bytes", lambda path: int(8.5 * block))
    with pytest.raises(RuntimeError, match="simulated crash"):
        segment_blockwise(root / "model", root / "img.zarr", tmp_path / "seg2.zarr",
                          predictor=OraclePredictor(root / "outputs.npy", tmp_path / "calls2", fail_after=9), **kw)
    held = stored_blocks(tmp_path / "w")
    monkeypatch.setattr(BW, "free_bytes", lambda path: int((7.5 - held) * block))
    with pytest.raises(SparseSegError, match=rf"needs about .* more \(7 float16 channels per voxel at the model's "
                                             rf"scale, 0\.1 M voxels stored at once, a few slabs of blocks, "
                                             rf"{held * 16 * 32 * 32 / 1e6:.1f} M of them stored already\)"):
        segment_blockwise(root / "model", root / "img.zarr", tmp_path / "seg2.zarr",
                          predictor=OraclePredictor(root / "outputs.npy"), **kw)


def test_auto_decides_from_blocks_spread_over_the_stack_when_slabs_are_deleted(long_stack, tmp_path, monkeypatch):
    """With slabs deleted as they go, "auto" reads the foreground of a slab's worth of blocks spread
    over the stack before it clusters any: a stack the head calls foreground but for a few columns
    is dense tissue either way (on a LocalCluster: each wave predicts and clusters at once)."""
    from napari_sparseseg.core import schedule

    monkeypatch.setattr(schedule, "TASKS_PER_THREAD", 1)  # slabs of one block column on two workers
    root, lab = long_stack
    outputs = np.load(root / "outputs.npy")
    outputs[D] = 6.0
    outputs[D, :, :, :24] = -6.0  # most of the first slab only is background
    np.save(tmp_path / "dense.npy", outputs)
    for keep in (True, False):
        res = segment_blockwise(root / "model", root / "img.zarr", tmp_path / f"auto-{keep}.zarr", method="auto",
                                block_shape=(16, 32, 32), keep_work=keep, work=tmp_path / f"w{keep}",
                                predictor=OraclePredictor(tmp_path / "dense.npy"), workers=0 if keep else 2)
        assert res.method == "multicut" and ("predict+cluster" in res.seconds) is not keep
        assert (zarr.open_array(str(tmp_path / f"auto-{keep}.zarr"))[:] > 0).all()


def test_slabs_hold_enough_blocks_for_every_worker(long_stack, tmp_path):
    """Two workers, 4 blocks each per wave: slabs of 4 block columns (8 blocks); 7 columns make 2
    slabs, too few to save anything, so everything is predicted first."""
    root, _ = long_stack
    res = segment_blockwise(root / "model", root / "img.zarr", tmp_path / "seg.zarr", method="mws",
                            block_shape=(16, 32, 32), predictor=OraclePredictor(root / "outputs.npy"), workers=2)
    assert "predict+cluster" not in res.seconds and res.blocks == 14


def test_a_running_cluster_given_by_its_address_runs_the_blocks_and_is_left_running(oracle, tmp_path):
    """--scheduler ADDRESS (e.g. a dask-jobqueue cluster on SLURM): the blocks run on its workers, and
    the cluster is not ours to close."""
    from distributed import Client, LocalCluster

    root, lab = oracle
    outputs = oracle_outputs(lab, noise=0.3, seed=3)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}) as cluster:
        with Client(cluster.scheduler_address) as client:
            run(root, outputs, tmp_path / "a.zarr", scheduler=cluster.scheduler_address)
            assert len(client.scheduler_info()["workers"]) == 2
            ran = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
            assert {"predict_block", "cluster_block", "write_block"} <= set(ran), ran
            run(root, outputs, tmp_path / "b.zarr", scheduler=cluster.scheduler_address)  # and again
    run(root, outputs, tmp_path / "c.zarr")
    a, b, c = (zarr.open_array(str(tmp_path / n))[:] for n in ("a.zarr", "b.zarr", "c.zarr"))
    assert np.array_equal(a, c) and np.array_equal(b, c)


def test_a_local_cluster_leaves_the_port_of_dasks_dashboard_alone(recwarn):
    """Two runs at once (or the user's own dask on 8787): no 'Port 8787 is already in use' warning."""
    import socket

    from napari_sparseseg.core import schedule

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", 8787))
            sock.listen()
        except OSError:
            pass  # someone holds it already: as good
        client = schedule.client(1, None)
        schedule.close(client, None)
    assert not [w for w in recwarn if "8787" in str(w.message)]
