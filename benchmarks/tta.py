"""Test-time augmentation scored on the models a suite run trained (no retraining): each test image
is predicted once per flip and the passes are combined, then clustered with the defaults.

    python benchmarks/tta.py --run /tmp/sparseseg-suite/runs/s18 --flips "" "1" "2" "12"

A flip is a string of spatial axes (0 = first spatial axis); "" is the image as it is. The
foreground probabilities are averaged over the passes; the embeddings are combined so that the
clustering reads the mean affinity of the passes: for CRAC (cosine affinities) the unit embeddings
of the passes are concatenated and scaled by 1/sqrt(n), whose cosine is the passes' mean cosine;
for SPOCO the same scaling gives the root-mean-square distance. ``--only fg`` / ``--only emb``
augment one of the two. Prints each run's primary metric without and with the flips.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import score  # noqa: E402
from suite_data import DATASETS  # noqa: E402

from napari_sparseseg.core import checkpoint, io, scale as scales  # noqa: E402
from napari_sparseseg.core import segment as seg_mod  # noqa: E402
from napari_sparseseg.core.data import rescale  # noqa: E402
from napari_sparseseg.core.io import normalize, to_channels_first  # noqa: E402
from napari_sparseseg.core.prediction import Prediction, predict_normalized, resolve_zoom, split_channels  # noqa: E402


def predict_flips(model, image: np.ndarray, flips: list[tuple[int, ...]], only: str | None = None) -> seg_mod.Embedded:
    x = to_channels_first(image, model.ndim, "image", model.in_channels)
    norm = model.config["normalization"]
    x = normalize(x, norm["low"], norm["high"])
    zoom = resolve_zoom(model, x, None, "cpu")
    z_zoom = scales.stack_z_zoom(zoom, None, model.config, model.ndim)
    xs = rescale(x, zoom, 1, z_zoom)
    net = model.net.eval()
    embs, fgs, affs = [], [], []
    for axes in flips:
        ax = tuple(a + 1 for a in axes)
        out = predict_normalized(net, np.ascontiguousarray(np.flip(xs, ax)), "cpu")
        emb, fg, aff = split_channels(np.ascontiguousarray(np.flip(out, ax)), net.config)
        if model.config.get("method") == "crac":
            emb = emb / np.maximum(np.linalg.norm(emb, axis=0, keepdims=True), 1e-8)
        embs.append(emb)
        fgs.append(fg)
        affs.append(aff)
    emb = embs[0] if only == "fg" else np.concatenate(embs) / np.sqrt(len(embs))
    fg = None if fgs[0] is None else (fgs[0] if only == "emb" else np.mean(fgs, 0))
    # the affinity head's channels would need a shift per flipped offset: the first pass's are kept
    return seg_mod.Embedded(Prediction(emb, fg, float(zoom), tuple(x.shape[1:]), affs[0], float(z_zoom)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a suite run folder (holds <dataset>-s<seed>/)")
    p.add_argument("--work", type=Path, default=Path("/tmp/sparseseg-suite"))
    p.add_argument("--flips", nargs="+", default=["", "1", "2", "12"],
                   help="flips as strings of spatial axes; 3D volumes use them as given (default: y, x, yx)")
    p.add_argument("--flips-2d", nargs="+", default=["", "0", "1", "01"])
    p.add_argument("--only", choices=("fg", "emb"), default=None)
    p.add_argument("--datasets", nargs="+", default=None)
    args = p.parse_args()
    for run in sorted(d for d in args.run.iterdir() if (d / "model" / "config.json").exists()):
        name = run.name.rsplit("-s", 1)[0]
        if args.datasets and name not in args.datasets:
            continue
        model = checkpoint.load(run / "model")
        flips = [tuple(int(c) for c in f) for f in (args.flips if model.ndim == 3 else args.flips_2d)]
        root = args.work / name
        key = DATASETS[name].primary
        plain, tta = [], []
        for n in sorted(q.name for q in (root / "test_images").iterdir() if not q.name.startswith(".")):
            img, gt = io.read(root / "test_images" / n), io.read_labels(root / "test_gt" / n)
            plain.append(score(seg_mod.cluster(model, predict_flips(model, img, [()])), gt)[key])
            tta.append(score(seg_mod.cluster(model, predict_flips(model, img, flips, args.only)), gt)[key])
        print(f"{run.name:<14} {key}: plain {np.mean(plain):.3f}  flips {np.mean(tta):.3f}", flush=True)


if __name__ == "__main__":
    main()
