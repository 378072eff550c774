"""Clustering speed on the 16-d embeddings of one 530x500 CVPPP image, and segment throughput.

    python benchmarks/clustering_speed.py --model /tmp/sparseseg-cvppp/p0.1/model [--repeat 5]

Prints a table: mutex watershed (affinities + MWS), HDBSCAN and mean-shift on the same embeddings
(paper, CVPPP val per image: 0.45 s / 82 s / 201 s), plus prediction and prediction + MWS per image.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from napari_sparseseg.core import checkpoint, io
from napari_sparseseg.core.clustering import segment_embeddings
from napari_sparseseg.core.metrics import evaluate
from napari_sparseseg.core.segment import cluster, embed, resize_labels, resolve

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cvppp_a1"


def timed(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--image", default="plant002")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--slow", action="store_true", help="also time HDBSCAN and mean-shift (minutes)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    m = checkpoint.load(args.model)
    img = io.read(args.data / "images" / f"{args.image}_rgb.png")
    gt = io.read_labels(args.data / "labels" / f"{args.image}_label.png")
    # the clustering methods side by side: every pixel, the same post-processing, no foreground mask
    t_pred, embedded = timed(lambda: embed(m, img, device=args.device), args.repeat)
    emb = embedded.f.embeddings  # at the model's scale; scored after resizing to the image
    _, opts = resolve(m.config, "mws", embedded.f.zoom, background="largest")
    opts = {**opts, "agreement": None, "affinities": embedded.f.affinities}
    shape = embedded.f.shape
    rows = [("prediction (f)", t_pred, None)]
    t_mws, seg = timed(lambda: segment_embeddings(emb, "mws", **opts), args.repeat)
    rows.append(("mutex watershed", t_mws, evaluate(resize_labels(seg, shape), gt)["sbd"]))
    if args.slow:
        for method in ("hdbscan", "meanshift"):
            t, seg = timed(lambda: segment_embeddings(emb, method, **opts), 1)
            rows.append((method, t, evaluate(resize_labels(seg, shape), gt)["sbd"]))
    # what `sparseseg segment` runs: the model's defaults (foreground head, when it has one)
    t_def, seg = timed(lambda: cluster(m, embedded, "mws"), args.repeat)
    rows.append(("MWS, model defaults", t_def, evaluate(seg, gt)["sbd"]))
    rows.append(("prediction + MWS", t_pred + t_def, None))
    print(f"\n{args.image}: image {img.shape}, embeddings {emb.shape}, {torch.get_num_threads()} CPU threads, "
          f"device {args.device}")
    print(f"{'step':<20}{'s/image':>10}{'SBD':>8}")
    for name, t, sbd in rows:
        print(f"{name:<20}{t:10.3f}{'' if sbd is None else f'{sbd:8.3f}':>8}")


if __name__ == "__main__":
    main()
