"""How well a mixed-size model's size model estimates a new image's zoom (docs/benchmarks.md §1).

    python benchmarks/size_model.py --runs <work>/runs/z0/nuclei_mix-s0 <work>/runs/z0cm/cvppp_mix-s1
    python benchmarks/size_model.py --runs ... --refit      # the same networks, size models fitted again
    python benchmarks/size_model.py --runs ... --passes 2   # 2 rounds per image instead of 4
    python benchmarks/size_model.py --runs ... --from-segments 2   # then cellpose's second stage, twice
    python benchmarks/sweep.py --run <work>/runs/z0-refit --grid SIZE_PASSES=4   # and what they score

For every test image of a suite run (``<dataset>-s<seed>`` with ``model/`` and ``test_images/``) the
size model's zoom is compared with the zoom the image's true objects call for (the target diameter
over their median diameter, clipped as the engine clips): mean and worst |log error| per model.
``--refit`` first fits each network's size model again with the package's current code (on the
training images, as training does) and writes the model to a copy, ``<run>-refit/<dataset>-s<seed>``,
so that ``sweep.py`` can score it; the original run is left as it is. ``--from-segments N`` then
tries cellpose's second stage N times: segment the image at the zoom found, take the median
diameter of its segments as the objects' diameter, and segment again at that one (errors and
scores per stage; not what the engine does, docs/benchmarks.md §1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import score  # noqa: E402
from suite_data import DATASETS, prepare  # noqa: E402

from napari_sparseseg.core import checkpoint, io, scale  # noqa: E402
from napari_sparseseg.core import segment as seg_mod  # noqa: E402


def images(model, folder: Path, norm: dict | None = None) -> list[np.ndarray]:
    """The images of ``folder`` as the network sees them: channels first, normalised."""
    kw = {} if norm is None else {"low": norm["low"], "high": norm["high"]}
    return [io.normalize(io.to_channels_first(io.read(p), model.ndim, channels=model.in_channels), **kw)
            for p in sorted(folder.iterdir())]


def refit(run: Path, root: Path, seed: int) -> Path:
    """A copy of ``run`` whose model's size model is fitted again by the current code."""
    dst = run.parent.with_name(run.parent.name + "-refit") / run.name
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    shutil.copytree(run / "model", dst / "model")
    os.symlink((run / "test_images").resolve(), dst / "test_images")
    model = checkpoint.load(dst / "model")
    cfg = json.loads((dst / "model" / "config.json").read_text())
    zooms = scale.training_zooms(cfg["scale"]["train_diameters"], model.ndim)
    cfg["scale"]["size_model"] = scale.fit_size_model(
        model.net, images(model, root / "train_images", cfg["normalization"]), zooms, seed=seed)
    (dst / "model" / "config.json").write_text(json.dumps(cfg))
    return dst


def errors(run: Path, root: Path) -> np.ndarray:
    """|log(estimated zoom / true zoom)| of every test image."""
    model = checkpoint.load(run / "model")
    if not (model.config.get("scale") or {}).get("size_model"):
        raise SystemExit(f"{run}: the model has no size model (its training objects had one size)")
    out = []
    for p, x in zip(sorted((run / "test_images").iterdir()), images(model, run / "test_images", model.config["normalization"])):
        gt = io.read_labels(root / "test_gt" / p.name)
        true = scale.zoom_for(float(np.median(scale.object_diameters(gt))), model.ndim)
        out.append(abs(np.log(scale.estimate_zoom(model.net, model.config, x) / true)))
    return np.array(out)


def from_segments(run: Path, root: Path, stages: int, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(|log zoom error|, score) of every test image (rows) at each stage (columns): the size
    model's zoom, then ``stages`` times the zoom of the last segmentation's median diameter."""
    model = checkpoint.load(run / "model")
    errs, scores = [], []
    for p in sorted((run / "test_images").iterdir()):
        image, gt = io.read(p), io.read_labels(root / "test_gt" / p.name)
        true = scale.zoom_for(float(np.median(scale.object_diameters(gt))), model.ndim)
        diameter, row_e, row_s = None, [], []
        for _ in range(stages + 1):
            embedded = seg_mod.embed(model, image, False, "cpu", diameter=diameter)
            seg = seg_mod.cluster(model, embedded)
            row_e.append(abs(np.log(embedded.zoom / true)))
            row_s.append(score(seg, gt)[key])
            found = scale.object_diameters(seg)
            diameter = float(np.median(found)) if found.size else diameter
        errs.append(row_e)
        scores.append(row_s)
    return np.array(errs), np.array(scores)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", type=Path, required=True, help="<work>/runs/<tag>/<dataset>-s<seed> folders")
    p.add_argument("--work", type=Path, default=Path("/tmp/sparseseg-suite"))
    p.add_argument("--refit", action="store_true", help="fit each size model again first (into <tag>-refit/)")
    p.add_argument("--passes", type=int, default=scale.SIZE_PASSES, help="rounds of the size model per image")
    p.add_argument("--from-segments", type=int, default=0, metavar="N",
                   help="then N times: the zoom of the segments' median diameter (cellpose's second stage)")
    args = p.parse_args()
    scale.SIZE_PASSES = args.passes
    for run in args.runs:
        name, seed = run.name.rsplit("-s", 1)
        root = prepare(name, args.work)
        if args.refit:
            run = refit(run, root, int(seed))
        if args.from_segments:
            e, s = from_segments(run, root, args.from_segments, DATASETS[name].primary)
            print(f"{run.parent.name}/{run.name} ({e.shape[0]} images), stage 0 (size model) to {args.from_segments}: "
                  f"mean |log error| {' / '.join(f'{v:.3f}' for v in e.mean(0))}, worst "
                  f"{' / '.join(f'{np.exp(v):.2f}x' for v in e.max(0))}, {DATASETS[name].primary} "
                  f"{' / '.join(f'{v:.3f}' for v in s.mean(0))}", flush=True)
            continue
        e = errors(run, root)
        print(f"{run.parent.name}/{run.name}: mean |log error| {e.mean():.3f}, worst {np.exp(e.max()):.2f}x "
              f"({e.size} images)", flush=True)


if __name__ == "__main__":
    main()
