"""Does 'where to label next' pick better objects than chance? A simulated annotator on suite datasets.

    python benchmarks/suggest.py                       # nuclei2d, vnc_mito, vnc_cells; seeds 0 1
    python benchmarks/suggest.py --datasets nuclei2d --seeds 0 1 2 --base 300 --more 180

Per dataset and seed, with the suite's data and protocol (benchmarks/suite.py):
1. ``sparseseg sparsify --fraction 0.1 --seed S`` on the training part, ``sparseseg train`` for
   ``--base`` seconds: the base model, scored on the test part.
2. Two annotators each paint ``--add`` more complete objects on the training images:
   *suggested*: walking down ``core.suggest``'s list of each training image (every image's first
   suggestion, the most uncertain first, then every image's second, ...), the annotator paints the
   true object under each suggested segment (the one it overlaps most) that is not painted yet;
   *random*: ``--add`` objects drawn at random from the unpainted true objects.
3. Each continues the base model (``train --resume``) for ``--more`` seconds on its labels and is
   scored on the test part. The gain of an arm is its score minus the base score.

Prints the gains (mean and sd over seeds) and writes every number to ``<work>/suggest.json``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import add_run_options, run_all, sparseseg, score_test_part  # noqa: E402
from suite_data import DATASETS, LOWER_IS_BETTER, prepare  # noqa: E402

from napari_sparseseg.core import io  # noqa: E402
from napari_sparseseg.core.checkpoint import load  # noqa: E402
from napari_sparseseg.core.suggest import suggest_for_image  # noqa: E402


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def suggested_objects(model_dir: Path, images, sparse, gts, k: int) -> list[tuple[int, int]]:
    """(image index, true object id) of the first ``k`` unpainted true objects under the suggested segments."""
    model = load(model_dir)
    ranked = []
    for i, (img, lab) in enumerate(zip(images, sparse)):
        _, seg, sug = suggest_for_image(model, img, lab, n=4 * k, device="cpu")
        ranked += [(rank, -s.score, i, s) for rank, s in enumerate(sug)]
    ranked.sort(key=lambda r: r[:2])  # every image's first suggestion, then every image's second, ...
    chosen: list[tuple[int, int]] = []
    for _, _, i, s in ranked:
        under = gts[i][s.box][s.mask & (sparse[i][s.box] == 0)]
        ids, counts = np.unique(under[under > 0], return_counts=True)
        if ids.size == 0:
            continue  # a segment on background: the annotator has nothing to paint there
        obj = int(ids[np.argmax(counts)])
        if (i, obj) not in chosen and not np.any(sparse[i][gts[i] == obj]):
            chosen.append((i, obj))
        if len(chosen) == k:
            break
    return chosen


def random_objects(sparse, gts, k: int, seed: int) -> list[tuple[int, int]]:
    pool = [(i, int(o)) for i, (lab, gt) in enumerate(zip(sparse, gts))
            for o in np.unique(gt[(gt > 0) & (lab == 0)]) if not np.any(lab[gt == o])]
    rng = np.random.default_rng(1000 + seed)
    return [pool[j] for j in rng.choice(len(pool), size=min(k, len(pool)), replace=False)]


def paint(sparse, gts, objects, folder: Path, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    out = [s.copy() for s in sparse]
    for i, obj in objects:
        out[i][gts[i] == obj] = out[i].max() + 1
    for lab, name in zip(out, names):
        tifffile.imwrite(folder / f"{Path(name).stem}.tif", lab.astype(np.uint32))


def run_job(name: str, seed: int, args) -> dict:
    root = prepare(name, args.work / "data")
    out = args.work / "runs" / f"{name}-s{seed}"
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    sparseseg(["sparsify", "--labels", str(root / "train_gt"), "--fraction", "0.1", "--seed", str(seed),
               "--out", str(out / "sparse")], 1, log)
    base = out / "base"
    if not (base / "config.json").exists():
        sparseseg(["train", "--images", str(root / "train_images"), "--labels", str(out / "sparse"), "--out", str(base),
                   "--time-limit", str(args.base), "--seed", str(seed), "--quiet"], args.threads, log)
    result = {"dataset": name, "seed": seed, "base": score_test_part(base, root, out / "seg-base", args.threads, log)}
    names = [p.name for p in _files(root / "train_images")]
    images = [io.read(root / "train_images" / n) for n in names]
    gts = [io.read_labels(root / "train_gt" / n) for n in names]
    sparse = [io.read_labels(out / "sparse" / f"{Path(n).stem}.tif") for n in names]
    arms = {"suggested": suggested_objects(base, images, sparse, gts, args.add),
            "random": random_objects(sparse, gts, args.add, seed)}
    for arm, objects in arms.items():
        paint(sparse, gts, objects, out / f"sparse-{arm}", names)
        model = out / f"model-{arm}"
        if not (model / "config.json").exists():
            shutil.copytree(base, model, dirs_exist_ok=True)
            sparseseg(["train", "--images", str(root / "train_images"), "--labels", str(out / f"sparse-{arm}"),
                       "--out", str(model), "--resume", "--time-limit", str(args.more), "--seed", str(seed), "--quiet"],
                      args.threads, log)
        result[arm] = score_test_part(model, root, out / f"seg-{arm}", args.threads, log)
        result[f"{arm}_objects"] = len(objects)
    print(f"{name} seed {seed}: " + ", ".join(f"{k} {result[k][DATASETS[name].primary]:.3f}"
                                               for k in ("base", "suggested", "random")), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["nuclei2d", "vnc_mito", "vnc_cells"], choices=list(DATASETS))
    p.add_argument("--base", type=float, default=180.0, help="training seconds of the base model")
    p.add_argument("--more", type=float, default=120.0, help="seconds each arm continues training")
    p.add_argument("--add", type=int, default=5, help="objects each annotator paints")
    add_run_options(p, "/tmp/sparseseg-suggest")
    args = p.parse_args()
    jobs = [(d, s) for d in args.datasets for s in args.seeds]
    results = run_all(run_job, jobs, args, "suggest.json")
    print(f"\ngain over the base model after painting {args.add} more objects and {args.more:.0f} s more training "
          "(mean (sd) over seeds; for VOI a negative gain is better)")
    print(f"{'dataset':<10}{'metric':<7}{'base':>14}{'suggested':>16}{'random':>16}{'suggested better':>18}")
    for name in args.datasets:
        rs = [r for r in results if r["dataset"] == name]
        key = DATASETS[name].primary
        base = [r["base"][key] for r in rs]
        gains = {arm: [r[arm][key] - r["base"][key] for r in rs] for arm in ("suggested", "random")}
        sign = -1 if key in LOWER_IS_BETTER else 1
        better = sum(sign * (a - b) > 0 for a, b in zip(gains["suggested"], gains["random"]))
        print(f"{name:<10}{key:<7}{np.mean(base):>8.3f} ({np.std(base):.2f})"
              + "".join(f"{np.mean(g):>+10.3f} ({np.std(g):.2f})" for g in gains.values())
              + f"{better:>12}/{len(rs)}")


if __name__ == "__main__":
    main()
