"""GPU figures: mixed precision for training and prediction, and the GPU memory a training run
leaves behind in this process versus in a child process (what napari does).

    python benchmarks/gpu.py --out gpu.json            # on a machine with a CUDA GPU, ~11 minutes
    python benchmarks/gpu.py --device cpu --quick      # the same code path on a CPU, ~2 minutes

Sections, each written to ``--out`` as soon as it is measured:

- ``memory``: a 3D CRAC run trains in a child process (:class:`TrainingProcess`, as the napari
  widget does); the GPU's used memory (nvidia-smi, whole device) is sampled before, during and
  after. Then the same run trains in this process: what stays allocated after it ends, before and
  after ``torch.cuda.empty_cache()``.
- ``train_speed``: seconds per step and peak allocated memory of both methods in 2D and 3D, under
  float32 and bfloat16 autocast, and the seconds the CPU takes to sample one batch (the data
  pipeline runs on the CPU whatever the device).
- ``quality``: the default method trained for a fixed number of steps on synthetic 2D and 3D data
  (10 % of the objects painted) under float32 and bfloat16, seeds 0 and 1, each segmented with
  its own precision; and the bfloat16-trained model predicted under both precisions (largest
  embedding difference, adapted Rand error between the two segmentations).
- ``predict_speed``: voxels per second of tiled prediction of a large 2D image and 3D stack.
- ``batch``: CRAC's step time for batch sizes 1-16, then a fixed time budget at the default batch
  and at 4x it, seeds 0 and 1.

Synthetic data only: nothing from ../shared travels to a rented GPU machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from napari_sparseseg.core import segment as seg_mod
from napari_sparseseg.core.device import resolve_device, resolve_precision
from napari_sparseseg.core.metrics import evaluate, mean_scores
from napari_sparseseg.core.prediction import predict_scaled
from napari_sparseseg.core.samples import synthetic_cells
from napari_sparseseg.core.sparsify import sparsify_many
from napari_sparseseg.core.training import BATCH_SIZE, TrainConfig, Trainer
from napari_sparseseg.core.training_process import TrainingProcess, TrainJob

PRECISIONS = ("float32", "bfloat16")


def gpu_used_mib() -> float | None:
    """Memory in use on GPU 0 by every process (nvidia-smi), MiB; None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10)
        return float(out.stdout.strip().splitlines()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


class Sampler(threading.Thread):
    """The peak of :func:`gpu_used_mib` while it runs."""

    def __init__(self, every: float = 0.2):
        super().__init__(daemon=True)
        self.every, self.peak, self.halt = every, 0.0, threading.Event()

    def run(self):
        while not self.halt.is_set():
            self.peak = max(self.peak, gpu_used_mib() or 0.0)
            time.sleep(self.every)

    def stop(self) -> float:
        self.halt.set()
        self.join()
        return self.peak


def dataset(ndim: int, n: int, seed: int, quick: bool):
    shape = (128, 128) if quick else (256, 256)
    if ndim == 3:
        shape = (24, 64, 64) if quick else (48, 128, 128)
    return [synthetic_cells(shape, seed=seed + i) for i in range(n)]


def painted(ndim: int, quick: bool, fraction: float = 0.3):
    """Two synthetic images and sparse labels (``fraction`` of their objects)."""
    data = dataset(ndim, 2, 0, quick)
    return [d[0] for d in data], sparsify_many([d[1] for d in data], fraction)


def step_seconds(trainer: Trainer, args) -> float:
    """Run ``trainer`` to its end; the mean seconds per step after ``args.warmup`` steps."""
    times = []
    for _ in trainer.run():
        sync(args.device)
        times.append(time.perf_counter())
    return float(np.mean(np.diff(times[args.warmup:-1])))


def config(method: str, precision: str, device: str, iterations: int, seed: int = 0) -> TrainConfig:
    return TrainConfig(method=method, precision=precision, device=device, iterations=iterations, seed=seed,
                       checkpoint_every=1e9)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def memory(args, out: dict) -> None:
    imgs, labs = painted(3, args.quick)
    cfg = config("crac", "auto", args.device, args.memory_iterations)
    res = out["memory"] = {"before_mib": gpu_used_mib()}
    with tempfile.TemporaryDirectory() as tmp:
        sampler = Sampler()
        sampler.start()
        proc = TrainingProcess(TrainJob(imgs, labs, cfg, Path(tmp) / "child", preview_every=0))
        last = None
        for ev in proc.events():
            last = ev
        res["child_peak_mib"] = sampler.stop()
        time.sleep(1.0)
        res["after_child_mib"] = gpu_used_mib()
        res["child_iterations"] = last.iteration
        args.save()
        trainer = Trainer(imgs, labs, cfg, out=Path(tmp) / "here")
        for _ in trainer.run():
            pass
        del trainer
        gc.collect()
        res["after_in_process_mib"] = gpu_used_mib()
        if torch.cuda.is_available():
            res["in_process_allocated_mib"] = torch.cuda.memory_allocated() / 2**20
            res["in_process_reserved_mib"] = torch.cuda.memory_reserved() / 2**20
            torch.cuda.empty_cache()
            res["after_empty_cache_mib"] = gpu_used_mib()
        args.save()


def train_speed(args, out: dict) -> None:
    rows = out["train_speed"] = []
    for ndim in (2, 3):
        imgs, labs = painted(ndim, args.quick)
        for method in ("crac", "spoco"):
            for precision in PRECISIONS:
                trainer = Trainer(imgs, labs, config(method, precision, args.device, args.warmup + args.steps))
                if args.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                step = step_seconds(trainer, args)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    trainer.sampler.batch(trainer.config.batch_size)
                batch = (time.perf_counter() - t0) / args.steps
                peak = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
                rows.append({"ndim": ndim, "method": method, "precision": precision, "step_s": step,
                             "batch_s": batch, "crop": list(trainer.sampler.patch),
                             "batch_size": trainer.config.batch_size, "peak_allocated_mib": peak})
                args.save(rows[-1])
                del trainer
                gc.collect()


def segment_with(model, image, precision: str, device: str):
    """(f's prediction, default segmentation) of ``image`` under ``precision``."""
    embedded = seg_mod.embed(model, image, seg_mod.needs_g("auto", model.config), device, precision=precision)
    return embedded.f, seg_mod.cluster(model, embedded)


def split(ndim: int, quick: bool):
    """Synthetic (image, labels) pairs to train on and others to test on."""
    n = 4 if ndim == 2 else 2
    return dataset(ndim, n, 100, quick), dataset(ndim, n, 200, quick)


def train_and_score(train, labs, cfg: TrainConfig, test, device: str) -> tuple[Trainer, dict]:
    """Train on ``train`` with ``labs`` to the end of ``cfg``'s budget; mean scores on ``test``
    (segmented under ``cfg.precision``), VOI as split + merge."""
    trainer = Trainer([d[0] for d in train], labs, cfg)
    for _ in trainer.run():
        pass
    m = mean_scores([evaluate(segment_with(trainer.model, img, cfg.precision, device)[1], gt) for img, gt in test])
    return trainer, {k: m[k] for k in ("sbd", "ap50", "arand")} | {"voi": m["voi_split"] + m["voi_merge"]}


def quality(args, out: dict) -> None:
    rows = out["quality"] = []
    for ndim in (2, 3):
        train, test = split(ndim, args.quick)
        iterations = args.quality_iterations[ndim - 2]
        for seed in (0, 1):
            labs = sparsify_many([d[1] for d in train], 0.1, seed=seed)
            models = {}
            for precision in PRECISIONS:
                trainer, scores = train_and_score(train, labs, config("auto", precision, args.device, iterations, seed),
                                                  test, args.device)
                models[precision] = trainer.model
                rows.append({"ndim": ndim, "seed": seed, "precision": precision, "iterations": iterations,
                             "train_s": trainer.seconds, **scores})
                args.save(rows[-1])
                del trainer
            # one model, two precisions at prediction: how far apart are embeddings and segmentations
            diffs, arands = [], []
            for img, _ in test:
                f32, s32 = segment_with(models["bfloat16"], img, "float32", args.device)
                f16, s16 = segment_with(models["bfloat16"], img, "bfloat16", args.device)
                diffs.append(float(np.abs(f32.embeddings - f16.embeddings).max()))
                arands.append(evaluate(s16, s32)["arand"])
            rows.append({"ndim": ndim, "seed": seed, "cross": "bfloat16 model, float32 vs bfloat16 prediction",
                         "max_abs_embedding_diff": max(diffs), "arand": float(np.mean(arands))})
            args.save(rows[-1])


def predict_speed(args, out: dict) -> None:
    rows = out["predict_speed"] = []
    for ndim, shape in ((2, args.image_2d), (3, args.stack_3d)):
        tile = synthetic_cells((256, 256) if ndim == 2 else (32, 128, 128), seed=7)[0]
        reps = [int(np.ceil(s / t)) for s, t in zip(shape, tile.shape)]
        image = np.tile(tile, reps)[tuple(slice(0, s) for s in shape)]
        data = dataset(ndim, 1, 0, True)
        trainer = Trainer([data[0][0]], [data[0][1]], config("auto", "float32", args.device, 2))
        for _ in trainer.run():
            pass
        model = trainer.model
        embs = {}
        for precision in PRECISIONS:
            predict_scaled(model, image[(slice(0, 64),) * ndim], device=args.device, precision=precision, zoom=1.0)
            sync(args.device)
            t0 = time.perf_counter()
            p = predict_scaled(model, image, device=args.device, precision=precision, zoom=1.0)
            sync(args.device)
            s = time.perf_counter() - t0
            embs[precision] = p.embeddings
            rows.append({"ndim": ndim, "shape": list(shape), "precision": precision, "seconds": s,
                         "voxels_per_s": float(np.prod(shape)) / s})
            args.save(rows[-1])
        rows.append({"ndim": ndim, "max_abs_embedding_diff": float(np.abs(embs["float32"] - embs["bfloat16"]).max())})
        args.save(rows[-1])
        del trainer, model, embs
        gc.collect()


def batch(args, out: dict) -> None:
    """Step time against batch size, then a fixed time budget at the default batch and 4x it."""
    rows = out["batch"] = []
    for ndim in (2, 3):
        imgs, labs = painted(ndim, args.quick)
        for bs in (1, 2, 4, 8, 16):
            cfg = config("crac", "float32", args.device, args.warmup + args.steps)
            cfg.batch_size = bs
            rows.append({"ndim": ndim, "batch_size": bs, "step_s": step_seconds(Trainer(imgs, labs, cfg), args)})
            args.save(rows[-1])
    for ndim in (2, 3):
        train, test = split(ndim, args.quick)
        for seed in (0, 1):
            labs = sparsify_many([d[1] for d in train], 0.1, seed=seed)
            for factor in (1, 4):
                cfg = TrainConfig(precision="float32", device=args.device, time_limit=args.batch_budget, seed=seed,
                                  checkpoint_every=1e9, batch_size=factor * BATCH_SIZE[ndim])
                trainer, scores = train_and_score(train, labs, cfg, test, args.device)
                rows.append({"ndim": ndim, "seed": seed, "batch_size": cfg.batch_size, "seconds": args.batch_budget,
                             "iterations": trainer.iteration, **scores})
                args.save(rows[-1])
                del trainer


SECTIONS = {"memory": memory, "train_speed": train_speed, "predict_speed": predict_speed, "quality": quality, "batch": batch}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=Path("gpu.json"))
    p.add_argument("--quick", action="store_true", help="small data and few steps (a check of the code path)")
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    args = p.parse_args()
    args.warmup, args.steps = (2, 4) if args.quick else (10, 50)
    args.memory_iterations = 4 if args.quick else 200
    args.quality_iterations = (20, 10) if args.quick else (800, 400)
    args.batch_budget = 5.0 if args.quick else 20.0
    args.image_2d = (512, 512) if args.quick else (4096, 4096)
    args.stack_3d = (32, 128, 128) if args.quick else (96, 512, 512)
    out: dict = {"device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
                 "torch": torch.__version__, "quick": args.quick,
                 "auto_precision": str(resolve_precision("auto", resolve_device(args.device)))}

    def save(row=None):
        if row is not None:
            print(row, flush=True)
        args.out.write_text(json.dumps(out, indent=1))
    args.save = save
    for name in args.only:
        t0 = time.perf_counter()
        try:
            SECTIONS[name](args, out)
        except Exception as err:  # one section failing must not lose the others' figures
            out[name + "_error"] = f"{type(err).__name__}: {err}"
            print(name, "failed:", out[name + "_error"], file=sys.stderr, flush=True)
        out.setdefault("seconds", {})[name] = time.perf_counter() - t0
        save()
        print(f"== {name}: {out['seconds'][name]:.0f} s", flush=True)


if __name__ == "__main__":
    main()
