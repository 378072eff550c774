"""The benchmark suite: every dataset of ../shared/data under one protocol, against a classical floor.

    python benchmarks/suite.py                 # full suite, 2 seeds (about an hour on 2 cores)
    python benchmarks/suite.py --quick         # a few minutes: short budgets, 1 seed, fewer test images
    python benchmarks/suite.py --datasets cvppp nuclei2d --seeds 0 1 2 --budget-scale 2
    python benchmarks/suite.py --tag b --iterations-from <work>/runs/a/suite.json   # A/B at equal steps
    python benchmarks/suite.py --datasets nuclei_mix gala --time-limit 1200   # the held-out protocol's budget

Protocol, per dataset and seed, exactly as a user runs the command line:
``sparseseg sparsify --fraction 0.1 --seed S`` on the training part's dense labels (SPOCO@0.1),
``sparseseg train`` with default options and ``--time-limit`` = the dataset's budget (one CPU
thread per job, ``--jobs`` jobs side by side), ``sparseseg segment`` with default options on the
test part, scored with ``napari_sparseseg.core.metrics``. The classical floor (benchmarks/suite_data.py)
is computed by this script on the same test part, its scales read from the same sparse labels.

Prints one table (mean and spread over seeds) and writes every number to ``<work>/suite.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite_data import DATASETS, LOWER_IS_BETTER, SHARED, classical, prepare, test_files  # noqa: E402

from napari_sparseseg.core import io  # noqa: E402
from napari_sparseseg.core.metrics import evaluate  # noqa: E402

COLUMNS = ("sbd", "ap50", "f1", "aji", "voi", "arand", "abs_dic")


def sparseseg(args: list[str], threads: int, log: Path) -> float:
    """Run one ``sparseseg`` command in a child process with ``threads`` CPU threads; seconds taken."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ sparseseg " + " ".join(args) + "\n")
        f.flush()
        rc = subprocess.call([sys.executable, "-m", "napari_sparseseg", *args], stdout=f, stderr=subprocess.STDOUT,
                             env=env)
    if rc != 0:
        raise RuntimeError(f"sparseseg {args[0]} failed (exit {rc}); see {log}")
    return time.perf_counter() - t0


def score(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    s = evaluate(pred, gt)
    s["voi"] = s["voi_split"] + s["voi_merge"]
    s["n_pred"], s["n_gt"] = float(len(np.unique(pred[pred > 0]))), float(len(np.unique(gt[gt > 0])))
    return s


def mean_of(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def score_test_part(model: Path, root: Path, out: Path, threads: int, log: Path) -> dict[str, float]:
    """``sparseseg segment`` of ``root/test_images`` with ``model`` into ``out``; the mean scores
    against ``root/test_gt`` (the layout of :func:`suite_data.prepare`)."""
    sparseseg(["segment", "--model", str(model), "--images", str(root / "test_images"), "--out", str(out)], threads, log)
    names = sorted(p.name for p in (root / "test_images").iterdir() if not p.name.startswith("."))
    return mean_of([score(io.read_labels(out / f"{Path(n).stem}.tif"), io.read_labels(root / "test_gt" / n))
                    for n in names])


def add_run_options(p: argparse.ArgumentParser, work: str) -> None:
    """The options every benchmark script shares: seeds, jobs side by side, threads, work folder."""
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--jobs", type=int, default=2, help="runs side by side")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    p.add_argument("--work", type=Path, default=Path(work))


def run_all(run_job, jobs: list[tuple], args, json_name: str) -> list[dict]:
    """``run_job(*job, args)`` for every job, ``args.jobs`` side by side, once the benchmark data is
    found; the results in job order, also written to ``<args.work>/<json_name>``."""
    if not SHARED.exists():
        sys.exit(f"the benchmark data is not there: {SHARED} (set SPARSESEG_DATA)")
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda j: run_job(*j, args), jobs))
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / json_name).write_text(json.dumps(results, indent=1))
    return results


def voxel_args(ds, args) -> list[str]:
    """``--voxel-size`` for a stack whose voxel size is known, as a user passes it (or the file
    states it); segmentation then takes the model's. ``--ignore-voxel-size``: none (z not zoomed)."""
    if ds.voxel is None or getattr(args, "ignore_voxel_size", False):
        return []
    return ["--voxel-size", *(str(v) for v in ds.voxel)]


def run_job(name: str, seed: int, args, root: Path) -> dict:
    """Sparsify, train, segment and score one (dataset, seed); the floor on the same split."""
    ds = DATASETS[name]
    out = args.work / "runs" / args.tag / f"{name}-s{seed}"
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    names = test_files(root, args.quick)
    test_dir = out / "test_images"
    test_dir.mkdir(exist_ok=True)
    for n in names:
        if not (test_dir / n).exists():
            os.symlink((root / "test_images" / n).resolve(), test_dir / n)
    budget = args.time_limit or ds.budget * args.budget_scale
    # an A/B comparison on a host whose speed drifts: the reference run's step count, time unbounded
    steps = args.reference_steps.get((name, seed))
    limit = ["--time-limit", str(budget)] if steps is None else ["--iterations", str(steps), "--time-limit", str(4 * budget)]
    sparseseg(["sparsify", "--labels", str(root / "train_gt"), "--fraction", str(args.fraction), "--seed", str(seed),
               "--out", str(out / "sparse")], 1, log)
    model = out / "model"
    t_train = 0.0
    if not (model / "config.json").exists():
        t_train = sparseseg(["train", "--images", str(root / "train_images"), "--labels", str(out / "sparse"),
                             "--out", str(model), *limit, "--seed", str(seed), "--quiet",
                             *voxel_args(ds, args), *args.train_args], args.threads, log)
    t_seg = sparseseg(["segment", "--model", str(model), "--images", str(test_dir), "--out", str(out / "seg"),
                       *args.segment_args], args.threads, log)
    cfg = json.loads((model / "config.json").read_text())
    gts = [io.read_labels(root / "test_gt" / n) for n in names]
    preds = [io.read_labels(out / "seg" / f"{Path(n).stem}.tif") for n in names]
    method = mean_of([score(p, g) for p, g in zip(preds, gts)])
    train_imgs = [io.read(p) for p in sorted((root / "train_images").iterdir())]
    sparse = [io.read_labels(p) for p in sorted((out / "sparse").iterdir())]
    floor_seg = classical(ds, train_imgs, sparse, [io.read(root / "test_images" / n) for n in names])
    floor = mean_of([score(p, g) for p, g in zip(floor_seg, gts)])
    return {
        "dataset": name, "seed": seed, "budget": budget, "method": method, "floor": floor,
        "iterations": cfg["training"]["iteration"], "train_seconds": t_train,
        "segment_seconds_per_image": t_seg / len(names), "n_test": len(names),
    }


def summarise(results: list[dict]) -> dict:
    """Per dataset: mean and sd over seeds of every metric, for the method and the floor."""
    table = {}
    for name in DATASETS:
        rs = [r for r in results if r["dataset"] == name]
        if not rs:
            continue
        entry = {"primary": DATASETS[name].primary, "seeds": [r["seed"] for r in rs],
                 "iterations": float(np.mean([r["iterations"] for r in rs])),
                 "segment_s": float(np.mean([r["segment_seconds_per_image"] for r in rs]))}
        for who in ("method", "floor"):
            entry[who] = {k: (float(np.mean([r[who][k] for r in rs])), float(np.std([r[who][k] for r in rs])))
                          for k in rs[0][who]}
        table[name] = entry
    return table


def beats(entry: dict) -> bool:
    key = entry["primary"]
    m, f = entry["method"][key][0], entry["floor"][key][0]
    return m < f if key in LOWER_IS_BETTER else m > f


def print_table(table: dict, tag: str) -> None:
    print(f"\nbenchmark suite ({tag}): mean (sd) over seeds; floor = classical baseline on the same test part")
    head = f"{'dataset':<10}{'metric':<7}{'floor':>15}{'sparseseg':>15}{'beats':>6}" + "".join(
        f"{c:>8}" for c in COLUMNS) + f"{'#pred/#gt':>12}{'its':>7}{'seg s':>7}"
    print(head)
    for name, e in table.items():
        key = e["primary"]
        f, m = e["floor"][key], e["method"][key]
        row = (f"{name:<10}{key:<7}{f[0]:>9.3f} ({f[1]:.2f}){m[0]:>9.3f} ({m[1]:.2f}){'yes' if beats(e) else 'NO':>6}"
               + "".join(f"{e['method'][c][0]:8.3f}" for c in COLUMNS)
               + f"{e['method']['n_pred'][0]:>6.0f}/{e['method']['n_gt'][0]:<5.0f}{e['iterations']:7.0f}{e['segment_s']:7.2f}")
        print(row)
        print(f"{'':<10}{'floor':<7}{'':>36}" + "".join(f"{e['floor'][c][0]:8.3f}" for c in COLUMNS)
              + f"{e['floor']['n_pred'][0]:>6.0f}/{e['floor']['n_gt'][0]:<5.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=[n for n, d in DATASETS.items() if not d.extra],
                   choices=list(DATASETS), help="default: all but the extra ones (cvppp_mix)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 (0 with --quick)")
    p.add_argument("--quick", action="store_true", help="budgets x 0.1, one seed, at most 6 test images")
    p.add_argument("--budget-scale", type=float, default=None, help="multiply every training budget")
    p.add_argument("--time-limit", type=float, default=None,
                   help="one training budget (s) for every dataset instead of the suite's own, e.g. 1200 as in "
                        "the held-out protocol of issue 6")
    p.add_argument("--fraction", type=float, default=0.1, help="SPOCO@p: fraction of objects labeled")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run")
    p.add_argument("--work", type=Path, default=Path("/tmp/sparseseg-suite"))
    p.add_argument("--tag", default=None, help="name of this run (default: quick or full)")
    p.add_argument("--train-args", default="", help="extra options for sparseseg train, one string (ablations)")
    p.add_argument("--segment-args", default="", help="extra options for sparseseg segment, one string")
    p.add_argument("--iterations-from", type=Path, default=None, metavar="SUITE_JSON",
                   help="train each (dataset, seed) for the iterations that run took instead of the time budget: "
                        "an A/B comparison that the host's speed does not confound")
    p.add_argument("--ignore-voxel-size", action="store_true",
                   help="train 3D stacks without their voxel size (z not zoomed; the protocol before it was used)")
    args = p.parse_args()
    if not SHARED.exists():
        sys.exit(f"benchmark data not found at {SHARED}")
    args.seeds = args.seeds or ([0] if args.quick else [0, 1])
    args.budget_scale = args.budget_scale or (0.1 if args.quick else 1.0)
    args.tag = args.tag or ("quick" if args.quick else "full")
    args.train_args, args.segment_args = shlex.split(args.train_args), shlex.split(args.segment_args)
    ref = json.loads(args.iterations_from.read_text())["results"] if args.iterations_from else []
    args.reference_steps = {(r["dataset"], r["seed"]): r["iterations"] for r in ref}
    roots = {name: prepare(name, args.work) for name in args.datasets}
    # longest budgets first so that the two queues end together
    jobs = sorted(((n, s) for n in args.datasets for s in args.seeds), key=lambda j: -DATASETS[j[0]].budget)
    t0 = time.perf_counter()
    results = []
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_job, n, s, args, roots[n]): (n, s) for n, s in jobs}
        for fut, (n, s) in futures.items():
            try:
                results.append(fut.result())
                r = results[-1]
                key = DATASETS[n].primary
                print(f"  {n} seed {s}: {key} {r['method'][key]:.3f} (floor {r['floor'][key]:.3f}), "
                      f"{r['iterations']} iterations", flush=True)
            except Exception as err:  # one failing dataset must not hide the others
                print(f"  {n} seed {s}: FAILED: {err}", flush=True)
    table = summarise(results)
    out = args.work / "runs" / args.tag / "suite.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
                               "table": table, "minutes": (time.perf_counter() - t0) / 60}, indent=1))
    print_table(table, args.tag)
    print(f"{(time.perf_counter() - t0) / 60:.1f} min; every number in {out}")


if __name__ == "__main__":
    main()
