"""Blockwise segmentation of stacks larger than memory (zarr, OME-Zarr, TIFF).

:func:`segment_blockwise` reads the stack lazily, normalises it with percentiles of the whole
stack, predicts block by block with a halo into a float16 zarr store, clusters each block with a
halo by the same clustering the whole-image path runs (:func:`.segment.cluster`; slab by slab,
deleting the prediction no clustering needs any more, :mod:`.schedule`), stitches the
blocks' fragments into globally consistent ids (:mod:`.stitching`, python-elf's multicut) and
writes the labels block by block (zarr, an OME-Zarr ``labels/<name>`` group, or TIFF). The steps
are in :mod:`.blocks`.

Blocks run as tasks of a dask.distributed cluster: a LocalCluster of ``workers`` processes, an
existing scheduler (``scheduler="tcp://host:8786"``, e.g. one dask-jobqueue started on SLURM), or
in this process (``workers=0``). Tasks exchange only paths, so the work folder and the output must
be on storage every worker sees. Finished blocks are recorded in the work folder; running the same
command again after a stop or crash skips them. The work folder is removed after a successful run.

Scale: the zoom that brings the objects to the model's size is computed once for the whole stack
(from ``diameter``, else the model's, else the model's size estimate on the stack's centre); all
blocks run on the zoomed grid, resampled exactly as the whole-image path zooms (:mod:`.resample`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from . import blocks as B
from . import schedule as S
from .blocks import Job, ModelPredictor, ProgressFn, Volume
from .errors import SparseSegError

#: default block (model-scale pixels) per dimensionality. A worker's peak is its clustering of one
#: block + halo (about 450 bytes per voxel with the multicut): 48 x 128 x 128 keeps two workers and
#: the client under 3 GiB (docs/large-data.md), for ~6 % more time than 64 x 256 x 256
BLOCK = {2: (1024, 1024), 3: (48, 128, 128)}
#: clustering methods that run blockwise: graph methods on local pixel neighbourhoods
BLOCKWISE_METHODS = ("auto", "mws", "multicut")
#: what the CLI's --out may end with to be a single file (else a folder for <stem>.zarr)
TIFF_SUFFIXES = (".tif", ".tiff")
#: what zarr's default compression keeps of the float16 prediction store: 74-75 % on the
#: predictions of three suite models (ovule, gala, nuclei 3D; docs/large-data.md), with a margin
STORE_KEPT = 0.8


@dataclass
class BlockwiseResult:
    """What a blockwise run did: output path, objects, zoom, clustering, blocks, seconds per step."""

    out: Path
    objects: int
    zoom: float
    method: str
    blocks: int
    shape: tuple[int, ...]
    seconds: dict[str, float] = field(default_factory=dict)


def zarr_root(path: Path) -> Path | None:
    """The outermost ``*.zarr`` folder ``path`` is or lies in, if any."""
    for p in [*reversed(path.parents), path]:
        if p.suffix == ".zarr":
            return p
    return None


def default_work(out: Path) -> Path:
    """The work folder: beside the output (beside the whole zarr when the output lies inside one)."""
    root = zarr_root(out) or out
    return root.with_name(f".{root.name}.sparseseg-work" if root != out else f".{out.name}.sparseseg-work")


def free_bytes(path: Path) -> int:
    """Free space on the disk of ``path``."""
    return shutil.disk_usage(path).free


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.1f} MiB"


def check_scratch(job: Job, n_channels: int, plan: S.Plan, sample: list[int]) -> None:
    """Before any block: the most the prediction store will hold at once (``n_channels`` float16
    channels, compressed as :data:`STORE_KEPT`; the blocks ``sample`` first, then ``plan``'s waves,
    :mod:`.schedule`), less the blocks it holds already (a resumed run), must fit the free space of
    the work folder's disk, else a clear error instead of a disk that fills part way through."""
    done = {p.stem for p in job.path("done", "predict").glob("*.json")}
    size = [int(np.prod([r.stop - r.start for r in B.block_region(i, job.scaled, job.block)]))
            for i in range(job.n_blocks())]
    held = set(B.stored(job))
    now = held | {i for i in sample if str(i) not in done}
    peak = sum(size[i] for i in now)
    for wave in plan.waves:
        now |= {i for i in wave.predict if str(i) not in done}
        peak = max(peak, sum(size[i] for i in now))
        now -= set(wave.free)
    stored_now = sum(size[i] for i in held)
    need, free = (peak - stored_now) * n_channels * 2 * STORE_KEPT, free_bytes(Path(job.work))
    if free < need:
        what = (f"{peak / 1e6:.1f} M voxels stored at once, a few slabs of blocks"
                + (f", {stored_now / 1e6:.1f} M of them stored already" if stored_now else "")
                if plan.rolling else f"{(peak - stored_now) / 1e6:.1f} M voxels left")
        raise SparseSegError(
            f"{job.work}: the prediction store needs about {_size(need)} more ({n_channels} float16 channels per voxel "
            f"at the model's scale, {what}), but only {_size(free)} are free there; free space, give a work folder on "
            "a larger disk (--work DIR, on storage every worker sees; work= in Python) or segment a coarser "
            "resolution level (--level)")


def _zoom(model_path: str, config: dict, volume: Volume, bounds, diameter: float | None, device: str) -> float:
    from . import io, scale
    from .prediction import resolve_zoom

    if diameter is not None:
        return scale.zoom_for(diameter, len(volume.shape))
    cfg = config.get("scale")
    if not (isinstance(cfg, dict) and cfg.get("mixed") and cfg.get("size_model")):
        return scale.model_zoom(config)
    # a model for mixed object sizes estimates the zoom: once, on the centre of the stack
    from .checkpoint import load

    window = (32, 512, 512)[-len(volume.shape):]
    region = tuple(slice(max(0, s // 2 - w // 2), min(s, s // 2 + w // 2)) for s, w in zip(volume.shape, window))
    from .device import resolve_device

    x = io.normalize(volume.read(region), bounds=bounds)
    dev = resolve_device(device)
    return resolve_zoom(load(model_path, device=dev), x, None, dev)


def _z_zoom(zoom: float, voxel_size, image: Path, level: int, config: dict, ndim: int) -> float:
    """The stack's z zoom: from ``voxel_size``, else the file's, else the model's (scale.stack_z_zoom)."""
    from . import io, scale

    if voxel_size is None and ndim == 3:
        voxel_size = io.voxel_size(image, level)
    return scale.stack_z_zoom(zoom, voxel_size, config, ndim)


def _fingerprint(model: str, settings: dict) -> dict:
    from .checkpoint import read_config

    files = read_config(model).get("files", {})
    return {**settings, "model_files": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()}


def _make_array(path: Path, shape, chunks, dtype, **kwargs):
    import zarr

    if path.exists():
        arr = zarr.open_array(str(path), mode="r+")
        if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
            raise SparseSegError(f"{path}: exists with shape {arr.shape} and type {arr.dtype}, expected "
                                 f"{tuple(shape)} {np.dtype(dtype)}; delete it or write elsewhere")
        return arr
    return zarr.create_array(str(path), shape=tuple(shape), chunks=tuple(chunks), dtype=dtype, fill_value=0, **kwargs)


def segment_blockwise(
    model: str | Path,
    image: str | Path,
    out: str | Path,
    *,
    level: int = 0,
    block_shape: tuple[int, ...] | None = None,
    workers: int = 0,
    scheduler: str | None = None,
    method: str = "auto",
    device: str = "cpu",
    precision: str = "auto",
    diameter: float | None = None,
    voxel_size=None,
    predictor: Any = None,
    work: str | Path | None = None,
    keep_work: bool = False,
    progress: ProgressFn | None = None,
    fg_threshold: float | None = None,
    **overrides,
) -> BlockwiseResult:
    """Segment the stack ``image`` (zarr / OME-Zarr at ``level`` / TIFF) block by block with the
    model folder ``model`` into ``out`` (a zarr array; an OME-Zarr labels image when ``out`` is
    ``<image>.zarr/labels/<name>``; a TIFF when it ends with .tif).

    ``block_shape``: block of the model-scale grid (default :data:`BLOCK`). ``workers``: processes
    of a LocalCluster (0: this process); ``scheduler``: address of a running dask scheduler instead.
    ``method``: one of :data:`BLOCKWISE_METHODS`. ``predictor``: replaces the model's network (any
    :class:`.blocks.Predictor`). ``overrides``: bias, min_size, max_size (image pixels), background
    ("auto", "foreground", "none"), affinity_source, rescue, min_contrast, as for
    :func:`.segment.cluster` (both look at each block with its halo, against the stack's intensity
    spread). ``voxel_size``
    (z, y, x): the stack's (default: what the file states, else the model's training voxel size).
    ``progress(step, done, total)`` is called after each block of each step (predict and cluster
    advance together, slab by slab). ``work``: the work folder (default: beside ``out``);
    ``keep_work``: keep it, with the prediction of every block (then predicted before any is
    clustered, as for stacks of a few slabs: :func:`.schedule.slab_plan`).
    """
    import zarr

    from .checkpoint import read_config
    from .segment import (DENSE_BACKGROUND, faint_fraction, foreground_threshold, is_dense, rescue_factor, resolve,
                          resolve_background)

    if int(zarr.__version__.split(".")[0]) < 3:
        raise SparseSegError(f"blockwise segmentation needs zarr >= 3 (installed: {zarr.__version__}); "
                             "pip install -U 'zarr>=3'")
    model, image, out = str(model), Path(image), Path(out)
    config = read_config(model)
    ndim, channels = int(config["network"]["ndim"]), int(config["network"]["in_channels"])
    if method not in BLOCKWISE_METHODS:
        raise SparseSegError(f"clustering {method!r}: blockwise segmentation supports "
                             f"{', '.join(BLOCKWISE_METHODS)} (graph methods that work on local neighbourhoods)")
    background_arg = overrides.get("background")
    background = resolve_background(config, overrides.pop("background", None))
    if background == "largest":
        raise SparseSegError("background 'largest': blockwise segmentation cannot tell the largest segment of a "
                             "whole stack block by block; use a model with a foreground head (background "
                             "'foreground') or background 'none'")
    if overrides.pop("agreement", None):
        raise SparseSegError("agreement filtering is not available blockwise (it needs the EMA network's "
                             "prediction of every block as well); leave --agreement unset")
    user_min, user_max = overrides.pop("min_size", None), overrides.pop("max_size", None)
    user_rescue, user_faint = overrides.pop("rescue", None), overrides.pop("min_contrast", None)
    factor = rescue_factor(config, user_rescue)  # a bad one is an error even where it would not be used
    faint = faint_fraction(config, user_faint)
    volume = B.open_volume(image, ndim, channels, level)
    block = B.check_block_shape(block_shape or BLOCK[ndim], ndim, f"{image}: block shape")
    tiff = out.suffix.lower() in TIFF_SUFFIXES
    ome_axes = None if tiff else _check_output(out, image, level, len(volume.shape))  # before any block
    for existing in (out, out / "0"):  # a plain array, or an OME-Zarr labels image's level 0
        if existing.exists() and not tiff:
            try:
                shape = zarr.open_array(str(existing), mode="r").shape
            except Exception:
                continue
            if shape != volume.shape:
                raise SparseSegError(f"{existing}: exists with shape {shape}, the labels of {image} have shape "
                                     f"{volume.shape}; delete it or write elsewhere")
    work = Path(work) if work is not None else default_work(out)
    settings = {"image": str(image.resolve()), "level": level, "model": str(Path(model).resolve()),
                "block": list(block), "method": method, "background": background, "diameter": diameter,
                "voxel_size": None if voxel_size is None else [float(v) for v in voxel_size],
                "fg_threshold": fg_threshold, "overrides": overrides, "min_size": user_min, "max_size": user_max,
                "rescue": user_rescue, "min_contrast": user_faint, "out": str(out.resolve())}
    settings = _fingerprint(model, settings)
    record = work / "job.json"
    if record.exists():
        saved = json.loads(record.read_text())
        if saved["settings"] != json.loads(json.dumps(settings)):
            raise SparseSegError(f"{work}: holds an unfinished run with other settings (input, model, block shape or "
                                 f"clustering); run it again with those, or delete {work} to start over")
        bounds, zoom = np.asarray(saved["bounds"]), float(saved["zoom"])
        z_zoom = float(saved.get("z_zoom", 1.0))
    else:
        bounds = B.sample_bounds(volume, **{k: config["normalization"][k] for k in ("low", "high")})
        zoom = _zoom(model, config, volume, bounds, diameter, device)
        z_zoom = _z_zoom(zoom, voxel_size, image, level, config, ndim)
        work.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"settings": settings, "bounds": bounds.tolist(), "zoom": zoom, "z_zoom": z_zoom}))
    scaled = B.scaled_shape(volume.shape, zoom, z_zoom)
    block = tuple(min(b, s) for b, s in zip(block, scaled))
    predictor = predictor or ModelPredictor(model, device, precision)
    thr = fg_threshold if fg_threshold is not None else foreground_threshold(config)
    halo = B.cluster_halo(config, ndim)
    cluster_overrides = dict(overrides, background=background, min_size=0, agreement=0)
    _, opts = resolve(config, "mws", zoom, z_zoom, background=background, min_size=user_min, max_size=user_max)
    job = Job(volume, str(work), predictor, bounds.tolist(), zoom, block, config, method, cluster_overrides, thr,
              halo, int(opts["min_size"]), opts.get("max_size"), z_zoom)
    cfg = predictor.config
    n_channels = cfg["out_channels"] + int(bool(cfg.get("foreground"))) + int(cfg.get("affinities", 0))
    ids = list(range(job.n_blocks()))
    seconds: dict[str, float] = {}
    client = S.client(workers, scheduler)
    try:
        plan = S.slab_plan(B.grid(scaled, block), block, halo, keep=keep_work,
                           min_blocks=S.TASKS_PER_THREAD * S.threads(client))
        # "auto" decides the clustering once for the stack, from the foreground of every block, or of a
        # slab's worth of blocks spread over it when the prediction of every block is never stored at once
        decide = method == "auto" and background == "foreground" and thr is not None
        sample = sorted({int(round(v)) for v in np.linspace(0, len(ids) - 1, len(plan.waves[0].predict))}
                        ) if decide and plan.rolling else []
        check_scratch(job, n_channels, plan, sample)
        _make_array(work / "prediction.zarr", (n_channels, *scaled), (n_channels, *B.inner_chunks(block)), "float16",
                    shards=(n_channels, *block))
        _make_array(work / "fragments.zarr", scaled, block, "uint32")
        t = time.perf_counter()
        steps = S.Progress(progress, {"predict": len(ids), "cluster": len(ids)})
        predict, cluster_ = partial(B.predict_block, job), partial(B.cluster_block, job)
        first = sample if plan.rolling else plan.waves[0].predict
        stats = S.execute([("predict", predict, first)], client, steps)["predict"]
        if not plan.rolling:
            seconds["predict"], t = time.perf_counter() - t, time.perf_counter()
        if method == "auto":  # as the whole-image path decides per image
            if background == "none":
                method = "multicut"
            elif decide:
                frac = sum(s["foreground"] for s in stats) / max(1, sum(s["voxels"] for s in stats))
                method = "multicut" if is_dense(frac, config.get("annotation")) else "mws"
                if method == "multicut" and background_arg in (None, "auto"):
                    job.overrides = dict(job.overrides, background=DENSE_BACKGROUND)
            else:
                method = "mws"
        job.method = method
        by_head = method == "mws" and background == "foreground" and background_arg in (None, "auto")
        if by_head and (factor > 0 or faint > 0):
            # as the whole-image path: objects the head dropped, and faint ones it kept, when "auto"
            # let the head decide
            job.rescue, job.faint, job.image_spread = factor, faint, _normalized_spread(volume, bounds)
        for wave in plan.waves[0 if plan.rolling else 1:]:
            S.execute([("predict", predict, wave.predict), ("cluster", cluster_, wave.cluster)], client, steps)
            B.free_prediction(job, wave.free)
        seconds["predict+cluster" if plan.rolling else "cluster"] = time.perf_counter() - t
        counts = [B.done(job, "cluster", i)["fragments"] for i in ids]
        (work / "counts.json").write_text(json.dumps(counts))
        t = time.perf_counter()
        if progress is not None:
            progress("stitch", 0, 1)
        lookup = B.relabel(job, counts)
        if progress is not None:
            progress("stitch", 1, 1)
        seconds["stitch"] = time.perf_counter() - t
        n_objects = int(lookup.max()) if lookup.size else 0
        dtype = "uint32" if n_objects < 2**32 - 1 else "uint64"
        target = work / "labels.zarr" if tiff else out
        arr_path = _create_output(target, volume, block, dtype, image, ome_axes)
        t = time.perf_counter()
        out_ids = list(range(int(np.prod(B.grid(volume.shape, block)))))
        S.execute([("write", partial(B.write_block, job, str(arr_path)), out_ids)], client,
                  S.Progress(progress, {"write": len(out_ids)}))
        if tiff:
            _to_tiff(zarr.open_array(str(arr_path), mode="r"), out)
        seconds["write"] = time.perf_counter() - t
    finally:
        if client is not None:
            S.close(client, scheduler)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return BlockwiseResult(out, n_objects, zoom, method, len(ids), volume.shape, seconds)


def _normalized_spread(volume: Volume, bounds: np.ndarray) -> list[float]:
    """Each channel's 1-99 % spread of the whole stack after normalisation with ``bounds`` (what
    :func:`.rescue.image_spread` gives for a whole image): every block's contrasts are measured
    against it, not against the block's own."""
    spread = np.diff(B.sample_bounds(volume, 1.0, 99.0), axis=1)[:, 0]
    return (np.maximum(spread, 1e-6) / np.maximum(np.diff(np.asarray(bounds), axis=1)[:, 0], 1e-6)).tolist()


# -- output ---------------------------------------------------------------------------------------
def _ome_axes(image: Path, level: int, ndim: int) -> tuple[list, list] | None:
    """The spatial axes and scale of the OME-Zarr image ``image`` at ``level``, or None."""
    import zarr

    from .io import _multiscales

    try:
        ms = _multiscales(dict(zarr.open_group(str(image), mode="r").attrs))
    except Exception:
        return None
    if not ms:
        return None
    axes = ms[0].get("axes") or [{"name": n, "type": "space"} for n in "zyx"[-ndim:]]
    axes = [a if isinstance(a, dict) else {"name": a} for a in axes]
    scale = [1.0] * len(axes)
    for t in ms[0]["datasets"][level].get("coordinateTransformations", []):
        if t.get("type") == "scale":
            scale = list(t["scale"])
    keep = [i for i, a in enumerate(axes) if a.get("type", "space") == "space" or a.get("name") in "zyx"][-ndim:]
    return [axes[i] for i in keep], [scale[i] for i in keep]


def _check_output(out: Path, image: Path, level: int, ndim: int) -> tuple | None:
    """Refuse, before any block is predicted, an output that cannot be written: a labels image
    (``<root>.zarr/.../labels/<name>``) of another image than the input, or in an input that is
    not an OME-Zarr image. Returns the image's OME axes for a labels image, None for a plain output."""
    root = zarr_root(out)
    if out.parent.name != "labels" or root is None or root == out:
        return None
    if root.resolve() != image.resolve():
        raise SparseSegError(f"--out {out}: a labels image belongs to the image it labels; the input is {image}")
    axes = _ome_axes(image, level, ndim)
    if axes is None:
        raise SparseSegError(f"--out {out}: {image} is not an OME-Zarr image, so it has no labels group")
    return axes


def _create_output(out: Path, volume: Volume, block, dtype: str, image: Path, axes: tuple | None) -> Path:
    """Create the output array; with ``axes`` (:func:`_check_output`: ``out`` is
    ``<image>.zarr/labels/<name>``) an OME-Zarr labels image (NGFF 0.4 or 0.5, as the image) listed
    in the labels group. Returns the array's path."""
    import zarr

    chunks = tuple(min(b, s) for b, s in zip(block, volume.shape))
    if axes is None:
        _make_array(out, volume.shape, chunks, dtype)
        return out
    fmt = zarr.open_group(str(image), mode="r").metadata.zarr_format
    labels = zarr.open_group(str(out.parent), mode="a", zarr_format=fmt)
    group = zarr.open_group(str(out), mode="a", zarr_format=fmt)
    multiscales = [{"version": "0.4" if fmt == 2 else "0.5", "name": out.name, "axes": axes[0],
                    "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": axes[1]}]}]}]
    meta = {"multiscales": multiscales, "image-label": {"version": multiscales[0]["version"],
                                                        "source": {"image": "../../"}}}
    names = set((labels.attrs.get("labels") or (labels.attrs.get("ome") or {}).get("labels") or [])) | {out.name}
    if fmt == 2:
        group.attrs.update(meta)
        labels.attrs["labels"] = sorted(names)
    else:
        group.attrs["ome"] = {"version": "0.5", **{k: v for k, v in meta.items()}}
        for m in group.attrs["ome"]["multiscales"]:
            m.pop("version", None)
        labels.attrs["ome"] = {"version": "0.5", "labels": sorted(names)}
    # NGFF 0.4 (zarr v2) wants "/" between chunk indices
    extra = {"chunk_key_encoding": {"name": "v2", "separator": "/"}} if fmt == 2 else {}
    _make_array(out / "0", volume.shape, chunks, dtype, zarr_format=fmt, **extra)
    return out / "0"


def _to_tiff(arr, out: Path) -> None:
    """Stream a label array into a compressed TIFF, one plane in memory at a time."""
    import os

    import tifffile

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    planes = (np.asarray(arr[i]) for i in range(arr.shape[0])) if arr.ndim == 3 else iter([np.asarray(arr[:])])
    tifffile.imwrite(tmp, data=planes, shape=arr.shape, dtype=arr.dtype, compression="zlib",
                     photometric="minisblack", bigtiff=arr.nbytes > 2**31)
    os.replace(tmp, out)
