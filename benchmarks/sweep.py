"""Post-processing choices scored on the models a suite run trained (no retraining): each model's
predictions are computed once, then clustered with every setting of a grid.

    python benchmarks/sweep.py --run /tmp/sparseseg-suite/runs/full --grid bias=0,0.05,0.1 affinity_mix=0,0.5,1

Every option of ``napari_sparseseg.core.segment.cluster`` can be swept (method, bias, affinity_mix,
fg_threshold, background, min_size, agreement, rescue), and the module constants ``FOREGROUND_FRACTION``,
``PREMASK_FRACTION``, ``MIN_SIZE_FRACTION`` and ``BIAS`` (upper case; a per-method table takes the
value everywhere), and any other module's constant as ``module.NAME`` (e.g.
``agglomeration.SUPERPIXEL_THRESHOLD``, ``rescue.RING_WIDTH``). Prints, per setting, each dataset's primary metric (mean over the run's seeds)
and the mean rank across datasets, so a default is chosen on the whole suite, never on one dataset.

Some keys change the predictions themselves, and each of their values predicts every image
again: ``zoom_factor`` multiplies the zoom the model would choose for each image (its common zoom,
or its size model's estimate; 1.25 shows every object 1.25x larger, 0.8 smaller), and the
constants of ``napari_sparseseg.core.scale`` (e.g. ``SIZE_PASSES``: how a new image's zoom is
estimated).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

sys.path.insert(0, str(Path(__file__).resolve().parent))
from suite import score  # noqa: E402
from suite_data import DATASETS, LOWER_IS_BETTER  # noqa: E402

from napari_sparseseg.core import checkpoint, io  # noqa: E402
from napari_sparseseg.core import prediction  # noqa: E402
from napari_sparseseg.core.annotation import border_statistics  # noqa: E402
from napari_sparseseg.core import rescue as rescue_mod  # noqa: E402
from napari_sparseseg.core import scale as scale_mod  # noqa: E402
from napari_sparseseg.core import segment as seg_mod  # noqa: E402
from napari_sparseseg.core.device import PRECISIONS  # noqa: E402


def parse_grid(items: list[str]) -> list[dict]:
    keys, values = [], []
    for item in items:
        key, vals = item.split("=")
        keys.append(key)
        values.append([_value(v) for v in vals.split(",")])
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def _value(text: str):
    if text in ("None", "none_"):
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _fill(table, value):
    """``table`` (a constant, or a dict of them, nested) with every entry ``value``."""
    return {k: _fill(v, value) for k, v in table.items()} if isinstance(table, dict) else value


def prediction_keys(setting: dict) -> tuple:
    """The keys of ``setting`` that change predictions (zoom_factor, scale's constants), sorted."""
    return tuple(sorted((k, v) for k, v in setting.items()
                        if k == "zoom_factor" or (k.isupper() and hasattr(scale_mod, k) and not hasattr(seg_mod, k))))


@contextmanager
def predicting(keys: tuple):
    """Within this block predictions follow ``keys`` (:func:`prediction_keys`): scale's constants
    set, and the engine's zoom choice (no user diameter) multiplied by ``zoom_factor``."""
    keys = dict(keys)
    factor = float(keys.pop("zoom_factor", 1.0))
    saved = {k: getattr(scale_mod, k) for k in keys}
    resolve = prediction.resolve_zoom
    for k, v in keys.items():
        setattr(scale_mod, k, type(saved[k])(v))
    prediction.resolve_zoom = lambda model, x, diameter=None, device="cpu": (
        resolve(model, x, diameter, device) * (factor if diameter is None else 1.0))
    try:
        yield
    finally:
        prediction.resolve_zoom = resolve
        for k, v in saved.items():
            setattr(scale_mod, k, v)


@contextmanager
def constants(setting: dict):
    """Within this block the module constants of ``setting`` are set: ``NAME`` of
    :mod:`.core.segment` (a per-method table, e.g. ``BIAS``, takes the value everywhere) or
    ``module.NAME`` of any module of ``napari_sparseseg.core``."""
    targets = []
    for k, v in setting.items():
        if "." in k:
            mod, name = k.rsplit(".", 1)
            targets.append((importlib.import_module(f"napari_sparseseg.core.{mod}"), name, v))
        elif k.isupper() and hasattr(seg_mod, k):
            targets.append((seg_mod, k, v))
    saved = [(m, n, getattr(m, n)) for m, n, _ in targets]
    try:
        for m, n, v in targets:
            old = getattr(m, n)
            setattr(m, n, _fill(old, v) if isinstance(old, dict) else type(old)(v) if isinstance(old, (int, float, str)) else v)
        yield
    finally:
        for m, n, old in saved:
            setattr(m, n, old)


def measure_annotation(model, run: Path, root: Path) -> None:
    """Give a model trained before ``annotation.object_contrast`` or ``annotation.border_contrast``
    existed (:mod:`.core.rescue`, :mod:`.core.annotation`) the figures of its run's own sparse
    labels, measured at the images' resolution (the contrast is a ratio of intensities over the
    image's spread, the ring scaled to the objects: it does not depend on the zoom); the model
    folder is not touched."""
    ann = model.config.get("annotation") or {}
    missing = ann.get("object_contrast") is None or "border_contrast" not in ann
    if not missing or not (run / "sparse").is_dir():
        return
    images, labels = [], []
    for path in sorted((run / "sparse").iterdir()):
        found = sorted((root / "train_images").glob(path.stem + ".*"))
        if found:
            labels.append(io.read_labels(path))
            images.append(io.to_channels_first(io.read(found[0]), model.ndim).astype(np.float32))
    if ann.get("object_contrast") is None:
        ann["object_contrast"] = rescue_mod.painted_contrast(images, labels) if labels else None
    if "border_contrast" not in ann:
        # at the images' resolution, normalised as the network sees them (training measures them at
        # the model's scale; the polarity and the ranks barely depend on it)
        norm = model.config["normalization"]
        normed = [io.normalize(i, norm["low"], norm["high"]) for i in images]
        ann["border_direction"], ann["border_contrast"] = border_statistics(normed, labels) if labels else (None, None)
    model.config["annotation"] = ann


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a suite run folder (holds <dataset>-s<seed>/)")
    p.add_argument("--work", type=Path, default=Path("/tmp/sparseseg-suite"))
    p.add_argument("--grid", nargs="+", required=True, help="key=v1,v2,... (several keys: all combinations)")
    p.add_argument("--datasets", nargs="+", default=None)
    p.add_argument("--max-images", type=int, default=6, help="test images per run (2D datasets)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="autocast of the predictions (as sparseseg segment --precision)")
    args = p.parse_args()
    grid = parse_grid(args.grid)
    runs = sorted(d for d in args.run.iterdir() if (d / "model" / "config.json").exists())
    if args.datasets:
        runs = [r for r in runs if r.name.rsplit("-s", 1)[0] in args.datasets]
    table: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        name = run.name.rsplit("-s", 1)[0]
        key = DATASETS[name].primary
        model = checkpoint.load(run / "model")
        root = args.work / name
        measure_annotation(model, run, root)
        names = sorted(p.name for p in (run / "test_images").iterdir())[: args.max_images]
        need_g = any(seg_mod.needs_g(s.get("method", "auto"), model.config,
                                     **{k: v for k, v in s.items() if k.islower() and k not in ("method", "zoom_factor")})
                     for s in grid)
        caches = {}
        for keys in sorted({prediction_keys(s) for s in grid}):
            with predicting(keys):
                caches[keys] = [(seg_mod.embed(model, io.read(root / "test_images" / n), need_g, "cpu",
                                               precision=args.precision), io.read_labels(root / "test_gt" / n))
                                for n in names]
        for i, setting in enumerate(grid):
            cache = caches[prediction_keys(setting)]
            with constants(setting):
                opts = {k: v for k, v in setting.items() if k.islower() and k != "zoom_factor" and "." not in k}
                vals = [score(seg_mod.cluster(model, e, **opts), gt)[key] for e, gt in cache]
            table.setdefault(name, {}).setdefault(i, []).append(float(np.mean(vals)))
        print(f"  {run.name}: " + " ".join(f"{table[name][i][-1]:.3f}" for i in range(len(grid))), flush=True)
    # mean over seeds, then rank per dataset (1 = best)
    print(f"\n{'setting':<50}" + "".join(f"{n[:10]:>11}" for n in table) + f"{'mean rank':>11}")
    ranks = np.zeros(len(grid))
    for name, per in table.items():
        means = np.array([np.mean(per[i]) for i in range(len(grid))])
        order = means if DATASETS[name].primary in LOWER_IS_BETTER else -means
        ranks += rankdata(np.round(order, 3))  # ties (to the third decimal) share their mean rank
    for i, setting in enumerate(grid):
        label = " ".join(f"{k}={v}" for k, v in setting.items())
        print(f"{label:<50}" + "".join(f"{np.mean(table[n][i]):11.3f}" for n in table) + f"{ranks[i] / len(table):11.2f}")
    out = args.run / ("sweep.json" if args.precision == "auto" else f"sweep-{args.precision}.json")
    out.write_text(json.dumps({"grid": grid, "table": {n: {str(i): v for i, v in per.items()} for n, per in table.items()}},
                              indent=1))


if __name__ == "__main__":
    main()
