"""Blockwise against whole-image segmentation, on the models a suite run trained: each test image
segmented both ways with ``sparseseg segment`` (defaults; blockwise with ``--block-shape``), scored
with the suite's metrics. A user who segments a large image block by block should get what the
whole image gives.

    python benchmarks/blockwise_suite.py --run /tmp/sparseseg-suite/runs/s30 --datasets nuclei2d --block-shape 256 256

Prints per model the primary metric of both paths, their adapted Rand error against each other,
and the mean (sd) over the run's seeds.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from skimage.metrics import adapted_rand_error

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import score  # noqa: E402
from suite_data import DATASETS  # noqa: E402

from napari_sparseseg.core import io  # noqa: E402


def segment(model: Path, images: Path, out: Path, extra: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "napari_sparseseg", "segment", "--model", str(model), "--images",
                    str(images / "*"), "--out", str(out), "--quiet", *extra], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a suite run folder (holds <dataset>-s<seed>/)")
    p.add_argument("--work", type=Path, default=Path("/tmp/sparseseg-suite"))
    p.add_argument("--datasets", nargs="+", required=True)
    p.add_argument("--block-shape", type=int, nargs="+", required=True, help="model-scale pixels per axis")
    p.add_argument("--extra", default="", help="more segment options for both paths, e.g. '--rescue 0'")
    args = p.parse_args()
    for name in args.datasets:
        key = DATASETS[name].primary
        rows = []
        for run in sorted(args.run.glob(f"{name}-s*")):
            if not (run / "model" / "config.json").exists():
                continue
            with tempfile.TemporaryDirectory() as tmp:
                whole, block = Path(tmp, "whole"), Path(tmp, "block")
                extra = args.extra.split()
                tw = segment(run / "model", run / "test_images", whole, extra)
                tb = segment(run / "model", run / "test_images", block,
                             extra + ["--block-shape", *map(str, args.block_shape), "--workers", "0"])
                vals = []
                for img in sorted((run / "test_images").iterdir()):
                    gt = io.read_labels(args.work / name / "test_gt" / img.name)
                    a = io.read_labels(whole / f"{img.stem}.tif")
                    b = io.read_labels(sorted(block.glob(f"{img.stem}.*"))[0])
                    vals.append((score(a, gt)[key], score(b, gt)[key], adapted_rand_error(a, b)[0]))
            w, b, e = np.mean(vals, axis=0)
            rows.append((w, b))
            print(f"{run.name}: whole {w:.3f} ({tw:.0f} s), blockwise {b:.3f} ({tb:.0f} s), "
                  f"ARand between them {e:.3f}", flush=True)
        if rows:
            r = np.array(rows)
            print(f"{name} {key}: whole {r[:, 0].mean():.3f} ({r[:, 0].std():.3f}), "
                  f"blockwise {r[:, 1].mean():.3f} ({r[:, 1].std():.3f}), {len(rows)} models")


if __name__ == "__main__":
    main()
