"""Blockwise segmentation of a synthetic stack on disk: throughput and peak memory.

    python benchmarks/large.py [--size-gib 0.01] [--workers 1 2] [--model MODEL] [--whole] [--clustering mws]
    python benchmarks/large.py --size-gib 1 --workers --train 60     # training only

Writes a synthetic uint8 stack (cells, generated block by block, never whole in memory) as zarr,
runs ``sparseseg segment`` on it in a subprocess per worker count and samples the resident memory
of the whole process tree (CLI, dask scheduler/nanny and worker processes) every 0.2 s with psutil
(RSS summed, PSS summed and the largest process), and every 10 s the disk its work folder holds.
``--whole`` also runs the whole-image path on the same stack written as TIFF (everything in
memory), for comparison. ``--train SECONDS`` trains on the stack with a few objects of its first
block painted (a label zarr of the stack's shape) and reports the same peaks: training reads only
the regions around the painted objects. Without ``--model`` a 3D model of the default architecture is trained for
a few steps (its weights do not matter for speed or memory). Sizes: 0.25, 1, 4 GiB and so on; the
default is small enough for a quick run on a laptop CPU.

Long runs can be stopped and continued: with ``--tmp DIR`` the stack written before is reused and
``sparseseg segment`` resumes at its first unfinished block; each run's seconds and peaks so far
are kept in ``DIR/peaks-<size>-<workers>.json`` (every 10 s, with the current memory and disk once a minute);
a resumed run keeps the earlier parts there and its table row adds them up (seconds summed, peaks the
highest of any part).
``--keep-work`` runs the same segmentation keeping every block's prediction (the whole store), to
compare the work folder's peak with the slab-by-slab default.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

GEN_BLOCK = (32, 256, 256)
#: how many synthetic blocks the stack is made of (flipped at random)
POOL = 2


def stack_shape(size_gib: float) -> tuple[int, int, int]:
    """The (z, y, x) shape, y = x, of a uint8 stack of about ``size_gib`` GiB."""
    voxels = size_gib * 2**30
    yx = int(min(2048, max(128, round((voxels / 64) ** 0.5 / 64) * 64)))
    return max(16, int(round(voxels / yx / yx))), yx, yx


def stack_plan(shape: tuple[int, ...], seed: int = 0) -> list[tuple[tuple[slice, ...], int, tuple[slice, ...]]]:
    """What :func:`make_stack` puts in each block of :data:`GEN_BLOCK` (C order): the block's
    region, which of the :data:`POOL` synthetic blocks fills it and the flips applied to that."""
    rng = np.random.default_rng(seed)
    grid = [range(0, s, b) for s, b in zip(shape, GEN_BLOCK)]
    plan = []
    for corner in ((a, b, c) for a in grid[0] for b in grid[1] for c in grid[2]):
        region = tuple(slice(o, min(o + g, s)) for o, g, s in zip(corner, GEN_BLOCK, shape))
        k = int(rng.integers(POOL))
        plan.append((region, k, tuple(slice(None, None, -1) if rng.random() < 0.5 else slice(None) for _ in range(3))))
    return plan


def stack_pool(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """The synthetic blocks (image, labels) the stack is made of."""
    from napari_sparseseg.core.samples import synthetic_cells

    return [synthetic_cells(GEN_BLOCK, radius=(6.0, 10.0), seed=seed + k) for k in range(POOL)]


def make_stack(path: Path, size_gib: float, seed: int = 0, labels: Path | None = None,
               painted: int = 4) -> tuple[int, ...]:
    """A uint8 stack of about ``size_gib`` GiB (z, y, x with y = x), written block by block: each
    block one of a few synthetic cell blocks, randomly flipped (generating cells is slow). With
    ``labels``, a label zarr of the same shape with ``painted`` objects of the first block."""
    import zarr

    shape = stack_shape(size_gib)
    done = path / "complete.json"  # written last: a stack (and labels) from an earlier run, whole
    if done.exists() and json.loads(done.read_text()) == {"shape": list(shape), "seed": seed,
                                                          "labels": str(labels), "painted": painted}:
        return shape
    arr = zarr.create_array(str(path), shape=shape, chunks=(32, 128, 128), dtype="uint8", overwrite=True)
    pool = stack_pool(seed)
    for i, (region, k, flips) in enumerate(stack_plan(shape, seed)):
        img, gt = pool[k]
        crop = tuple(slice(0, r.stop - r.start) for r in region)
        arr[region] = img[flips][crop]
        if labels is not None and i == 0:
            lab = zarr.create_array(str(labels), shape=shape, chunks=(32, 128, 128), dtype="uint16", overwrite=True,
                                    fill_value=0)
            gt = gt[flips][crop]
            ids = [j for j in np.unique(gt[:, 64:-64, 64:-64]) if j > 0][:painted]  # whole, away from the edges
            lab[region] = np.where(np.isin(gt, ids), gt, 0).astype("uint16")
    done.write_text(json.dumps({"shape": list(shape), "seed": seed, "labels": str(labels), "painted": painted}))
    return shape


def tiny_model(folder: Path, base_channels: int | None = None, depth: int = 4) -> Path:
    """A 3D model (CRAC; the default architecture unless ``base_channels``/``depth`` say otherwise),
    trained for 2 steps on a small synthetic stack."""
    from napari_sparseseg import TrainConfig, Trainer
    from napari_sparseseg.core.samples import synthetic_cells
    from napari_sparseseg.core.sparsify import sparsify

    img, lab = synthetic_cells((32, 96, 96), radius=(6.0, 10.0), seed=0)
    trainer = Trainer([img], [sparsify(lab, 0.5, np.random.default_rng(0))],
                      TrainConfig(iterations=2, diameter=16, base_channels=base_channels, depth=depth), out=folder)
    for _ in trainer.run():
        pass
    return folder


def disk_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 if it does not exist)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def run(cmd: list[str], env: dict, record: Path | None = None, work: Path | None = None) -> tuple[float, dict, str]:
    """(seconds, peaks, output) of ``cmd``; peaks of the process tree in bytes: ``rss`` (resident
    set sizes summed: shared pages such as torch's libraries count once per process), ``pss``
    (proportional set sizes summed: every page counted once, what the tree occupies) and
    ``largest`` (the RSS of its largest process). With ``record``, the seconds and peaks so far are
    written there every 10 s, so a run stopped part way (and resumed later) still has its figures.
    With ``work`` (the run's work folder), ``disk`` is the most it held, measured every 10 s. Once a
    minute the current values are appended to ``series`` (seconds, rss, pss, largest, disk), to see
    whether memory stays flat over a long run. A ``record`` left by an earlier part of the same run
    (stopped, then resumed) is kept under ``parts`` and counted in the returned figures."""
    parts = []
    if record is not None and record.exists():
        old = json.loads(record.read_text())
        parts = [*old.pop("parts", []), old]
    t0 = last = minute = time.perf_counter()
    series: list[list[float]] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    root = psutil.Process(proc.pid)
    peaks = {"rss": 0, "pss": 0, "largest": 0, "disk": 0}
    while proc.poll() is None:
        rss = pss = largest = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    info = p.memory_full_info()
                except psutil.Error:
                    continue
                rss, pss, largest = rss + info.rss, pss + getattr(info, "pss", info.rss), max(largest, info.rss)
        except psutil.Error:
            pass
        for k, v in (("rss", rss), ("pss", pss), ("largest", largest)):
            peaks[k] = max(peaks[k], v)
        if time.perf_counter() - last > 10:
            last = time.perf_counter()
            disk = disk_bytes(work) if work is not None else 0
            peaks["disk"] = max(peaks["disk"], disk)
            if last - minute > 60:
                minute = last
                series.append([round(last - t0, 1), rss, pss, largest, disk])
            if record is not None:
                tmp = record.with_suffix(".tmp")  # replaced whole: a run killed mid-write keeps the last record
                tmp.write_text(json.dumps({"cmd": cmd, "seconds": last - t0, **peaks, "series": series,
                                           "parts": parts}))
                os.replace(tmp, record)
        time.sleep(0.2)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out}")
    seconds = time.perf_counter() - t0 + sum(part["seconds"] for part in parts)
    for part in parts:
        peaks = {k: max(v, part.get(k, 0)) for k, v in peaks.items()}
    if parts:
        print(f"{len(parts) + 1} parts: seconds and peaks over all of them")
    return seconds, peaks, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=0.01, help="stack size in GiB (uint8 voxels)")
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2], help="blockwise runs (none: only --train)")
    p.add_argument("--block-shape", type=int, nargs=3, default=None, help="default: sparseseg's (48 128 128)")
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--base-channels", type=int, default=None, help="of the trained model (default: 8)")
    p.add_argument("--depth", type=int, default=4, help="of the trained model")
    p.add_argument("--clustering", default=None, help="sparseseg segment's --clustering (default: its own, auto)")
    p.add_argument("--whole", action="store_true", help="also run the whole-image path (TIFF input)")
    p.add_argument("--tmp", type=Path, default=None, help="folder for the stack and outputs (default: a temp dir)")
    p.add_argument("--keep-work", action="store_true",
                   help="keep every block's prediction (segment_blockwise(keep_work=True), which predicts the whole "
                        "stack before clustering it): the work folder the slab-by-slab default saves")
    p.add_argument("--train", type=float, default=None, metavar="SECONDS",
                   help="also train for SECONDS on the stack with a few objects painted")
    args = p.parse_args()

    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="sparseseg-large-"))
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stack = tmp / f"stack-{args.size_gib:g}.zarr"
    labels = tmp / f"labels-{args.size_gib:g}.zarr" if args.train else None
    shape = make_stack(stack, args.size_gib, labels=labels)
    n = int(np.prod(shape))
    print(f"stack {shape} = {n / 1e6:.1f} M voxels ({n / 2**30:.3f} GiB uint8), written in {time.perf_counter() - t0:.1f} s")
    model = args.model or tmp / "model"
    if args.workers and not (model / "config.json").exists():  # a model trained here before is reused
        tiny_model(model, args.base_channels, args.depth)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    base = [sys.executable, "-m", "napari_sparseseg.cli", "segment", "--model", str(model), "--device", "cpu",
            "--quiet"]
    rows = []
    for w in args.workers:
        out = tmp / f"seg-{args.size_gib:g}-{w}{'-kept' * args.keep_work}.zarr"
        cmd = base + ["--images", str(stack), "--out", str(out), "--workers", str(w)]
        if args.block_shape:
            cmd += ["--block-shape", *map(str, args.block_shape)]
        if args.clustering:
            cmd += ["--clustering", args.clustering]
        work, name = tmp / f".{out.name}.sparseseg-work", f"blockwise, {w} worker(s)"
        if args.keep_work:  # the same run through the Python API, which can keep the whole store
            work, name = tmp / f"kept-{args.size_gib:g}-{w}", name + ", whole store kept"
            kw = dict(workers=w, keep_work=True, work=str(work), method=args.clustering or "auto",
                      block_shape=args.block_shape)
            cmd = [sys.executable, "-c", "import sys; from napari_sparseseg.core.blockwise import segment_blockwise as s; "
                   f"r = s(sys.argv[1], sys.argv[2], sys.argv[3], **{kw!r}); print(r)", str(model), str(stack), str(out)]
        secs, peak, log = run(cmd, env, tmp / f"peaks-{args.size_gib:g}-{w}{'-kept' * args.keep_work}.json", work)
        if args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        rows.append((name, secs, peak, log.strip().splitlines()[-1]))
    if args.train:
        cmd = [sys.executable, "-m", "napari_sparseseg.cli", "train", "--images", str(stack), "--labels", str(labels),
               "--out", str(tmp / f"trained-{args.size_gib:g}"), "--time-limit", str(args.train), "--device", "cpu",
               "--quiet"]
        secs, peak, out = run(cmd, env)
        rows.append((f"training {args.train:g} s", secs, peak, " / ".join(out.strip().splitlines())))
    if args.whole:
        import tifffile
        import zarr

        tifffile.imwrite(tmp / "stack.tif", zarr.open_array(str(stack))[:])
        secs, peak, out = run(base + ["--images", str(tmp / "stack.tif"), "--out", str(tmp / "whole")], env)
        rows.append(("whole image (in memory)", secs, peak, out.strip().splitlines()[-1]))
    print("\n| run | seconds | voxels/s | peak RSS (GiB) | peak PSS (GiB) | largest process (GiB) "
          "| work folder (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for name, secs, peak, _ in rows:
        print(f"| {name} | {secs:.1f} | {n / secs:.3g} | {peak['rss'] / 2**30:.2f} | {peak['pss'] / 2**30:.2f} "
              f"| {peak['largest'] / 2**30:.2f} | {peak['disk'] / 2**30:.2f} |")
    for name, *_, last in rows:
        print(f"{name}: {last}")


if __name__ == "__main__":
    main()
