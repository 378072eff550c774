"""The block tasks of :mod:`.blockwise` and what they share: lazy stacks, the grid of blocks, the job.

Tasks exchange nothing but paths: they read and write zarr stores and small files in the work
folder. A finished block leaves a marker ``done/<step>/<id>.json`` there, and a task whose marker
exists returns at once, so a stopped run started again skips it. Steps:

1. ``predict``: image block + :data:`PREDICT_HALO` -> normalised with the stack's percentiles ->
   zoomed to the model's scale (:mod:`.resample`) -> the predictor -> halo cropped away ->
   float16 channels in ``prediction.zarr`` (coordinate channels stored without their coordinates,
   which are added back exactly when read: float16 could not hold large coordinates).
2. ``cluster``: prediction block + a halo as long as the longest offset -> the clustering the
   whole-image path runs (:func:`.segment.cluster`; the objects the foreground head dropped are
   looked for in the image block, :mod:`.rescue`) -> local ids in ``fragments.zarr``, sizes and
   the ids on the faces shared with neighbouring blocks in ``blocks/<id>.npz``.
3. ``stitch`` (in the caller): fragments of neighbouring blocks that overlap on their shared faces
   are merged by a multicut (elf), then size limits apply to whole objects -> ``lookup.npy``.
4. ``write``: fragments -> global ids, resized to the image grid, into the output zarr.

Steps 1 and 2 go slab by slab (:mod:`.schedule`): a block's prediction is deleted
(:func:`free_prediction`) once every clustering that reads it is done.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from . import io
from .errors import SparseSegError
from .prediction import HALO
from .resample import scaled_shape, zoom_read, nearest_index

#: context read around a block for prediction: what the whole-image path puts around its tiles
#: (8, 32, 32) in 3D; the U-Net's output beyond that depends only faintly on more context
PREDICT_HALO = HALO
#: width of the band on each side of a block face where neighbouring blocks' objects are matched
FACE = 4
#: the prediction store keeps each block in one file (a zarr shard) of inner chunks about this
#: fraction of the block along each axis (at most :data:`INNER_MAX` voxels): a clustering reads its
#: block's halo from the neighbouring blocks' files without decompressing them whole. Against one
#: chunk per block (benchmarks/store_layout.py, docs/large-data.md): an interior 48 x 128 x 128
#: block with its (4, 27, 27) halo read in 1.16 s instead of 2.00 s, 27 blocks written in 7.4 s
#: instead of 9.9 s, 6 % more disk
INNER_FRACTION = 1 / 4
INNER_MAX = 64

ProgressFn = Callable[[str, int, int], None]


class Predictor(Protocol):
    """Anything that turns a normalised (C, *S) block at the model's scale into the raw network
    output (channels, *S): ``offset`` and ``full_shape`` place the block in the whole (scaled)
    image. ``config`` is the network's config (out_channels, foreground, affinities,
    coord_scale, ndim). It must pickle (it travels to the workers)."""

    config: dict

    def __call__(self, x: np.ndarray, offset: tuple[int, ...], full_shape: tuple[int, ...]) -> np.ndarray: ...


_NETS: dict = {}


@dataclass
class ModelPredictor:
    """The predictor of a model folder (any method): loads the network once per worker process.

    A block (with its halo) is predicted in one pass by default: blocks are already sized for
    memory, and tiling them again (``tile_shape``) would predict every tile's halo once more."""

    model: str
    device: str = "cpu"
    precision: str = "auto"
    tile_shape: tuple[int, ...] | None = None

    def __post_init__(self):
        from .checkpoint import read_config

        self.config = dict(read_config(self.model)["network"])

    def __call__(self, x, offset, full_shape):
        from .checkpoint import load
        from .device import resolve_device, resolve_precision
        from .prediction import predict_normalized

        key = (self.model, self.device)
        if key not in _NETS:
            dev = resolve_device(self.device)
            _NETS[key] = (load(self.model).net.to(dev).eval(), dev)
        net, dev = _NETS[key]
        return predict_normalized(net, x, dev, resolve_precision(self.precision, dev), self.tile_shape or x.shape[1:],
                                  offset=offset, full_shape=full_shape)


@dataclass(frozen=True)
class Volume:
    """A lazily read stack: ``read(region)`` -> float32 (C, *region) for a region of its
    ``shape`` (spatial axes). Holds only the path, so it travels to workers."""

    path: str
    level: int
    shape: tuple[int, ...]
    channels: int
    channel_axis: int | None  # in the array after dropping ``drop`` leading singleton axes
    drop: int = 0

    def array(self):
        return io.open_lazy(self.path, self.level)

    def read(self, region: tuple[slice, ...], array=None) -> np.ndarray:
        arr = self.array() if array is None else array
        lead = (0,) * self.drop
        if self.channel_axis is None:
            return np.asarray(arr[lead + region], np.float32)[None]
        if self.channel_axis == 0:
            return np.asarray(arr[lead + (slice(None),) + region], np.float32)
        return np.moveaxis(np.asarray(arr[lead + region + (slice(None),)], np.float32), -1, 0)


@dataclass(frozen=True)
class ArrayVolume(Volume):
    """A :class:`Volume` over an array that is already open (a napari layer's dask or zarr array):
    read region by region like a file, but it stays in this process (it has no path to travel by)."""

    data: Any = None

    def array(self):
        return self.data


def open_volume(path: str | os.PathLike, ndim: int, channels: int, level: int = 0) -> Volume:
    """Describe the stack at ``path`` for a model of ``ndim`` spatial axes and ``channels``
    channels (channel axis as :func:`.io.to_channels_first` reads it; leading axes of length 1,
    such as OME-Zarr's t and c, are dropped)."""
    arr = io.open_lazy(path, level)
    shape, drop = tuple(arr.shape), 0
    while len(shape) > ndim + 1 and shape[0] == 1:
        shape, drop = shape[1:], drop + 1
    if len(shape) == ndim:
        axis = None
    elif len(shape) == ndim + 1 and shape[-1] <= 4 and shape[-1] == channels:
        axis = len(shape) - 1
    elif len(shape) == ndim + 1 and shape[0] == channels:
        axis = 0
    else:
        raise SparseSegError(f"{path}: shape {tuple(arr.shape)} does not fit the model (expected {ndim} spatial "
                             f"axes, with {channels} channel(s){' optional' if channels == 1 else ''})")
    if axis is None and channels != 1:
        raise SparseSegError(f"{path}: has 1 channel, the model expects {channels}")
    spatial = tuple(s for i, s in enumerate(shape) if i != axis)
    return Volume(str(path), level, spatial, channels, axis, drop)


def check_block_shape(block_shape, ndim: int, what: str = "block shape") -> tuple[int, ...]:
    """A block shape with one positive size per spatial axis, or a clear error."""
    block = tuple(int(b) for b in block_shape)
    if len(block) != ndim:
        raise SparseSegError(f"{what} {block}: expected {ndim} sizes (one per spatial axis of a {ndim}D model)")
    if min(block) < 1:
        raise SparseSegError(f"{what} {block}: every size must be a positive number of pixels")
    return block


def sample_bounds(volume: Volume, low: float = 1.0, high: float = 99.8, max_voxels: int = 1 << 22,
                  seed: int = 0) -> np.ndarray:
    """Per-channel (low, high) percentiles of the whole stack (:func:`.io.percentile_bounds`),
    from all of it when it has at most ``max_voxels`` voxels, else from up to 64 random regions
    spread over it (never per block: every block is normalised alike)."""
    arr = volume.array()
    shape = volume.shape
    n = int(np.prod(shape))
    if n <= max_voxels:
        return io.percentile_bounds(volume.read(tuple(slice(0, s) for s in shape), arr), low, high)
    rng = np.random.default_rng(seed)
    k = 64
    side = [max(1, min(s, int(round((max_voxels / k) ** (1 / len(shape)))))) for s in shape]
    if len(shape) == 3:  # thin slabs: one z plane reads fewer chunks than a cube
        side = [1] + [max(1, min(s, int((max_voxels / k) ** 0.5))) for s in shape[1:]]
    parts = []
    for _ in range(k):
        start = [int(rng.integers(0, s - w + 1)) for s, w in zip(shape, side)]
        region = tuple(slice(a, a + w) for a, w in zip(start, side))
        parts.append(volume.read(region, arr).reshape(volume.channels, -1))
    return io.percentile_bounds(np.concatenate(parts, axis=1), low, high)


# -- the grid of blocks ---------------------------------------------------------------------------
def grid(shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, ...]:
    """Blocks per axis."""
    return tuple(-(-s // b) for s, b in zip(shape, block))


def block_region(i: int, shape, block) -> tuple[slice, ...]:
    """The region of block ``i`` (C order over :func:`grid`)."""
    idx = np.unravel_index(i, grid(shape, block))
    return tuple(slice(int(k) * b, min((int(k) + 1) * b, s)) for k, b, s in zip(idx, block, shape))


def cluster_halo(config: dict, ndim: int) -> tuple[int, ...]:
    """The halo a block's clustering reads per axis: the model's longest offset along it (at least 1)."""
    offsets = config.get("offsets") or []
    return tuple(max([abs(o[a]) for o in offsets] + [1]) for a in range(ndim))


def inner_chunks(block: tuple[int, ...]) -> tuple[int, ...]:
    """The prediction store's inner chunk per axis: the smallest divisor of the block's length that
    reaches :data:`INNER_FRACTION` of it (or :data:`INNER_MAX`), so that the chunks tile the shard."""
    def one(b: int) -> int:
        target = min(INNER_MAX, -(-b // int(round(1 / INNER_FRACTION))))
        return next(d for d in range(max(1, target), b + 1) if b % d == 0)

    return tuple(one(int(b)) for b in block)


def grow(region: tuple[slice, ...], halo, shape) -> tuple[slice, ...]:
    return tuple(slice(max(0, r.start - h), min(s, r.stop + h)) for r, h, s in zip(region, halo, shape))


def local(region: tuple[slice, ...], outer: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(r.start - o.start, r.stop - o.start) for r, o in zip(region, outer))


def coordinates(config: dict, region: tuple[slice, ...], full_shape) -> np.ndarray | None:
    """The coordinate channels a network with ``config`` adds to its first embeddings over
    ``region`` of an image of ``full_shape`` (as :meth:`.network.UNet.coordinates`), or None."""
    scale = float(config.get("coord_scale") or 0.0)
    if not scale:
        return None
    axes = [(np.arange(r.start, r.stop, dtype=np.float32) - s // 2) * np.float32(scale)
            for r, s in zip(region, full_shape)]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


# -- the job every task receives ------------------------------------------------------------------
@dataclass
class Job:
    """Everything a block task needs (pickled to the workers); ``work`` is the work folder."""

    volume: Volume
    work: str
    predictor: Any
    bounds: list
    zoom: float
    block: tuple[int, ...]
    config: dict
    method: str = "mws"
    overrides: dict = field(default_factory=dict)
    fg_threshold: float | None = None
    cluster_halo: tuple[int, ...] = ()
    min_size: int = 0
    max_size: int | None = None
    z_zoom: float = 1.0
    #: > 0: keep the objects the foreground head dropped (:mod:`.rescue`; the factor) / drop the
    #: segments fainter than this fraction of the painted contrast (:func:`.rescue.drop_faint`),
    #: both measured against the stack's normalised spread ``image_spread`` (per channel)
    rescue: float = 0.0
    faint: float = 0.0
    image_spread: list | None = None

    @property
    def ndim(self) -> int:
        return len(self.volume.shape)

    @property
    def scaled(self) -> tuple[int, ...]:
        return scaled_shape(self.volume.shape, self.zoom, self.z_zoom)

    def n_blocks(self, shape=None) -> int:
        return int(np.prod(grid(shape or self.scaled, self.block)))

    def path(self, *parts) -> Path:
        return Path(self.work, *parts)


def _marker(job: Job, stage: str, i: int) -> Path:
    return job.path("done", stage, f"{i}.json")


def mark(job: Job, stage: str, i: int, info: dict) -> None:
    """Record that block ``i`` finished ``stage`` with ``info`` (written whole: a crash leaves none or all)."""
    path = _marker(job, stage, i)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


def done(job: Job, stage: str, i: int) -> dict | None:
    """What block ``i`` recorded when it finished ``stage``, or None if it has not."""
    path = _marker(job, stage, i)
    return json.loads(path.read_text()) if path.exists() else None


def predict_block(job: Job, i: int) -> dict:
    """Step 1 for block ``i``; returns (and records) its voxel and foreground counts."""
    import zarr

    if (info := done(job, "predict", i)) is not None:
        return info
    full = job.scaled
    inner = block_region(i, full, job.block)
    outer = grow(inner, PREDICT_HALO[job.ndim], full)
    x = zoom_read(job.volume, outer, job.zoom, job.z_zoom)
    x = io.normalize(x, bounds=np.asarray(job.bounds))
    raw = np.asarray(job.predictor(x, tuple(r.start for r in outer), full), np.float32)
    del x
    from .prediction import split_channels

    # crop the halo away first (a view) and fill one float16 array: no float32 copy of the block
    emb, fg, aff = split_channels(raw[(slice(None),) + local(inner, outer)], job.predictor.config)
    parts = [emb] + ([fg[None]] if fg is not None else []) + ([aff] if aff is not None else [])
    out = np.concatenate(parts, dtype=np.float16)
    grid_ = coordinates(job.predictor.config, inner, full)
    if grid_ is not None:  # stored without coordinates (float16 could not hold large ones)
        out[: job.ndim] = emb[: job.ndim] - grid_
    del raw, emb, parts, aff
    zarr.open_array(str(job.path("prediction.zarr")), mode="r+")[(slice(None),) + inner] = out
    n_fg = 0 if fg is None or job.fg_threshold is None else int(np.count_nonzero(fg >= job.fg_threshold))
    info = {"voxels": int(np.prod(out.shape[1:])), "foreground": n_fg}
    mark(job, "predict", i, info)
    return info


def _shard_files(job: Job, ids) -> dict[int, Path]:
    """The file of each block of ``ids`` in the prediction store (a shard per block), as zarr names it."""
    import zarr

    root = job.path("prediction.zarr")
    meta = zarr.open_array(str(root), mode="r").metadata
    return {i: root / meta.encode_chunk_key((0, *np.unravel_index(i, grid(job.scaled, job.block)))) for i in ids}


def free_prediction(job: Job, ids: list[int]) -> None:
    """Delete the stored prediction of blocks ``ids`` (no clustering reads it any more): each block
    is one file of the store (a shard), removed as zarr names it; reading it gives zeros after."""
    if not ids:
        return
    for path in _shard_files(job, ids).values():
        path.unlink(missing_ok=True)


def stored(job: Job) -> list[int]:
    """The blocks whose prediction the store holds now (predicted, not deleted); none before it exists."""
    if not job.path("prediction.zarr", "zarr.json").exists():
        return []
    return [i for i, path in _shard_files(job, range(job.n_blocks())).items() if path.exists()]


def read_prediction(job: Job, region: tuple[slice, ...]):
    """A :class:`.prediction.Prediction` of ``region`` from the store (coordinates added back)."""
    import zarr

    from .prediction import Prediction

    cfg = job.predictor.config
    d, has_fg, k = cfg["out_channels"], int(bool(cfg.get("foreground"))), int(cfg.get("affinities", 0))
    p = np.asarray(zarr.open_array(str(job.path("prediction.zarr")), mode="r")[(slice(None),) + region], np.float32)
    emb = p[:d]
    grid_ = coordinates(cfg, region, job.scaled)
    if grid_ is not None:
        emb[: job.ndim] += grid_
    shape = tuple(r.stop - r.start for r in region)
    return Prediction(emb, p[d] if has_fg else None, job.zoom, shape, p[d + has_fg:] if k else None, job.z_zoom)


def cluster_block(job: Job, i: int) -> dict:
    """Step 2 for block ``i``: cluster it with its halo; returns (and records) its fragment count."""
    from .checkpoint import Model
    from .agglomeration import image_share
    from .segment import Embedded, cluster, drop_faint_segments, keep_dropped

    if (info := done(job, "cluster", i)) is not None:
        return info
    full = job.scaled
    inner = block_region(i, full, job.block)
    outer = grow(inner, job.cluster_halo, full)
    pred = read_prediction(job, outer)
    model = Model(net=None, config=job.config)
    if job.method == "multicut" and image_share(job.config.get("annotation")) > 0:
        # the multicut's superpixels and edge costs also follow the image's own borders (agglomeration)
        pred.image = io.normalize(zoom_read(job.volume, outer, job.zoom, job.z_zoom), bounds=np.asarray(job.bounds))
    seg = cluster(model, Embedded(pred), job.method, fg_threshold=job.fg_threshold, **dict(job.overrides, rescue=0))
    if job.rescue > 0 or job.faint > 0:
        # the objects the head dropped, looked for in the block with its halo as the network saw it;
        # the block's pieces under the size limit (dropped after stitching) give way, as on the whole image
        if pred.image is None:
            pred.image = io.normalize(zoom_read(job.volume, outer, job.zoom, job.z_zoom), bounds=np.asarray(job.bounds))
        pred.image_spread = np.asarray(job.image_spread, np.float64)
        seg = keep_dropped(model, pred, seg, job.rescue, give_way=job.min_size, **job.overrides)
        seg = drop_faint_segments(model, pred, seg, job.faint)
    return store_fragments(job, i, seg, inner, outer)


def store_fragments(job: Job, i: int, seg: np.ndarray, inner: tuple[slice, ...], outer: tuple[slice, ...]) -> dict:
    """Record the segmentation ``seg`` of block ``i``'s region ``outer`` (the block ``inner`` with its
    halo) as the block's fragments: local ids in ``fragments.zarr``, sizes and face bands in
    ``blocks/<i>.npz``, the ``cluster`` marker. Returns (and records) the fragment count."""
    import zarr

    full = job.scaled
    inside = local(inner, outer)
    # ids present inside the block first (1..n): those are the block's fragments; ids met only in
    # the halo follow (n+1..) and take part in no merge
    ids_in = np.unique(seg[inside])
    ids_in = ids_in[ids_in > 0]
    ids_out = np.setdiff1d(np.unique(seg), np.concatenate([[0], ids_in]))
    lut = np.zeros(int(seg.max()) + 1, np.uint32)
    lut[ids_in] = np.arange(1, ids_in.size + 1)
    lut[ids_out] = np.arange(ids_in.size + 1, ids_in.size + ids_out.size + 1)
    seg = lut[seg]
    zarr.open_array(str(job.path("fragments.zarr")), mode="r+")[inner] = seg[inside]
    faces = {}
    for ax in range(job.ndim):
        for side, b in (("lower", inner[ax].start), ("upper", inner[ax].stop)):
            if b in (0, full[ax]):
                continue
            band = slice(max(0, b - FACE), min(full[ax], b + FACE))
            sl = tuple(band if a == ax else outer[a] for a in range(job.ndim))
            faces[f"{side}{ax}"] = seg[local(sl, outer)]
    sizes = np.bincount(seg[inside].ravel(), minlength=ids_in.size + 1)[1 : ids_in.size + 1]
    path = job.path("blocks", f"{i}.npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{i}.tmp.npz")
    np.savez_compressed(tmp, sizes=sizes.astype(np.int64), **faces)
    os.replace(tmp, path)
    info = {"fragments": int(ids_in.size)}
    mark(job, "cluster", i, info)
    return info


def relabel(job: Job, counts: list[int]) -> np.ndarray:
    """Step 3: the lookup table global fragment id -> final object id: stitched
    (:func:`.stitching.stitch`), size limits (model-scale pixels, as the whole-image path applies
    them) on whole objects, ids consecutive. Recorded in the work folder."""
    from .stitching import stitch

    path = job.path("lookup.npy")
    if path.exists():
        return np.load(path)
    labels = stitch(job.path("blocks"), grid(job.scaled, job.block), counts).astype(np.int64)
    sizes = np.zeros(labels.size, np.int64)
    sizes[1:] = np.concatenate([np.load(job.path("blocks", f"{i}.npz"))["sizes"] for i in range(len(counts))]
                               or [np.zeros(0, np.int64)])
    totals = np.bincount(labels, weights=sizes, minlength=int(labels.max()) + 1)
    keep = totals > 0
    keep[0] = False
    keep &= totals >= job.min_size
    if job.max_size:
        keep &= totals <= job.max_size
    new = np.zeros(totals.size, np.int64)
    new[keep] = np.arange(1, int(keep.sum()) + 1)
    lookup = new[labels]
    tmp = path.with_name(".lookup.tmp.npy")
    np.save(tmp, lookup)
    os.replace(tmp, path)
    return lookup


def write_block(job: Job, out: str, i: int, lookup: np.ndarray | None = None) -> dict:
    """Step 4 for block ``i`` of the image grid: final ids into the zarr array at ``out``."""
    import zarr

    if (info := done(job, "write", i)) is not None:
        return info
    counts = json.loads(job.path("counts.json").read_text())
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    lookup = np.load(job.path("lookup.npy"), mmap_mode="r") if lookup is None else lookup
    shape, full = job.volume.shape, job.scaled
    region = block_region(i, shape, job.block)
    idx = [np.arange(r.start, r.stop) for r in region]
    for a in range(-job.ndim, 0):
        if full[a] != shape[a]:
            idx[a] = nearest_index(region[a], full[a], shape[a])
    src = tuple(slice(int(ix.min()), int(ix.max()) + 1) for ix in idx)
    frag = np.asarray(zarr.open_array(str(job.path("fragments.zarr")), mode="r")[src], np.int64)
    frag = frag[np.ix_(*[ix - s.start for ix, s in zip(idx, src)])]
    # the fragment block each pixel came from, for its id offset
    bidx = np.ravel_multi_index(np.meshgrid(*[ix // b for ix, b in zip(idx, job.block)], indexing="ij"),
                                grid(full, job.block))
    gid = np.where(frag > 0, offsets[bidx] + frag, 0)
    labels = np.asarray(lookup)[gid]
    arr = zarr.open_array(out, mode="r+")
    arr[region] = labels.astype(arr.dtype)
    info = {"objects": int(np.unique(labels[labels > 0]).size)}
    mark(job, "write", i, info)
    return info
