"""``sparseseg segment`` on stacks larger than memory: the blockwise options and the run
(:mod:`.core.blockwise`), with a progress bar per step."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .core.errors import SparseSegError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The blockwise options of ``sparseseg segment``."""
    b = parser.add_argument_group(
        "blockwise (stacks larger than memory)",
        "used for zarr / OME-Zarr input, or for any input with --block-shape, --scheduler or --work "
        "(docs/large-data.md); --out then names a .zarr, a .tif or a labels group inside an OME-Zarr image "
        "(<image>.zarr/labels/<name>), or a folder for <stem>.zarr")
    b.add_argument("--block-shape", type=int, nargs="+", default=None, metavar="N",
                   help="block in model-scale pixels, one size per spatial axis (default 48 128 128 in 3D)")
    b.add_argument("--workers", type=int, default=None,
                   help="processes of a local dask cluster (default: the number of cores; 0: this process)")
    b.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="address of a running dask scheduler (e.g. tcp://host:8786) to run the blocks on instead")
    b.add_argument("--level", type=int, default=0, help="OME-Zarr resolution level to segment (0: full resolution)")
    b.add_argument("--work", default=None, metavar="DIR",
                   help="folder in which the run keeps its intermediate results (.<out>.sparseseg-work, removed when "
                        "it finishes; about 43 bytes per voxel at the model's scale, for a few slabs of blocks at a "
                        "time), on storage every worker sees (default: beside --out); give it again to resume")
    b.add_argument("--quiet", action="store_true", help="no progress bars")


def blockwise_out(out: Path, src: Path, n_files: int) -> Path:
    """--out for a blockwise run: a .zarr / .tif path (or a path inside a .zarr, e.g. an OME-Zarr
    labels group) is the output itself; anything else is a folder for <stem>.zarr."""
    from .core.blockwise import TIFF_SUFFIXES, zarr_root

    if out.suffix.lower() in TIFF_SUFFIXES or zarr_root(out) is not None:
        if n_files > 1:
            raise SparseSegError(f"--out {out}: names one output but --images matched {n_files} files; "
                                 "give a folder to write <stem>.zarr for each")
        return out
    stem = src.name[: -len(".zarr")] if src.name.endswith(".zarr") else src.stem
    return out / f"{stem}.zarr"


def segment(args, files: list[Path]) -> int:
    """Segment each stack block by block (core/blockwise.py) with a progress bar per step."""
    import os

    from tqdm import tqdm

    from .core.blockwise import default_work, segment_blockwise

    workers = (os.cpu_count() or 1) if args.workers is None else args.workers
    if workers < 0:
        raise SparseSegError(f"--workers {workers}: expected 0 (this process) or a positive number of processes")
    if args.work is not None and Path(args.work).exists() and not Path(args.work).is_dir():
        raise SparseSegError(f"--work {args.work}: expected a folder (each run's work folder is made inside it)")
    for path in files:
        dst = blockwise_out(Path(args.out), path, len(files))
        work = default_work(dst) if args.work is None else Path(args.work) / default_work(dst).name
        bars: dict[str, tqdm] = {}

        def progress(step: str, done: int, total: int) -> None:
            if step not in bars:
                bars[step] = tqdm(total=total, desc=f"{step:8s}", unit="block", disable=args.quiet or None,
                                  dynamic_ncols=True)
            bars[step].n = done
            bars[step].refresh()

        try:
            res = segment_blockwise(
                args.model, path, dst, level=args.level, block_shape=args.block_shape, workers=workers,
                scheduler=args.scheduler, method=args.clustering, device=args.device, precision=args.precision,
                diameter=args.diameter, voxel_size=args.voxel_size, progress=progress, fg_threshold=args.fg_threshold,
                bias=args.bias, min_size=args.min_size, max_size=args.max_size, background=args.background,
                agreement=args.agreement, affinity_source=args.affinities, split_ratio=args.split_ratio,
                rescue=args.rescue, min_contrast=args.min_contrast, work=work)
        except KeyboardInterrupt:
            print(f"interrupted (Ctrl-C); finished blocks are kept in {work}: run the same command "
                  "again to resume", file=sys.stderr)
            return 130
        finally:
            for bar in bars.values():
                bar.close()
        secs = sum(res.seconds.values())
        steps = ", ".join(f"{k} {v:.1f} s" for k, v in res.seconds.items())
        print(f"{path} -> {dst}: {res.objects} objects in {secs:.2f} s ({res.method}, blockwise: {res.blocks} blocks, "
              f"{np.prod(res.shape) / max(secs, 1e-9):.3g} voxels/s; {steps})")
    return 0
