"""Training in a child process (what the napari widget runs): the same events, Stop within one
step, errors and crashes reported with the last good checkpoint kept."""

import os
import signal

import numpy as np
import pytest

from napari_sparseseg import SparseSegError, TrainConfig, load_model
from napari_sparseseg.core.training import TrainEvent
from napari_sparseseg.core.training_process import Preview, TrainingProcess, TrainJob

FAST = dict(method="spoco", batch_size=1, patch_shape=(64, 64), base_channels=8, depth=3, checkpoint_every=1e9)


def _job(cells2d, tmp_path, **config):
    img, gt = cells2d[0]
    sparse = np.where(np.isin(gt, np.unique(gt)[1:6]), gt, 0)
    return TrainJob([img], [sparse], TrainConfig(**{**FAST, **config}), out=tmp_path / "m")


def test_child_yields_the_trainers_events_and_leaves_the_model_in_its_folder(cells2d, tmp_path):
    job = _job(cells2d, tmp_path, iterations=4)
    job.preview_image, job.preview_every = cells2d[0][0], 1e-3
    proc = TrainingProcess(job)
    events = list(proc.events())
    steps = [e for e in events if isinstance(e, TrainEvent)]
    assert [e.iteration for e in steps] == [1, 2, 3, 4, 4] and steps[-1].done and steps[-1].reason == "iterations"
    previews = [e for e in events if isinstance(e, Preview)]
    assert previews and isinstance(events[-1], Preview)  # the final model's preview comes last
    assert previews[-1].labels.shape == cells2d[0][0].shape
    assert proc.exitcode == 0
    assert proc.model().config["training"]["iteration"] == 4
    # continue training the same model: resume from its folder
    again = TrainingProcess(TrainJob(job.images, job.labels, TrainConfig(**{**FAST, "iterations": 2}),
                                     out=job.out, init=job.out, resume=True))
    assert [e.iteration for e in again.events()] == [5, 6, 6]


def test_stop_ends_the_child_within_one_step_and_keeps_a_loadable_model(cells2d, tmp_path):
    proc = TrainingProcess(_job(cells2d, tmp_path, iterations=100_000, time_limit=120.0))
    events = proc.events()
    for ev in events:
        if ev.iteration >= 2:
            proc.stop()
            break
    rest = list(events)
    assert rest[-1].done and rest[-1].reason == "stopped"
    assert rest[-1].iteration <= 4  # the step in flight, at most one more
    assert load_model(tmp_path / "m").config["training"]["iteration"] == rest[-1].iteration


def test_an_error_in_the_child_reaches_the_caller_with_its_message(cells2d, tmp_path):
    job = _job(cells2d, tmp_path, iterations=2)
    job.init = tmp_path / "no-such-model"
    with pytest.raises(SparseSegError, match="no-such-model"):
        list(TrainingProcess(job).events())
    job = _job(cells2d, tmp_path, iterations=2)
    job.labels = [np.zeros_like(job.labels[0])]
    with pytest.raises(SparseSegError, match="no labeled object in any label image"):
        job.check()  # the quick check a caller makes before starting a child


def test_a_crashed_child_is_reported_and_its_last_checkpoint_kept(cells2d, tmp_path):
    proc = TrainingProcess(_job(cells2d, tmp_path, iterations=100_000, time_limit=120.0, checkpoint_every=0.0))
    events = proc.events()
    with pytest.raises(SparseSegError, match=r"training process ended unexpectedly \(exit code -9\).*checkpoint"):
        for ev in events:
            if ev.iteration >= 2:
                os.kill(proc.pid, signal.SIGKILL)
    assert load_model(tmp_path / "m").config["training"]["iteration"] >= 2


SCRIPT = """
import numpy as np
from napari_sparseseg import TrainConfig
from napari_sparseseg.core.samples import synthetic_cells
from napari_sparseseg.core.training_process import TrainingProcess, TrainJob

print("top level ran", flush=True)  # a user's script without an `if __name__ == "__main__":` guard
img, gt = synthetic_cells((64, 64), seed=0)
sparse = np.where(np.isin(gt, np.unique(gt)[1:4]), gt, 0)
cfg = TrainConfig(method="spoco", iterations=1, batch_size=1, patch_shape=(64, 64), base_channels=4, depth=2,
                  checkpoint_every=1e9)
events = list(TrainingProcess(TrainJob([img], [sparse], cfg, out=OUT)).events())
print("events", len(events), flush=True)
"""


def test_a_script_without_a_main_guard_is_not_run_again_by_the_child(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "user_script.py"
    script.write_text(f"OUT = {str(tmp_path / 'm')!r}\n" + SCRIPT)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("top level ran") == 1, run.stdout + run.stderr[-2000:]
    assert "events 2" in run.stdout
