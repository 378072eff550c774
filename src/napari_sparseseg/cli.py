"""The ``sparseseg`` command: sparsify, train, segment, evaluate, export, demo.

Every subcommand drives the same engine as the napari widgets (``napari_sparseseg.core``).
User errors print one line (``sparseseg: error: ...``) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import numpy as np

from . import cli_blockwise
from .core import checkpoint, io
from .core.device import PRECISIONS
from .core.errors import SparseSegError
from .core.methods import METHOD_NAMES, describe_default
from .core.segment import (AFFINITY_SOURCES, AGREEMENT, BIAS, CLUSTERINGS, CRAC_AFFINITY_SOURCE, FAINT_CONTRAST,
                           RESCUE_CONTRAST, SPLIT_RATIO)
from .core.training import (FINE_TUNE_LR, FOREGROUND_HOLDOUT, OBJECT_DIM, OBJECT_DIM_ON, OBJECT_GAIN, OBJECT_GAIN_ON,
                            default_lr_text)
from .core.real_samples import REAL_SAMPLES
from .core.transfer import MIN_RECOVERY


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shape like 256,256 or 32,96,96, got {text!r}") from None


def _out_path(out: Path, src: Path) -> Path:
    stem = src.name[: -len(".zarr")] if src.name.endswith(".zarr") else src.stem
    return out / f"{stem}.tif"


# -- sparsify ------------------------------------------------------------------------------------
def cmd_sparsify(args) -> int:
    from .core.sparsify import sparsify

    files = io.expand(args.labels, "--labels")
    out = Path(args.out)
    n_kept = n_total = 0
    for i, path in enumerate(files):
        lab = io.read_labels(path)
        sparse = sparsify(lab, args.fraction, np.random.default_rng([args.seed, i]))
        n_total += len(np.unique(lab[lab > 0]))
        n_kept += len(np.unique(sparse[sparse > 0]))
        io.write(_out_path(out, path), sparse)
    print(f"kept {n_kept} of {n_total} objects in {len(files)} image(s) -> {out}/")
    return 0


# -- train ---------------------------------------------------------------------------------------
#: the help of --precision (train and segment)
PRECISION_HELP = ("auto: bfloat16 autocast on CPUs with AVX512-BF16 or AMX (faster there), else float32 "
                  "(also on CUDA GPUs, where it was slower)")
#: loss terms shown beside the total in the training progress bar, when the method has them
PROGRESS_TERMS = ("obj", "consistency", "supervised_eam", "cross")


def cmd_train(args) -> int:
    from tqdm import tqdm

    from .core.losses import SpocoLossConfig
    from .core.training import TrainConfig, Trainer

    out = Path(args.out)
    init, resume = None, False
    if (out / checkpoint.CONFIG).exists():
        if not args.resume:
            raise SparseSegError(
                f"--out {out}: already holds a model; pass --resume to continue training it, or choose another folder"
            )
        init, resume = checkpoint.load(out, with_optimizer=True), True
    elif args.resume:
        raise SparseSegError(f"--resume: {out} holds no model to resume")
    if args.init is not None:
        if init is not None:
            raise SparseSegError("--from and --resume cannot be combined: --resume continues the model in --out")
        init = checkpoint.load(args.init)
    from .core.scale import check_voxel_size

    check_voxel_size(args.voxel_size, "--voxel-size")
    from .core.pairs import load_training_pairs

    imgs, labs, names, ignore, bounds, voxels = load_training_pairs(args.images, args.labels, args.ignore_mask,
                                                                    args.background_id, report=print)
    loss = SpocoLossConfig(anchor=args.anchor, w_consistency=args.consistency_weight)
    config = TrainConfig(
        iterations=args.iterations,
        time_limit=args.time_limit,
        batch_size=args.batch_size,
        patch_shape=args.patch_shape,
        precision=args.precision,
        lr=args.lr,
        method=args.method,
        seed=args.seed,
        device=args.device,
        background_id=args.background_id,
        diameter=args.diameter,
        voxel_size=args.voxel_size,
        coord_scale=args.coord_scale,
        loss=loss,
        checkpoint_every=args.checkpoint_every,
        foreground_holdout=args.foreground_holdout,
        object_gain=args.object_contrast,
        object_dim=args.object_dim,
        finetune=args.finetune,
    )
    if args.base_channels is not None:
        config.base_channels = args.base_channels
    trainer = Trainer(imgs, labs, config, out=out, init=init, resume=resume, names=names, ignore=ignore,
                      voxel_sizes=voxels, bounds=bounds)
    zooms = sorted({round(s.zoom, 3) for s in trainer.samples})
    z_zooms = sorted({round(s.z_zoom, 3) for s in trainer.samples})
    sc = trainer.scale_config
    voxel = "" if sc.get("voxel_size") is None else (
        f", voxel {' x '.join(f'{v:.3g}' for v in sc['voxel_size'])}, z zoom "
        f"{z_zooms[0]:.3g}{f'-{z_zooms[-1]:.3g}' if len(z_zooms) > 1 else ''}")
    print(
        f"training {trainer.method.name.upper()} on {len(imgs)} image(s), {sum(len(s.objects) for s in trainer.samples)} annotated "
        f"object(s), object diameter {sc['diameter']:.1f} px{' (mixed sizes)' if sc['mixed'] else ''}, "
        f"zoom {zooms[0]:.3g}{f'-{zooms[-1]:.3g}' if len(zooms) > 1 else ''}{voxel}, patch {trainer.patch}, "
        f"device {trainer.device}"
        + (f"; {trainer.heldout} object(s) held out of the foreground loss to calibrate its threshold"
           if trainer.heldout else "")
    )
    if trainer.note:
        print(trainer.note)
    # SIGTERM (e.g. a batch system's time limit) stops like Ctrl-C, after the current step
    signal.signal(signal.SIGTERM, lambda *_: trainer.stop())
    iters, _ = trainer.limits()
    bar = tqdm(total=iters, unit="it", disable=args.quiet or None, dynamic_ncols=True)
    events = trainer.run()
    reason = ""
    try:
        for ev in events:
            if ev.done:
                reason = ev.reason
                break
            bar.update(1)
            if ev.iteration % 5 == 0:
                # the total first, then the method's own terms (SPOCO and CRAC name theirs differently)
                bar.set_postfix({k: f"{v:.3f}" for k, v in ev.losses.items() if k in ("loss", *PROGRESS_TERMS)})
    except KeyboardInterrupt:
        events.close()  # the trainer writes its checkpoint on close
        reason = "interrupted (Ctrl-C)"
    finally:
        bar.close()
    print(
        f"stopped after {trainer.iteration} iterations ({trainer.seconds:.0f} s, "
        f"{trainer.iteration / max(trainer.seconds, 1e-9):.2f} it/s): {reason or 'done'}; model saved to {out}/"
    )
    return 0


# -- segment -------------------------------------------------------------------------------------
def cmd_segment(args) -> int:
    from .core.pairs import is_zarr
    from .core.scale import check_voxel_size, diameter_note
    from .core.agglomeration import image_share, image_share_note
    from .core.segment import cluster, dense_reason, embed, needs_g, resolved_clustering

    check_voxel_size(args.voxel_size, "--voxel-size")
    files = io.expand(args.images, "--images")
    if args.block_shape is not None or args.scheduler or args.work or any(is_zarr(p) for p in files):
        return cli_blockwise.segment(args, files)
    model = checkpoint.load(args.model)
    out = Path(args.out)
    overrides = dict(bias=args.bias, min_size=args.min_size, max_size=args.max_size, background=args.background,
                     agreement=args.agreement, fg_threshold=args.fg_threshold, affinity_source=args.affinities,
                     split_ratio=args.split_ratio, rescue=args.rescue, min_contrast=args.min_contrast)
    need_g = needs_g(args.clustering, model.config, **overrides)
    for path in files:
        t0 = time.perf_counter()
        voxel = args.voxel_size or io.voxel_size(path)  # None: the model's
        embedded = embed(model, io.read(path), need_g, args.device, str(path), args.diameter, voxel, args.precision)
        how = resolved_clustering(model, embedded, args.clustering, **overrides)  # reported below
        if args.clustering == "auto" and how == "multicut":
            how += f", dense tissue by {dense_reason(model, embedded, **overrides)}"
        if how.startswith("multicut"):
            how += image_share_note(image_share(model.config.get("annotation")))
        seg = cluster(model, embedded, args.clustering, **overrides)  # "auto" decides clustering and background
        dst = io.write(_out_path(out, path), seg.astype(np.uint32 if seg.max() > 65535 else np.uint16))
        print(f"{path} -> {dst}: {int(seg.max())} objects in {time.perf_counter() - t0:.2f} s "
              f"({how}; {diameter_note(model.config, model.ndim, embedded.zoom, args.diameter)})")
    return 0


# -- evaluate ------------------------------------------------------------------------------------
def cmd_evaluate(args) -> int:
    from .core.metrics import KEYS, evaluate, mean_scores

    pairs = io.pair(io.expand(args.pred, "--pred"), io.expand(args.gt, "--gt"))
    rows = []
    for pp, gp in pairs:
        pred, gt = io.read_labels(pp), io.read_labels(gp)
        if pred.shape != gt.shape:
            raise SparseSegError(f"{pp}: shape {pred.shape} does not match the ground truth {gp} {gt.shape}")
        rows.append({"name": pp.name, **evaluate(pred, gt)})
    mean = mean_scores(rows)
    if args.json:
        print(json.dumps({"images": rows, "mean": mean}, indent=1))
    else:
        print("name".ljust(28) + "".join(k.rjust(10) for k in KEYS))
        for r in rows + [{"name": "mean", **mean}]:
            print(r["name"][:27].ljust(28) + "".join(f"{r[k]:10.3f}" for k in KEYS))
    return 0


# -- export --------------------------------------------------------------------------------------
def cmd_export(args) -> int:
    from .core.export import check_package, export_bioimageio

    t0 = time.perf_counter()
    out = export_bioimageio(args.model, args.out, name=args.name, authors=args.authors, license=args.license)
    model = checkpoint.load(out)
    print(f"{args.model} -> {out}: bioimage.io model package, {model.config.get('method', 'spoco').upper()} "
          f"{model.ndim}D, {out.stat().st_size / 1e6:.2f} MB, in {time.perf_counter() - t0:.1f} s")
    if args.check:
        status, failures = check_package(out)
        print(f"bioimageio.core test: {status}")
        for line in failures:
            print(f"  {line}")
        return 0 if status == "passed" else 1
    return 0


# -- demo ----------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from .core.samples import synthetic_dataset
    from .core.sparsify import sparsify

    out = Path(args.out)
    data = synthetic_dataset(args.n_train + 2, seed=args.seed)
    for d in ("images", "sparse", "gt", "test", "test_gt"):
        (out / d).mkdir(parents=True, exist_ok=True)
    for i, (img, lab) in enumerate(data):
        if i < args.n_train:
            io.write(out / "images" / f"cells_{i:02d}.tif", img)
            io.write(out / "sparse" / f"cells_{i:02d}.tif", sparsify(lab, args.fraction, np.random.default_rng([args.seed, i])))
        else:
            io.write(out / "test" / f"cells_{i:02d}.tif", img)
            io.write(out / "test_gt" / f"cells_{i:02d}.tif", lab)
    print(f"sample data: {args.n_train} training images with {args.fraction:.0%} of the cells labeled -> {out}/")
    model_dir = out / "model"
    train_args = [
        "train", "--images", str(out / "images" / "*.tif"), "--labels", str(out / "sparse" / "*.tif"),
        "--out", str(model_dir), "--time-limit", str(args.time_limit), "--seed", str(args.seed),
    ]
    if (model_dir / checkpoint.CONFIG).exists():
        train_args.append("--resume")
    segment_args = ["segment", "--model", str(model_dir), "--images", str(out / "test" / "*.tif"),
                    "--out", str(out / "seg")]
    for step in (train_args, segment_args):
        rc = main(step)
        if rc != 0:
            return rc
    return main(["evaluate", "--pred", str(out / "seg" / "*.tif"), "--gt", str(out / "test_gt" / "*.tif")])


def cmd_sample(args) -> int:
    from .core.real_samples import load_real_sample

    image, sparse, gt, sample = load_real_sample(args.name)
    out = Path(args.out)
    io.write(out / "images" / f"{args.name}.tif", image, voxel_size=sample.voxel_size)
    io.write(out / "labels" / f"{args.name}.tif", sparse)
    io.write(out / "gt" / f"{args.name}.tif", gt)
    print(f"{sample.title}: {len(np.unique(sparse)) - 1} of {gt.max()} objects painted -> "
          f"{out}/images, {out}/labels (all objects: {out}/gt)\nsource: {sample.attribution}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparseseg",
        description="Train instance segmentation from a few labeled objects (SPOCO or CRAC) and segment images.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("sparsify", help="keep a random fraction of the objects (benchmark protocol SPOCO@p)")
    s.add_argument("--labels", required=True, help="dense label images (quoted glob)")
    s.add_argument("--fraction", type=float, required=True, help="fraction of objects to keep, in (0, 1]")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="folder for <stem>.tif")
    s.set_defaults(func=cmd_sparsify)

    t = sub.add_parser("train", help="train an embedding network on sparse labels")
    t.add_argument("--images", required=True, help="images (quoted glob); pair with --labels in sorted order")
    t.add_argument("--labels", required=True, help="sparse labels: 0 = unlabeled, each id > 0 one complete object")
    t.add_argument("--out", required=True, help="model folder to write")
    t.add_argument("--time-limit", type=float, default=None, metavar="SECONDS", help="stop after this many seconds")
    t.add_argument("--iterations", type=int, default=None, help="stop after this many iterations")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--method", choices=("auto", *METHOD_NAMES), default="auto",
                   help="training method; auto: " + describe_default()
                        + " (a model given with --from or --resume keeps its own)")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    t.add_argument("--from", dest="init", default=None, metavar="MODEL",
                   help=f"fine-tune this model (lr {FINE_TUNE_LR:g} by default) if it already finds the painted "
                        "objects, else train a fresh network (see --finetune)")
    t.add_argument("--finetune", choices=["auto", "always"], default="auto",
                   help="with --from: auto (default) keeps the model only if its own segmentation recovers the "
                        f"painted objects (mean best IoU >= {MIN_RECOVERY:g}); always fine-tunes it")
    t.add_argument("--resume", action="store_true", help="continue training the model already in --out")
    t.add_argument("--background-id", type=int, default=None, help="this label is background (full supervision)")
    t.add_argument("--batch-size", type=int, default=None, help="crops per step (default: 2 in 2D, 1 in 3D)")
    t.add_argument("--base-channels", type=int, default=None, help="channels of the U-Net's first level (default: 16 in 2D, 8 in 3D)")
    t.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    t.add_argument("--patch-shape", type=_parse_shape, default=None, help="training crop, e.g. 256,256")
    t.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default {default_lr_text('with --from')})")
    t.add_argument("--diameter", type=float, default=None, metavar="PIXELS",
                   help="typical object diameter in pixels (default: measured on each image's labeled objects)")
    t.add_argument("--voxel-size", type=float, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="3D: voxel size of the stacks, any unit (default: what each TIFF / OME-Zarr states; none: "
                        "z is not zoomed). With one, z is zoomed so that voxels are as deep as wide at the model's scale")
    t.add_argument("--ignore-mask", default=None, metavar="GLOB",
                   help="masks (quoted glob, paired with --images in sorted order): nonzero pixels take no part "
                        "in training")
    t.add_argument("--foreground-holdout", type=float, default=FOREGROUND_HOLDOUT, metavar="FRACTION",
                   help="fraction of the labeled objects held out of the foreground loss, on which its threshold "
                        f"is calibrated (default {FOREGROUND_HOLDOUT:g}; none with fewer than 3 objects; 0: none)")
    t.add_argument("--object-contrast", type=float, nargs="?", const=OBJECT_GAIN_ON, default=OBJECT_GAIN,
                   metavar="FACTOR",
                   help="raise the contrast of half the labeled objects of each crop by up to FACTOR (alone: "
                        f"{OBJECT_GAIN_ON:g}), so that objects much brighter than the labeled ones are not called "
                        "background: for objects on a background (nuclei); on the benchmark suite it cost CVPPP "
                        "leaves and ovule cells. Default: off")
    t.add_argument("--object-dim", type=float, nargs="?", const=OBJECT_DIM_ON, default=OBJECT_DIM, metavar="FACTOR",
                   help="lower the contrast of half the labeled objects of each crop by down to FACTOR (alone: "
                        f"{OBJECT_DIM_ON:.2g}), so that objects much dimmer than the labeled ones are not called "
                        "background: for nuclei; on the benchmark suite it cost CVPPP leaves and mitochondria. "
                        "Default: off")
    t.add_argument("--anchor", choices=("pixel", "mean"), default="pixel", help="instance-selection anchor")
    t.add_argument("--coord-scale", type=float, default=None,
                   help="SPOCO only (CRAC's networks have none): coordinate channels added to the embeddings "
                        "(units per pixel at the model's scale); 0: a plain U-Net (default: 4 units per object "
                        "diameter)")
    t.add_argument("--consistency-weight", type=float, default=1.0, help="weight of the embedding consistency term")
    t.add_argument("--checkpoint-every", type=float, default=60.0, metavar="SECONDS")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("segment", help="predict embeddings and cluster them into objects")
    g.add_argument("--model", required=True)
    g.add_argument("--images", required=True, help="images (quoted glob)")
    g.add_argument("--out", required=True, help="folder for <stem>.tif")
    g.add_argument("--clustering", choices=CLUSTERINGS, default="auto",
                   help="auto (default): multicut on superpixels where an image is mostly foreground (dense tissue: "
                        "membranes, EM), mutex watershed (mws) for objects on a background")
    g.add_argument("--bias", type=float, default=None,
                   help="> 0 splits more, < 0 merges more (mws and multicut; default: " + "; ".join(
                       f"{name.upper()} models " + ", ".join(f"{m} {b:+g}" for m, b in table.items())
                       for name, table in BIAS.items()) + ")")
    g.add_argument("--min-size", type=int, default=None, help="smaller objects are removed (default: 1/4 of the median annotated object)")
    g.add_argument("--max-size", type=int, default=None,
                   help="larger segments are background (default: no limit)")
    g.add_argument("--background", choices=("auto", "foreground", "largest", "none"), default="auto",
                   help="auto (default): none on an image auto clustering calls dense tissue, else the model's "
                        "foreground head if it has one, else largest; foreground: "
                        "pixels the foreground head calls background are 0; largest: the largest segment is "
                        "background; none: dense tissue")
    g.add_argument("--fg-threshold", type=float, default=None, metavar="P",
                   help="foreground probability threshold (default: from the model)")
    g.add_argument("--agreement", type=float, default=None, metavar="IOU",
                   help="keep segments the EMA network reproduces with at least this IoU "
                        f"(default {AGREEMENT} for mws and multicut when background is the largest segment, else off; 0: off)")
    g.add_argument("--affinities", choices=tuple(AFFINITY_SOURCES), default=None,
                   help=f"CRAC models: the affinity map the mutex watershed reads: eam (from the embeddings), iam "
                        f"(predicted directly) or mean (default {CRAC_AFFINITY_SOURCE})")
    g.add_argument("--split-ratio", type=float, default=None, metavar="R",
                   help="mws on CRAC models: segments more than R median annotated diameters across are clustered "
                        "again, where either affinity map sees a border (default: " + ", ".join(
                            f"{m.upper()} {r:.2f}" for m, r in SPLIT_RATIO.items()) + "; 0: off)")
    g.add_argument("--rescue", type=float, default=None, metavar="FACTOR",
                   help="background decided by the foreground head: keep the segments it drops that "
                        "stand out from their surroundings at least FACTOR times as much as the painted objects "
                        f"(objects much brighter or darker than any painted one; default {RESCUE_CONTRAST:g} for 2D "
                        "models, off for 3D ones; 0: off)")
    g.add_argument("--min-contrast", type=float, default=None, metavar="FRACTION",
                   help="background decided by the foreground head: drop the segments it keeps that stand out from "
                        "the background beside them less than FRACTION of the painted objects' contrast (background "
                        f"texture; default {FAINT_CONTRAST:g}; 0: off)")
    g.add_argument("--diameter", type=float, default=None, metavar="PIXELS",
                   help="typical object diameter in these images, in pixels (default: the model's, or estimated "
                        "per image for a model trained on objects of mixed sizes)")
    g.add_argument("--voxel-size", type=float, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help="3D: voxel size of these stacks (default: what the file states, else the model's training "
                        "voxel size)")
    g.add_argument("--device", default="auto")
    g.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help=PRECISION_HELP + "; bfloat16 predictions differ from float32 ones by a few hundredths")
    cli_blockwise.add_arguments(g)
    g.set_defaults(func=cmd_segment)

    e = sub.add_parser("evaluate", help="score segmentations against ground truth")
    e.add_argument("--pred", required=True)
    e.add_argument("--gt", required=True)
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", help="write a model as a bioimage.io model package (.zip; needs the "
                                      "[bioimageio] extra)")
    x.add_argument("--model", required=True, help="model folder (or a package written by export)")
    x.add_argument("--out", required=True, help="package file to write, e.g. model.zip")
    x.add_argument("--name", default=None, help="model name (default: sparseseg <method> <n>D <folder name>)")
    x.add_argument("--authors", nargs="+", default=None, metavar="NAME",
                   help="author names, e.g. --authors 'Jane Doe' 'John Roe' (default: your login name)")
    x.add_argument("--license", default="CC-BY-4.0", help="SPDX licence of the weights (default CC-BY-4.0)")
    x.add_argument("--check", action="store_true",
                   help="run bioimageio.core's test of the package (both weight formats) and report it")
    x.set_defaults(func=cmd_export)

    d = sub.add_parser("demo", help="sample data -> sparse labels -> train -> segment -> score")
    d.add_argument("--out", default="sparseseg-demo")
    d.add_argument("--time-limit", type=float, default=120.0)
    d.add_argument("--fraction", type=float, default=0.25)
    d.add_argument("--n-train", type=int, default=6)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("sample", help="download a real 3D sample (once) and write it with a few objects painted")
    m.add_argument("name", choices=list(REAL_SAMPLES), help="ovule: confocal, cell boundaries; fibsem: neuropil")
    m.add_argument("--out", default="sparseseg-sample")
    m.set_defaults(func=cmd_sample)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SparseSegError as err:
        print(f"sparseseg: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
