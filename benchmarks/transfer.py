"""Does fine-tuning a model from another dataset pay off? Fine-tuned vs trained from scratch.

    python benchmarks/transfer.py                            # two 2D pairs, 1/5/10 %, seeds 0 1
    python benchmarks/transfer.py --pairs ovule:gala --source-budget 480 --budget 240   # 3D
    python benchmarks/transfer.py --finetune-args="--lr 0.001" --work <other>   # another fine-tuning rule

Per pair SOURCE:TARGET and seed, exactly as a user runs the command line:
1. *source*: ``sparseseg train`` on every object of the source's training part (``sparsify
   --fraction 1``) for ``--source-budget`` seconds; scored on the target's test part as is
   (source only).
2. for each target fraction p (SPOCO@p, ``sparsify --fraction p --seed S``; at least one object per
   image): *scratch* trains on those labels for ``--budget`` seconds; *fine-tuned* trains the same
   labels, same budget, ``--from`` the source model (the default fine-tuning rule: the source is
   kept only if it already finds the painted objects, core/transfer.py; ``--finetune-args
   "--finetune always"`` always keeps it). Both are scored on the target's test part.

Datasets are the suite's (benchmarks/suite_data.py) plus ``gala2d``: the FIB-SEM gala volumes as 2D
slices (every 5th slice; train / test volumes), so a 2D EM model can transfer to it.
Prints one table (mean and sd over seeds) and writes ``<work>/transfer.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import add_run_options, run_all, sparseseg, score_test_part  # noqa: E402
from suite_data import DATASETS, LOWER_IS_BETTER, SHARED, prepare  # noqa: E402

from napari_sparseseg.core import io  # noqa: E402

PRIMARY = {**{k: d.primary for k, d in DATASETS.items()}, "gala2d": "voi"}


def prepare_any(name: str, work: Path) -> Path:
    if name != "gala2d":
        return prepare(name, work)
    root = work / name
    if not (root / ".ready").exists():
        for part in ("train", "test"):
            raw = tifffile.imread(SHARED / "fibsem_gala" / f"{part}_raw.tif")
            gt = tifffile.imread(SHARED / "fibsem_gala" / f"{part}_gt.tif")
            for z in range(0, raw.shape[0], 5):
                for sub, arr in (("images", raw[z]), ("gt", gt[z].astype(np.uint32))):
                    (root / f"{part}_{sub}").mkdir(parents=True, exist_ok=True)
                    tifffile.imwrite(root / f"{part}_{sub}" / f"z{z:02d}.tif", arr)
        (root / ".ready").touch()
    return root


def _labeled(folder: Path) -> int:
    return int(sum(len(np.unique(io.read_labels(p))) - 1 for p in sorted(folder.iterdir())))


def run_job(pair: str, seed: int, args) -> dict:
    source, target = pair.split(":")
    src, tgt = prepare_any(source, args.work / "data"), prepare_any(target, args.work / "data")
    out = args.work / "runs" / f"{source}-to-{target}-s{seed}"
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    model_src = out / "source"
    if not (model_src / "config.json").exists():
        sparseseg(["sparsify", "--labels", str(src / "train_gt"), "--fraction", "1", "--seed", str(seed),
                   "--out", str(out / "source-labels")], 1, log)
        sparseseg(["train", "--images", str(src / "train_images"), "--labels", str(out / "source-labels"),
                   "--out", str(model_src), "--time-limit", str(args.source_budget), "--seed", str(seed), "--quiet"],
                  args.threads, log)
    result = {"pair": pair, "seed": seed, "source_only": score_test_part(model_src, tgt, out / "seg-source", args.threads, log)}
    for p in args.fractions:
        labels = out / f"labels-{p}"
        sparseseg(["sparsify", "--labels", str(tgt / "train_gt"), "--fraction", str(p), "--seed", str(seed),
                   "--out", str(labels)], 1, log)
        row = {"objects": _labeled(labels)}
        for arm, extra in (("scratch", []), ("finetuned", ["--from", str(model_src), *args.finetune_args])):
            model = out / f"{arm}-{p}"
            if not (model / "config.json").exists():
                sparseseg(["train", "--images", str(tgt / "train_images"), "--labels", str(labels), "--out", str(model),
                           "--time-limit", str(args.budget), "--seed", str(seed), "--quiet", *extra], args.threads, log)
            row[arm] = score_test_part(model, tgt, out / f"seg-{arm}-{p}", args.threads, log)
        # what `--from` decided (transfer.keep_parent): the source's recovery of the painted objects
        row["decision"] = json.loads((out / f"finetuned-{p}" / "config.json").read_text()).get("fine_tune")
        result[str(p)] = row
        key = PRIMARY[target]
        said = "" if not row["decision"] else (
            f" (source recovers the painted objects at IoU {row['decision']['recovery']:.2f}: "
            f"{'fine-tuned' if row['decision']['kept'] else 'set aside, trained fresh'})")
        print(f"{pair} seed {seed} @{p}: scratch {row['scratch'][key]:.3f}, fine-tuned {row['finetuned'][key]:.3f}{said}",
              flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="+", default=["vnc_cells:gala2d", "vnc_mito:nuclei2d"])
    p.add_argument("--fractions", nargs="+", type=float, default=[0.01, 0.05, 0.1])
    p.add_argument("--source-budget", type=float, default=240.0, help="seconds to train the source model")
    p.add_argument("--budget", type=float, default=90.0, help="seconds per target run, scratch and fine-tuned alike")
    p.add_argument("--finetune-args", type=shlex.split, default=[],
                   help='more `sparseseg train` options for the fine-tuned arm, e.g. "--lr 0.001"')
    add_run_options(p, "/tmp/sparseseg-transfer")
    args = p.parse_args()
    for pair in args.pairs:
        if pair.count(":") != 1 or any(n not in PRIMARY for n in pair.split(":")):
            p.error(f"--pairs {pair!r}: expected SOURCE:TARGET from {', '.join(PRIMARY)}")
    jobs = [(pair, s) for pair in args.pairs for s in args.seeds]
    results = run_all(run_job, jobs, args, "transfer.json")
    print(f"\ntransfer: target metric, mean (sd) over seeds; {args.budget:.0f} s per target run, "
          f"source trained {args.source_budget:.0f} s on all its objects")
    print(f"{'pair':<22}{'metric':<7}{'labels':>7}{'objects':>9}{'source only':>15}{'scratch':>15}{'fine-tuned':>15}")
    for pair in args.pairs:
        rs = [r for r in results if r["pair"] == pair]
        key = PRIMARY[pair.split(":")[1]]
        lower = key in LOWER_IS_BETTER
        so = [r["source_only"][key] for r in rs]
        for f in args.fractions:
            sc = [r[str(f)]["scratch"][key] for r in rs]
            ft = [r[str(f)]["finetuned"][key] for r in rs]
            better = sum((b < a) if lower else (b > a) for a, b in zip(sc, ft))
            print(f"{pair:<22}{key:<7}{f:>7.2f}{np.mean([r[str(f)]['objects'] for r in rs]):>9.0f}"
                  f"{np.mean(so):>9.3f} ({np.std(so):.2f}){np.mean(sc):>9.3f} ({np.std(sc):.2f})"
                  f"{np.mean(ft):>9.3f} ({np.std(ft):.2f})   fine-tuned better in {better}/{len(rs)}")


if __name__ == "__main__":
    main()
