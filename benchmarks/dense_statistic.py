"""What the annotation alone says about dense tissue, per suite dataset and sparse-label draw.

For each dataset (and the demo's synthetic cells) and each ``sparsify`` seed (SPOCO@0.1, seeds
0-3): the two figures ``napari_sparseseg.core.annotation.annotation_statistics`` measures when
training starts, at the model's scale, and that ``--clustering auto`` reads
(``segment.DENSE_CONTRAST``, ``segment.DENSE_INTERIOR``):

- ring contrast: ROC AUC between the painted objects' interiors and a ring of unpainted pixels
  around them (objects on a background: high; dense tissue and crowded objects: low);
- interior share: share of the unpainted pixels that look like the interiors (dense tissue: most).

    python benchmarks/dense_statistic.py [--datasets ...] [--work /tmp/sparseseg-suite]

Findings: docs/benchmarks.md (section 1, the dense-tissue call from the annotation).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite_data import DATASETS, prepare  # noqa: E402

from napari_sparseseg.core import io  # noqa: E402
from napari_sparseseg.core.samples import synthetic_dataset  # noqa: E402
from napari_sparseseg.core.segment import DENSE_CONTRAST, DENSE_INTERIOR, is_dense  # noqa: E402
from napari_sparseseg.core.sparsify import sparsify  # noqa: E402
from napari_sparseseg.core.training import TrainConfig, Trainer  # noqa: E402


def draw(name: str, seed: int, work: Path):
    """Training images, sparse labels and train options of one draw, as the suite (or the demo) makes them."""
    if name == "demo":  # `sparseseg demo`'s sample data: 6 training images, 10 % of the cells
        data = synthetic_dataset(8, seed=seed)[:6]
        labels = [sparsify(lab, 0.1, np.random.default_rng([seed, i])) for i, (_, lab) in enumerate(data)]
        return [img for img, _ in data], labels, {}
    root = prepare(name, work)
    images = [io.read(f) for f in sorted((root / "train_images").iterdir())]
    dense = [io.read_labels(f) for f in sorted((root / "train_gt").iterdir())]
    voxel = DATASETS[name].voxel
    return images, [sparsify(g, 0.1, np.random.default_rng(seed)) for g in dense], (
        {"voxel_size": list(voxel)} if voxel else {})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["demo"] + [n for n, d in DATASETS.items() if not d.extra])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--work", type=Path, default=Path("/tmp/sparseseg-suite"))
    args = p.parse_args()
    print(f"ring contrast / interior share per draw; dense by the annotation when contrast < {DENSE_CONTRAST} "
          f"and share >= {DENSE_INTERIOR}")
    for name in args.datasets:
        cells = []
        for seed in args.seeds:
            images, labels, options = draw(name, seed, args.work)
            # the statistics are measured when the trainer is built, at the model's scale
            stats = Trainer(images, labels, TrainConfig(iterations=1, seed=seed, **options)).model_config["annotation"]
            dense = "*" if is_dense(0.0, stats) else " "
            cells.append(f"{stats['ring_contrast']:.3f} / {stats['interior_share']:.2f}{dense}")
        kind = DATASETS[name].kind if name in DATASETS else "blobs"
        print(f"{name:<11} {kind:<10} " + "   ".join(cells), flush=True)


if __name__ == "__main__":
    main()
