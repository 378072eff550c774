"""CVPPP A1 benchmark: SPOCO@p (CRAC with ``--train-args --method crac``) on the fixed 103/25
split, trained with `sparseseg train` and scored with `sparseseg evaluate`, exactly as a user would
run them.

    python benchmarks/cvppp.py --fraction 0.1 --time-limit 1200 --work /tmp/cvppp

The data stays in ../shared/data/cvppp_a1 (never copied into the project); the script links the
split's files into --work. Prints a table of SBD, |DiC|, AP50, iterations/s and clustering time.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from napari_sparseseg.cli import main as sparseseg
from napari_sparseseg.core import checkpoint, io
from napari_sparseseg.core.metrics import evaluate, mean_scores
from napari_sparseseg.core.segment import cluster, embed, needs_g

#: SPARSESEG_DATA overrides the shared data folder, as for benchmarks/suite.py
DATA = Path(os.environ.get("SPARSESEG_DATA") or Path(__file__).resolve().parents[1] / ".." / "shared" / "data") / "cvppp_a1"


def link_split(data: Path, work: Path, names: list[str], sub: str) -> None:
    for kind, suffix in (("images", "_rgb.png"), ("labels", "_label.png")):
        d = work / sub / kind
        d.mkdir(parents=True, exist_ok=True)
        for n in names:
            dst = d / f"{n}{suffix}"
            if not dst.exists():
                os.symlink((data / kind / f"{n}{suffix}").resolve(), dst)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--work", type=Path, default=Path("/tmp/sparseseg-cvppp"))
    p.add_argument("--fraction", type=float, default=0.1, help="SPOCO@p; 1.0 with --full for full supervision")
    p.add_argument("--full", action="store_true", help="full supervision: dense labels with background id 0")
    p.add_argument("--time-limit", type=float, default=1200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clustering", nargs="+", default=["auto"], help="auto (the default of sparseseg segment), mws, multicut, ...")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[])
    args = p.parse_args()
    split = json.loads((args.data / "split.json").read_text())
    tag = "full" if args.full else f"p{args.fraction}"
    work = args.work / tag
    link_split(args.data, args.work, split["train"], "train")
    link_split(args.data, args.work, split["val"], "val")
    model = work / "model"
    if not args.skip_train:
        if args.full:
            labels = str(args.work / "train" / "labels" / "*.png")
            extra = ["--background-id", "0"]
        else:
            sparseseg(["sparsify", "--labels", str(args.work / "train" / "labels" / "*.png"),
                       "--fraction", str(args.fraction), "--seed", str(args.seed), "--out", str(work / "sparse")])
            labels, extra = str(work / "sparse" / "*.tif"), []
        sparseseg(["train", "--images", str(args.work / "train" / "images" / "*.png"), "--labels", labels,
                   "--out", str(model), "--time-limit", str(args.time_limit), "--seed", str(args.seed),
                   "--quiet", *extra, *args.train_args])
    m = checkpoint.load(model)
    its = m.config["training"]["iteration"] / max(m.config["training"]["seconds"], 1e-9)
    val_imgs = io.expand(str(args.work / "val" / "images" / "*.png"))
    val_gts = io.expand(str(args.work / "val" / "labels" / "*.png"))
    rows = []
    t_pred, embs = 0.0, []
    need_g = any(needs_g(method, m.config) for method in args.clustering)
    for ip in val_imgs:
        t0 = time.perf_counter()
        embs.append(embed(m, io.read(ip), need_g))  # f (and g, the EMA network, when a method needs it)
        t_pred += time.perf_counter() - t0
    for method in args.clustering:
        scores, t_clu = [], 0.0
        for embedded, gp in zip(embs, val_gts):
            t0 = time.perf_counter()
            seg = cluster(m, embedded, method)
            t_clu += time.perf_counter() - t0
            scores.append(evaluate(seg, io.read_labels(gp)))
        mean = mean_scores(scores)
        sd = float(np.std([s["sbd"] for s in scores]))
        rows.append((method, mean, sd, t_clu / len(val_imgs)))
    print(f"\nCVPPP A1 val (25 images), {m.config.get('method', 'spoco').upper()}@{'full' if args.full else args.fraction}, "
          f"seed {args.seed}: "
          f"{m.config['training']['iteration']} iterations in {m.config['training']['seconds']:.0f} s "
          f"({its:.2f} it/s), prediction {t_pred / len(val_imgs):.2f} s/image")
    print(f"{'clustering':<12}{'SBD':>8}{'(sd)':>8}{'|DiC|':>8}{'AP50':>8}{'mAP':>8}{'AJI':>8}{'s/image':>9}")
    for method, mean, sd, t in rows:
        print(f"{method:<12}{mean['sbd']:8.3f}{sd:8.3f}{mean['abs_dic']:8.2f}{mean['ap50']:8.3f}"
              f"{mean['map']:8.3f}{mean['aji']:8.3f}{t:9.2f}")


if __name__ == "__main__":
    main()
