"""Can the annotation alone tell dense tissue from objects on a background? A diagnostic.

For each suite dataset and sparse-label draw (SPOCO@0.1, ``sparsify`` seeds 0-3): how well one
intensity projection (LDA over the channels; the image smoothed by 0.1 object diameters)
separates the labeled objects' interiors from a ring just outside them (0.075-0.4 diameters
away), as a ROC AUC in [0.5, 1]. Objects on a background should give a high AUC (the ring is
background), dense tissue a low one (the ring is the neighbouring cells' interior).

    python benchmarks/dense_statistic.py [--datasets ...] [--work /tmp/sparseseg-suite]

Findings: docs/benchmarks.md (section 1, the dense-tissue decision).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite_data import DATASETS, lda_direction, prepare  # noqa: E402

from napari_sparseseg.core import io  # noqa: E402
from napari_sparseseg.core.scale import object_diameters  # noqa: E402
from napari_sparseseg.core.sparsify import sparsify  # noqa: E402


def ring_auc(images, labels, ndim: int, inner: float = 0.15, outer: float = 0.4, smooth: float = 0.1) -> float:
    d = float(np.median(np.concatenate([object_diameters(lab) for lab in labels if lab.max()])))
    ins, outs = [], []
    for im, lab in zip(images, labels):
        im = np.asarray(im, np.float32)
        im = im[..., None] if im.ndim == ndim else im
        im = np.stack([ndimage.gaussian_filter(im[..., c], smooth * d) for c in range(im.shape[-1])], -1)
        fg = lab > 0
        out_dist, in_dist = ndimage.distance_transform_edt(~fg), ndimage.distance_transform_edt(fg)
        ins.append(im[in_dist > inner * d / 2])
        outs.append(im[(out_dist > inner * d / 2) & (out_dist <= outer * d)])
    a, b = np.concatenate(ins), np.concatenate(outs)
    w = lda_direction(a, b) if a.shape[1] > 1 else np.ones(1)
    rng = np.random.default_rng(0)
    pa, pb = rng.permutation(a @ w)[:20000], rng.permutation(b @ w)[:20000]
    auc = roc_auc_score(np.r_[np.ones(len(pa)), np.zeros(len(pb))], np.r_[pa, pb])
    return max(auc, 1 - auc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=[n for n, d in DATASETS.items() if not d.extra and n != "nuclei_mix"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--work", type=Path, default=Path("/tmp/sparseseg-suite"))
    args = p.parse_args()
    for name in args.datasets:
        root = prepare(name, args.work)
        images = [io.read(f) for f in sorted((root / "train_images").iterdir())]
        dense = [io.read_labels(f) for f in sorted((root / "train_gt").iterdir())]
        aucs = []
        for seed in args.seeds:
            rng = np.random.default_rng(seed)
            aucs.append(ring_auc(images, [sparsify(g, 0.1, rng) for g in dense], DATASETS[name].ndim))
        print(f"{name:<10} {DATASETS[name].kind:<10} " + " ".join(f"{v:.3f}" for v in aucs), flush=True)


if __name__ == "__main__":
    main()
