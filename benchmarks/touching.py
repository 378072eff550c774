"""How well do a suite run's models tell touching objects apart? A diagnostic for merges.

    python benchmarks/touching.py --runs <work>/runs/s24 <work>/runs/s29og --dataset cvppp

For every pair of pixels ``d`` pixels apart along y or x (2D test images; ``--max-images``) whose
true labels are two different objects, the mean cosine similarity of the embeddings (what the
mutex watershed of a CRAC model reads) and, at d = 1, the affinity head's probability that they
are one object; the same within objects for comparison. Mean per run and seed. A merge-prone model
has high similarity across borders.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite_data import DATASETS  # noqa: E402

from napari_sparseseg.core import checkpoint, io  # noqa: E402
from napari_sparseseg.core import segment as seg_mod  # noqa: E402


def pairs(labels: np.ndarray, d: int, axis: int):
    """(first, second) views of ``labels``-shaped arrays' pixel pairs ``d`` apart along ``axis``."""
    a = [slice(None)] * labels.ndim
    b = [slice(None)] * labels.ndim
    a[axis], b[axis] = slice(0, -d), slice(d, None)
    return tuple(a), tuple(b)


def border_stats(pred, gt: np.ndarray, offsets, distances=(1, 3, 9)) -> dict[str, float]:
    emb = pred.embeddings / np.maximum(np.linalg.norm(pred.embeddings, axis=0, keepdims=True), 1e-6)
    lab = seg_mod.resize_labels(gt, emb.shape[1:])
    out: dict[str, list[float]] = {}
    for d in distances:
        for axis in range(lab.ndim):
            sa, sb = pairs(lab, d, axis)
            p, q = lab[sa], lab[sb]
            cos = (emb[(slice(None), *sa)] * emb[(slice(None), *sb)]).sum(0)
            across, within = (p > 0) & (q > 0) & (p != q), (p > 0) & (p == q)
            out.setdefault(f"cos{d} across", []).append(float(cos[across].mean()) if across.any() else np.nan)
            out.setdefault(f"cos{d} within", []).append(float(cos[within].mean()) if within.any() else np.nan)
            unit = [0] * lab.ndim
            unit[axis] = -1
            if d == 1 and pred.affinities is not None and unit in offsets:
                # the affinity head's channel for offset -1 along this axis: at the pair's second pixel
                aff = pred.affinities[offsets.index(unit)][sb]
                out.setdefault("aff1 across", []).append(float(aff[across].mean()) if across.any() else np.nan)
    return {k: float(np.nanmean(v)) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="suite run folders (hold <dataset>-s<seed>/)")
    p.add_argument("--dataset", default="cvppp", choices=[n for n, d in DATASETS.items() if d.ndim == 2])
    p.add_argument("--work", type=Path, default=Path("/tmp/sparseseg-suite"))
    p.add_argument("--max-images", type=int, default=8)
    args = p.parse_args()
    root = args.work / args.dataset
    for run in args.runs:
        for folder in sorted(run.glob(f"{args.dataset}-s*")):
            model = checkpoint.load(folder / "model")
            names = sorted(q.name for q in (folder / "test_images").iterdir())[: args.max_images]
            rows = [border_stats(seg_mod.embed(model, io.read(root / "test_images" / n), False, "cpu").f,
                                 io.read_labels(root / "test_gt" / n), model.config.get("offsets") or [])
                    for n in names]
            mean = {k: np.nanmean([r[k] for r in rows]) for k in rows[0]}
            print(f"{run.name}/{folder.name}: " + "  ".join(f"{k} {v:.3f}" for k, v in mean.items()), flush=True)


if __name__ == "__main__":
    main()
